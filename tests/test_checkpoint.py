"""Checkpoints refuse hostile and damaged files in seconds, with one sentence each: a code
payload (which must never run), pickle bombs, foreign dictionaries, configs that are not
minillm's, steps beyond the run, NaN and infinite weights, changed or added files; and a full disk
while saving leaves the previous checkpoint usable."""

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from minillm import checkpoint, rundir
from tests.test_rundir import small_disk

SECONDS = 10  # every refusal comes well within this (loose: shared CI machines are slow)


def _state(step: int = 3) -> dict:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return {
        "step": step,
        "data": {"position": 7},
        "rng": checkpoint.rng_state(),
        "engine": {"optimizer": optimizer.state_dict()},
    }


def _save(run_dir: Path, step: int = 3, model: nn.Module | None = None) -> Path:
    config = {"model": {"n_layer": 1}, "max_iters": 10}
    return checkpoint.save(run_dir, step, model or nn.Linear(4, 3), _state(step), config)


@pytest.fixture
def saved(tmp_path) -> Path:
    return _save(tmp_path / "run")


class _WritesAMarker:
    """A real code payload: unpickling it calls `Path.touch` on the marker."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def payload(tmp_path):
    _WritesAMarker.marker = tmp_path / "PWNED"
    yield _WritesAMarker()
    assert not _WritesAMarker.marker.exists(), "the payload ran"


def _refused(call, match: str) -> str:
    start = time.process_time()  # CPU time: a busy machine does not inflate it
    with pytest.raises(checkpoint.CheckpointError, match=match) as refused:
        call()
    assert time.process_time() - start < SECONDS
    return str(refused.value)


# -- what a save writes ----------------------------------------------------------------------


def test_a_save_lists_every_file_with_its_sha256_in_the_manifest(saved):
    import hashlib
    import json

    manifest = json.loads((saved / checkpoint.MANIFEST).read_text())
    assert set(manifest["files"]) == {checkpoint.WEIGHTS, checkpoint.STATE, checkpoint.CONFIG}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((saved / name).read_bytes()).hexdigest() == digest
    checkpoint.verify(saved)  # passes on what was written
    assert checkpoint.load_state(saved)["step"] == 3


def test_a_folder_without_a_manifest_is_not_a_checkpoint(saved):
    (saved / checkpoint.MANIFEST).unlink()  # a save killed before its last write
    assert checkpoint.list_checkpoints(saved.parent.parent) == []
    _refused(lambda: checkpoint.verify(saved), "is incomplete")


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "add", "manifest", "huge"])
def test_changed_removed_or_added_files_are_named(saved, damage):
    state = saved / checkpoint.STATE
    if damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 1
        state.write_bytes(bytes(data))
        match = r"state\.pt has changed since it was saved"
    elif damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
        match = r"state\.pt has changed since it was saved"
    elif damage == "remove":
        state.unlink()
        match = r"state\.pt is missing"
    elif damage == "add":
        (saved / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
        match = "is not listed in the checkpoint's manifest"
    elif damage == "manifest":
        (saved / checkpoint.MANIFEST).write_text("{not json")
        match = "unreadable"
    else:
        (saved / checkpoint.MANIFEST).write_bytes(b" " * (2 << 20))
        match = "too large to be a checkpoint manifest"
    _refused(lambda: checkpoint.verify(saved), match)


# -- hostile state files --------------------------------------------------------------------


def test_a_code_payload_in_the_state_never_runs(saved, payload):
    torch.save({**_state(), "engine": {"optimizer": payload}}, saved / checkpoint.STATE)
    _refused(lambda: checkpoint.load_state(saved), "not a minillm training state")
    _refused(lambda: checkpoint.verify(saved), "has changed since it was saved")


def test_a_plain_pickle_payload_never_runs(saved, payload):
    (saved / checkpoint.STATE).write_bytes(pickle.dumps(payload))
    _refused(lambda: checkpoint.load_state(saved), "not a minillm training state")


def _laughs(levels: int) -> list:
    """A billion-laughs state: each level holds the one below twice, by reference, so the file
    is small but walking it would take 2**levels steps."""
    node: list = ["lol"]
    for _ in range(levels):
        node = [node, node]
    return node


def test_a_pickle_bomb_of_shared_references_is_refused_in_seconds(saved):
    torch.save({**_state(), "engine": {"optimizer": _laughs(25)}}, saved / checkpoint.STATE)
    assert (saved / checkpoint.STATE).stat().st_size < 100_000
    _refused(lambda: checkpoint.load_state(saved), "holds more than 100,000 items")


def test_deepspeed_files_are_read_weights_only_and_bounded(tmp_path, payload):
    from minillm.engines.deepspeed import load_file_weights_only

    plain = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19"}, plain)
    assert load_file_weights_only(plain)["module"]["w"].tolist() == [1.0, 1.0]
    for content, match in (
        ({"module": {}, "client_state": payload}, "is not a DeepSpeed checkpoint file"),
        ({"module": _laughs(25)}, "holds more than 100,000 items"),
    ):
        torch.save(content, plain)
        _refused(lambda: load_file_weights_only(plain), match)


def test_deeply_nested_state_is_refused(saved):
    nested: dict = {}
    for _ in range(200):
        nested = {"x": nested}
    torch.save({**_state(), "engine": nested}, saved / checkpoint.STATE)
    _refused(lambda: checkpoint.load_state(saved), "nests deeper than 32 levels")


@pytest.mark.parametrize(
    "state, match",
    [
        ({"model": "weights", "epoch": 4}, r"missing step, data, rng"),
        ([1, 2, 3], "it holds a list, not a mapping"),
        ({"step": "3", "data": {}, "rng": {}}, "malformed step"),
        ({"step": 3, "data": [], "rng": {}}, "malformed data"),
    ],
)
def test_a_foreign_dictionary_is_refused(saved, state, match):
    torch.save(state, saved / checkpoint.STATE)
    _refused(lambda: checkpoint.load_state(saved), match)


def test_a_step_beyond_max_iters_is_refused(saved):
    state = checkpoint.load_state(saved)
    _refused(lambda: checkpoint.check_state({**state, "step": 50}, saved, max_iters=10), "step 50")
    _refused(lambda: checkpoint.check_state({**state, "step": -1}, saved), "outside 0..")
    checkpoint.check_state(state, saved, max_iters=3)  # the last step itself is fine


# -- configs and weights ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("- model\n- n_layer\n", "must hold a mapping of config sections, got list"),
        ("just text\n", "got str"),
        ("max_iters: 10\n", "has no model section"),
        ("model: 3\n", "has no model section"),
        ("model: [unclosed\n", "cannot read"),
    ],
)
def test_a_config_that_is_not_minillms_is_refused(saved, text, match):
    (saved / checkpoint.CONFIG).write_text(text)
    _refused(lambda: checkpoint.load_config(saved), match)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinite_weights_are_refused(tmp_path, bad):
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.bias[1] = bad
    folder = _save(tmp_path / "run", model=model)
    kind = "NaN" if bad != bad else "infinite"
    message = _refused(lambda: checkpoint.load_weights(folder, nn.Linear(4, 3)), kind)
    assert "in bias" in message and "diverged" in message


# -- a full disk while saving ---------------------------------------------------------------


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    small, big = nn.Linear(4, 3), nn.Linear(256, 256)  # the second save does not fit
    with small_disk(run, size_kb=128) as kind:
        first = _save(run, 2, small)
        start = time.process_time()  # CPU time: a busy machine does not inflate it
        with pytest.raises(rundir.RunFolderError, match="no space left to write") as full:
            checkpoint.save(run, 4, big, _state(4), {"model": {}})
        assert time.process_time() - start < SECONDS
        assert f"the last complete checkpoint, {first}, is intact" in str(full.value), kind
        assert checkpoint.list_checkpoints(run) == [first]
        assert [p.name for p in (run / "checkpoints").iterdir()] == [first.name]  # no temp left
        checkpoint.verify(first)
        assert checkpoint.load_state(first)["step"] == 2
        checkpoint.load_weights(first, nn.Linear(4, 3))


def test_the_manifest_is_written_atomically(saved):
    before = (saved / checkpoint.MANIFEST).read_bytes()
    checkpoint.write_manifest(saved)
    assert (saved / checkpoint.MANIFEST).read_bytes() == before
    assert not [p for p in os.listdir(saved) if p.endswith(".tmp")]
    yaml.safe_load((saved / checkpoint.CONFIG).read_text())  # the config stays plain YAML

"""minillm.data's token streams: the on-disk token cache, the train/val split, and the batch
sampler (shift by one, determinism, exact resume, errors)."""

import hashlib
import io
import json

import numpy as np
import pytest
import torch

from minillm.data import (
    CORPORA,
    Corpus,
    TokenBatchSampler,
    cached_path,
    load_tokens,
    token_dtype,
    tokens_path,
    train_val_split,
)
from minillm.errors import InputError, InputTypeError
from minillm.tokenizer import BPETokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch) -> str:
    """A registered corpus named 'tiny' already in a temporary data cache."""
    raw = TEXT.encode()
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path))
    monkeypatch.setitem(
        CORPORA,
        "tiny",
        Corpus(
            name="tiny",
            url="http://127.0.0.1:9/never-fetched",
            sha256=hashlib.sha256(raw).hexdigest(),
            size=len(raw),
            filename="input.txt",
            description="a test corpus",
        ),
    )
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "input.txt").write_bytes(raw)
    return "tiny"


def _counting(tok: BPETokenizer, monkeypatch) -> list[str]:
    """Record every text `tok.encode` is called with."""
    calls = []
    encode = tok.encode

    def counted(text, **kwargs):
        calls.append(text)
        return encode(text, **kwargs)

    monkeypatch.setattr(tok, "encode", counted)
    return calls


def test_token_cache_lies_beside_the_corpus_and_a_second_load_does_not_re_encode(
    tiny_corpus, monkeypatch
):
    tok = BPETokenizer.train(TEXT, 300)
    calls = _counting(tok, monkeypatch)
    ids = load_tokens(tiny_corpus, tok, progress=False)
    path = tokens_path(tiny_corpus, tok)
    assert path.parent == cached_path(tiny_corpus).parent and path.is_file()
    assert CORPORA["tiny"].sha256[:16] in path.name and tok.fingerprint[:16] in path.name
    assert ids.dtype == np.uint16 and tok.decode(ids) == TEXT and len(calls) == 1
    written = path.stat().st_mtime_ns

    again = load_tokens(tiny_corpus, tok, progress=False)
    assert len(calls) == 1, "the cached ids were encoded again"
    assert path.stat().st_mtime_ns == written
    np.testing.assert_array_equal(again, ids)


def test_another_tokenizer_gets_its_own_cache_file(tiny_corpus):
    small, large = BPETokenizer.train(TEXT, 280), BPETokenizer.train(TEXT, 320)
    assert tokens_path(tiny_corpus, small) != tokens_path(tiny_corpus, large)
    assert len(load_tokens(tiny_corpus, large)) < len(load_tokens(tiny_corpus, small))


def test_token_dtype_is_the_smallest_that_fits():
    assert token_dtype(512) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.int32


def test_split_keeps_the_first_part_for_training_and_the_last_for_validation():
    ids = np.arange(1000)
    train, val = train_val_split(ids)
    assert (len(train), len(val)) == (900, 100)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    train, val = train_val_split(ids, val_fraction=0.25)
    assert train[-1] == 749 and val[0] == 750


@pytest.mark.parametrize(
    "fraction, error",
    [(0, InputError), (1.0, InputError), (-0.1, InputError), ("0.1", InputTypeError)],
)
def test_split_rejects_fractions_outside_zero_to_one(fraction, error):
    with pytest.raises(error, match="val_fraction"):
        train_val_split(np.arange(100), fraction)


def test_split_of_too_few_tokens_is_an_error():
    with pytest.raises(InputError, match="3 tokens are too few"):
        train_val_split(np.arange(3), 0.1)


def test_batches_are_windows_with_targets_shifted_by_one():
    """With ids 0..999 a window starting at s is s, s+1, ...: so x rows count up by one and
    y = x + 1 exactly."""
    x, y = next(TokenBatchSampler(np.arange(1000, dtype=np.uint16), block_size=16, batch_size=8))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], x[:, :-1] + 1)
    torch.testing.assert_close(y, x + 1)
    assert int(y.max()) <= 999


def test_batches_of_real_tokens_are_windows_of_the_stream(tiny_corpus):
    ids = load_tokens(tiny_corpus, BPETokenizer.train(TEXT, 300))
    windows = {tuple(w) for w in np.lib.stride_tricks.sliding_window_view(ids, 33).tolist()}
    sampler = TokenBatchSampler(ids, 32, 4, seed=3)
    for _ in range(5):
        x, y = next(sampler)
        torch.testing.assert_close(y[:, :-1], x[:, 1:])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert tuple(row) in windows


def test_a_stream_one_token_longer_than_a_block_has_one_window():
    x, y = next(TokenBatchSampler(np.arange(9), block_size=8, batch_size=2))
    torch.testing.assert_close(x, torch.arange(8).repeat(2, 1))
    torch.testing.assert_close(y, torch.arange(1, 9).repeat(2, 1))


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    ids = np.arange(10_000)

    def batches(seed):
        sampler = TokenBatchSampler(ids, 64, 8, seed=seed)
        return torch.stack([next(sampler)[0] for _ in range(4)])

    torch.testing.assert_close(batches(0), batches(0))
    assert not torch.equal(batches(0), batches(1))


def test_resuming_from_a_saved_state_continues_exactly():
    """Checkpoint after 5 batches (through torch.save, as a training checkpoint would), then a
    fresh sampler that loads it gives bitwise the batches the first one gives next."""
    ids = np.random.default_rng(0).integers(0, 512, size=5_000).astype(np.uint16)
    first = TokenBatchSampler(ids, 32, 4, seed=7)
    for _ in range(5):
        next(first)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    json.dumps(first.state_dict())  # plain ints: fits in any checkpoint format
    expected = [next(first) for _ in range(3)]

    resumed = TokenBatchSampler(ids, 32, 4, seed=0)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for (x, y), (ex, ey) in zip((next(resumed) for _ in range(3)), expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_state_from_a_different_batch_shape_is_refused():
    state = TokenBatchSampler(np.arange(100), 8, 4).state_dict()
    with pytest.raises(InputError, match="batch_size=4, this one has 2"):
        TokenBatchSampler(np.arange(100), 8, 2).load_state_dict(state)
    with pytest.raises(InputError, match="keys"):
        TokenBatchSampler(np.arange(100), 8, 4).load_state_dict({"step": 3})


def test_batches_go_to_the_requested_device():
    x, y = next(TokenBatchSampler(np.arange(100), 8, 2, device="meta"))
    assert x.device.type == y.device.type == "meta"


@pytest.mark.parametrize(
    "ids, block_size, batch_size, error, message",
    [
        (np.arange(10), 10, 2, InputError, r"block_size \(10\) must be smaller than .* \(10\)"),
        (np.arange(10), 4, 0, InputError, "batch_size must be > 0"),
        (np.arange(10), 4, -3, InputError, "batch_size must be > 0"),
        (np.arange(10), 0, 2, InputError, "block_size must be > 0"),
        (np.arange(10), 4, 2.5, InputTypeError, "batch_size must be an integer"),
        (np.linspace(0, 1, 10), 4, 2, InputTypeError, "integer token ids"),
        (np.zeros((2, 10), dtype=int), 4, 2, InputTypeError, "1-D"),
    ],
)
def test_sampler_bad_arguments_give_clear_errors(ids, block_size, batch_size, error, message):
    with pytest.raises(error, match=message):
        TokenBatchSampler(ids, block_size, batch_size)

"""Per-rank memory measured inside real DeepSpeed (chapter 09), on two processes.

One launch runs `ds_memory.census_worker` (ZeRO 0-3, fp32) with `ds_memory.engine_state_bytes`
wrapped so that, at the same moment, it also sums every tensor alive in the rank: the census must
account for all of them, or the test names what it leaves out.
"""

import gc

import pytest
import torch

from minillm.engines import ds_memory
from minillm.memory import STATE_PARTS
from minillm.model import GPT, GPTConfig
from minillm.parallel.launch import launch
from minillm.parallel.zero import zero_state_bytes

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)  # vocabulary 65
N = GPT(CONFIG).num_parameters()  # 28,064: each tensor is even, so nothing is padded on 2 ranks
PART = N // 2  # one rank's partition
STAGES = range(4)


def _live_bytes() -> int:
    """Bytes of every float tensor alive in this process, each storage once. Left out, as the
    census leaves them out: 0-d scalars such as AdamW's step counters, and the storage-less
    "meta" tensors ZeRO-1/2 keep to remember shapes."""
    gc.collect()  # the engines of the earlier stages linger in reference cycles until collected
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in gc.get_objects()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0 and not t.is_meta
    }
    return sum(storages.values())


def _buffer_bytes(optimizer) -> dict[str, int]:
    """The bytes of the flat gradient-partition buffer and reduce buckets a ZeRO optimizer holds
    (ZeRO-1/2 free theirs at the end of each backward; ZeRO-3 keeps them for the whole run)."""
    found = {}
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if flat is not None:
        found["grad_partitions_flat_buffer"] = flat.untyped_storage().nbytes()
    for dtype, bucket in getattr(optimizer, "ipg_buckets", {}).items():
        buffers = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        size = sum(b.untyped_storage().nbytes() for b in buffers)
        if size:
            found[f"ipg_buckets[{dtype}].buffer"] = size
    return found


def _census_and_everything_else(rank: int, world_size: int, config: GPTConfig) -> dict:
    """`ds_memory.census_worker`, whose census also reports the bytes alive outside it."""
    census = ds_memory.engine_state_bytes

    def measure(engine) -> dict:
        held = census(engine)
        outside = _live_bytes() - sum(held.values())
        return {**held, "outside the census": outside, "buffers": _buffer_bytes(engine.optimizer)}

    ds_memory.engine_state_bytes = measure  # census_worker looks it up when it measures
    return ds_memory.census_worker(rank, world_size, config)


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    return launch(_census_and_everything_else, 2, CONFIG, echo=False)


def _census(report: dict, stage: int) -> dict[str, int]:
    return {part: report[stage][part] for part in STATE_PARTS}


def test_the_census_equals_the_exact_prediction_on_both_ranks(reports):
    for stage in STAGES:
        predicted = ds_memory.deepspeed_state_bytes(N, stage, 2)
        assert _census(reports[0], stage) == _census(reports[1], stage) == predicted


def test_each_stage_holds_less_and_zero3_holds_half_the_parameters(reports):
    held = [_census(reports[0], stage) for stage in STAGES]
    totals = [sum(h.values()) for h in held]
    assert totals == [16 * N, 12 * N, 12 * N, 10 * N]  # bytes per parameter per rank
    assert totals == sorted(totals, reverse=True)  # ZeRO-1 and -2 tie at the step (see below)
    assert held[0]["parameters"] == 4 * N
    assert held[3]["parameters"] == held[0]["parameters"] // 2 == 4 * PART
    assert held[0]["master_weights"] == 0  # fp32 ZeRO-0: AdamW updates the model itself
    assert [h["optimizer_states"] for h in held] == [8 * N, 8 * PART, 8 * PART, 8 * PART]


def test_the_differences_from_the_16_bytes_rule(reports):
    """DeepSpeed minus the plain fp32 rule (4 + 4 + 0 + 8, sharded by stage): a 4-byte master
    copy of the partition from ZeRO-1 on, and ZeRO-1's gradients already reduced to the
    partition by the time the optimizer steps (it frees the full ones at the end of the
    backward). Both sides speak `STATE_PARTS`."""
    extra = []
    for stage in STAGES:
        held = _census(reports[0], stage)
        rule = zero_state_bytes(N, stage, 2, "fp32")
        extra.append({part: held[part] - rule[part] for part in STATE_PARTS})
    none = dict.fromkeys(STATE_PARTS, 0)
    master = {**none, "master_weights": 4 * PART}
    assert extra == [none, {**master, "gradients": -4 * PART}, master, master]


def test_all_that_is_alive_at_the_step_is_in_the_census_but_two_zero3_buffers(reports):
    """At ZeRO 0-2 the census holds every float tensor alive at the step. ZeRO-3 keeps two
    buffers beside it for the whole run: the flat buffer its gradient partitions accumulate in
    (4/N bytes a parameter; the `.grad` AdamW steps with is a flattened copy of it) and a reduce
    bucket of `reduce_bucket_size` elements (the census worker sizes it to the model)."""
    for report in reports:
        for stage in range(3):
            assert report[stage]["outside the census"] == 0
            assert report[stage]["buffers"] == {}
        zero3 = {
            "grad_partitions_flat_buffer": 4 * PART,
            "ipg_buckets[torch.float32].buffer": 4 * N,
        }
        assert report[3]["buffers"] == zero3
        assert report[3]["outside the census"] == sum(zero3.values())

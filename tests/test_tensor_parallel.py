"""Tensor parallelism on real processes: a GPT split over a tensor group gives the unsplit model's
outputs and gradients, with one all-reduce per block each way."""

import pytest
import torch

from minillm.errors import InputError
from minillm.model import GPT, GPTConfig
from minillm.parallel.launch import launch
from minillm.parallel.layout import Layout
from minillm.parallel.tensor import run_demo, shard

CONFIG = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=65)
EXACT = 1e-12  # float64: only the order of additions differs


def test_shards_of_every_parameter_recombine_into_the_unsplit_one():
    model = GPT(GPTConfig(**CONFIG))
    for name, p in model.named_parameters():
        parts = [shard(name, p, rank, 4) for rank in range(4)]
        if name.endswith(("q_proj.weight", "up_proj.bias", "v_proj.bias")):
            assert parts[0].shape[0] == p.shape[0] // 4
            torch.testing.assert_close(torch.cat(parts, dim=0), p, rtol=0, atol=0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert parts[0].shape[1] == p.shape[1] // 4
            torch.testing.assert_close(torch.cat(parts, dim=1), p, rtol=0, atol=0)
        elif name.endswith(("o_proj.bias", "down_proj.bias", "ln_1.weight", "tok_emb.weight")):
            assert all(part is p for part in parts)  # added once after the sum / replicated


def test_heads_that_do_not_divide_are_refused_before_launch():
    with pytest.raises(InputError, match="3 attention heads cannot be split over tensor"):
        Layout.for_world(2, tensor=2).check_model(n_head=3, n_layer=2)


def _check(results, ranks):
    assert len(results) == ranks
    for r in results:
        assert r["loss_diff"] < EXACT and r["logits_diff"] < EXACT and r["grad_diff"] < EXACT
        assert r["all_reduces_per_layer"] == {"forward": 2, "backward": 2}  # attention + MLP


@pytest.mark.multiprocess
def test_two_ranks_match_the_unsplit_gpt_with_one_all_reduce_per_block():
    results = launch(run_demo, 2, CONFIG, 2, 4, 0, torch.float64, echo=False)
    _check(results, 2)
    r = results[0]
    # Each rank holds half of every block's matrices; LayerNorms and row biases stay whole.
    assert r["params_unsplit"] / 2 < r["params"] < r["params_unsplit"] / 2 * 1.05


@pytest.mark.multiprocess
def test_tensor_groups_inside_data_groups_match_the_unsplit_gpt_on_the_whole_batch():
    Layout.for_world(4, tensor=2).check_model(n_head=4, n_layer=2, batch_size=4)
    _check(launch(run_demo, 4, CONFIG, 2, 4, 0, torch.float64, echo=False), 4)


@pytest.mark.multiprocess
def test_float32_stays_within_rounding():
    results = launch(run_demo, 2, CONFIG, 2, 4, 0, torch.float32, echo=False)
    assert max(r["grad_diff"] for r in results) < 1e-6
    assert max(r["logits_diff"] for r in results) < 1e-5

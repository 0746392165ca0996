"""Chapter 11's compression methods against independent references: torch's quantize_per_tensor /
per_channel and its pruning utilities, numpy's SVD, float64 hand computations, and the
uncompressed model itself. (Decoding and the KV cache: tests/test_generate.py.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

from minillm import infer
from minillm.errors import InputError
from minillm.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=40, block_size=12, n_layer=3, n_head=4, n_embd=32)


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


# -- quantisation ----------------------------------------------------------------------------


def weights(rows=6, cols=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-2, 0, rows)[:, None]


# torch's quantized tensors are deprecated, but still the reference for the integer codes
OLD_QUANTIZATION_API = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")


@OLD_QUANTIZATION_API
def test_absmax_int8_equals_torch_quantize_per_tensor():
    w = weights()
    qt = infer.quantize(w, 8, "absmax")
    reference = torch.quantize_per_tensor(w, qt.scale.item(), 0, torch.qint8)
    assert torch.equal(qt.q.int() - 128, reference.int_repr().int())
    torch.testing.assert_close(infer.dequantize(qt), reference.dequantize())
    assert qt.scale.item() == pytest.approx(w.abs().max().item() / 127)


@OLD_QUANTIZATION_API
def test_zeropoint_per_channel_equals_torch_quantize_per_channel():
    w = weights() + 0.3  # not centred on zero: what the zero point is for
    qt = infer.quantize(w, 8, "zeropoint", per_channel=True)
    reference = torch.quantize_per_channel(
        w, qt.scale.flatten().double(), qt.zero_point.flatten().long(), 0, torch.quint8
    )
    assert torch.equal(qt.q, reference.int_repr())
    torch.testing.assert_close(infer.dequantize(qt), reference.dequantize())


@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_error_is_at_most_half_a_step_and_4_bits_pack_two_to_a_byte(scheme, bits):
    w = weights(rows=5, cols=7)  # 35 values: odd, so the last byte holds one
    for per_channel in (False, True):
        qt = infer.quantize(w, bits, scheme, per_channel)
        error = (infer.dequantize(qt) - w).abs()
        assert (error <= qt.scale / 2 + 1e-7).all()
        assert qt.q.numel() == (35 if bits == 8 else 18)
    per_tensor = (infer.dequantize(infer.quantize(w, bits, scheme)) - w).abs()
    per_row = (infer.dequantize(infer.quantize(w, bits, scheme, True)) - w).abs()
    assert per_row[0].max() < per_tensor[0].max() / 5  # the row of small weights gains most


def test_quantize_refuses_what_it_cannot_do():
    for kwargs in ({"bits": 3}, {"scheme": "fp8"}):
        with pytest.raises(InputError):
            infer.quantize(weights(), **kwargs)
    with pytest.raises(InputError, match="2-D"):
        infer.quantize(torch.ones(4))


def test_quantized_model_is_smaller_and_close(gpt):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    linear_params = sum(m.weight.numel() for _, m in infer.block_linears(gpt))
    rows = sum(m.out_features for _, m in infer.block_linears(gpt))  # a scale and a zero each
    full = infer.model_bytes(gpt)
    for bits, tolerance in ((8, 0.02), (4, 0.3)):
        small = infer.quantize_model(gpt, bits)
        saved = linear_params * 4 - linear_params * bits // 8 - rows * (4 + 4)
        assert full - infer.model_bytes(small) == saved
        gap = (small(idx)[0] - gpt(idx)[0]).abs().max().item()
        assert 0 < gap < tolerance, bits
        state = small.state_dict()
        assert state["blocks.0.mlp.up_proj.weight_q"].dtype == torch.uint8


# -- pruning --------------------------------------------------------------------------------


def test_global_magnitude_pruning_equals_torch_prune(gpt):
    pruned = infer.magnitude_prune(gpt, 0.5)
    assert pruned.blocks[0].mlp.up_proj.weight.count_nonzero() > 0
    assert infer.sparsity_of(pruned) == pytest.approx(0.5, abs=1e-9)
    reference = GPT(CONFIG)
    reference.load_state_dict(gpt.state_dict())
    params = [(m, "weight") for _, m in infer.block_linears(reference)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.5)
    for (_, ours), (theirs, _) in zip(infer.block_linears(pruned), params, strict=True):
        assert torch.equal(ours.weight == 0, theirs.weight_mask == 0)
    assert infer.sparsity_of(gpt) == 0  # the original is untouched


def test_per_layer_pruning_prunes_each_layer_alike(gpt):
    pruned = infer.magnitude_prune(gpt, 0.3, scope="layer")
    for _, m in infer.block_linears(pruned):
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.3, abs=1 / m.weight.numel())
    for bad in ({"sparsity": 1.0}, {"sparsity": 0.2, "scope": "row"}):
        with pytest.raises(InputError):
            infer.magnitude_prune(gpt, **bad)


def test_pruned_heads_compute_what_masked_heads_compute(gpt):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    heads = {0: [1, 3], 2: [0]}
    pruned = infer.prune_heads(gpt, heads)
    d = CONFIG.head_dim

    def zero(dropped):
        def hook(_module, args):
            x = args[0].clone()
            for h in dropped:
                x[..., h * d : (h + 1) * d] = 0
            return (x,)

        return hook

    handles = [
        gpt.blocks[layer].self_attn.o_proj.register_forward_pre_hook(zero(dropped))
        for layer, dropped in heads.items()
    ]
    with torch.no_grad():
        masked = gpt(idx)[0]
    for h in handles:
        h.remove()
    torch.testing.assert_close(pruned(idx)[0], masked, atol=1e-5, rtol=1e-5)
    per_head = 4 * d * CONFIG.n_embd + 3 * d  # q, k, v rows and o_proj columns, q/k/v biases
    assert gpt.num_parameters() - pruned.num_parameters() == 3 * per_head
    with pytest.raises(InputError, match="no attention"):
        infer.prune_heads(gpt, {1: [0, 1, 2, 3]})


def test_head_importance_is_the_loss_rise_of_pruning_that_head(gpt):
    idx = torch.randint(0, CONFIG.vocab_size, (4, 10))
    rises = infer.head_importance(gpt, idx, idx)
    assert rises.shape == (CONFIG.n_layer, CONFIG.n_head)
    with torch.no_grad():
        base = gpt(idx, idx)[1].item()
        alone = infer.prune_heads(gpt, {1: [2]})(idx, idx)[1].item()
    assert alone - base == pytest.approx(rises[1, 2].item(), abs=1e-5)


def test_drop_layers(gpt):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    torch.testing.assert_close(infer.drop_layers(gpt, [0, 1, 2])(idx)[0], gpt(idx)[0])
    one = infer.drop_layers(gpt, [1])
    assert one.config.n_layer == 1 and len(one.blocks) == 1
    with torch.no_grad():
        x = gpt.tok_emb(idx) + gpt.pos_emb(torch.arange(8))
        by_hand = gpt.lm_head(gpt.ln_f(gpt.blocks[1](x, is_causal=True)))
    torch.testing.assert_close(one(idx)[0], by_hand)
    for bad in ([], [0, 0], [3]):
        with pytest.raises(InputError):
            infer.drop_layers(gpt, bad)


# -- distillation, sharing, low rank ----------------------------------------------------------


def test_distillation_loss_by_hand_in_float64():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5).double(), torch.randn(2, 3, 5).double()
    targets = torch.randint(0, 5, (2, 3))
    t = 2.0
    p_teacher = (teacher / t).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (student / t).log_softmax(-1))).sum(-1).mean()
    ce = F.cross_entropy(student.reshape(-1, 5), targets.reshape(-1))
    loss = infer.distillation_loss(student, teacher, targets, temperature=t, alpha=0.7)
    assert loss.item() == pytest.approx(0.7 * t**2 * kl.item() + 0.3 * ce.item(), rel=1e-12)
    same = infer.distillation_loss(teacher, teacher, targets, temperature=t, alpha=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError):
        infer.distillation_loss(student, teacher, targets, alpha=1.5)


def test_shared_blocks_hold_one_block_of_parameters(gpt):
    shared = infer.share_blocks(gpt)
    block = sum(p.numel() for p in gpt.blocks[0].parameters())
    assert gpt.num_parameters() - shared.num_parameters() == (CONFIG.n_layer - 1) * block
    assert all(b is shared.blocks[0] for b in shared.blocks)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    shared(idx, idx)[1].backward()  # one gradient, summed over the layers that use it
    assert shared.blocks[0].mlp.up_proj.weight.grad is not None


def test_low_rank_is_the_best_approximation_of_its_rank():
    torch.manual_seed(0)
    linear = nn.Linear(12, 9)
    singular = np.linalg.svd(linear.weight.detach().double().numpy(), compute_uv=False)
    for rank in (1, 4, 9):
        two = infer.low_rank(linear, rank)
        w = (two[1].weight @ two[0].weight).detach().double()
        error = torch.linalg.matrix_norm(w - linear.weight.detach().double()).item()
        assert error == pytest.approx(math.sqrt((singular[rank:] ** 2).sum()), abs=1e-5)
        assert sum(p.numel() for p in two.parameters()) == rank * (12 + 9) + 9
    x = torch.randn(3, 12)
    torch.testing.assert_close(infer.low_rank(linear, 9)(x), linear(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError):
        infer.low_rank(linear, 10)


def test_low_rank_model_replaces_the_mlp(gpt):
    small = infer.low_rank_model(gpt, 4)
    assert isinstance(small.blocks[0].mlp.up_proj, nn.Sequential)
    c = CONFIG.n_embd
    saved_per_block = 2 * (4 * c * c - 4 * (c + 4 * c))
    assert gpt.num_parameters() - small.num_parameters() == CONFIG.n_layer * saved_per_block


# -- offload, measuring ---------------------------------------------------------------------------


def test_disk_offloaded_model_computes_the_same_with_one_block_in_memory(gpt, tmp_path):
    offloaded = infer.DiskOffloadedGPT(gpt, tmp_path)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 8))
    torch.testing.assert_close(offloaded(idx), gpt(idx)[0], atol=0, rtol=0)
    files = sorted(tmp_path.glob("block*.safetensors"))
    assert len(files) == CONFIG.n_layer
    assert offloaded.bytes_read == sum(f.stat().st_size for f in files)
    block = infer.model_bytes(gpt.blocks[0])
    assert offloaded.resident_bytes() == infer.model_bytes(gpt) - (CONFIG.n_layer - 1) * block
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 500)
    assert infer.evaluate_loss(offloaded, tokens, 8, 2, 4) == pytest.approx(
        infer.evaluate_loss(gpt, tokens, 8, 2, 4), abs=1e-6
    )


def test_evaluate_loss_uses_the_same_windows_every_time(gpt):
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 300)
    first = infer.evaluate_loss(gpt, tokens, CONFIG.block_size, 2, 4)
    assert first == infer.evaluate_loss(gpt, tokens, CONFIG.block_size, 2, 4)
    assert first == pytest.approx(math.log(CONFIG.vocab_size), rel=0.1)  # an untrained model

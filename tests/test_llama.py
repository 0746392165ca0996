"""Tests of minillm.llama and minillm.hf_llama: RMSNorm against torch.nn.RMSNorm and the formula,
SwiGLU by hand, both rotary pairings and the permutation between them, grouped- and multi-query
attention against transformers' repeat_kv and against multi-head attention with repeated weights,
the model against transformers' LlamaForCausalLM in both directions, generation with the KV cache
against generation without it and against transformers' greedy generate."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig
from transformers.models.llama.modeling_llama import repeat_kv

from minillm.errors import InputError, InputTypeError
from minillm.finetune import SoftPrompt, add_lora, merge_lora
from minillm.generate import generate
from minillm.hf_llama import from_hf, to_hf
from minillm.llama import (
    Llama,
    LlamaAttention,
    LlamaConfig,
    RMSNorm,
    SwiGLU,
    apply_rotary_interleaved,
    half_to_interleaved,
    interleaved_to_half,
    rotary_cos_sin_interleaved,
    share_kv_heads,
    swiglu_hidden_size,
)
from minillm.model import GPT, GPTConfig, KVCache, apply_rotary, rotary_cos_sin
from minillm.sample import load_for_sampling
from minillm.train import Trainer
from minillm.train_config import load_config

# float32 logits of minillm and transformers agree to rounding (measured: at most 8e-7 on logits
# of size 2); float64 comparisons of one implementation with itself to 1e-10.
LOGITS_ATOL = 1e-5
F64_ATOL = 1e-10

IDX = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(2))


def random_llama(dtype=torch.float32, **overrides) -> Llama:
    """A small Llama whose every weight is random (RMSNorm gains too: a gain of 1 would hide one
    that lands in the wrong place)."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = Llama(LlamaConfig(**(sizes | {"rope_base": 500.0} | overrides))).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# -- RMSNorm and SwiGLU ----------------------------------------------------------------------


def test_rms_norm_equals_torch_and_the_formula():
    x = torch.randn(3, 5, 8, dtype=torch.float64) * 4 + 1
    norm = RMSNorm(8, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    theirs = torch.nn.RMSNorm(8, eps=1e-5).double()
    theirs.weight.data.copy_(norm.weight)
    by_hand = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), theirs(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(norm(x), by_hand, rtol=0, atol=1e-12)


def test_rms_norm_keeps_a_half_precision_dtype_and_computes_in_float32():
    x = torch.randn(4, 16) * 300  # x^2 of this size overflows float16's 65504
    norm = RMSNorm(16).half()
    out = norm(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), norm.float()(x.half().float()), rtol=1e-3, atol=1e-3)


def test_swiglu_by_hand():
    """n_embd 1, hidden 1: down(silu(2x) * 3x) at x = 1 is 0.5 * 2 sigmoid(2) * 3."""
    mlp = SwiGLU(1, 1).double()
    with torch.no_grad():
        mlp.gate_proj.weight.fill_(2.0)
        mlp.up_proj.weight.fill_(3.0)
        mlp.down_proj.weight.fill_(0.5)
    expected = 0.5 * (2 / (1 + math.exp(-2))) * 3
    assert mlp(torch.ones(1, 1, 1, dtype=torch.float64)).item() == pytest.approx(expected, 1e-14)
    x = torch.randn(2, 3, 1, dtype=torch.float64)
    gate = 2 * x
    torch.testing.assert_close(mlp(x), 0.5 * gate * torch.sigmoid(gate) * 3 * x)
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def test_swiglu_width_keeps_the_gpt_mlps_weight_count():
    assert swiglu_hidden_size(128) == 352  # 8 * 128 / 3 = 341.3, up to a multiple of 32
    assert swiglu_hidden_size(96, multiple_of=1) == 256  # exactly 8C/3: 3 C h = 2 C 4C
    assert LlamaConfig(n_embd=128).intermediate_size == 352
    assert LlamaConfig(n_embd=128, intermediate_size=100).intermediate_size == 100


# -- rotary positions --------------------------------------------------------------------------


def test_interleaved_rotary_rotates_neighbouring_pairs_by_hand():
    """head_dim 4 at position 1: pair (0, 1) turns by 1 radian, pair (2, 3) by 1/100 (base 1e4)."""
    cos, sin = rotary_cos_sin_interleaved(torch.tensor([1]), 4)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[math.cos(1), math.sin(1), -math.sin(0.01), math.cos(0.01)]])
    out = apply_rotary_interleaved(x, cos.double(), sin.double())
    torch.testing.assert_close(out, expected.double(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rotated_scores_depend_on_relative_position_only(pairing):
    tables = rotary_cos_sin if pairing == "half" else rotary_cos_sin_interleaved
    rotate = apply_rotary if pairing == "half" else apply_rotary_interleaved
    q, k = torch.randn(2, 8, dtype=torch.float64)

    def score(m, n):
        cos, sin = (t.double() for t in tables(torch.tensor([m, n]), 8))
        return (rotate(q[None], cos[:1], sin[:1]) @ rotate(k[None], cos[1:], sin[1:]).T).item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-6)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_the_permutation_between_pairings_is_invertible_and_moves_pair_members():
    w = torch.arange(2 * 6 * 3).reshape(12, 3)  # 2 heads of 6 features
    half = interleaved_to_half(w, n_heads=2)
    assert torch.equal(half_to_interleaved(half, n_heads=2), w)
    # head 0: interleaved rows 0, 2, 4 (first of each pair) then 1, 3, 5; head 1 likewise
    assert half[:, 0].tolist() == [3 * r for r in (0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11)]


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_interleaved_model_equals_half_model_with_permuted_weights(n_kv_head):
    inter = random_llama(torch.float64, rope_pairing="interleaved", n_kv_head=n_kv_head)
    half = Llama(LlamaConfig(**(inter.config.to_dict() | {"rope_pairing": "half"})))
    state = inter.state_dict()
    for i in range(inter.config.n_layer):
        for proj, heads in (("q", 4), ("k", n_kv_head)):
            name = f"blocks.{i}.self_attn.{proj}_proj.weight"
            state[name] = interleaved_to_half(state[name], heads)
    half = half.double().eval()
    half.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(half(IDX)[0], inter(IDX)[0], rtol=0, atol=F64_ATOL)
        unpermuted = Llama(half.config).double().eval()
        unpermuted.load_state_dict(inter.state_dict())
        assert (unpermuted(IDX)[0] - inter(IDX)[0]).abs().max() > 1e-3  # the permutation matters


# -- grouped-query attention -----------------------------------------------------------------


def test_share_kv_heads_equals_transformers_repeat_kv():
    k = torch.randn(2, 3, 5, 4)
    shared = share_kv_heads(k, 4)
    assert torch.equal(shared, repeat_kv(k, 4))
    assert torch.equal(shared[:, 5], k[:, 1])  # query head 5 reads kv head 5 // 4 = 1
    assert share_kv_heads(k, 1) is k


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_grouped_attention_equals_multi_head_with_repeated_key_value_weights(n_kv_head):
    torch.manual_seed(0)
    grouped = LlamaAttention(32, 4, n_kv_head).double()
    full = LlamaAttention(32, 4, 4).double()
    rep, d = 4 // n_kv_head, 8
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            getattr(full, name).weight.copy_(getattr(grouped, name).weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(grouped, name).weight.view(n_kv_head, d, 32)
            getattr(full, name).weight.copy_(w.repeat_interleave(rep, dim=0).reshape(32, 32))
    assert grouped.k_proj.weight.shape == (n_kv_head * d, 32)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    rotary = tuple(t.double() for t in rotary_cos_sin(torch.arange(6), d))
    torch.testing.assert_close(
        grouped(x, rotary=rotary), full(x, rotary=rotary), atol=F64_ATOL, rtol=0
    )


@pytest.mark.parametrize("attention", ["manual", "flash"])
def test_attention_implementations_give_the_same_logits_and_gradients(attention):
    ref = random_llama(torch.float64)
    other = Llama(LlamaConfig(**(ref.config.to_dict() | {"attention": attention}))).double()
    other.load_state_dict(ref.state_dict())
    a, b = ref(IDX, IDX)[1], other.eval()(IDX, IDX)[1]
    torch.testing.assert_close(a, b, rtol=0, atol=F64_ATOL)
    ga = torch.autograd.grad(a, list(ref.parameters()))
    gb = torch.autograd.grad(b, list(other.parameters()))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=F64_ATOL)


# -- transformers' LlamaForCausalLM ----------------------------------------------------------


def random_hf(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = HFLlamaConfig(
        **{
            "vocab_size": 40,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 300.0},
            "rms_norm_eps": 1e-6,
            **overrides,
        }
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize(("n_kv_head", "tie"), [(2, False), (1, True), (4, False)])
def test_to_hf_gives_the_same_logits(pairing, n_kv_head, tie):
    llama = random_llama(rope_pairing=pairing, n_kv_head=n_kv_head, tie_weights=tie)
    hf = to_hf(llama)
    assert isinstance(hf, LlamaForCausalLM) and not hf.training
    assert hf.config.num_key_value_heads == n_kv_head and hf.config.tie_word_embeddings == tie
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, llama(IDX)[0], rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_from_hf_gives_the_same_logits(pairing, n_kv_head):
    hf = random_hf(num_key_value_heads=n_kv_head)
    llama = from_hf(hf, rope_pairing=pairing)
    c = llama.config
    assert (c.n_kv_head, c.intermediate_size, c.rope_base, c.norm_eps) == (n_kv_head, 48, 300, 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(llama(IDX)[0], hf(IDX).logits, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_round_trip_keeps_every_weight_exactly(pairing):
    llama = random_llama(torch.float64, rope_pairing=pairing, dropout=0.1).train()
    hf = to_hf(llama)
    assert hf.dtype == torch.float64 and hf.training
    back = from_hf(hf, rope_pairing=pairing)
    assert back.config == llama.config and back.training
    ours, theirs = llama.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_unmappable_models_get_clear_errors():
    with pytest.raises(InputError, match="hidden_act='gelu'.*attention_bias"):
        from_hf(random_hf(hidden_act="gelu", attention_bias=True))
    with pytest.raises(InputTypeError, match="LlamaForCausalLM, got GPT2LMHeadModel"):
        from_hf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))
    with pytest.raises(InputTypeError, match="to_hf takes a minillm Llama, got GPT"):
        to_hf(GPT(GPTConfig()))
    with pytest.raises(InputError, match="rope_pairing"):
        from_hf(random_hf(), rope_pairing="pairs")


# -- generation and the KV cache -------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_cached_logits_equal_the_full_forward(n_kv_head):
    llama = random_llama(torch.float64, n_kv_head=n_kv_head)
    cache = KVCache(llama.config.n_layer)
    with torch.no_grad():
        full = llama(IDX)[0]
        steps = [llama(IDX[:, :5], cache=cache)[0]]
        steps += [llama(IDX[:, t : t + 1], cache=cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=F64_ATOL)
    k, v = cache.layers[0]
    assert k.shape == v.shape == (3, n_kv_head, 16, 8)  # the cache keeps G heads, not H


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_generate_with_the_cache_equals_without_and_transformers(pairing):
    llama = random_llama(rope_pairing=pairing)
    prompt = IDX[:, :4]
    cached = generate(llama, prompt, 10, temperature=0)
    assert torch.equal(cached, generate(llama, prompt, 10, temperature=0, use_cache=False))
    theirs = to_hf(llama).generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False
    )
    assert torch.equal(cached, theirs)
    # past block_size (16) the window slides: still equal to the uncached reference
    long = generate(llama, prompt, 20, temperature=0)
    assert torch.equal(long, generate(llama, prompt, 20, temperature=0, use_cache=False))


# -- the GPT's interface -----------------------------------------------------------------------


def test_parts_compose_to_the_whole_model_and_checkpointing_keeps_gradients():
    llama = random_llama(torch.float64, n_layer=3)
    first = llama.part([0, 1], tokens=True, positions=True)
    last = llama.part([2], head=True)
    assert isinstance(first, Llama) and "blocks.2.ln_1.weight" in dict(last.named_parameters())
    with torch.no_grad():
        staged = last.head(last.run_blocks(first.run_blocks(first.embed(IDX))))
        torch.testing.assert_close(staged, llama(IDX)[0], rtol=0, atol=0)
    loss = llama(IDX, IDX)[1]
    grads = torch.autograd.grad(loss, list(llama.parameters()))
    llama.set_activation_checkpointing(True)
    again = torch.autograd.grad(llama(IDX, IDX)[1], list(llama.parameters()))
    for a, b in zip(grads, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=F64_ATOL)


def test_no_biases_and_no_weight_decay_on_the_norm_gains():
    llama = random_llama()
    assert not [n for n, _ in llama.named_parameters() if n.endswith("bias")]
    decay, no_decay = llama.param_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    # no decay on the RMSNorm gains (2 per block and ln_f) and the token table, as for the GPT
    kept = {id(p) for p in no_decay["params"]}
    gains = [p for n, p in llama.named_parameters() if ".ln_" in n or n.startswith("ln_f")]
    assert kept == {id(p) for p in gains} | {id(llama.tok_emb.weight)}
    assert len(gains) == 2 * llama.config.n_layer + 1


def test_a_training_step_lowers_the_loss():
    llama = Llama(LlamaConfig(vocab_size=40, block_size=16, n_layer=1, n_embd=32))
    optimizer = llama.configure_optimizers(0.0, 1e-2)
    first = None
    for _ in range(5):
        loss = llama(IDX, IDX.roll(-1, dims=1))[1]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"n_kv_head": 3}, InputError, "divisible by n_kv_head=3"),
        ({"n_kv_head": 0}, InputError, "n_kv_head"),
        ({"n_embd": 36, "n_head": 4, "n_kv_head": 1}, InputError, "must be even"),
        ({"rope_pairing": "pairs"}, InputError, "rope_pairing"),
        ({"attention": "flash", "dropout": 0.1}, InputError, "no attention dropout"),
        ({"intermediate_size": -1}, InputError, "intermediate_size"),
        ({"rope_base": 0.0}, InputError, "rope_base"),
    ],
)
def test_bad_configs_are_refused(changes, error, match):
    with pytest.raises(error, match=match):
        LlamaConfig(**changes)


def test_config_round_trips_and_refuses_gpt_only_keys():
    config = LlamaConfig(n_kv_head=1, rope_pairing="interleaved")
    assert LlamaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="unknown LlamaConfig field.*'bias'"):
        LlamaConfig.from_dict({"bias": True})
    with pytest.raises(InputTypeError, match="Llama takes a LlamaConfig, got GPTConfig"):
        Llama(GPTConfig())


def test_a_saved_folder_loads_with_automodel_and_back(tmp_path):
    llama = random_llama(rope_pairing="interleaved")
    to_hf(llama).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)  # a local folder: no network involved
    assert isinstance(hf, LlamaForCausalLM)
    back = from_hf(hf.eval(), rope_pairing="interleaved")
    with torch.no_grad():
        torch.testing.assert_close(back(IDX)[0], llama(IDX)[0], rtol=0, atol=0)


def test_fine_tuning_tools_take_the_llama():
    """chapter 10's LoRA (merged back exactly) and soft prompt (only the prompt trains)."""
    llama = random_llama(torch.float64)
    wrapped = add_lora(llama, targets=("q_proj", "v_proj", "gate_proj"), r=2)
    assert len(wrapped) == 3 * llama.config.n_layer
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.3)  # zero at the start: make the adapters change something
        adapted = llama(IDX)[0]
        merge_lora(llama)
        torch.testing.assert_close(llama(IDX)[0], adapted, rtol=0, atol=F64_ATOL)
    prompt = SoftPrompt(llama, n_virtual=3)
    loss = prompt(IDX[:, :10], IDX[:, 1:11])[1]
    loss.backward()
    assert prompt.prompt.grad is not None
    assert all(p.grad is None for p in llama.parameters())


REPO = Path(__file__).resolve().parents[1]


def test_the_trainer_trains_resumes_and_samples_a_llama(tmp_path):
    """configs/train/shakespeare_char_llama.yaml at toy size: the Trainer builds a Llama, trains
    it, resumes it from its checkpoint and sampling rebuilds it from the folder."""
    tiny = [
        "model.n_layer=1",
        "model.n_embd=32",
        "model.block_size=16",
        "batch_size=4",
        "eval_interval=10",
        "eval_iters=2",
        "checkpoint_interval=10",
        "sample_tokens=0",
        "optim.warmup_iters=5",
        f"out_dir={tmp_path / 'run'}",
    ]
    path = REPO / "configs/train/shakespeare_char_llama.yaml"
    first = Trainer(load_config(path, [*tiny, "max_iters=10"]), progress=False)
    assert isinstance(first.model, Llama) and isinstance(first.config.model, LlamaConfig)
    first.fit()
    resumed = Trainer(load_config(path, [*tiny, "max_iters=20"]), progress=False)
    resumed.fit()
    model, _ = load_for_sampling(tmp_path / "run")
    assert isinstance(model, Llama) and model.config == resumed.config.model
    for a, b in zip(model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(
        generate(model, prompt, 5, temperature=0),
        generate(resumed.model.eval(), prompt, 5, temperature=0),
    )


@pytest.mark.parametrize("architecture", ["llamma", ["gpt"], None])
def test_a_checkpoint_naming_an_unknown_architecture_is_refused(architecture):
    """A checkpoint config from elsewhere names its architecture; anything but "gpt" or "llama"
    is one InputError listing both, never a KeyError or TypeError."""
    from minillm.engines.common import rebuild_model

    config = {"architecture": architecture, "model": GPTConfig().to_dict()}
    with pytest.raises(InputError, match="gpt, llama"):
        rebuild_model(config, {}, torch.device("cpu"))

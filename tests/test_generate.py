"""Tests of minillm.generate against independent references: a written-out greedy loop over the
uncached forward pass, float64 distributions with and without the KV cache, transformers' logits
warpers, and transformers' GPT2LMHeadModel.generate on the same weights (minillm.hf)."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minillm import checkpoint, cli
from minillm.errors import InputError, InputTypeError
from minillm.generate import filter_logits, generate
from minillm.hf import to_hf
from minillm.model import GPT, GPTConfig, KVCache
from minillm.sample import generate_text
from minillm.tokenizer import CharTokenizer

CONFIG = GPTConfig(vocab_size=40, block_size=12, n_layer=3, n_head=4, n_embd=32)


def gpt(dtype=torch.float32, spread: float | None = None, **overrides) -> GPT:
    """The test GPT in eval mode. `spread`: every weight drawn from N(0, spread), which gives
    peaked predictions (clear greedy choices) instead of the near-uniform ones at initialisation."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CONFIG.to_dict(), **overrides})).to(dtype).eval()
    if spread is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, spread)
    return model


def prompt(rows: int = 2, length: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, CONFIG.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed)
    )


def greedy_reference(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding written out: every step reads the last block_size tokens afresh."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size :])[0][:, -1]
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


def record_last_logits(model: GPT) -> list[torch.Tensor]:
    """Every forward pass's last-position logits, appended to the returned list."""
    seen: list[torch.Tensor] = []
    model.lm_head.register_forward_hook(lambda _m, _args, out: seen.append(out[:, -1].clone()))
    return seen


# -- the KV cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_kv_cache_gives_the_logits_of_the_full_forward_pass(positions):
    model = gpt(positions=positions)
    idx = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    cache = KVCache(CONFIG.n_layer)
    with torch.no_grad():
        full, _ = model(idx)
        first, _ = model(idx[:, :5], cache=cache)
        steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, CONFIG.block_size)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == CONFIG.block_size
    assert cache.nbytes() == 2 * CONFIG.n_layer * 2 * CONFIG.block_size * CONFIG.n_embd * 4
    with pytest.raises(InputError, match="longer than the context"):
        model(idx[:, :1], cache=cache)  # the cache is full


def test_a_filled_cache_takes_one_token_at_a_time():
    model = gpt()
    cache = KVCache(CONFIG.n_layer)
    idx = torch.randint(0, CONFIG.vocab_size, (1, 6))
    model(idx[:, :3], cache=cache)
    with pytest.raises(InputError, match="one new token"):
        model(idx[:, 3:], cache=cache)
    with pytest.raises(InputError, match="KVCache"):
        model(idx, cache=KVCache(1))


# -- greedy decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_greedy_with_and_without_the_cache_equals_the_written_out_loop(positions):
    """Past the context too: 3 x block_size new tokens, and a prompt longer than the context."""
    model = gpt(torch.float64, spread=0.3, positions=positions)
    for idx in (prompt(2, 4), prompt(1, 2 * CONFIG.block_size)):
        n = 3 * CONFIG.block_size
        expected = greedy_reference(model, idx, n)
        assert expected.shape == (idx.shape[0], idx.shape[1] + n)
        assert torch.equal(generate(model, idx, n, temperature=0), expected)
        assert torch.equal(generate(model, idx, n, temperature=0, use_cache=False), expected)


def test_greedy_equals_transformers_gpt2_generate_on_the_same_weights():
    """Within the context: transformers' GPT-2 has block_size positions and no cropping."""
    model = gpt(spread=0.3)
    hf = to_hf(model)
    idx = prompt(3, 4)
    n = CONFIG.block_size - idx.shape[1]
    theirs = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    assert theirs.shape == (3, CONFIG.block_size)
    assert torch.equal(generate(model, idx, n, temperature=0), theirs)
    assert torch.equal(generate(model, idx, n, temperature=0, use_cache=False), theirs)


def test_greedy_ignores_the_sampling_filters_and_top_k_1_is_greedy():
    model = gpt()
    idx = prompt()
    greedy = generate(model, idx, 8, temperature=0)
    assert torch.equal(generate(model, idx, 8, temperature=0, top_k=3, top_p=0.5), greedy)
    assert torch.equal(generate(model, idx, 8, top_k=1, seed=5), greedy)
    assert torch.equal(generate(model, idx, 0), idx)


def test_generation_runs_in_eval_mode_and_restores_the_mode():
    model = gpt(dropout=0.5).train()
    idx = prompt()
    out = generate(model, idx, 6, temperature=0)
    assert model.training
    assert torch.equal(out, generate(model.eval(), idx, 6, temperature=0))  # no dropout either way


# -- stop tokens -----------------------------------------------------------------------------


def test_stop_tokens_end_each_row_and_fill_it_like_transformers():
    model = gpt(spread=0.3)
    idx = prompt(3, 4)
    n = CONFIG.block_size - 4
    free = generate(model, idx, n, temperature=0)
    stop = int(free[0, 6])  # row 0's third new token
    # By hand: a row keeps its first stop token, then holds stop; all stopped ends generation.
    expected = free.clone()
    ends = []
    for row in range(3):
        hits = [j for j in range(4, 4 + n) if free[row, j] == stop]
        if hits:
            expected[row, hits[0] + 1 :] = stop
        ends.append(hits[0] + 1 if hits else 4 + n)
    expected = expected[:, : max(ends)]
    ours = generate(model, idx, n, temperature=0, stop_tokens=stop)
    assert torch.equal(ours, expected)
    assert torch.equal(generate(model, idx, n, temperature=0, stop_tokens=[stop]), ours)
    theirs = to_hf(model).generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=stop,
    )
    assert torch.equal(ours, theirs)


def test_generation_ends_early_once_every_row_has_stopped():
    model = gpt(spread=0.3)
    idx = prompt(1, 4)
    free = generate(model, idx, 6, temperature=0)
    unseen = next(t for t in range(CONFIG.vocab_size) if t not in free)
    out = generate(model, idx, 6, temperature=0, stop_tokens=[unseen, int(free[0, 4])])
    assert torch.equal(out, free[:, :5])  # the first new token is a stop token: one step
    sampled = generate(model, idx, 6, seed=0, stop_tokens=list(range(CONFIG.vocab_size)))
    assert sampled.shape == (1, 5)  # every token stops


# -- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_and_uncached_distributions_are_equal_in_float64(positions):
    """The same seed, and every step's filtered distribution, through 2 x block_size tokens."""
    options = dict(temperature=0.8, top_k=10, top_p=0.9, seed=7)
    n = 2 * CONFIG.block_size
    runs = []
    for use_cache in (True, False):
        model = gpt(torch.float64, positions=positions)
        seen = record_last_logits(model)
        out = generate(model, prompt(), n, use_cache=use_cache, **options)
        runs.append((out, seen))
    (cached, cached_logits), (uncached, uncached_logits) = runs
    assert torch.equal(cached, uncached)
    assert len(cached_logits) == len(uncached_logits) == n
    for a, b in zip(cached_logits, uncached_logits, strict=True):
        p = filter_logits(a, 0.8, 10, 0.9).softmax(-1)
        q = filter_logits(b, 0.8, 10, 0.9).softmax(-1)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        assert torch.equal(p == 0, q == 0)  # the same tokens filtered out


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 5, None), (1.0, None, 0.5), (0.7, 12, 0.9), (1.5, 50, 0.3), (1.0, 1, 0.99)],
)
def test_filtered_distributions_equal_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    theirs = warpers(None, logits.clone()).softmax(-1)
    ours = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert torch.equal(ours == 0, theirs == 0)


def test_each_sampled_token_is_drawn_from_the_warped_distribution():
    """One step, in float64: the token equals torch.multinomial on transformers' warped
    distribution with the same seed."""
    model = gpt(torch.float64)
    idx = prompt(4, 5)
    with torch.no_grad():
        logits = model(idx)[0][:, -1]
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(0.9), TopKLogitsWarper(8), TopPLogitsWarper(0.8)]
    )
    probs = warpers(None, logits).softmax(-1)
    for seed in range(5):
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
        out = generate(model, idx, 1, temperature=0.9, top_k=8, top_p=0.8, seed=seed)
        assert torch.equal(out[:, -1:], expected)


def test_sampling_equals_transformers_gpt2_generate_with_the_same_seed():
    """Float64 weights in both: transformers' temperature, top-k and top-p warpers, then
    torch.multinomial on torch's global generator, which ours uses without seed or generator."""
    model = gpt(torch.float64)
    hf = to_hf(model)
    idx = prompt(3, 4)
    n = CONFIG.block_size - idx.shape[1]
    options = dict(temperature=0.9, top_k=12, top_p=0.85)
    for seed in range(3):
        torch.manual_seed(seed)
        theirs = hf.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=n,
            do_sample=True,
            pad_token_id=0,
            **options,
        )
        torch.manual_seed(seed)
        assert torch.equal(generate(model, idx, n, **options), theirs)


def test_top_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(p):
        return (~filter_logits(logits, top_p=p).isinf()).nonzero()[:, 1].tolist()

    assert kept(0.7) == [0, 1]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert kept(0.5) == [0]
    assert kept(0.96) == [0, 1, 2, 3]
    assert kept(0.01) == [0]  # the most likely token always stays
    assert kept(1.0) == [0, 1, 2, 3]
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"temperature": 0}, {"top_k": 0}):
        with pytest.raises(InputError):
            filter_logits(logits, **bad)


def test_top_k_keeps_only_the_k_most_likely_tokens():
    """At initialisation predictions are near-uniform: without the cut, some of 40 samples would
    almost surely fall outside the 3 best."""
    model = gpt()
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 10, top_k=3, seed=0)
    with torch.no_grad():
        logits = model(out[:, :-1])[0]
    allowed = logits.topk(3, dim=-1).indices  # (B, T, 3): the 3 best at each step
    assert (allowed == out[:, 1:, None]).any(dim=-1).all()


def test_a_seed_makes_sampling_repeatable_without_touching_the_global_rng():
    model = gpt()
    idx = prompt()
    state = torch.get_rng_state()
    first = generate(model, idx, 20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (2, 24) and torch.equal(first[:, :4], idx)
    assert torch.equal(generate(model, idx, 20, seed=3), first)
    assert not torch.equal(generate(model, idx, 20, seed=4), first)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(generate(model, idx, 20, generator=generator), first)
    assert not torch.equal(generate(model, idx, 20, generator=generator), first)  # it advanced
    torch.manual_seed(11)
    from_global = generate(model, idx, 20)
    torch.manual_seed(11)
    assert torch.equal(generate(model, idx, 20), from_global)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_new_tokens": -1}, InputError, "max_new_tokens must be an integer >= 0, got -1"),
        ({"max_new_tokens": 2.5}, InputError, "max_new_tokens must be an integer"),
        ({"max_new_tokens": True}, InputError, "max_new_tokens must be an integer"),
        ({"temperature": -1.0}, InputError, r"temperature must be a number >= 0 \(0 = greedy\)"),
        ({"temperature": math.nan}, InputError, "temperature must be a number >= 0"),
        ({"temperature": math.inf}, InputError, "temperature must be a number >= 0"),
        ({"temperature": "0.5"}, InputError, "temperature must be a number >= 0"),
        ({"top_k": 0}, InputError, "top_k must be > 0"),
        ({"top_k": 2.5}, InputTypeError, "top_k must be an integer"),
        ({"top_p": 0.0}, InputError, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5, "temperature": 0}, InputError, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": math.nan}, InputError, "top_p must be a number in"),
        ({"stop_tokens": 40}, InputError, r"stop token 40 is not a token id in \[0, 40\)"),
        ({"stop_tokens": [3, -1]}, InputError, "stop token -1 is not a token id"),
        ({"stop_tokens": ["a"]}, InputError, "stop token 'a' is not a token id"),
        ({"stop_tokens": 3.5}, InputTypeError, "stop_tokens must be a token id or a list of ids"),
        ({"seed": 1, "generator": torch.Generator()}, InputError, "seed or generator, not both"),
        ({"seed": "1"}, InputTypeError, "seed must be an integer"),
        ({"generator": 3}, InputTypeError, "generator must be a torch.Generator, got int"),
        ({"idx": torch.zeros(1, 3)}, InputTypeError, "integer token ids"),
        ({"idx": torch.zeros(3, dtype=torch.long)}, InputError, r"shape \(batch, seq\)"),
        ({"idx": torch.tensor([[1, 40]])}, InputError, "token id 40 in idx is outside"),
        ({"model": torch.nn.Linear(2, 2)}, InputTypeError, "generate takes a minillm GPT"),
    ],
)
def test_bad_arguments_get_one_clear_sentence(kwargs, error, message):
    args = {"model": gpt(), "idx": prompt(), "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=message):
        generate(args.pop("model"), args.pop("idx"), args.pop("max_new_tokens"), **args)


def test_nan_weights_are_refused_instead_of_sampled():
    model = gpt()
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.weight.fill_(math.nan)
    for temperature in (1.0, 0):
        with pytest.raises(InputError, match="logits contain NaN or infinity"):
            generate(model, prompt(), 3, temperature=temperature, seed=0)


# -- the callers: text, the command line -----------------------------------------------------


@pytest.fixture
def sampleable(tmp_path):
    """A checkpoint folder of a small character-level GPT, as `minillm train` leaves one."""
    tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ,.:\n")
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16
    )
    torch.manual_seed(0)
    model = GPT(config).eval()
    folder = checkpoint.save(
        tmp_path, 1, model, {}, {"model": config.to_dict()}, tokenizer=tokenizer
    )
    return folder, model, tokenizer


def test_minillm_sample_takes_top_p(sampleable, capsys):
    folder, model, tokenizer = sampleable
    args = ["sample", "--checkpoint", str(folder), "--prompt", "king:", "--tokens", "20"]
    assert cli.main([*args, "--top-p", "0.5", "--seed", "2"]) == 0
    expected = generate_text(model, tokenizer, "king:", 20, top_p=0.5, seed=2)
    assert capsys.readouterr().out == expected + "\n"
    assert generate_text(model, tokenizer, "king:", 20, top_p=1.0, seed=2) == generate_text(
        model, tokenizer, "king:", 20, seed=2
    )
    assert cli.main([*args, "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_p must be a number in (0, 1]" in err

"""Generating tokens with the course GPT: the one generation function that every caller uses
(`minillm sample`, `Trainer.sample`, `minillm.sample.generate_text`, `minillm.finetune.answer`,
chapter 11's serving code).

    out = generate(model, idx, 100, temperature=0.8, top_k=50, top_p=0.95, seed=0)

Each step turns the logits of the last position into the next token of every row:

1. greedy when `temperature` is 0 (the most likely token), otherwise
2. logits / temperature: below 1 sharpens the distribution, above 1 flattens it;
3. top-k: only the k most likely tokens stay;
4. top-p (nucleus): only the smallest set of most likely tokens whose probability reaches p;
5. one token drawn from the softmax of what is left.

With the KV cache (`use_cache=True`, the default) the prompt is read once and each later step
feeds only the newest token, reusing the keys and values of the tokens before it
(`minillm.model.KVCache`): n tokens cost O(n) token forwards instead of O(n^2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from minillm.errors import InputError, InputTypeError, require_positive
from minillm.model import GPT, KVCache, check_token_ids


def check_sampling(
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Raise a one-sentence error unless `temperature` is a finite number >= 0 (0 = greedy),
    `top_k` None or an integer >= 1, and `top_p` None or a number in (0, 1]."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        require_positive(top_k, "top_k", integer=True)
    if top_p is not None and (
        isinstance(top_p, bool)
        or not isinstance(top_p, (int, float))
        or not 0 < top_p <= 1  # also refuses NaN
    ):
        raise InputError(f"top_p must be a number in (0, 1] (1 keeps every token), got {top_p!r}")


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """`logits` `(B, V)` for the next token -> the logits to sample from: divided by
    `temperature`, then -inf outside the `top_k` largest and outside the nucleus, the smallest set
    of most likely tokens whose probabilities reach `top_p` (the most likely token always stays).

    `temperature` must be > 0 here: greedy decoding (temperature 0) takes the argmax instead.
    Ties at the k-th largest logit all stay, as in transformers' `TopKLogitsWarper`.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise InputError("filter_logits needs temperature > 0; greedy decoding is the argmax")
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(int(top_k), logits.shape[-1]), dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:  # 1 keeps every token, whatever the rounding of the sum
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the tokens before it already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _stop_ids(stop_tokens: int | Iterable[int], vocab_size: int) -> list[int]:
    ids = [stop_tokens] if isinstance(stop_tokens, int) else stop_tokens
    try:
        ids = list(ids)
    except TypeError:
        got = type(stop_tokens).__name__
        raise InputTypeError(
            f"stop_tokens must be a token id or a list of ids, got {got}"
        ) from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise InputError(f"stop token {i!r} is not a token id in [0, {vocab_size})")
    return ids


def _sampling_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise InputError("give seed or generator, not both: a seed makes a fresh generator")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputTypeError(f"seed must be an integer, got {seed!r}")
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            got = type(generator).__name__
            raise InputTypeError(f"generator must be a torch.Generator, got {got}")
        if generator.device.type != device.type:
            raise InputError(
                f"the generator is on {generator.device} but the model on {device}; "
                f"make it with torch.Generator(device={str(device)!r})"
            )
    return generator


@torch.no_grad()
def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue each prompt row of `idx` by up to `max_new_tokens` tokens.

    Args:
        model: a `minillm.model.GPT`; it runs in eval mode (no dropout) and is put back in the
            mode it was in.
        idx: `(B, T)` prompt token ids on the model's device, every row T >= 1 tokens long.
        max_new_tokens: how many tokens to append (>= 0).
        temperature: 0 for greedy decoding (then `top_k` and `top_p` change nothing), otherwise
            the divisor of the logits before sampling.
        top_k: sample among the `top_k` most likely tokens only.
        top_p: sample among the smallest set of most likely tokens whose probability reaches
            `top_p` (nucleus sampling); 1 keeps every token.
        stop_tokens: a token id or ids that end a row. A row that produced one keeps it and is
            filled with `stop_tokens[0]` until every row has stopped, then generation ends early
            (transformers' convention when the end token is also the padding token).
        seed: sample with a fresh `torch.Generator` seeded with it: the same seed gives the same
            tokens. Without `seed` or `generator`, torch's global random state is used.
        generator: a `torch.Generator` on the model's device, advanced by the sampling.
        use_cache: keep every layer's keys and values (`KVCache`) and feed one new token per
            step; False reruns the whole window each step (the reference the cache must equal).

    Returns:
        `(B, T + n)` token ids, the prompt first, n <= max_new_tokens (fewer only when every row
        stopped).

    The model reads at most its `block_size` last tokens: a longer prompt, or a sequence that
    grows past the context, is cropped to its last block_size tokens for every step. From then
    on the cache is rebuilt from the window each step, so the cache gives no speed-up there: a
    cached key depends on its position and on earlier tokens that have left the window.
    """
    if not isinstance(model, GPT):
        raise InputTypeError(f"generate takes a minillm GPT, got {type(model).__name__}")
    c = model.config
    check_token_ids(idx, c.vocab_size, block_size=None)  # longer prompts are cropped below
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    stop = _stop_ids(stop_tokens, c.vocab_size)
    device = next(model.parameters()).device
    if idx.device != device:
        raise InputError(f"idx is on {idx.device} but the model on {device}; use idx.to({device})")
    generator = _sampling_generator(seed, generator, device)

    was_training = model.training
    model.eval()
    try:
        stop_ids = torch.tensor(stop, dtype=idx.dtype, device=device)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model(idx[:, -c.block_size :])
            elif cache is None or cache.length == c.block_size:  # empty, or no room for one more
                cache = KVCache(c.n_layer)
                logits, _ = model(idx[:, -c.block_size :], cache=cache)
            else:
                logits, _ = model(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :]  # (B, V): only the last position predicts a new token
            if not torch.isfinite(logits).all():
                raise InputError(
                    "the model's logits contain NaN or infinity: its weights are damaged or "
                    "overflowed; load a checkpoint saved before the loss went NaN"
                )
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                # Sample in at least float32: half-precision probabilities are too coarse.
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            if stop:
                next_id = next_id.masked_fill(finished[:, None], stop[0])
                finished |= torch.isin(next_id[:, 0], stop_ids)
            idx = torch.cat((idx, next_id), dim=1)
            if stop and finished.all():
                break
    finally:
        model.train(was_training)
    return idx

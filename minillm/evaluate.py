"""Evaluation beyond validation loss: multiple-choice accuracy by log-likelihood, and perplexity.

Multiple choice is scored the way HellaSwag is (Zellers et al., 2019; EleutherAI's
lm-evaluation-harness): for each item, the model reads the context followed by each option and
the option whose tokens it finds most likely wins. Nothing is generated, so any language model
can take the test. Three scores rank the options:

- `sum`: the total log-probability of the option's tokens (`acc` in the harness). It favours
  short options, since every token can only lower it;
- `per_token`: that total divided by the option's token count;
- `per_char`: divided by the option's length in characters (`acc_norm` in the harness), which,
  unlike the token count, does not depend on the tokenizer. The course's headline score.

A context longer than the model reads is cut on the left (its most recent tokens are kept), as
the harness does; an option longer than the whole context window is an error.

`continuation_task` builds such a task from a text, reproducibly: a passage, its true
continuation, and continuations taken from elsewhere in the text as distractors.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minillm.errors import InputError, InputTypeError, require_positive, require_text
from minillm.tokenizer import Tokenizer

NORMALISATIONS = ("sum", "per_token", "per_char")


@dataclass(frozen=True)
class MultipleChoice:
    """One item: `context`, the `options` that could follow it, and the index of the true one."""

    context: str
    options: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        require_text(self.context, "context")
        if isinstance(self.options, str) or len(self.options) < 2:
            raise InputError(
                f"a multiple-choice item needs at least 2 options, got {self.options!r}"
            )
        for i, option in enumerate(self.options):
            if not isinstance(option, str) or not option:
                raise InputError(f"option {i} must be a non-empty str, got {option!r}")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise InputTypeError(f"answer must be an option's index, got {self.answer!r}")
        if not 0 <= self.answer < len(self.options):
            raise InputError(
                f"answer {self.answer} is not an option's index (0 to {len(self.options) - 1})"
            )


@dataclass(frozen=True)
class OptionScore:
    """What the model thinks of one option: its summed log-probability and its lengths."""

    logprob: float  # sum of log p(token | everything before it) over the option's tokens
    n_tokens: int
    n_chars: int

    def score(self, normalisation: str) -> float:
        if normalisation == "sum":
            return self.logprob
        if normalisation == "per_token":
            return self.logprob / self.n_tokens
        if normalisation == "per_char":
            return self.logprob / self.n_chars
        raise InputError(f"normalisation must be one of {', '.join(NORMALISATIONS)}")


def _logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def _option_rows(
    tokenizer: Tokenizer, block_size: int, context: str, options: Sequence[str]
) -> list[tuple[list[int], int, list[int]]]:
    """Per option: the input ids (encoded context, then the option, less its last token), the
    position that predicts the option's first token, and the option's ids. The context keeps its
    last block_size - len(option) tokens at most."""
    if isinstance(options, str) or not options:
        raise InputError(f"options must be a non-empty list of strings, got {options!r}")
    context_ids = tokenizer.encode(require_text(context, "context"))
    if not context_ids:
        raise InputError("the context is empty: the first option token needs something before it")
    rows = []
    for i, option in enumerate(options):
        option_ids = tokenizer.encode(require_text(option, f"options[{i}]"))
        if not option_ids:
            raise InputError(f"option {i} is empty: there is nothing to score")
        if len(option_ids) > block_size:
            raise InputError(
                f"option {i} is {len(option_ids)} tokens, more than the model reads "
                f"(block_size={block_size}); shorten the options"
            )
        kept = context_ids[-(block_size + 1 - len(option_ids)) :]  # left-truncation
        rows.append(((kept + option_ids)[:-1], len(kept) - 1, option_ids))
    return rows


@torch.no_grad()
def _score_rows(model: nn.Module, rows: list[tuple[list[int], int, list[int]]]) -> list[float]:
    """The summed log-probability of each row's option, from one forward pass over all rows,
    right-padded (causal attention never looks right, so padding needs no mask)."""
    width = max(len(ids) for ids, _, _ in rows)
    device = next(model.parameters()).device
    idx = torch.tensor([ids + [0] * (width - len(ids)) for ids, _, _ in rows], device=device)
    logits = _logits(model, idx)
    # Every option token at once: its row, the position that predicts it, and its id. Only those
    # positions' distributions are normalised (a whole batch's, in float64, would not fit for a
    # large vocabulary).
    owner = [row for row, (_, _, option_ids) in enumerate(rows) for _ in option_ids]
    at = [first + k for _, first, option_ids in rows for k in range(len(option_ids))]
    targets = torch.tensor([t for _, _, option_ids in rows for t in option_ids], device=device)
    owner_t = torch.tensor(owner, device=device)
    logp = F.log_softmax(logits[owner_t, torch.tensor(at, device=device)].double(), dim=-1)
    picked = logp[torch.arange(len(targets), device=device), targets]
    totals = torch.zeros(len(rows), dtype=logp.dtype, device=device).index_add_(0, owner_t, picked)
    return totals.tolist()


def score_options(
    model: nn.Module, tokenizer: Tokenizer, context: str, options: Sequence[str]
) -> list[OptionScore]:
    """The log-probability `model` gives each option as the continuation of `context`.

    Each option is encoded on its own and appended to the encoded context (so that every option
    is scored on the same context tokens); its tokens are scored by one forward pass, all
    options in one batch. The context keeps its last block_size - len(option) tokens at most.
    """
    rows = _option_rows(tokenizer, model.config.block_size, context, options)
    if hasattr(model, "eval"):
        model.eval()
    return _option_scores(_score_rows(model, rows), rows, options)


def _option_scores(totals, rows, options: Sequence[str]) -> list[OptionScore]:
    return [
        OptionScore(total, len(option_ids), len(option))
        for total, (_, _, option_ids), option in zip(totals, rows, options, strict=True)
    ]


@dataclass(frozen=True)
class MultipleChoiceResult:
    """Accuracy under each normalisation, over `n_items` items of `n_options` options each."""

    accuracy: dict[str, float]
    n_items: int
    n_options: int

    @property
    def chance(self) -> float:
        return 1 / self.n_options


def predicted(scores: Sequence[OptionScore], normalisation: str) -> int:
    """The winning option's index; a tie goes to the first of the tied options (numpy's argmax,
    as the harness does), so a tie is only right when the answer comes first."""
    return int(np.argmax([s.score(normalisation) for s in scores]))


def multiple_choice_accuracy(
    model: nn.Module,
    tokenizer: Tokenizer,
    items: Iterable[MultipleChoice],
    items_per_batch: int = 32,
) -> MultipleChoiceResult:
    """The share of `items` whose true option `model` ranks first, by each normalisation."""
    items = list(items)
    if not items:
        raise InputError("no items to score")
    require_positive(items_per_batch, "items_per_batch", integer=True)
    if hasattr(model, "eval"):
        model.eval()
    right = dict.fromkeys(NORMALISATIONS, 0)
    # Items a batch at a time: one forward pass per item costs more in overhead than in compute.
    for start in range(0, len(items), items_per_batch):
        batch = items[start : start + items_per_batch]
        per_item = [
            _option_rows(tokenizer, model.config.block_size, item.context, item.options)
            for item in batch
        ]
        totals = _score_rows(model, [row for rows in per_item for row in rows])
        for item, rows in zip(batch, per_item, strict=True):
            scores = _option_scores(totals[: len(rows)], rows, item.options)
            totals = totals[len(rows) :]
            for name in NORMALISATIONS:
                right[name] += predicted(scores, name) == item.answer
    n_options = len(items[0].options)
    return MultipleChoiceResult(
        {k: v / len(items) for k, v in right.items()}, len(items), n_options
    )


@torch.no_grad()
def perplexity(model: nn.Module, ids: Sequence[int] | np.ndarray, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per token) of the token stream `ids`.

    The stream is cut into consecutive windows of block_size + 1 tokens that share one token
    (each window's last is the next one's first), so that every token after the first is
    predicted exactly once, from the 1 to block_size tokens before it in its window. (A sliding
    window would give every token a full context, at block_size times the cost.) The leftover
    tokens at the end form one shorter window.
    """
    require_positive(batch_size, "batch_size", integer=True)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 2:
        raise InputError(f"perplexity needs a 1-D stream of at least 2 token ids, got {ids.shape}")
    block_size = model.config.block_size
    device = next(model.parameters()).device
    starts = list(range(0, len(ids) - 1, block_size))
    windows = [ids[s : s + block_size + 1] for s in starts]
    if hasattr(model, "eval"):
        model.eval()
    total, count = 0.0, 0
    for shape in sorted({len(w) for w in windows}, reverse=True):  # full ones, the short one
        same = [w for w in windows if len(w) == shape]
        for k in range(0, len(same), batch_size):
            batch = torch.from_numpy(np.stack(same[k : k + batch_size])).to(device)
            logits = _logits(model, batch[:, :-1]).double()
            total += F.cross_entropy(
                logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


_WORD_START = re.compile(r"(?<=\s)\S")


def continuation_task(
    text: str,
    n_items: int,
    *,
    context_chars: int = 48,
    words: tuple[int, int] = (2, 6),
    n_options: int = 4,
    seed: int = 0,
) -> list[MultipleChoice]:
    """`n_items` items made from `text`: a passage of `context_chars` characters that ends where a
    word begins, its true continuation (the next 2 to 6 words, a random count), and
    `n_options - 1` distractors of 2 to 6 words each taken at other word starts of `text`, at
    least 4 contexts' length away. The true option sits at a random index. Options differ in
    length, which is where length normalisation matters. The same arguments give the same items.
    """
    require_text(text)
    require_positive(n_items, "n_items", integer=True)
    require_positive(context_chars, "context_chars", integer=True)
    if isinstance(n_options, bool) or not isinstance(n_options, int) or n_options < 2:
        raise InputError(f"n_options must be an int >= 2, got {n_options!r}")
    low, high = words
    if not 1 <= low <= high:
        raise InputError(f"words must be (fewest, most) with 1 <= fewest <= most, got {words}")
    starts = [m.start() for m in _WORD_START.finditer(text) if m.start() >= context_chars]
    if len(starts) < 2 * n_options + n_items:
        raise InputError(
            f"the text has {len(starts)} word starts after the first {context_chars} characters: "
            f"too few for {n_items} items of {n_options} options; use a longer text"
        )
    rng = random.Random(seed)

    runs = {n: re.compile(rf"(?:\S+\s+){{{n - 1}}}\S+") for n in range(low, high + 1)}

    def words_from(start: int) -> str:
        """A random count of words from `start`, without the whitespace after the last one."""
        match = runs[rng.randint(low, high)].match(text, start)
        return match.group() if match else text[start:].rstrip()

    items = []
    for position in rng.sample(starts, n_items):
        true = " " + words_from(position) if text[position - 1] == " " else words_from(position)
        context = text[position - context_chars : position]
        context = context[:-1] if context.endswith(" ") else context  # the space joins the option
        options = [true]
        while len(options) < n_options:
            other = rng.choice(starts)
            if abs(other - position) < 4 * context_chars:
                continue
            option = (" " if true.startswith(" ") else "") + words_from(other)
            if option not in options:
                options.append(option)
        answer = rng.randrange(n_options)
        options[0], options[answer] = options[answer], options[0]
        items.append(MultipleChoice(context, tuple(options), answer))
    return items

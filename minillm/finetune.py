"""Fine-tuning the course GPT (chapter 10): everything that starts from a pre-trained model.

1. supervised fine-tuning (SFT): prompt/response pairs, with the loss on the response only;
2. classification: a head on the hidden state of each sequence's last real token;
3. alignment: a reward model (Bradley-Terry loss) and DPO, which needs no reward model;
4. parameter-efficient tuning: LoRA written out, and a soft prompt (prompt tuning / P-tuning);
5. what each costs: trainable parameters and the bytes of training state.

`train_steps` is the one loop every method here trains with: it takes a function that returns the
loss of the next batch, so the methods differ only in their loss and in which parameters train.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.errors import InputError, InputTypeError, require_positive
from minillm.generate import generate
from minillm.memory import bytes_per_value, model_state_bytes
from minillm.model import GPT, IGNORE_INDEX
from minillm.tokenizer import Tokenizer
from minillm.utils import progress_bar

# ---------------------------------------------------------------------------------------------
# 1. Supervised fine-tuning
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One instruction example: the model reads `prompt` and learns to write `response`."""

    prompt: str
    response: str


def sft_tokens(
    prompt_ids: Sequence[int], response_ids: Sequence[int], block_size: int
) -> tuple[list[int], list[int]]:
    """Inputs and targets of one SFT example, for `GPT.forward(inputs, targets)`.

    The sequence is prompt + response; the model reads all of it but one token and predicts the
    next at each position. Only predictions of response tokens are learned: the targets of the
    positions that predict a prompt token are -100, so the prompt conditions the answer without
    being trained on (a model trained on prompts too learns to write questions).
    """
    if not prompt_ids or not response_ids:
        raise InputError("an SFT example needs a non-empty prompt and a non-empty response")
    ids = [*prompt_ids, *response_ids]
    if len(ids) - 1 > block_size:
        raise InputError(
            f"prompt + response is {len(ids)} tokens, but the model reads at most "
            f"block_size + 1 = {block_size + 1}; shorten the example or use a larger block_size"
        )
    targets = ids[1:]
    for i in range(len(prompt_ids) - 1):  # targets[i] is ids[i + 1], still part of the prompt
        targets[i] = IGNORE_INDEX
    return ids[:-1], targets


def pad_batch(rows: Sequence[Sequence[int]], pad_value: int) -> Tensor:
    """Right-pad `rows` to the longest: a `(B, T)` long tensor. Under causal attention a real
    token never attends to padding to its right, so right padding needs no attention mask."""
    width = max(len(r) for r in rows)
    return torch.tensor([[*r, *[pad_value] * (width - len(r))] for r in rows], dtype=torch.long)


def sft_batch(
    examples: Sequence[Example], tokenizer: Tokenizer, block_size: int, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """`(inputs, targets)` for a batch of examples: inputs padded with `pad_id`, targets with
    -100 so that padding adds nothing to the loss."""
    pairs = [
        sft_tokens(tokenizer.encode(e.prompt), tokenizer.encode(e.response), block_size)
        for e in examples
    ]
    return pad_batch([p[0] for p in pairs], pad_id), pad_batch([p[1] for p in pairs], IGNORE_INDEX)


def answer(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 40, stop: str = "\n"
) -> str:
    """The model's greedy continuation of `prompt`, up to the first `stop` text (not included).
    Generation ends at `stop` when it is one token; the text is cut at `stop` in any case (a
    tokenizer may merge it with its neighbours)."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    stop_ids = tokenizer.encode(stop) if stop else []
    one_token = stop_ids if len(stop_ids) == 1 else ()
    out = generate(model, idx, max_new_tokens, temperature=0, stop_tokens=one_token)
    text = tokenizer.decode(out[0, idx.shape[1] :].tolist())
    return text.split(stop)[0] if stop else text


def exact_match(
    model: GPT, tokenizer: Tokenizer, examples: Iterable[Example], stop: str = "\n"
) -> float:
    """Fraction of examples whose greedy answer is exactly the response (its `stop` left off)."""
    examples = list(examples)
    hits = sum(
        answer(model, tokenizer, e.prompt, len(e.response) + 2, stop) == e.response.split(stop)[0]
        for e in examples
    )
    return hits / len(examples)


def train_steps(
    loss_of_next_batch: Callable[[], Tensor],
    parameters: Iterable[nn.Parameter],
    steps: int,
    learning_rate: float,
    *,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    progress: bool = True,
    desc: str = "fine-tuning",
) -> list[float]:
    """Train `parameters` (the ones that require grad) with AdamW for `steps` steps and return
    the loss of each. Whatever module `loss_of_next_batch` runs should be in train mode."""
    require_positive(steps, "steps", integer=True)
    require_positive(learning_rate, "learning_rate")
    trained = [p for p in parameters if p.requires_grad]
    if not trained:
        raise InputError("no parameter requires grad: nothing would be trained")
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=weight_decay)
    losses = []
    bar = progress_bar(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = loss_of_next_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise InputError(f"the loss became {losses[-1]} at step {len(losses)}: lower the rate")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # redrawn by update()
    return losses


def batches_of(items: Sequence, batch_size: int, seed: int = 0) -> Callable[[], list]:
    """A function returning the next `batch_size` items of `items`, reshuffled every epoch."""
    require_positive(batch_size, "batch_size", integer=True)
    rng, order = random.Random(seed), []

    def next_batch() -> list:
        while len(order) < batch_size:
            epoch = list(range(len(items)))
            rng.shuffle(epoch)
            order.extend(epoch)
        return [items[order.pop(0)] for _ in range(batch_size)]

    return next_batch


def instruction_examples(text: str, n: int, seed: int = 0, max_words: int = 3) -> list[Example]:
    """`n` instruction examples made from the corpus's own words, for a character-level model:
    "Shout: <words>" answered with the words in capitals, "Reverse: <words>" with the words in
    reverse order. Each response ends with a newline, the model's signal that it has finished."""
    words = sorted({w for w in re.findall(r"[a-z]+", text) if 2 <= len(w) <= 8})
    if len(words) < 10:
        raise InputError("the text has too few lower-case words to build instruction examples")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        phrase = rng.sample(words, rng.randint(1, max_words))
        if i % 2 == 0:
            examples.append(
                Example(f"Shout: {' '.join(phrase)}\n", " ".join(phrase).upper() + "\n")
            )
        else:
            examples.append(
                Example(f"Reverse: {' '.join(phrase)}\n", " ".join(phrase[::-1]) + "\n")
            )
    return examples


@dataclass(frozen=True)
class Preference:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) response."""

    prompt: str
    chosen: str
    rejected: str


def preference_pairs(examples: Iterable[Example]) -> list[Preference]:
    """Preference pairs for `instruction_examples`: the right answer is chosen; the answer that
    ignores the instruction (the words unchanged) is rejected. Examples whose right answer is the
    unchanged words (a one-word "Reverse") are left out: they have no wrong answer of this kind."""
    pairs = []
    for e in examples:
        unchanged = e.prompt.split(": ", 1)[1]
        if unchanged != e.response:
            pairs.append(Preference(e.prompt, e.response, unchanged))
    return pairs


def question_lines(text: str, n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """A balanced classification set from the corpus: `n` spoken lines with their final mark
    removed, labelled 1 where the line ended in "?" and 0 where it ended in "." (so the label
    must be read from the words, not from the last character)."""
    lines = [line.strip() for line in text.splitlines()]
    by_label = {
        label: sorted(
            {line[:-1] for line in lines if line.endswith(mark) and 12 <= len(line) <= 48}
        )
        for label, mark in ((1, "?"), (0, "."))
    }
    if min(len(v) for v in by_label.values()) < n // 2:
        raise InputError(f"the text has too few lines ending in '?' and '.' for {n} examples")
    rng = random.Random(seed)
    labelled = [(t, label) for label, texts in by_label.items() for t in rng.sample(texts, n // 2)]
    rng.shuffle(labelled)
    return [t for t, _ in labelled], [label for _, label in labelled]


# ---------------------------------------------------------------------------------------------
# 2. Classification
# ---------------------------------------------------------------------------------------------


def last_token_states(hidden: Tensor, lengths: Tensor) -> Tensor:
    """`hidden` `(B, T, C)`, `lengths` `(B,)` real tokens per row -> `(B, C)`: each row's state at
    its last real token. Under causal attention that is the only position that has read the whole
    sequence; position 0 has seen one token, and right padding is never seen at all."""
    if lengths.dim() != 1 or lengths.shape[0] != hidden.shape[0]:
        got = tuple(lengths.shape)
        raise InputError(f"lengths must have shape ({hidden.shape[0]},), got {got}")
    if (lengths < 1).any() or (lengths > hidden.shape[1]).any():
        raise InputError(f"lengths must be in [1, {hidden.shape[1]}], got {lengths.tolist()}")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, lengths.to(hidden.device) - 1]


class SequenceClassifier(nn.Module):
    """A pre-trained GPT with a linear head on one position's hidden state: `n_classes` scores
    per sequence (a reward model is the case `n_classes=1`).

    `pooling="last"` reads each sequence's last real token (right); `"first"` reads position 0,
    the mistake of the seed's classifier (erratum 6), which sees one token of each sequence.
    """

    def __init__(self, gpt: GPT, n_classes: int, pooling: str = "last"):
        super().__init__()
        require_positive(n_classes, "n_classes", integer=True)
        if pooling not in ("last", "first"):
            raise InputError(f"pooling must be 'last' or 'first', got {pooling!r}")
        self.gpt, self.pooling = gpt, pooling
        self.head = nn.Linear(gpt.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """`idx` `(B, T)` right-padded token ids, `lengths` `(B,)` -> scores `(B, n_classes)`."""
        hidden = self.gpt.hidden_states(idx)
        if self.pooling == "first":
            return self.head(hidden[:, 0])
        return self.head(last_token_states(hidden, lengths))


def encode_batch(
    texts: Sequence[str], tokenizer: Tokenizer, block_size: int, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """`(idx, lengths)` of right-padded texts; a text longer than `block_size` is refused."""
    rows = [tokenizer.encode(t) for t in texts]
    for text, row in zip(texts, rows, strict=True):
        if not row or len(row) > block_size:
            raise InputError(
                f"text of {len(row)} tokens does not fit 1..block_size={block_size}: {text[:40]!r}"
            )
    return pad_batch(rows, pad_id), torch.tensor([len(r) for r in rows])


@torch.no_grad()
def accuracy(classifier: SequenceClassifier, idx: Tensor, lengths: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose highest score is the label."""
    classifier.eval()
    return (classifier(idx, lengths).argmax(-1) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# 3. Alignment: a reward model and DPO
# ---------------------------------------------------------------------------------------------


def reward_model_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Bradley-Terry loss of a reward model: -log sigmoid(r_chosen - r_rejected), averaged. It
    only asks the preferred answer to score higher; the rewards' level is free. (RLHF then
    trains the policy with PPO to maximise this reward, kept near the SFT model by a KL term.)"""
    return -F.logsigmoid(chosen - rejected).mean()


def sequence_logprobs(model: GPT, inputs: Tensor, targets: Tensor) -> Tensor:
    """`(B,)`: the log-probability the model gives each row's targets, summed over the
    positions whose target is not -100 (the response, for an SFT-style batch)."""
    logits, _ = model(inputs)
    logp = F.log_softmax(logits.float(), dim=-1)
    kept = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * kept).sum(-1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimisation (Rafailov et al., 2023) from sequence log-probabilities.

    The implicit reward of an answer is beta * (log pi(y|x) - log pi_ref(y|x)); the loss is
    -log sigmoid(reward_chosen - reward_rejected), averaged. Returns the loss and both rewards
    (detached), whose difference is the margin the training widens.
    """
    require_positive(beta, "beta")
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


# ---------------------------------------------------------------------------------------------
# 4. Parameter-efficient tuning: LoRA and soft prompts
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (Hu et al., 2021):

        y = base(x) + (alpha / r) * x A^T B^T,   A: (r, in), B: (out, r)

    B starts at zero, so the adapted model starts as the pre-trained one; A starts random (the
    Kaiming-uniform of `nn.Linear`, as PEFT does), or no gradient would ever reach B.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InputTypeError(f"LoRA adapts an nn.Linear, got {type(base).__name__}")
        require_positive(r, "r", integer=True)
        require_positive(alpha, "alpha")
        if r > min(base.in_features, base.out_features):
            raise InputError(
                f"rank r={r} is larger than the layer's smaller side "
                f"({base.in_features} x {base.out_features}): a full update would be cheaper"
            )
        self.base, self.r, self.scaling = base, r, alpha / r
        base.requires_grad_(False)
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        """The update LoRA adds to the base weight: (alpha / r) B A, `(out, in)`, rank <= r."""
        return self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function: W + (alpha / r) B A, no extra cost at
        inference."""
        b = self.base
        layer = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None)
        layer = layer.to(device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(b.weight + self.delta_weight())
            if b.bias is not None:
                layer.bias.copy_(b.bias)
        return layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(
    model: nn.Module, targets: Sequence[str] = ("q_proj", "v_proj"), r: int = 8, alpha: float = 16
) -> list[str]:
    """Freeze `model` and wrap every `nn.Linear` whose name ends with one of `targets` in a
    `LoRALinear`; returns the wrapped names. Only the LoRA matrices then require grad."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
    ]
    if not names:
        raise InputError(f"no nn.Linear named {list(targets)} in the model: nothing to adapt")
    model.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha))
    return names


def merge_lora(model: nn.Module) -> int:
    """Replace every `LoRALinear` in `model` by its merged `nn.Linear`; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merged())
    return len(names)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LoRA matrices: what a LoRA fine-tune saves (kilobytes, beside a frozen base)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


class SoftPrompt(nn.Module):
    """Prompt tuning / P-tuning: `n_virtual` learned vectors placed before every input, with the
    GPT frozen. Only `n_virtual * n_embd` numbers train; the vectors start as the embeddings of
    random vocabulary tokens, a better start than noise. (Prefix tuning goes further and learns
    keys and values for every layer: 2 * n_layer times as many.)"""

    def __init__(self, gpt: GPT, n_virtual: int, seed: int = 0):
        super().__init__()
        require_positive(n_virtual, "n_virtual", integer=True)
        if n_virtual >= gpt.config.block_size:
            raise InputError(
                f"{n_virtual} virtual tokens leave no room in a context of "
                f"block_size={gpt.config.block_size}"
            )
        self.gpt = gpt.requires_grad_(False)
        picks = torch.randint(
            gpt.config.vocab_size, (n_virtual,), generator=torch.Generator().manual_seed(seed)
        )
        self.prompt = nn.Parameter(gpt.tok_emb.weight.detach()[picks.to(gpt.tok_emb.weight.device)])

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Like `GPT.forward`, for the real tokens only (the virtual ones predict nothing)."""
        hidden = self.gpt.hidden_states(idx, prefix=self.prompt[None])
        logits = self.gpt.lm_head(hidden[:, self.prompt.shape[0] :])
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )


# ---------------------------------------------------------------------------------------------
# 5. Costs
# ---------------------------------------------------------------------------------------------


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameters of `model`, each shared tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def finetune_state_bytes(model: nn.Module, precision: str = "fp32") -> dict[str, int]:
    """Bytes of training state for fine-tuning `model` with AdamW by `minillm.memory`'s
    `STATE_PARTS`, activations left out: every weight is held, frozen or not; only the trainable
    ones add chapter 06's gradient, master copy and Adam moments (`model_state_bytes`)."""
    trainable, total = parameter_counts(model)
    state = model_state_bytes(trainable, precision)
    return {**state.as_dict(), "parameters": bytes_per_value(precision) * total}

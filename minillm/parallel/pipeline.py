"""Pipeline parallelism: the GPT's layers cut into contiguous stages, one stage per process.

Stage 0 holds the embeddings and the first blocks, the last stage the last blocks, `ln_f` and the
LM head; activations travel forward from stage to stage and their gradients travel back, point to
point (send/recv). The batch is cut into m micro-batches so that stages can work at once; a
schedule says in which order each stage runs the forward (F) and backward (B) of each micro-batch:

- GPipe: all m forwards, then all m backwards. Simple, but a stage holds the activations of all m
  micro-batches before its first backward frees any.
- 1F1B: p - 1 - stage forwards to fill the pipe, then one forward and one backward in turn, then
  the remaining backwards. The same bubble, but at most p - stage micro-batches held.

Either way every stage waits (p - 1) forward+backward slots for the pipe to fill and drain: the
bubble, a fraction (p - 1) / (m + p - 1) of the step. A tied embedding is the one weight two
stages share: the first and the last stage each keep a copy and all-reduce its gradient.

`run_step` is the worker that tests and chapter 08 launch; it returns the loss, the gradients'
distance to the single-process model, a timeline of each F and B, and the activation memory held.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.errors import InputError, require_positive, unknown_name
from minillm.model import GPT, IGNORE_INDEX, GPTConfig

SCHEDULES = ("gpipe", "1f1b")


def split_layers(n_layer: int, stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (earlier stages
    take the extra layers: the last stage also carries the LM head)."""
    require_positive(stages, "stages", integer=True)
    if n_layer < stages:
        raise InputError(f"{n_layer} layers cannot fill {stages} stages: each needs one layer")
    base, extra = divmod(n_layer, stages)
    starts = [s * base + min(s, extra) for s in range(stages + 1)]
    return [range(starts[s], starts[s + 1]) for s in range(stages)]


def schedule(kind: str, stages: int, micro_batches: int) -> list[list[tuple[str, int]]]:
    """For each stage, its ordered work: ("F", i) or ("B", i) for micro-batch i.

    >>> schedule("1f1b", 2, 3)
    [[('F', 0), ('F', 1), ('B', 0), ('F', 2), ('B', 1), ('B', 2)], [('F', 0), ('B', 0), ...]]
    """
    if kind not in SCHEDULES:
        raise unknown_name("pipeline schedule", kind, SCHEDULES)
    m = micro_batches
    if kind == "gpipe":
        return [[("F", i) for i in range(m)] + [("B", i) for i in range(m)]] * stages
    plans = []
    for stage in range(stages):
        warmup = min(stages - 1 - stage, m)  # forwards in flight before the first backward
        plan = [("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            plan += [("F", warmup + i), ("B", i)]
        plans.append(plan + [("B", i) for i in range(m - warmup, m)])
    return plans


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle share of a step when forward and backward take the same time on every stage."""
    return (stages - 1) / (micro_batches + stages - 1)


class PipelineStage(nn.Module):
    """One stage's share of a GPT: a copy of the GPT with the other stages' parts absent
    (`GPT.part`), run by the GPT's own `embed`, `run_blocks` and `head`. The part `self.gpt` keeps
    the GPT's parameter names (block 5 is `blocks.5` on whichever stage holds it), so gradients
    compare name by name."""

    def __init__(self, model: GPT, stage: int, stages: int):
        super().__init__()
        self.config, self.stage, self.stages = model.config, stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        layers = split_layers(model.config.n_layer, stages)[stage]
        part = model.part(layers, tokens=self.first, positions=self.first, head=self.last)
        # A copy of its own: on one stage the tie stays (deepcopy copies a shared tensor once);
        # on several, the last stage's head gets its own copy of the tied matrix.
        self.gpt = copy.deepcopy(part)

    def forward(self, x: Tensor) -> Tensor:
        """Stage 0 reads token ids `(b, T)`, the others the previous stage's `(b, T, C)`; the last
        returns logits `(b, T, V)`, the others `(b, T, C)`."""
        if self.first:
            x = self.gpt.embed(x)
        x = self.gpt.run_blocks(x)
        return self.gpt.head(x) if self.last else x

    def tied_weight(self) -> Tensor | None:
        """This stage's copy of the embedding matrix that the LM head shares, if it has one."""
        if not self.config.tie_weights or self.first == self.last:
            return None
        return self.gpt.tok_emb.weight if self.first else self.gpt.lm_head.weight


class _ActivationMeter:
    """Counts the bytes autograd saves for backward, per micro-batch (parameters left out), and
    the most micro-batches and bytes held at once."""

    def __init__(self, stage: nn.Module):
        self.params = {p.data_ptr() for p in stage.parameters()}
        self.held: dict[int, int] = {}
        self.current = -1
        self.peak_count = self.peak_bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        if t.data_ptr() not in self.params:
            self.held[self.current] = self.held.get(self.current, 0) + t.nbytes
        return t

    def update(self) -> None:
        self.peak_count = max(self.peak_count, len(self.held))
        self.peak_bytes = max(self.peak_bytes, sum(self.held.values()))


def train_step(
    stage: PipelineStage, idx: Tensor, targets: Tensor, micro_batches: int, kind: str
) -> dict:
    """One forward and backward of the batch `idx`, `targets` `(B, T)` through this stage,
    following `schedule(kind, ...)`. Every stage calls it at once; the process group's ranks are
    the stages in order. Returns the mean loss (on the last stage; 0 elsewhere), the timeline
    [(op, micro-batch, start, end)] and the activation peak."""
    rank, p = stage.stage, stage.stages
    c, (B, T) = stage.config, idx.shape
    b = B // micro_batches
    dtype = next(stage.parameters()).dtype
    inputs, outputs, losses, pending, events = {}, {}, [], [], []
    meter = _ActivationMeter(stage)
    for op, i in schedule(kind, p, micro_batches)[rank]:
        rows = slice(i * b, (i + 1) * b)
        if op == "F":
            if stage.first:
                x = idx[rows]
            else:
                x = torch.empty(b, T, c.n_embd, dtype=dtype)
                dist.recv(x, src=rank - 1)
                x.requires_grad_()
            start, meter.current = time.perf_counter(), i
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                y = stage(x)
                if stage.last:
                    y = F.cross_entropy(
                        y.flatten(0, 1), targets[rows].flatten(), ignore_index=IGNORE_INDEX
                    )
                    y = y / micro_batches  # m equal parts of the batch mean
                    losses.append(y.detach())
            meter.update()
            events.append(("F", i, start, time.perf_counter()))
            inputs[i], outputs[i] = x, y
            if not stage.last:
                sent = y.detach()
                pending.append((dist.isend(sent, dst=rank + 1), sent))  # never block on a send
        else:
            grad = None
            if not stage.last:
                grad = torch.empty(b, T, c.n_embd, dtype=dtype)
                dist.recv(grad, src=rank + 1)
            start = time.perf_counter()
            torch.autograd.backward(outputs.pop(i), grad)
            meter.held.pop(i)  # backward has freed what this micro-batch saved
            events.append(("B", i, start, time.perf_counter()))
            x = inputs.pop(i)
            if not stage.first:
                pending.append((dist.isend(x.grad, dst=rank - 1), x.grad))
    for work, _ in pending:  # the tensors stay alive until their sends are done
        work.wait()
    loss = torch.stack(losses).sum().item() if losses else 0.0
    return {
        "loss": loss,
        "events": events,
        "peak_micro_batches": meter.peak_count,
        "peak_activation_bytes": meter.peak_bytes,
    }


def run_step(
    rank: int,
    world_size: int,
    config: dict,
    batch_size: int,
    micro_batches: int,
    kinds: tuple[str, ...] = SCHEDULES,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Worker for `launch`: `world_size` stages run one step with each schedule in `kinds` on the
    same batch; every rank also runs the single-process GPT to compare with. Returns, per
    schedule, the loss and its difference to the reference, the largest gradient difference
    over this stage's parameters, the timeline (a clock shared by the processes) and the
    activation peak."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_dict(config)).to(dtype)
    c = model.config
    idx = torch.randint(0, c.vocab_size, (batch_size, c.block_size + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    _, ref_loss = model(x, y)
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in model.named_parameters()}
    # The first and last stage add up their halves of the tied embedding's gradient.
    tied_group = dist.new_group([0, world_size - 1])
    train_step(PipelineStage(model, rank, world_size), x, y, micro_batches, kinds[0])  # warm-up
    results = {}
    for kind in kinds:
        stage = PipelineStage(model, rank, world_size)
        dist.barrier()
        step = train_step(stage, x, y, micro_batches, kind)
        tied = stage.tied_weight()
        if tied is not None:
            dist.all_reduce(tied.grad, group=tied_group)
        loss = torch.tensor([step["loss"]], dtype=torch.float64)
        dist.all_reduce(loss)  # only the last stage's is not 0
        names = {"lm_head.weight": "tok_emb.weight"} if c.tie_weights else {}
        step["grad_diff"] = max(
            (p.grad - ref_grads[names.get(n, n)]).abs().max().item()
            for n, p in stage.gpt.named_parameters()
        )
        step["loss"], step["loss_diff"] = loss.item(), abs(loss.item() - ref_loss.item())
        print(
            f"{kind}: stage {rank} holds layers {list(split_layers(c.n_layer, world_size)[rank])}, "
            f"peak {step['peak_micro_batches']} micro-batches = "
            f"{step['peak_activation_bytes'] / 1024:.0f} KiB, loss {loss.item():.6f}"
        )
        results[kind] = step
    return results


def bubble_from_events(events_by_stage: list[list[tuple]]) -> list[float]:
    """Measured idle share of each stage: 1 - (time computing) / (first start to last end over
    every stage)."""
    start = min(e[2] for events in events_by_stage for e in events)
    end = max(e[3] for events in events_by_stage for e in events)
    return [1 - sum(e[3] - e[2] for e in events) / (end - start) for events in events_by_stage]


def plot_timeline(events_by_stage: list[list[tuple]], ax, title: str = "") -> None:
    """Draw each stage's forwards (blue) and backwards (green) as bars on a shared clock, the
    micro-batch number inside each bar; white space is the bubble."""
    start = min(e[2] for events in events_by_stage for e in events)
    for s, events in enumerate(events_by_stage):
        for op, i, t0, t1 in events:
            color = "tab:blue" if op == "F" else "tab:green"
            ax.barh(s, (t1 - t0) * 1e3, left=(t0 - start) * 1e3, color=color, edgecolor="white")
            ax.text((t0 + t1 - 2 * start) * 500, s, str(i), ha="center", va="center", color="w")
    ax.set(yticks=range(len(events_by_stage)), ylabel="stage", xlabel="ms", title=title)
    ax.invert_yaxis()

"""DeepSpeed's pipeline engine under the Trainer: the GPT as a sequence of layers (DeepSpeed's
`PipelineModule`), cut into stages that run DeepSpeed's 1F1B schedule (chapters 08 and 09)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm.engines.deepspeed import DeepSpeedTrainEngine
from minillm.model import GPT, lm_loss

# The GPT's forward pass as DeepSpeed pipeline layers, one tensor in and one out each. Every
# layer holds a part of the GPT (`GPT.part`: the model with the other parts absent, sharing the
# GPT's modules) and runs it with the GPT's own method, so no layer re-implements the forward.


class PipeTokens(nn.Module):
    """Token ids `(b, T)` -> token vectors `(b, T, C)`: the GPT's `embed_tokens`."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt.part(tokens=True)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt.embed_tokens(idx)


class PipePositions(nn.Module):
    """The GPT's `add_positions`: learned position vectors (none with rotary positions), then
    dropout. A layer of its own: the token embedding is tied to the head on the last stage,
    where position vectors would be dead weight."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt.part(positions=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt.add_positions(x)


class PipeBlock(nn.Module):
    """Block `layer` of the GPT, run by the GPT's `run_blocks` (rotary tables included). The
    class name is what `partition: "type:PipeBlock"` and activation checkpointing select."""

    def __init__(self, gpt: GPT, layer: int):
        super().__init__()
        self.gpt = gpt.part([layer])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt.run_blocks(x)


class PipeModule(nn.Module):
    """A GPT module used as a pipeline layer as it is (the final LayerNorm, an untied head)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def tied_logits(tokens: PipeTokens, x: torch.Tensor) -> torch.Tensor:
    """The tied LM head on the last stage, whose copy of the embedding is a `PipeTokens`:
    `(b, T, C)` -> logits `(b, T, V)`, what `lm_head` computes with the tied matrix."""
    return F.linear(x, tokens.gpt.tok_emb.weight)


def pipeline_layers(gpt: GPT) -> list:
    """The GPT as DeepSpeed layer specs: token embedding, positions, blocks, final LayerNorm,
    head. Each layer holds the GPT's own modules, so a stage trains the GPT's parameters (same
    initial values as the single-process model); DeepSpeed builds only the layers of this rank's
    stage."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if gpt.config.tie_weights:
        # The token embedding is one module on both end stages: it reads tokens in on the
        # first and scores them out on the last. DeepSpeed adds the two copies' gradients.
        tied = ["gpt.tok_emb.weight"]
        tokens = TiedLayerSpec("embedding", PipeTokens, gpt, tied_weight_attr=tied)
        head = TiedLayerSpec(
            "embedding", PipeTokens, gpt, forward_fn=tied_logits, tied_weight_attr=tied
        )
    else:
        tokens, head = LayerSpec(PipeTokens, gpt), LayerSpec(PipeModule, gpt.lm_head)
    blocks = [LayerSpec(PipeBlock, gpt, i) for i in range(gpt.config.n_layer)]
    positions, ln_f = LayerSpec(PipePositions, gpt), LayerSpec(PipeModule, gpt.ln_f)
    return [tokens, positions, *blocks, ln_f, head]


@contextlib.contextmanager
def _tied_weight_broadcasts_unwarned():
    """DeepSpeed broadcasts the tied embedding between the first and the last stage with a
    tensor that autograd tracks, and torch warns in every backward pass that c10d::broadcast_
    has no autograd kernel ("may lead to silently incorrect behavior"). Here it does not: the
    losses, evaluations and gathered weights equal one process's to float32 rounding
    (tests/test_ds.py, chapter 09 section 6). The warning is silenced for that operator only."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="c10d::broadcast_: an autograd kernel", category=UserWarning
        )
        yield


class PipelineTrainEngine(DeepSpeedTrainEngine):
    """DeepSpeed's pipeline engine under the Trainer: the GPT cut into `pipeline.stages` stages
    (by default an equal number of blocks each), the ranks of each stage forming a data-parallel
    group. A step is not forward/backward/step per micro-batch here: `train_batch` takes all of
    a step's micro-batches and runs them through DeepSpeed's 1F1B schedule (chapter 08).

    Every rank builds the whole GPT and keeps its stage's layers in training (fine for the course
    model; a large model would build only its layers). The ranks' GPTs are brought up to date
    from all stages whenever a checkpoint is saved or loaded, so sampling sees the trained model.
    """

    schedules_micro_batches = True

    def _trained_module(self, model: nn.Module) -> nn.Module:
        from deepspeed.pipe import PipelineModule

        pipe = self.ds_config["pipeline"]
        self.pipeline = PipelineModule(
            layers=pipeline_layers(model),
            num_stages=pipe["stages"],
            loss_fn=lm_loss,
            partition_method=pipe.get("partition", "type:PipeBlock"),
            activation_checkpoint_interval=pipe.get("activation_checkpoint_interval", 0),
            checkpointable_layers=["PipeBlock"],  # never the embedding: its input has no grad
        )
        return self.pipeline

    def train_batch(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]):
        """One optimizer step on these micro-batches: (mean loss over them and over the
        data-parallel ranks, the same on every stage; gradient norm before clipping)."""
        with _tied_weight_broadcasts_unwarned():
            loss = self.engine.train_batch(iter(micro_batches))
        norm = self.engine.get_global_grad_norm()
        return float(loss), None if norm is None else float(norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one batch, for evaluation (training goes through `train_batch`)."""
        if torch.is_grad_enabled():
            raise RuntimeError("a pipeline engine trains with train_batch; forward evaluates")
        return self.engine.eval_batch(iter([(x, y)]), num_micro_batches=1)

    def mean(self, value: float) -> float:
        return value  # the pipeline already averaged it over the data-parallel ranks

    def _fp32_state_dict(self, folder: Path | None = None) -> dict[str, torch.Tensor]:
        """Each stage's weights under the GPT's names, gathered on every rank and loaded into
        every rank's GPT."""
        local = {id(p) for p in self.pipeline.parameters()}
        mine = {
            name: t.detach().float().cpu()
            for name, t in self.module.state_dict(keep_vars=True).items()
            if id(t) in local
        }
        parts: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, mine)
        weights = {name: t for part in parts for name, t in part.items()}
        self.module.load_state_dict(weights)  # strict: every weight came from some stage
        return weights

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = super().load_checkpoint(path)
        self._fp32_state_dict()
        return state

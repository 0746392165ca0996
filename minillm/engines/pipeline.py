"""DeepSpeed's pipeline engine under the Trainer: the GPT as a sequence of layers (DeepSpeed's
`PipelineModule`), cut into stages that run DeepSpeed's 1F1B schedule (chapters 08 and 09)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm.engines.deepspeed import DeepSpeedTrainEngine
from minillm.model import GPT, GPTConfig, lm_loss, rotary_cos_sin


class PipeLayer(nn.Module):
    """A GPT module used as a pipeline layer as it is (token embedding, final LayerNorm, head)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class PipePositions(nn.Module):
    """Adds the GPT's learned position embeddings (none with rotary positions) and dropout to
    the token embeddings `(b, T, C)`."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.pos_emb, self.drop = getattr(gpt, "pos_emb", None), gpt.drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)


def tied_logits(embedding: PipeLayer, x: torch.Tensor) -> torch.Tensor:
    """The tied LM head: `(b, T, C)` -> logits `(b, T, V)` with the token embedding matrix."""
    return F.linear(x, embedding.module.weight)


class PipeBlock(nn.Module):
    """One GPT block as a pipeline layer: a single tensor in, a single tensor out."""

    def __init__(self, block: nn.Module, config: GPTConfig):
        super().__init__()
        self.block, self.rotary = block, config.positions == "rotary"
        self.head_dim = config.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        rotary = rotary_cos_sin(positions, self.head_dim) if self.rotary else None
        return self.block(x, is_causal=True, rotary=rotary)


def pipeline_layers(gpt: GPT) -> list:
    """The GPT as DeepSpeed layer specs: token embedding, positions, blocks, final LayerNorm,
    head. Each layer wraps the GPT's own module, so a stage trains the GPT's parameters (same
    names, same initial values as the single-process model); DeepSpeed builds only the layers of
    this rank's stage."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if gpt.config.tie_weights:
        # The token embedding is one module on both end stages: it reads tokens in on the
        # first and scores them out on the last. DeepSpeed adds the two copies' gradients.
        embedding = TiedLayerSpec(
            "embedding", PipeLayer, gpt.tok_emb, tied_weight_attr=["module.weight"]
        )
        head = TiedLayerSpec(
            "embedding",
            PipeLayer,
            gpt.tok_emb,
            forward_fn=tied_logits,
            tied_weight_attr=["module.weight"],
        )
    else:
        embedding, head = LayerSpec(PipeLayer, gpt.tok_emb), LayerSpec(PipeLayer, gpt.lm_head)
    blocks = [LayerSpec(PipeBlock, block, gpt.config) for block in gpt.blocks]
    return [embedding, LayerSpec(PipePositions, gpt), *blocks, LayerSpec(PipeLayer, gpt.ln_f), head]


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

"""DeepSpeed as another engine under the same Trainer, model and data (chapter 09).

`prepare_config` checks a DeepSpeed JSON config against the training config *before* anything is
launched and fills its `"auto"` values; `DeepSpeedTrainEngine` gives `deepspeed.initialize`'s
engine the interface the Trainer drives (`forward`, `backward`, `step`, `lr`, checkpoints).

DeepSpeed 0.19 traps this module guards against (each measured on a CPU machine):
- an unknown top-level key is ignored silently (`"zero_optimisation"` trains at ZeRO-0): refused
  here, with the closest valid key;
- `gradient_clipping` defaults to 1.0: always written explicitly, from `optim.grad_clip`;
- fp16 is refused on a CPU ("Type fp16 is not supported on your device"): refused here first;
- pipeline parallelism with ZeRO-2/3 is unsupported: refused here;
- batch sizes must multiply out: `train_batch_size = micro batch x accumulation x data-parallel`.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.errors import InputError
from minillm.model import GPT, GPTConfig, lm_loss, rotary_cos_sin

# Sections DeepSpeed reads that its parser looks up with `.keys()` (so a recorder misses them).
_READ_VIA_KEYS = {
    "optimizer",
    "scheduler",
    "activation_checkpointing",
    "flops_profiler",
    "aio",
    "autotuning",
    "zero_optimization",
}


@functools.cache
def known_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser reads, recorded from the parser itself."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recorder(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1  # the parser checks batch math
    DeepSpeedConfig(
        Recorder(
            train_batch_size=world, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1
        )
    )
    return frozenset(seen | _READ_VIA_KEYS)


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object at the top level")
    return config


def _fill(section: dict, key: str, value: Any) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def prepare_config(config: dict[str, Any], train, world_size: int, device_type: str) -> dict:
    """A copy of DeepSpeed `config` with "auto" filled from `train` (a TrainConfig), after checks
    that DeepSpeed itself would skip, make silently, or make only after launching."""
    config = json.loads(json.dumps(config))  # a deep copy
    known = known_top_level_keys()
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"unknown DeepSpeed config key {key!r}{hint} (DeepSpeed would ignore it silently)"
            )
    stages = config.get("pipeline", {}).get("stages", 1)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise InputError(f"pipeline.stages must be a whole number of stages >= 1, got {stages!r}")
    if world_size % stages:
        raise InputError(
            f"{world_size} processes cannot form {stages} pipeline stages: the process count "
            "must be a multiple of pipeline.stages"
        )
    data_parallel = world_size // stages
    _fill(config, "train_micro_batch_size_per_gpu", train.batch_size)
    _fill(config, "gradient_accumulation_steps", train.grad_accum)
    micro, accumulation = (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
    )
    _fill(config, "train_batch_size", micro * accumulation * data_parallel)
    if config["train_batch_size"] != micro * accumulation * data_parallel:
        raise InputError(
            f"batch sizes do not multiply out: train_batch_size {config['train_batch_size']} != "
            f"micro batch {micro} x accumulation {accumulation} x data-parallel {data_parallel}"
        )
    if (micro, accumulation) != (train.batch_size, train.grad_accum):
        raise InputError(
            f"the DeepSpeed config says micro batch {micro} and accumulation {accumulation}, the "
            f"training config batch_size={train.batch_size} and grad_accum={train.grad_accum}; "
            'make them agree or write "auto" in the DeepSpeed config'
        )
    _fill(config, "gradient_clipping", train.optim.grad_clip)  # 0.19's default would be 1.0
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    o = train.optim
    for key, value in (
        ("lr", o.learning_rate),
        ("betas", [o.beta1, o.beta2]),
        ("weight_decay", o.weight_decay),
    ):
        _fill(params, key, value)
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        _fill(section, "enabled", train.precision == precision)
    if config["fp16"]["enabled"] and device_type == "cpu":
        raise InputError(
            "fp16 is not supported by DeepSpeed on a CPU; use the bf16 config there "
            "(fp16 configs are for GPUs)"
        )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if "pipeline" in config and stage >= 2:
        raise InputError(
            f"pipeline parallelism cannot be combined with ZeRO stage {stage}; use "
            "stage 0 or 1 with a pipeline"
        )
    if (
        "pipeline" in config
        and stage == 0
        and not config["bf16"]["enabled"]
        and config["gradient_clipping"] > 0
    ):
        raise InputError(  # measured: DeepSpeed 0.19 then clips by stage 0's gradient norm only
            "a pipeline at ZeRO stage 0 in fp32 clips gradients by the first stage's norm, not "
            "the whole model's; use ZeRO stage 1 or set optim.grad_clip=0"
        )
    return config


def rank_device() -> str:
    """The device of this launched process: its own GPU where there are GPUs, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def launch(nproc: int, ds_config: dict, train, argv: list[str]) -> int:
    """Check the DeepSpeed and training configs for `nproc` processes, then start them with
    DeepSpeed's launcher running `minillm <argv>` (without --nproc). Returns its exit code."""
    import shutil
    import subprocess
    import sys

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    prepare_config(ds_config, train, nproc, device_type)  # refuse a bad config before launching
    from minillm import data

    data.fetch(train.data.corpus)  # download once here, not in every rank
    argv = list(argv)
    i = argv.index("--nproc")
    del argv[i : i + 2]
    if "--fresh" in argv:  # here, once, not in every rank
        argv.remove("--fresh")
        shutil.rmtree(train.out_dir, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher leaves it unset: 2-25x slower steps
    from minillm.parallel.launch import free_port

    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--master_port",  # a free one, not the fixed default that another run may hold
        str(free_port()),
        "--num_gpus",
        str(nproc),
        "--module",
        "minillm.cli",
        *argv,
    ]
    return subprocess.call(command, env=env)


class DeepSpeedTrainEngine:
    """`deepspeed.initialize` behind the Trainer's engine interface. Each data-parallel rank runs
    its slice of the global micro-batch; DeepSpeed averages gradients across ranks (ZeRO shards
    them). A config with an `activation_checkpointing` section also recomputes every block in
    the backward pass with `deepspeed.checkpointing.checkpoint`, configured by that section."""

    def __init__(self, model: torch.nn.Module, train, device: torch.device, ds_config: dict):
        import deepspeed
        import torch.distributed as dist

        from minillm.train import lr_at

        if not dist.is_initialized():
            deepspeed.init_distributed()
        self.rank = dist.get_rank()
        self.config = prepare_config(ds_config, train, dist.get_world_size(), device.type)
        self.module = model
        if "activation_checkpointing" in self.config:
            checkpointing = deepspeed.checkpointing
            checkpointing.configure(None, deepspeed_config=self.config)
            model.set_activation_checkpointing(True, checkpointing.checkpoint)
            if self.rank == 0 and checkpointing.is_configured():
                print(
                    f"activation checkpointing: {len(model.blocks)} block(s) recomputed in "
                    "backward by deepspeed.checkpointing (partition_activations="
                    f"{checkpointing.PARTITION_ACTIVATIONS}, cpu_checkpointing="
                    f"{checkpointing.CPU_CHECKPOINT})"
                )
        o = train.optim

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_at(step, o, train.max_iters) / o.learning_rate
            )

        trained = self._trained_module(model)
        local = {id(p) for p in trained.parameters()}  # a pipeline stage holds only its layers
        groups = [
            {**group, "params": [p for p in group["params"] if id(p) in local]}
            for group in model.param_groups(o.weight_decay)
        ]
        self.engine, *_ = deepspeed.initialize(
            model=trained,
            model_parameters=[g for g in groups if g["params"]],
            lr_scheduler=schedule,
            config=self.config,
        )
        # The Trainer's world is the data-parallel one: that many ranks split each batch.
        self.world_size = self.engine.dp_world_size
        self.data_rank = dist.get_rank(group=self.engine.data_parallel_group)

    def _trained_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What `deepspeed.initialize` wraps: the GPT itself (a pipeline wraps its layers)."""
        return model

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global micro-batch (batch_size x data-parallel sequences)."""
        size = x.shape[0] // self.world_size
        rows = slice(self.data_rank * size, (self.data_rank + 1) * size)
        return x[rows], y[rows]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.engine(x, y)[1]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches in step(); this one only counts

    def step(self) -> float | None:
        self.engine.step()  # the last micro-batch of the window: the real update
        norm = self.engine.get_global_grad_norm()  # None at ZeRO-0 in fp32
        return None if norm is None else float(norm)

    def mean(self, value: float) -> float:
        """The average of a per-rank number (a loss) over the ranks."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.engine.device)  # NCCL: a GPU
        dist.all_reduce(t, group=self.engine.data_parallel_group)
        return t.item() / self.world_size

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    # -- checkpoints: DeepSpeed's own format, plus one safetensors file for sampling ---------
    def save_checkpoint(
        self, run_dir: Path, step: int, state: dict, config: dict, keep: int, tokenizer
    ) -> Path:
        """Every rank writes its shard with DeepSpeed's `save_checkpoint`; rank 0 then exports
        the full fp32 weights as `model.safetensors` (written last, so its presence marks the
        checkpoint complete), with the config and tokenizer `minillm sample` reads."""
        import torch.distributed as dist
        import yaml
        from safetensors.torch import save_model

        from minillm import checkpoint

        folder = checkpoint.checkpoint_dir(run_dir, step)
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=state)
        weights = self._fp32_state_dict(folder)  # collective at ZeRO-3: every rank takes part
        if self.rank == 0:
            (folder / checkpoint.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
            tokenizer.save(folder / checkpoint.TOKENIZER)
            model = GPT(GPTConfig.from_dict(config["model"]))
            model.load_state_dict(weights)
            tmp = folder / f".{checkpoint.WEIGHTS}.tmp"
            save_model(model, str(tmp))
            tmp.rename(folder / checkpoint.WEIGHTS)
            checkpoint.prune(run_dir, keep)
        dist.barrier()
        return folder

    def _fp32_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        stage = self.config.get("zero_optimization", {}).get("stage", 0)
        if stage == 0:  # every rank holds the whole model
            return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        import torch.distributed as dist
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        dist.barrier()  # all shards are on disk
        if self.rank != 0:
            return {}
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        path = Path(path)
        loaded, state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            from minillm.checkpoint import CheckpointError

            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
        return state


def make_engine(model: GPT, train, device: torch.device, ds_config: dict) -> DeepSpeedTrainEngine:
    """The engine `ds_config` asks for: a pipeline engine where it has a `pipeline` section."""
    engine = PipelineTrainEngine if "pipeline" in ds_config else DeepSpeedTrainEngine
    return engine(model, train, device, ds_config)


# -- pipeline parallelism: the GPT as a sequence of layers (DeepSpeed's PipelineModule) ---------


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

    def _trained_module(self, model: torch.nn.Module) -> torch.nn.Module:
        from deepspeed.pipe import PipelineModule

        pipe = self.config["pipeline"]
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
        import torch.distributed as dist

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


# -- memory: what each rank really holds inside DeepSpeed (chapter 09) --------------------------

STATE_PARTS = ("parameters", "gradients", "master weights", "optimizer states")


def _storage_bytes(tensors) -> dict[int, int]:
    """{storage address: its bytes} of the non-empty tensors: views of one buffer count once."""
    return {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if t is not None and t.numel() > 0
    }


def engine_state_bytes(engine) -> dict[str, int]:
    """Bytes of model state this rank holds in a DeepSpeed engine, read from the engine's own
    tensors between the backward pass and the optimizer step (a step pre-hook of the inner
    optimizer), when gradients and Adam's moments both exist:

    - parameters: the model's weights as this rank holds them (at ZeRO-3 its partitions);
    - gradients: the gradients left for the step (at ZeRO 1-3 only this rank's partition);
    - master weights: the copy of the weights the optimizer updates where it is not the model's
      own (ZeRO 1-3 keep an fp32 partition even when the model is fp32 already);
    - optimizer states: AdamW's exp_avg and exp_avg_sq (its step counters are left out).

    The engine must have one parameter group: DeepSpeed steps its inner optimizer once per group,
    and the hook would see only one. Outside the census, ZeRO-3 also keeps a flat buffer its
    gradient partitions accumulate in and a reduce bucket (`reduce_bucket_size` elements) for the
    whole run; ZeRO 1-2 free theirs after each backward (tests/test_ds_memory.py shows both).
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW
    held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    stepped = [p for group in inner.param_groups for p in group["params"]]
    parameters = _storage_bytes(held)
    master = {k: v for k, v in _storage_bytes(stepped).items() if k not in parameters}
    gradients = _storage_bytes(p.grad for p in [*engine.module.parameters(), *stepped])
    moments = _storage_bytes(
        t for p in stepped for name, t in inner.state[p].items() if name.startswith("exp_avg")
    )
    return {
        "parameters": sum(parameters.values()),
        "gradients": sum(gradients.values()),
        "master weights": sum(master.values()),
        "optimizer states": sum(moments.values()),
    }


def deepspeed_state_bytes(n_params: int, stage: int, world_size: int) -> dict[str, int]:
    """What `engine_state_bytes` measures for an fp32 model of `n_params` parameters at each ZeRO
    stage. Exact when nothing is padded: at ZeRO-1/2, 2 x `world_size` divides the flat size of
    each parameter group; at ZeRO-3, `world_size` divides each parameter's size (with
    `stage3_param_persistence_threshold` 0, so that no parameter stays whole on every rank).
    The 16-bytes rule in fp32 is 4 + 4 + 8; DeepSpeed's ZeRO adds the fp32 master partition (4/N:
    its layout is the mixed-precision one, whose 12 bytes of optimizer state include a master
    copy) and, at the step, holds gradients reduced to this rank's partition already at ZeRO-1."""
    part = -(-n_params // world_size)  # this rank's partition: the parameter count / N
    sharded = stage >= 1
    return {
        "parameters": 4 * (part if stage == 3 else n_params),
        "gradients": 4 * (part if sharded else n_params),
        "master weights": 4 * part if sharded else 0,
        "optimizer states": 8 * (part if sharded else n_params),
    }


def _measure_into(into: dict, engine, *_hook_args) -> None:
    into.update(engine_state_bytes(engine))


def census_worker(
    rank: int, world_size: int, model_config: GPTConfig, stages=(0, 1, 2, 3)
) -> dict[int, dict[str, int]]:
    """For `minillm.parallel.launch.launch`: train the GPT for two steps with real DeepSpeed at
    each ZeRO stage (fp32, AdamW) and return what this rank held at the second step."""
    import warnings

    import deepspeed

    # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates; nothing a student can change.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

    report = {}
    for stage in stages:
        torch.manual_seed(0)
        model = GPT(model_config)
        n = model.num_parameters()
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {  # buckets sized to the model, not DeepSpeed's 0.5-2 GB
                "stage": stage,
                "reduce_bucket_size": n,
                "allgather_bucket_size": n,
                "stage3_prefetch_bucket_size": n,
                "stage3_param_persistence_threshold": 0,  # shard every tensor, even small ones
            },
        }
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        generator = torch.Generator().manual_seed(rank)
        x = torch.randint(
            0, model_config.vocab_size, (2, model_config.block_size), generator=generator
        )
        x = x.to(engine.device)
        engine.backward(engine(x, x)[1])
        engine.step()  # AdamW creates its moments in this first step
        measured: dict[str, int] = {}
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        inner.register_step_pre_hook(functools.partial(_measure_into, measured, engine))
        engine.backward(engine(x, x)[1])
        engine.step()
        report[stage] = measured
        engine.destroy()
    return report

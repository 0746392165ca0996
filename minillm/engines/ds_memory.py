"""Memory per rank measured inside DeepSpeed (chapter 09): what each rank really holds, read
from the engine's own tensors, and the exact prediction it is checked against."""

from __future__ import annotations

import functools

import torch

from minillm.model import GPT, GPTConfig


def _storage_bytes(tensors) -> dict[int, int]:
    """{storage address: its bytes} of the non-empty tensors: views of one buffer count once."""
    return {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if t is not None and t.numel() > 0
    }


def engine_state_bytes(engine) -> dict[str, int]:
    """Bytes of model state this rank holds in a DeepSpeed engine by `minillm.memory`'s
    `STATE_PARTS`, read from the engine's own
    tensors between the backward pass and the optimizer step (a step pre-hook of the inner
    optimizer), when gradients and Adam's moments both exist:

    - parameters: the model's weights as this rank holds them (at ZeRO-3 its partitions);
    - gradients: the gradients left for the step (at ZeRO 1-3 only this rank's partition);
    - master_weights: the copy of the weights the optimizer updates where it is not the model's
      own (ZeRO 1-3 keep an fp32 partition even when the model is fp32 already);
    - optimizer_states: AdamW's exp_avg and exp_avg_sq (its step counters are left out).

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
        "master_weights": sum(master.values()),
        "optimizer_states": sum(moments.values()),
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
        "master_weights": 4 * part if sharded else 0,
        "optimizer_states": 8 * (part if sharded else n_params),
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

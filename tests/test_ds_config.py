"""DeepSpeed configs are checked whole before launch: every bad config below is refused with one
sentence that names the key (and the closest valid name for a near miss), never an
AttributeError or TypeError, and never silently changed; configs shaped like DeepSpeed's
published examples (deepspeed.ai config-json docs, DeepSpeedExamples, the Hugging Face
integration's ZeRO-2/3 templates) are accepted with what they say kept. Validation only: the real
launches are in tests/test_ds.py."""

import time
from pathlib import Path

import pytest

from minillm.engines import ds_config
from minillm.errors import InputError
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["batch_size=4", "optim.learning_rate=4e-3", "optim.grad_clip=1.0", "optim.optimizer=adamw"]


def train(*extra):
    return load_config(REPO / "configs/train/shakespeare_char.yaml", [*TINY, *extra])


PIPE = {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 1}}

# (id, DeepSpeed config, training overrides, text the one-sentence message must hold)
BAD = [
    # -- wrong JSON types: the crashes ------------------------------------------------
    ("pipeline-true", {"pipeline": True}, (), "'pipeline' must be a JSON object"),
    ("zero-int", {"zero_optimization": 2}, (), "'zero_optimization' must be a JSON object"),
    ("bf16-true", {"bf16": True}, (), "'bf16' must be a JSON object such as"),
    ("optimizer-null", {"optimizer": None}, (), "'optimizer' must be a JSON object"),
    (
        "params-null",
        {"optimizer": {"type": "AdamW", "params": None}},
        (),
        "'optimizer.params' must be a JSON object",
    ),
    (
        "stage-string",
        {"zero_optimization": {"stage": "2"}},
        (),
        "'zero_optimization.stage' must be 0, 1, 2 or 3 (the ZeRO stage), got \"2\" (written in "
        "quotes: drop them)",
    ),
    (
        "pipeline-clip-string",
        {**PIPE, "gradient_clipping": "1.0"},
        (),
        "'gradient_clipping' must be a number, got \"1.0\"",
    ),
    ("micro-batch-string", {"train_micro_batch_size_per_gpu": "4"}, (), "must be a whole number"),
    ("accumulation-zero", {"gradient_accumulation_steps": 0}, (), "must be >= 1, got 0"),
    ("clip-negative", {"gradient_clipping": -1}, (), "'gradient_clipping' must be >= 0"),
    ("steps-per-print-list", {"steps_per_print": [10]}, (), "'steps_per_print' must be a whole"),
    ("steps-per-print-0", {"steps_per_print": 0}, (), "'steps_per_print' must be >= 1"),
    ("wall-clock-string", {"wall_clock_breakdown": "yes"}, (), "must be true or false"),
    # -- nested typos and bad values: caught by DeepSpeed's own models, before launch -------
    (
        "stge",
        {"zero_optimization": {"stge": 2}},
        (),
        "'zero_optimization.stge'; did you mean 'stage'",
    ),
    (
        "offload-optimiser",
        {"zero_optimization": {"stage": 2, "offload_optimiser": {"device": "cpu"}}},
        (),
        "'zero_optimization.offload_optimiser'; did you mean 'offload_optimizer'",
    ),
    ("enabeld", {"bf16": {"enabeld": True}}, (), "'bf16.enabeld'; did you mean 'enabled'"),
    (
        "cpuu",
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpuu"}}},
        (),
        "'zero_optimization.offload_optimizer.device' cannot be \"cpuu\"",
    ),
    ("stage-5", {"zero_optimization": {"stage": 5}}, (), "must be 0, 1, 2 or 3 (the ZeRO stage)"),
    (
        "Adamm",
        {"optimizer": {"type": "Adamm", "params": {}}},
        (),
        "'optimizer.type' cannot be 'Adamm'",
    ),
    (
        "offload-pin-typo",
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memry": True}}},
        (),
        "'zero_optimization.offload_param.pin_memry'; did you mean 'pin_memory'",
    ),
    (
        "bucket-text",
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
        (),
        "'zero_optimization.reduce_bucket_size' must be a whole number",
    ),
    (
        "fp16-loss-scale",
        {"fp16": {"loss_scale": -1}},
        (),
        "'fp16.loss_scale' is refused by DeepSpeed: fp16.loss_scale must be >= 0",
    ),
    (
        "activation-typo",
        {"activation_checkpointing": {"partition_activation": True}},
        (),
        "'activation_checkpointing.partition_activation'; did you mean 'partition_activations'",
    ),
    (
        "flops-typo",
        {"flops_profiler": {"enabled": True, "profile_stepp": 2}},
        (),
        "'flops_profiler.profile_stepp'; did you mean 'profile_step'",
    ),
    (
        "tensorboard-typo",
        {"tensorboard": {"enabled": True, "output_pth": "tb/"}},
        (),
        "'tensorboard.output_pth'; did you mean 'output_path'",
    ),
    ("pipeline-typo", {"pipeline": {"stagse": 2}}, (), "'pipeline.stagse'; did you mean 'stages'"),
    ("pipeline-partition", {**PIPE, "pipeline": {"stages": 2, "partition": "best"}}, (), "'best'"),
    (
        "optimizer-param-typo",
        {"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1, "torch_adam": True}}},
        (),
        "'optimizer.params.weight_decy'; did you mean 'weight_decay'",
    ),
    (
        "sgd-betas",
        {"optimizer": {"type": "SGD", "params": {"betas": [0.9, 0.99]}}},
        (),
        "'optimizer.params.betas'",
    ),
    (
        "max-grad-norm",
        {"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}},
        (),
        "clip with optim.grad_clip",
    ),
    ("optimizer-no-type", {"optimizer": {"params": {}}}, (), "'optimizer.type' is missing"),
    ("eps-zero", {"optimizer": {"type": "AdamW", "params": {"eps": 0}}}, (), "must be > 0"),
    (
        "zero-optimisation",
        {"zero_optimisation": {"stage": 3}},
        (),
        "did you mean 'zero_optimization'",
    ),
    # -- nothing silently overridden or dropped ------------------------------------------------
    (
        "lr-differs",
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}},
        (),
        "'optimizer.params.lr' is 0.01 but the training config's optim.learning_rate is 0.004",
    ),
    (
        "betas-differ",
        {"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.9]}}},
        (),
        "'optimizer.params.betas' is [0.8, 0.9] but",
    ),
    (
        "decay-differs",
        {"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.0}}},
        (),
        "optim.weight_decay is 0.1",
    ),
    ("clip-differs", {"gradient_clipping": 0.5}, (), "optim.grad_clip is 1.0"),
    (
        "micro-differs",
        {"train_micro_batch_size_per_gpu": 8},
        (),
        "the training config's batch_size",
    ),
    ("scheduler", {"scheduler": {"type": "WarmupLR"}}, (), "'scheduler' is not supported: minillm"),
    (
        "random-ltd",
        {"data_efficiency": {"enabled": True, "data_routing": {"random_ltd": {"enabled": True}}}},
        (),
        "random-LTD",
    ),
    ("autotp", {"tensor_parallel": {"autotp_size": 2}}, (), "AutoTP"),
    ("compile", {"compile": {"deepcompile": True}}, (), "set compile=true"),
    ("both-bf16-spellings", {"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, (), "both"),
    ("bf16-disabled-but-asked", {"bf16": {"enabled": False}}, ("precision=bf16",), "make them"),
    ("bf16-and-fp16", {"bf16": {"enabled": True}, "fp16": {"enabled": True}}, (), "both bf16"),
    # -- what DeepSpeed would find only inside every rank ---------------------------------------
    ("fp16-on-cpu", {"fp16": {"enabled": True}}, (), "fp16 is not supported by DeepSpeed on a CPU"),
    (
        "offload-at-stage-0",
        {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
        (),
        "'zero_optimization.offload_optimizer' needs ZeRO stage 1, 2 or 3",
    ),
    (
        "offload-param-at-stage-2",
        {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
        (),
        "'zero_optimization.offload_param' needs ZeRO stage 3",
    ),
    ("lamb-on-cpu", {"optimizer": {"type": "Lamb", "params": {}}}, (), "cannot run on this"),
    ("pipeline-zero2", {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 2}}, (), "ZeRO"),
    ("pipeline-clip-zero0", {"pipeline": {"stages": 2}}, (), "clips gradients by the first"),
    ("pipeline-3-stages", {**PIPE, "pipeline": {"stages": 3}}, (), "cannot form 3"),
    ("pipeline-stages-auto", {"pipeline": {"stages": "auto"}}, (), "'pipeline.stages' must be"),
    ("batch-math", {"train_batch_size": 16}, (), "16 != micro batch 4 x accumulation 1"),
    ("removed-feature", {"progressive_layer_drop": {"enabled": True}}, (), "has been removed"),
    ("top-level-list", [1, 2], (), "must be a JSON object"),
    ("universal", {"checkpoint": {"load_universal": True}}, (), "weights_only=False"),
    ("fast-writer", {"checkpoint": {"writer": {"decoupled": True}}}, (), "torch engine only"),
]


@pytest.mark.parametrize(
    "config, overrides, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_configs_are_refused_with_one_sentence_naming_the_key(config, overrides, message):
    start = time.process_time()  # CPU time: a busy machine does not inflate it
    with pytest.raises(InputError) as refused:
        ds_config.prepare_config(config, train(*overrides), 2, "cpu")
    assert time.process_time() - start < 10  # loose: no launch, no JIT build
    text = str(refused.value)
    assert message in text
    assert "\n" not in text and "Traceback" not in text


def test_there_are_at_least_30_bad_configs():
    assert len(BAD) >= 30


def test_the_callers_config_is_never_changed():
    config = {"zero_optimization": {"stage": 2}, "bfloat16": {"enabled": True}}
    ds_config.prepare_config(config, train(), 2, "cpu")
    assert config == {"zero_optimization": {"stage": 2}, "bfloat16": {"enabled": True}}


# -- good configs, shaped like DeepSpeed's published examples ---------------------------------

HF_ZERO2 = {  # the Hugging Face integration's ZeRO-2 template
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
HF_ZERO3 = {  # the Hugging Face integration's ZeRO-3 template
    **HF_ZERO2,
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}
ADAM = {"type": "Adam", "params": {"lr": 4e-3, "betas": [0.9, 0.99], "eps": 1e-8}}

# (id, config, training overrides, device, {dotted key: value the prepared config must hold})
GOOD = [
    (
        "getting-started",
        {"train_batch_size": 8, "optimizer": ADAM},
        (),
        "cpu",
        {"train_batch_size": 8},
    ),
    (
        "zero1",
        {"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8}},
        (),
        "cpu",
        {"zero_optimization.stage": 1},
    ),
    ("hf-zero2", HF_ZERO2, (), "cpu", {"zero_optimization.offload_optimizer.device": "cpu"}),
    ("hf-zero3", HF_ZERO3, (), "cpu", {"zero_optimization.stage3_max_live_parameters": 1e9}),
    (
        "bf16-auto",
        {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}},
        ("precision=bf16",),
        "cpu",
        {"bf16.enabled": True, "fp16.enabled": False},
    ),
    (
        "legacy-bfloat16",
        {"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2}},
        (),
        "cpu",
        {"bf16.enabled": True},
    ),
    (
        "fp16-gpu",
        {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "loss_scale_window": 1000,
                "initial_scale_power": 16,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        },
        (),
        "cuda",
        {"fp16.loss_scale_window": 1000},
    ),
    (
        "activation-checkpointing",
        {
            "activation_checkpointing": {
                "partition_activations": False,
                "cpu_checkpointing": False,
                "contiguous_memory_optimization": False,
                "number_checkpoints": None,
                "synchronize_checkpoint_boundary": False,
                "profile": False,
            }
        },
        (),
        "cpu",
        {"activation_checkpointing.profile": False},
    ),
    (
        "flops-profiler",
        {
            "flops_profiler": {
                "enabled": True,
                "profile_step": 1,
                "module_depth": -1,
                "top_modules": 1,
                "detailed": True,
                "output_file": None,
            }
        },
        (),
        "cpu",
        {"flops_profiler.profile_step": 1},
    ),
    (
        "monitors",
        {
            "tensorboard": {"enabled": True, "output_path": "log/", "job_name": "minillm"},
            "csv_monitor": {"enabled": True, "output_path": "csv/", "job_name": "minillm"},
        },
        (),
        "cpu",
        {"csv_monitor.job_name": "minillm"},
    ),
    (
        "comms-logger",
        {"comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False}},
        (),
        "cpu",
        {"comms_logger.prof_all": True},
    ),
    (
        "pipeline-zero1",
        {"pipeline": {"stages": 2, "partition": "parameters"}, "zero_optimization": {"stage": 1}},
        (),
        "cpu",
        {"train_batch_size": 4, "pipeline.partition": "parameters"},
    ),
    (
        "adamw-explicit",
        {
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": 4e-3,
                    "betas": [0.9, 0.99],
                    "eps": 1e-8,
                    "weight_decay": 0.1,
                    "torch_adam": True,
                },
            }
        },
        (),
        "cpu",
        {"optimizer.params.eps": 1e-8},
    ),
    (
        "torch-sgd",
        {"optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": 0.9}}},
        (),
        "cpu",
        {"optimizer.params.momentum": 0.9, "optimizer.params.lr": 4e-3},
    ),
    (
        "adagrad",
        {"optimizer": {"type": "Adagrad", "params": {"lr": "auto"}}},
        (),
        "cpu",
        {"optimizer.params.lr": 4e-3},
    ),
    (
        "explicit-batches-and-clip",
        {
            "train_batch_size": 16,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2,
            "gradient_clipping": 1.0,
        },
        ("grad_accum=2",),
        "cpu",
        {"gradient_accumulation_steps": 2},
    ),
    (
        "communication",
        {"communication_data_type": "fp32", "prescale_gradients": False, "steps_per_print": 10},
        (),
        "cpu",
        {"communication_data_type": "fp32"},
    ),
    (
        "zero3-offload-nvme-free",
        {
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {"device": "cpu"},
                "offload_param": {"device": "cpu"},
                "reduce_bucket_size": 5e6,
            },
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        },
        (),
        "cpu",
        {"zero_optimization.offload_param.device": "cpu"},
    ),
]


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize(
    "config, overrides, device, kept", [g[1:] for g in GOOD], ids=[g[0] for g in GOOD]
)
def test_configs_like_deepspeeds_examples_are_accepted_as_written(config, overrides, device, kept):
    prepared = ds_config.prepare_config(config, train(*overrides), 2, device)
    for key, value in kept.items():
        assert _get(prepared, key) == value, key
    # the training config's values fill every "auto", and DeepSpeed's default clip never applies
    assert prepared["gradient_clipping"] == 1.0
    assert prepared["optimizer"]["params"]["lr"] == 4e-3
    assert prepared["train_micro_batch_size_per_gpu"] == 4
    assert "auto" not in str(prepared["optimizer"])  # eps "auto": the optimizer's own default


def test_there_are_at_least_15_good_configs():
    assert len(GOOD) >= 15


def test_every_shipped_config_is_accepted():
    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        device = "cuda" if "fp16" in path.name else "cpu"
        ds_config.prepare_config(ds_config.load_config(path), train(), 2, device)


def test_deepspeeds_own_key_list_is_recorded_from_its_parser():
    known = ds_config.known_top_level_keys()
    assert {"zero_optimization", "bf16", "optimizer", "gradient_clipping"} <= known
    assert "zero_optimisation" not in known
    reads = ds_config.deepspeed_reads()
    assert reads["activation_checkpointing"]["partition_activations"] is False  # its default


def _paths(config: dict, prefix=()):
    for key, value in config.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _replaced(config: dict, path: tuple, value):
    import copy

    config = copy.deepcopy(config)
    node = config
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return config


MALFORMED = [None, True, -1, 0.5, "x", [], {}, [1, 2]]


@pytest.mark.parametrize(
    "config, overrides, device", [g[1:4] for g in GOOD], ids=[g[0] for g in GOOD]
)
def test_any_malformed_value_anywhere_is_an_input_error(config, overrides, device):
    """Every key of every good config set to each malformed value in turn: accepted, or refused
    with an InputError; never a TypeError, AttributeError or DeepSpeed's own exception."""
    settings = train(*overrides)
    for path in _paths(config):
        for value in MALFORMED:
            try:
                ds_config.prepare_config(_replaced(config, path, value), settings, 2, device)
            except InputError as exc:
                assert "\n" not in str(exc), (path, value)

"""Muon (minillm.muon) against independent references: the singular value decomposition in
float64, the same update written out in float64, torch's own Muon and AdamW; and which engines
run it, and which refuse it, saying so."""

import copy
import math
from pathlib import Path

import pytest
import torch

from minillm.engines import ZeroEngine, ds_config
from minillm.engines.common import build_optimizer
from minillm.errors import InputError
from minillm.model import GPT
from minillm.muon import NS_COEFFICIENTS, NS_STEPS, Muon, orthogonalize
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = REPO / "configs/train/shakespeare_char.yaml"


def _spread_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A float64 matrix with singular values from 1 down to 0.01 (a gradient's are that uneven)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.logspace(0, -2, k, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape", [(48, 160), (200, 40), (64, 64)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_values(shape):
    g = _spread_matrix(*shape, seed=sum(shape))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    r = orthogonalize(g.float()).double()
    # in g's singular basis the result is diagonal: the same vectors, new values
    inner = u.T @ r @ vh.T
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max() < 1e-4
    values = torch.diagonal(inner)
    assert s.max() / s.min() > 99  # from 1 to 0.01 in ...
    assert values.min() > 0.65 and values.max() < 1.25  # ... to within a factor 2 of each other


def test_orthogonalize_is_the_quintic_iteration_in_float64():
    g = _spread_matrix(30, 50, seed=3)
    x = g / g.norm()
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    torch.testing.assert_close(orthogonalize(g.float()).double(), x, atol=2e-5, rtol=0)


def test_orthogonalize_refuses_what_is_not_a_matrix_and_keeps_the_dtype():
    with pytest.raises(InputError, match=r"a matrix, got a tensor of shape \(5,\)"):
        orthogonalize(torch.ones(5))
    assert orthogonalize(torch.randn(4, 6, dtype=torch.float64)).dtype == torch.float64


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def test_a_muon_step_is_the_update_written_out_in_float64():
    lr, momentum, decay, shape = 0.02, 0.95, 0.1, (24, 8)  # tall: lr times sqrt(24 / 8)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(w.clone())
    opt = Muon([{"params": [p], "muon": True}], lr=lr, momentum=momentum, weight_decay=decay)
    ref, buf = w.double(), torch.zeros(shape, dtype=torch.float64)
    for grad in _grads(shape, 3):
        p.grad = grad.clone()
        opt.step()
        g = grad.double()
        buf = momentum * buf + (1 - momentum) * g
        nesterov = (1 - momentum) * g + momentum * buf
        x = (nesterov / nesterov.norm()).T
        a, b, c = NS_COEFFICIENTS
        for _ in range(NS_STEPS):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        ref = ref * (1 - lr * decay) - lr * math.sqrt(24 / 8) * x.T
    torch.testing.assert_close(p.detach().double(), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])  # wide, and tall (rate times sqrt 3)
def test_muon_agrees_with_torchs_muon_within_its_bfloat16(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    mine = Muon([{"params": [ours], "muon": True}], lr=0.02, weight_decay=0.1)
    torchs = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    for grad in _grads(shape, 4, seed=5):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        torchs.step()
    moved_ours, moved_theirs = ours.detach() - w, theirs.detach() - w
    # torch orthogonalises in bfloat16 (8 bits of mantissa), minillm in float32
    assert (moved_ours - moved_theirs).norm() < 0.02 * moved_theirs.norm()


def test_the_other_groups_step_exactly_as_torchs_adamw():
    shape = (7, 5)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    # not Muon's defaults, and gradients small enough that eps moves the step
    settings = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)
    mine = Muon([{"params": [ours]}], **settings)
    torchs = torch.optim.AdamW([theirs], foreach=False, **settings)
    for grad in _grads(shape, 6, seed=6):
        grad = grad * 1e-3
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        torchs.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-7, rtol=1e-6)


def test_a_muon_group_of_vectors_is_refused():
    with pytest.raises(InputError, match=r"orthogonalises matrices.*\(3,\)"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(3))], "muon": True}], lr=0.1)


@pytest.mark.parametrize("tied", [True, False])
def test_the_main_job_puts_the_blocks_matrices_on_muon_and_the_rest_on_adamw(tied):
    config = load_config(MAIN_JOB, [f"model.tie_weights={str(tied).lower()}"])
    assert config.optim.optimizer == "muon"
    model = GPT(config.model)
    opt = build_optimizer(model, config.optim, torch.device("cpu"))
    on_muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {
        id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2
    }
    assert on_muon == expected, sorted(names[i] for i in on_muon ^ expected)
    adamw = [g for g in opt.param_groups if not g["muon"]]
    decayed = {names[id(p)] for g in adamw if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == (set() if tied else {"lm_head.weight"})  # embeddings, norms, biases: none
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.param_groups[0]["lr"] == config.optim.learning_rate  # what the Trainer logs


def test_zero_and_deepspeed_refuse_muon_and_say_how_to_train(tmp_path):
    config = load_config(MAIN_JOB, [f"out_dir={tmp_path}"])
    with pytest.raises(InputError, match="needs each matrix whole.*optim.optimizer=adamw"):
        ZeroEngine(GPT(config.model), config, torch.device("cpu"))
    zero2 = ds_config.load_config(REPO / "configs/deepspeed/zero2.json")
    with pytest.raises(InputError, match="DeepSpeed config's optimizer.*optim.optimizer=adamw"):
        ds_config.prepare_config(zero2, config, 2, "cpu")
    adamw = copy.deepcopy(config)
    adamw.optim.optimizer = "adamw"
    assert ds_config.prepare_config(zero2, adamw, 2, "cpu")["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.optimizer=sgd", "unknown optim.optimizer 'sgd'; choose one of: adamw, muon"),
        ("optim.muon_learning_rate=0", "optim.muon_learning_rate"),
        ("optim.muon_learning_rate=.nan", "optim.muon_learning_rate"),
    ],
)
def test_a_bad_optimizer_setting_is_refused_by_name(override, message):
    with pytest.raises(InputError, match=message):
        load_config(MAIN_JOB, [override])


def test_a_run_resumes_only_with_the_optimizer_it_was_trained_with(tmp_path):
    """A run folder of the AdamW main job (every run before Muon) and today's default: refused
    with the way out, before any optimizer state is read; with AdamW named, it resumes."""
    from minillm.checkpoint import CheckpointError
    from minillm.train import Trainer, read_metrics
    from tests.test_train import tiny

    def fit(*extra):
        config = tiny(tmp_path, "eval_interval=2", "checkpoint_interval=2", *extra)
        return Trainer(config, progress=False).fit()

    fit("max_iters=2", "optim.optimizer=adamw")
    first = read_metrics(tmp_path / "run")[0]
    with pytest.raises(CheckpointError, match="optim.optimizer=adamw, and this config says muon"):
        fit("max_iters=4")
    resumed = fit("max_iters=4", "optim.optimizer=adamw")
    rows = read_metrics(tmp_path / "run")[0]
    assert resumed.step == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == first  # steps 1-2 kept from the first run, not trained again

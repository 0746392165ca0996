"""Graded tests for chapter 05 (loss and training): `minillm grade ch05`.

References are torch's own `F.cross_entropy`, `torch.optim.AdamW`, `torch.optim.lr_scheduler`,
`torch.nn.utils.clip_grad_norm_`, autograd on one big batch, an evaluation and an uninterrupted run
computed here, `torch.utils.flop_counter.FlopCounterMode`, and hand values. Everything runs in
float64: comparisons with torch use atol 1e-12 (only rounding differs), hand values atol 1e-9.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from minillm.model import GPT, GPTConfig
from tests.exercises import in_worker

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "cross_entropy": (
        "torch.nn.functional.cross_entropy",
        "torch.nn.functional.nll_loss",
        "torch.nn.functional.log_softmax",
        "torch.log_softmax",
        "torch.Tensor.log_softmax",
    ),
    "perplexity": ("torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss"),
    "label_smoothed_cross_entropy": (
        "torch.nn.functional.cross_entropy",
        "torch.nn.functional.nll_loss",
    ),
    "warmup_cosine_lr": (
        "torch.optim.lr_scheduler.LRScheduler.__init__",
        "minillm.engines.common.lr_at",
        "minillm.engines.common.lr_schedule",
    ),
    "clip_grad_norm": (
        "torch.nn.utils.clip_grad_norm_",
        "torch.nn.utils.get_total_norm",
        "torch.nn.utils.clip_grads_with_norm_",
    ),
    "adamw_step": (
        "torch.optim.AdamW.step",
        "torch.optim.Adam.step",
        "torch.optim.adamw.adamw",
    ),
    "decay_param_names": ("minillm.model.GPT.param_groups",),
    "evaluate": ("minillm.train.Trainer.evaluate",),
    "save_checkpoint": ("minillm.checkpoint.save", "minillm.train.Trainer.save_checkpoint"),
    "load_checkpoint": ("minillm.checkpoint.load_weights", "minillm.checkpoint.load_state"),
    "gpt_flops_per_token": ("minillm.compute.flops_per_token", "minillm.compute.matmul_weights"),
}

F64 = {"atol": 1e-12, "rtol": 0.0}
HAND = {"atol": 1e-9, "rtol": 0.0}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randint(high, *shape, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def torch_ce(logits, targets, **kwargs):
    """torch's mean cross-entropy for `(..., V)` logits and `(...)` targets."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), **kwargs)


# -- the loss --------------------------------------------------------------------------------


@pytest.mark.points(2)
def test_cross_entropy_matches_torch(impl):
    """Catches a sign error, a log-softmax over the wrong axis, summing instead of averaging over
    positions, and log base 2 instead of the natural log; (batch, seq, vocab) and (N, vocab)
    inputs both work."""
    ex = impl("ch05_training")
    logits, targets = randn(3, 5, 7) * 3, randint(7, 3, 5)
    torch.testing.assert_close(ex.cross_entropy(logits, targets), torch_ce(logits, targets), **F64)
    flat, flat_targets = logits.flatten(0, 1), targets.flatten()  # (N, V) and (N,)
    torch.testing.assert_close(
        ex.cross_entropy(flat, flat_targets), F.cross_entropy(flat, flat_targets), **F64
    )


@pytest.mark.points(2)
def test_cross_entropy_is_stable_for_huge_logits(impl):
    """Catches softmax computed as exp(z) / sum(exp(z)) without subtracting the maximum: exp(1000)
    overflows to inf and the loss becomes NaN or inf."""
    ex = impl("ch05_training")
    # By hand: p = [1, 3] / 4 for logits [1000, 1000 + ln 3], so the loss of target 1 is -ln(3/4).
    logits = torch.tensor([[1000.0, 1000.0 + math.log(3.0)]], dtype=torch.float64)
    loss = ex.cross_entropy(logits, torch.tensor([1]))
    assert torch.isfinite(loss), f"the loss of large logits is {loss}: subtract the maximum first"
    torch.testing.assert_close(loss, torch.tensor(-math.log(0.75), dtype=torch.float64), **HAND)
    huge, targets = randn(2, 4, 9) * 1e4, randint(9, 2, 4, seed=1)
    torch.testing.assert_close(
        ex.cross_entropy(huge, targets), torch_ce(huge, targets), atol=0.0, rtol=1e-12
    )


@pytest.mark.points(2)
def test_cross_entropy_skips_ignored_targets(impl):
    """Catches averaging over every position, ignored ones included (the loss comes out too
    small), and ignoring the `ignore_index` argument (here also 3, a real id)."""
    ex = impl("ch05_training")
    # By hand: only the first position counts, with p(target) = 0.5.
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [9.0, 0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(
        ex.cross_entropy(logits, torch.tensor([[2, -100]])),
        torch.tensor(math.log(2.0), dtype=torch.float64),
        **HAND,
    )
    logits, targets = randn(3, 6, 5), randint(5, 3, 6, seed=2)
    padded = targets.clone()
    padded[:, 4:] = -100  # padding at the end of every sequence
    padded[1, 0] = -100
    torch.testing.assert_close(
        ex.cross_entropy(logits, padded), torch_ce(logits, padded, ignore_index=-100), **F64
    )
    torch.testing.assert_close(
        ex.cross_entropy(logits, targets, ignore_index=3),
        torch_ce(logits, targets, ignore_index=3),
        **F64,
    )


@pytest.mark.points(1)
def test_perplexity_is_exp_of_the_mean_loss(impl):
    """Catches the arithmetic mean of the per-token perplexities 1/p instead of exp of the mean
    loss (their geometric mean), and 2 ** loss instead of e ** loss."""
    ex = impl("ch05_training")
    uniform = torch.zeros(2, 3, 65, dtype=torch.float64)
    assert ex.perplexity(uniform, randint(65, 2, 3)) == pytest.approx(65.0, rel=1e-12)
    # By hand: p(target) = 1/2 and 1/100 give exp(mean(ln 2, ln 100)) = sqrt(200), not 51.
    logits = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.01, 0.0, 0.99]], dtype=torch.float64))
    assert ex.perplexity(logits, torch.tensor([0, 0])) == pytest.approx(math.sqrt(200), rel=1e-9)
    logits, targets = randn(4, 8, 11), randint(11, 4, 8, seed=3)
    targets[0, :3] = -100
    expected = torch_ce(logits, targets, ignore_index=-100).exp().item()
    assert ex.perplexity(logits, targets) == pytest.approx(expected, rel=1e-12)


@pytest.mark.points(2)
def test_label_smoothing_matches_torch(impl):
    """Catches spreading the smoothing over the V - 1 wrong tokens only (torch gives every token,
    the true one included, smoothing / V), forgetting the 1 - smoothing on the true token's term,
    and counting ignored positions."""
    ex = impl("ch05_training")
    logits, targets = randn(3, 5, 7) * 2, randint(7, 3, 5, seed=4)
    targets[0, 1] = targets[2, 4] = -100
    for eps in (0.0, 0.1, 0.3):
        expected = torch_ce(logits, targets, ignore_index=-100, label_smoothing=eps)
        out = ex.label_smoothed_cross_entropy(logits, targets, eps)
        torch.testing.assert_close(out, expected, **F64, msg=f"smoothing={eps}")


# -- the learning-rate schedule --------------------------------------------------------------


def torch_warmup_cosine(max_lr, min_lr, warmup, max_steps):
    """The learning rates torch's schedulers give for steps 0..max_steps: LinearLR from max_lr /
    warmup up to max_lr over the warm-up, then CosineAnnealingLR down to min_lr."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=max_lr)
    warm = LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    cosine = CosineAnnealingLR(opt, T_max=max_steps - warmup, eta_min=min_lr)
    schedule = SequentialLR(opt, [warm, cosine], milestones=[warmup])
    lrs = []
    for _ in range(max_steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


@pytest.mark.points(2)
def test_warmup_cosine_lr_matches_torch_schedulers(impl):
    """Catches the warm-up off by one (lr 0 at the first step, max_lr only one step late) and a
    cosine stretched over max_steps instead of max_steps - warmup_steps."""
    ex = impl("ch05_training")
    hyper = {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "max_steps": 60}
    expected = torch_warmup_cosine(3e-3, 3e-4, 10, 60)
    got = [ex.warmup_cosine_lr(step, **hyper) for step in range(61)]
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"step {step}: {a} != torch's {b}"


@pytest.mark.points(1)
def test_warmup_cosine_lr_ends_at_min_lr_and_stays_there(impl):
    """Catches a cosine that never reaches min_lr (decaying towards 0, or reaching min_lr only as
    steps go to infinity) and one that climbs back up after max_steps."""
    ex = impl("ch05_training")

    def lr(step, warmup=4):
        return ex.warmup_cosine_lr(step, max_lr=1.0, min_lr=0.1, warmup_steps=warmup, max_steps=24)

    # By hand: first step 1/4 of the peak, the peak at steps 3 and 4, halfway (step 14) the mean
    # of the two ends, min_lr at step 24 and after.
    for step, expected in [
        (0, 0.25),
        (3, 1.0),
        (4, 1.0),
        (14, 0.55),
        (24, 0.1),
        (25, 0.1),
        (40, 0.1),
        (1000, 0.1),
    ]:
        assert lr(step) == pytest.approx(expected, abs=1e-12), f"step {step}"
    assert lr(0, warmup=0) == pytest.approx(1.0, abs=1e-12), "no warm-up: start at max_lr"


# -- gradient clipping and accumulation ------------------------------------------------------


def params_with_grads(scale, seed=0):
    """Three float64 parameters with gradients of very different sizes, and one without."""
    shapes = [(4, 3), (3,), (2, 2, 2)]
    params = [nn.Parameter(randn(*s, seed=seed + i)) for i, s in enumerate(shapes)]
    for i, p in enumerate(params):
        p.grad = randn(*p.shape, seed=seed + 10 + i) * scale * (i + 1) ** 2
    return [*params, nn.Parameter(randn(5, seed=seed + 3))]  # the last has .grad None


@pytest.mark.points(2)
def test_clip_grad_norm_matches_torch(impl):
    """Catches clipping each tensor to max_norm on its own instead of scaling all of them by one
    factor from the global norm, and returning the norm after clipping instead of before."""
    ex = impl("ch05_training")
    mine, ref = params_with_grads(10.0), params_with_grads(10.0)
    norm = ex.clip_grad_norm(mine, max_norm=1.0)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm=1.0)
    assert norm == pytest.approx(expected.item(), rel=1e-12)
    for p, q in zip(mine, ref, strict=True):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, **F64)


@pytest.mark.points(1)
def test_clip_grad_norm_leaves_small_gradients_alone(impl):
    """Catches rescaling every gradient to norm max_norm, which blows small gradients up."""
    ex = impl("ch05_training")
    params = params_with_grads(0.01)
    before = [p.grad.clone() for p in params if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before])).item()
    assert ex.clip_grad_norm(params, max_norm=1.0) == pytest.approx(expected, rel=1e-12)
    for p, g in zip(params[:3], before, strict=True):
        torch.testing.assert_close(p.grad, g, **F64)


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.points(2)
def test_accumulate_gradients_equals_one_big_batch(impl):
    """Catches forgetting to divide each micro-batch's loss by the number of micro-batches
    (gradients 4 times too large), zeroing the gradients inside the loop (only the last
    micro-batch's gradient is left), and keeping stale gradients from before the call."""
    ex = impl("ch05_training")
    x, y = randn(12, 5), randint(3, 12, seed=5)
    big = tiny_mlp()
    big_loss = F.cross_entropy(big(x), y)
    big_loss.backward()
    model = tiny_mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # stale: the call must not add to these
    micro_batches = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 12, 3)]
    loss = ex.accumulate_gradients(model, F.cross_entropy, micro_batches)
    assert loss == pytest.approx(big_loss.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **F64, msg=f"gradient of {name}")


# -- the optimizer ---------------------------------------------------------------------------


@pytest.mark.points(3)
def test_adamw_step_matches_torch_over_several_steps(impl):
    """Catches the weight decay added to the gradient (Adam's L2, which passes through m and v)
    instead of applied to the weight, a missing bias correction, eps inside the square root, and
    moments that are not updated in place."""
    ex = impl("ch05_training")
    hyper = {"lr": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    ref = nn.Parameter(randn(3, 4))
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    param = ref.detach().clone()
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, 6):
        grad = randn(3, 4, seed=step)
        ref.grad = grad.clone()
        opt.step()
        ex.adamw_step(param, grad, exp_avg, exp_avg_sq, step, **hyper)
        torch.testing.assert_close(param, ref.detach(), **F64, msg=f"param after step {step}")
    state = opt.state[ref]
    torch.testing.assert_close(exp_avg, state["exp_avg"], **F64)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], **F64)


@pytest.mark.points(1)
def test_adamw_decay_is_decoupled_and_first_step_is_bias_corrected(impl):
    """Hand values. Catches L2 regularisation in place of decoupled decay (with a zero gradient
    AdamW only shrinks the weight by lr * weight_decay), and a missing bias correction (the first
    step is then about 3 times lr here instead of lr)."""
    ex = impl("ch05_training")
    param = torch.tensor([4.0, -8.0], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    ex.adamw_step(param, zeros, zeros.clone(), zeros.clone(), 1, lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(param, torch.tensor([3.8, -7.6], dtype=torch.float64), **HAND)

    param = torch.tensor([2.0, -4.0], dtype=torch.float64)
    grad = torch.tensor([0.3, -0.003], dtype=torch.float64)
    ex.adamw_step(param, grad, zeros.clone(), zeros.clone(), 1, lr=0.1, eps=0.0, weight_decay=0.0)
    torch.testing.assert_close(param, torch.tensor([1.9, -3.9], dtype=torch.float64), **HAND)


# -- which parameters decay ------------------------------------------------------------------


@pytest.mark.points(2)
def test_decay_param_names(impl):
    """Catches decaying every tensor of two or more dimensions (the embedding tables), deciding by
    the name "weight" (LayerNorm gains get decayed), and a tied lm_head decaying the token
    embedding through the back door."""
    ex = impl("ch05_training")
    config = {"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8}
    for tied in (True, False):
        model = GPT(GPTConfig(**config, tie_weights=tied))
        names = {name for name, _ in model.named_parameters()}
        # By hand: the six projections of each block, and lm_head when untied (a tied lm_head is
        # tok_emb's matrix, listed once, as tok_emb.weight).
        expected = {n for n in names if n.endswith("_proj.weight") or n == "lm_head.weight"}
        decay, no_decay = ex.decay_param_names(model)
        assert set(decay) == expected, f"tie_weights={tied}: wrong decay set"
        assert set(no_decay) == names - expected, f"tie_weights={tied}: wrong no-decay set"
    stack = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.Linear(2, 2))
    decay, no_decay = ex.decay_param_names(stack)
    assert set(decay) == {"2.weight", "3.weight"}
    assert set(no_decay) == {"0.weight", "1.weight", "1.bias", "2.bias", "3.bias"}


# -- sampling --------------------------------------------------------------------------------


def reference_top_k(logits, k, temperature):
    """Softmax over each row's k largest logits only, scattered back into zeros."""
    top, index = (logits / temperature).sort(dim=-1, descending=True)
    probs = torch.zeros_like(logits)
    return probs.scatter(-1, index[..., :k], top[..., :k].softmax(dim=-1))


@pytest.mark.points(2)
def test_top_k_probs(impl):
    """Catches multiplying by the temperature instead of dividing, keeping the top k without
    renormalising them, masking the others with logit 0 instead of -inf (they keep some
    probability), and keeping k - 1 or k + 1 tokens."""
    ex = impl("ch05_training")
    # By hand: the top two of [2, 1, 0, -1] get e/(e + 1) and 1/(e + 1).
    out = ex.top_k_probs(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64), k=2)
    e = math.e
    torch.testing.assert_close(
        out, torch.tensor([e / (e + 1), 1 / (e + 1), 0.0, 0.0], dtype=torch.float64), **HAND
    )
    logits = randn(3, 2, 10) * 2
    for k in (1, 3, 10):
        for temperature in (0.5, 1.0, 2.0):
            torch.testing.assert_close(
                ex.top_k_probs(logits, k=k, temperature=temperature),
                reference_top_k(logits, k, temperature),
                **F64,
                msg=f"k={k}, temperature={temperature}",
            )
    torch.testing.assert_close(
        ex.top_k_probs(logits, temperature=0.7), (logits / 0.7).softmax(dim=-1), **F64
    )


# -- evaluation ------------------------------------------------------------------------------


def dropout_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.5))


def eval_batches():
    return [(randint(11, 3, 8, seed=s), randint(11, 3, 8, seed=s + 50)) for s in range(4)]


@pytest.mark.points(2)
def test_evaluate_uses_eval_mode_and_no_grad(impl):
    """Catches an evaluation with dropout left on (forgetting model.eval(): the loss is noisy and
    too high) and one that builds a graph (forgetting torch.no_grad(): every activation kept for
    a backward that never comes). The reference is the mean loss in eval mode, computed here."""
    ex = impl("ch05_training")
    model, batches = dropout_gpt(), eval_batches()
    loss, calls, _ = ex.run_helper(in_worker.evaluate_in_worker, model, batches, True)
    model.eval()
    with torch.no_grad():
        expected = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    assert len(calls) == len(batches), f"expected {len(batches)} forward calls, got {len(calls)}"
    assert not any(training for _, training in calls), (
        "the model (or a submodule) was in train mode during the evaluation: dropout was on; "
        "call model.eval() first"
    )
    assert not any(grad for grad, _ in calls), (
        "gradients were enabled during the evaluation: wrap it in torch.no_grad()"
    )
    assert loss == pytest.approx(expected, rel=1e-6), f"expected mean loss {expected}, got {loss}"


@pytest.mark.points(1)
def test_evaluate_restores_the_mode_it_found(impl):
    """Catches leaving the model in eval mode after evaluating a training model (the rest of the
    run then trains without dropout), and forcing train mode on a model that was in eval mode."""
    ex = impl("ch05_training")
    for training in (True, False):
        _, _, after = ex.run_helper(
            in_worker.evaluate_in_worker, dropout_gpt(), eval_batches(), training
        )
        assert after is training, (
            f"the model was {'training' if training else 'in eval mode'} before the call and "
            f"{'training' if after else 'in eval mode'} after it; restore the mode you found"
        )


# -- checkpoint and resume -------------------------------------------------------------------


@pytest.mark.points(3)
@pytest.mark.timeout(180)  # three short runs; a busy machine needs more than the default 60 s
def test_resumed_run_equals_an_uninterrupted_one(impl):
    """Catches a checkpoint of the weights alone (AdamW's moments and step counts start again:
    the resumed run drifts away), a step that is not saved or not returned, and a load that
    leaves the fresh model's own weights. The reference is the same 10 steps without a stop, run
    here; on a CPU the two must agree bit for bit."""
    ex = impl("ch05_training")
    model, optimizer, batches = in_worker.resume_problem()
    in_worker.train_on(model, optimizer, batches)
    for stop in (3, 7):
        step, weights = ex.run_helper(in_worker.resume_in_worker, stop)
        assert step == stop, f"load_checkpoint returned step {step!r}, expected {stop}"
        for name, value in model.state_dict().items():
            assert torch.equal(weights[name], value), (
                f"stopped after {stop} steps and resumed: {name} differs from the uninterrupted "
                f"run by up to {(weights[name] - value).abs().max():.2e}; save and load the "
                "optimizer's state_dict too"
            )


# -- the compute budget ----------------------------------------------------------------------


def counted_training_flops(config, batch=2):
    """FlopCounterMode's count of one forward + backward of GPT(config) with written-out attention
    (torch's fused CPU attention has no FLOP formula), per token."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**config.to_dict(), "attention": "manual"}))
    idx = randint(config.vocab_size, batch, config.block_size)
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    return counter.get_total_flops() // (batch * config.block_size)


@pytest.mark.points(2)
def test_gpt_flops_per_token_matches_a_flop_counter(impl):
    """Catches 6N from the parameter count (it misses attention's q k^T and p v, and the tied
    lm_head's matmul), the forward alone (2 W instead of 6 W), and attention counted once per
    model instead of once per layer. The reference is torch's FlopCounterMode on a real step."""
    ex = impl("ch05_training")
    example = ex.gpt_flops_per_token(GPTConfig())
    assert example == 5_161_728, (
        f"GPTConfig() (the docstring's example): expected 5,161,728, got {example}"
    )
    for config in (
        GPTConfig(vocab_size=50, block_size=32, n_layer=3, n_head=2, n_embd=24),
        GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=4, n_embd=64, tie_weights=False),
    ):
        expected = counted_training_flops(config)
        got = ex.gpt_flops_per_token(config)
        assert got == expected, f"{config}: expected {expected:,} FLOPs per token, got {got:,}"

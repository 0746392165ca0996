"""Speed against peers: minillm's training step and main job beside GPTs a user would pick.

The peers are installed from the registry, not copied: transformers' `GPT2LMHeadModel` (a
dependency of the course) and the models of Sebastian Raschka's book "Build a Large Language
Model (From Scratch)", package `llms-from-scratch`: `GPTModel` (the book's) and `GPTModelFast`
(its bonus variant with a fused query/key/value projection and torch's attention kernel). That
package pins numpy below 2.1 and pulls in TensorFlow, while its model and training loop need
only torch, so it is a benchmark-only install without its dependencies:

    .venv/bin/pip install --no-deps llms-from-scratch

Every model has the main job's size (configs/train/shakespeare_char.yaml: 4 layers, 4 heads,
width 128, context 64, 65 characters, batch 12, fp32, no dropout) and keeps its own training
defaults: minillm its engine (`PlainEngine`: the config's rates, AdamW fused, with clipping at 1.0;
timed also with the main job's optimizer, Muon, which the comparison leaves out: the peers step
with AdamW);
transformers what its `Trainer` builds by default (AdamW fused, lr 5e-5, clipping at 1.0); the
book's models the book's chapter 5 loop (AdamW, lr 4e-4, weight decay 0.1, no clipping).

All steps run in one process, in alternating rounds, so that every model sees the same machine
load; each figure is the median over rounds. Model FLOPs per step are
`minillm.compute.flops_per_token` (6 W + 12 L T C: W the weights that multiply, the blocks' and
the output head's, the second term the attention scores and their weighted sum) times the
tokens of a step, the same for every model of this shape. The fp32 matmul peak
(`minillm.compute.matmul_peak`, 2048 x 2048) is measured in the same rounds, and every model's
share of it is printed. Targets: minillm at least 1.3x faster per step than the fastest
peer and at least 50% of the peak. minillm's step is also profiled: the time its matmul and
attention kernels take is what no change outside them can save, and the run prints how little
would be left for everything else (norms, GELU, loss, AdamW) in a step 1.3x faster. The fastest
peer is profiled the same way: its kernels are the same matmuls, and the fastest peer's step over
minillm's kernel time is the most any change outside the kernels could reach.
`--compile` times minillm with `compile=true` (torch.compile, AdamW) beside it, and prints what
the compilation cost: the lever the kernels' share leaves, weighed in the same rounds.

The main job is compared with the peer that ships a training loop, the book's
`train_model_simple`: both train for `--job-steps` steps (a quarter of the 2000 by default)
with the main job's evaluation (20 batches per split every 250 steps) on the same corpus.

    python benchmarks/peers.py [--rounds 15] [--steps 10] [--job-steps 500] [--no-job]
                               [--compile] [--set key=value ...]   (minillm's config, as
                                                                    `minillm train`)
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minillm import compute, data
from minillm.engines import PlainEngine
from minillm.model import GPT
from minillm.train import Trainer
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/train/shakespeare_char.yaml"
SPEEDUP_TARGET, PEAK_TARGET = 1.3, 0.5
INSTALL = ".venv/bin/pip install --no-deps llms-from-scratch"


def require_book_package():
    try:
        from llms_from_scratch import ch04, ch05
    except ImportError:
        sys.exit(
            "this benchmark compares with the book's models, package llms-from-scratch; install "
            f"it without its dependencies (it needs only torch):\n    {INSTALL}"
        )
    return ch04, ch05


def minillm_step(config):
    model = GPT(config.model)
    engine = PlainEngine(model, config, torch.device("cpu"))

    def step(x, y):
        engine.backward(engine.forward(x, y))
        engine.step()

    return model, step


def transformers_step(m):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=m.block_size,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[])
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_class(model.parameters(), **kwargs)

    def step(x, y):
        # GPT-2 shifts the labels itself: the labels are the inputs
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def book_config(m) -> dict:
    return {
        "vocab_size": m.vocab_size,
        "context_length": m.block_size,
        "emb_dim": m.n_embd,
        "n_heads": m.n_head,
        "n_layers": m.n_layer,
        "drop_rate": 0.0,
        "qkv_bias": False,  # the book's setting for training from scratch
    }


def book_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)  # chapter 5's


def book_step(model_class, ch05, m):
    model = model_class(book_config(m))
    optimizer = book_optimizer(model)

    def step(x, y):  # the body of ch05.train_model_simple's loop
        optimizer.zero_grad()
        ch05.calc_loss_batch(x, y, model, "cpu").backward()
        optimizer.step()

    return model, step


# The kernels whose work is the model's FLOPs: the linear layers and the attention.
MATMUL_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash")


def matmul_share(step, x, y, steps: int = 5) -> float:
    """The share of a step's CPU time that the matmul and attention kernels take (their self
    time under torch's profiler, over `steps` steps): what no change outside them can save."""
    from torch.profiler import ProfilerActivity, profile, schedule

    # one step profiled and thrown away: a model's first profiled step can count twice the time
    cycles = []
    with profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
        on_trace_ready=lambda prof: cycles.append(prof.key_averages()),
    ) as prof:
        for _ in range(1 + steps):
            step(x, y)
            prof.step()
    (events,) = cycles
    total = sum(e.self_cpu_time_total for e in events)
    kernels = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_KERNELS))
    return kernels / total


def time_rounds(steps: dict, rounds: int, per_round: int, x, y) -> tuple[dict[str, float], float]:
    """Median seconds per call of each step, in alternating rounds after a warm-up, and the
    median over the rounds of the fp32 matmul peak (FLOP/s), measured in each round too."""
    for step in steps.values():
        for _ in range(3):
            step(x, y)
    times = {name: [] for name in steps}
    peaks = []
    for _ in range(rounds):
        peaks.append(compute.matmul_peak(repeats=3).median)
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step(x, y)
            times[name].append((time.perf_counter() - start) / per_round)
    return {name: statistics.median(t) for name, t in times.items()}, statistics.median(peaks)


class CharTokenizerForBook:
    """minillm's character tokenizer with the `encode(text, allowed_special=...)` signature that
    the book's sampling helper calls (tiktoken's)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text, allowed_special=None):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


class Windows(torch.utils.data.Dataset):
    """The book's dataset (`GPTDatasetV1`) on token ids: windows of `block` tokens, stride
    `block`, each with the window shifted by one as its targets."""

    def __init__(self, ids, block: int):
        self.ids, self.block = torch.as_tensor(ids, dtype=torch.long), block

    def __len__(self):
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i):
        chunk = self.ids[i * self.block : (i + 1) * self.block + 1]
        return chunk[:-1], chunk[1:]


def time_main_jobs(config, overrides: list[str], steps: int, ch04, ch05) -> dict[str, float]:
    """Wall seconds of `steps` steps of the main job: minillm's Trainer, and the book's
    `train_model_simple` with the same evaluation schedule and a sample at the end."""
    c = config
    trainer_seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = load_config(
            CONFIG, [f"out_dir={tmp}", f"max_iters={steps}", "sample_tokens=0", *overrides]
        )
        start = time.perf_counter()
        trainer = Trainer(job, progress=False)
        trainer.fit()
        trainer_seconds["minillm Trainer"] = time.perf_counter() - start
    tokenizer = trainer.tokenizer
    start = time.perf_counter()
    ids = data.load_tokens(c.data.corpus, tokenizer, progress=False)
    train_ids, val_ids = data.train_val_split(ids, c.data.val_fraction)
    torch.manual_seed(c.seed)
    windows = Windows(train_ids, c.model.block_size)
    train_loader = torch.utils.data.DataLoader(  # shuffled, as the book's; `steps` batches
        windows,
        batch_size=c.batch_size,
        sampler=torch.utils.data.RandomSampler(windows, num_samples=steps * c.batch_size),
        drop_last=True,
    )
    val_loader = torch.utils.data.DataLoader(
        Windows(val_ids, c.model.block_size),
        batch_size=c.batch_size,
        shuffle=False,
        drop_last=True,
    )
    model = ch04.GPTModelFast(book_config(c.model))
    ch05.train_model_simple(
        model,
        train_loader,
        val_loader,
        book_optimizer(model),
        "cpu",
        num_epochs=1,
        eval_freq=c.eval_interval,
        eval_iter=c.eval_iters,
        start_context="\n",
        tokenizer=CharTokenizerForBook(tokenizer),
    )
    trainer_seconds["book train_model_simple"] = time.perf_counter() - start
    return trainer_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and model")
    parser.add_argument("--job-steps", type=int, default=500)
    parser.add_argument("--no-job", action="store_true", help="time the steps only")
    parser.add_argument(
        "--compile", action="store_true", help="time minillm with torch.compile (AdamW) too"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override minillm's config"
    )
    args = parser.parse_args()
    ch04, ch05 = require_book_package()
    config = load_config(CONFIG, ["sample_tokens=0", *args.set])
    # the peers' mathematics (AdamW) for the comparison; the main job's Muon timed beside it
    adamw, muon, compiled = (
        load_config(CONFIG, ["sample_tokens=0", *args.set, "optim.optimizer=" + name, *extra])
        for name, extra in (("adamw", []), ("muon", []), ("adamw", ["compile=true"]))
    )
    m = config.model
    torch.manual_seed(0)
    models, steps = {}, {}
    compiled_row = [("minillm compiled", lambda: minillm_step(compiled))] if args.compile else []
    for name, build in (
        ("minillm", lambda: minillm_step(adamw)),
        ("minillm Muon", lambda: minillm_step(muon)),
        *compiled_row,
        ("transformers GPT-2", lambda: transformers_step(m)),
        ("book GPTModel", lambda: book_step(ch04.GPTModel, ch05, m)),
        ("book GPTModelFast", lambda: book_step(ch04.GPTModelFast, ch05, m)),
    ):
        models[name], steps[name] = build()
    x = torch.randint(0, m.vocab_size, (config.batch_size, m.block_size))
    y = torch.roll(x, -1, dims=1)
    if args.compile:  # the first call compiles (from torch's inductor cache after a first run)
        start = time.perf_counter()
        steps["minillm compiled"](x, y)
        compile_seconds = time.perf_counter() - start
    median, peak = time_rounds(steps, args.rounds, args.steps, x, y)
    tokens = config.batch_size * m.block_size
    flops = compute.flops_per_token(m) * tokens
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; model FLOPs per step {flops / 1e9:.2f} G "
        f"({tokens} tokens); {args.rounds} rounds x {args.steps} steps, medians"
    )
    for name, t in median.items():
        params = sum(p.numel() for p in models[name].parameters())
        print(
            f"{name:<19} {t * 1e3:7.2f} ms/step  {tokens / t:7,.0f} tokens/s  "
            f"{flops / t / 1e9:6.1f} GFLOP/s  {flops / t / peak:5.1%} of peak  "
            f"{params:,} parameters"
        )
    print(
        f"Muon (the main job's optimizer) costs {median['minillm Muon'] / median['minillm']:.2f}x"
        " AdamW's step: its Newton-Schulz iteration is matmuls the model FLOPs above leave out"
    )
    if args.compile:
        saved = median["minillm"] - median["minillm compiled"]
        payback = f"{compile_seconds / saved:,.0f} steps" if saved > 0 else "never"
        print(
            f"torch.compile: its first step took {compile_seconds:.1f} s (compiling); then "
            f"{median['minillm'] / median['minillm compiled']:.2f}x eager minillm's speed; "
            f"it earns the compilation back after {payback}"
        )
    fastest_peer = min((t, n) for n, t in median.items() if not n.startswith("minillm"))
    ratio = fastest_peer[0] / median["minillm"]
    share = flops / median["minillm"] / peak
    print(
        f"minillm is {ratio:.2f}x faster per step than the fastest peer ({fastest_peer[1]}; "
        f"target >= {SPEEDUP_TARGET}) and runs at {share:.1%} of the matmul peak "
        f"(target >= {PEAK_TARGET:.0%})"
    )
    kernels_ms = matmul_share(steps["minillm"], x, y) * median["minillm"] * 1e3
    budget_ms = fastest_peer[0] / SPEEDUP_TARGET * 1e3
    print(
        f"of minillm's {median['minillm'] * 1e3:.1f} ms, the matmul and attention kernels take "
        f"{kernels_ms:.1f} ms (torch's profiler) and everything else "
        f"{(median['minillm'] * 1e3 - kernels_ms):.1f} ms; {SPEEDUP_TARGET}x the fastest peer "
        f"is a step of {budget_ms:.1f} ms, which leaves {budget_ms - kernels_ms:.1f} ms for "
        "everything else"
    )
    peer_kernels_ms = matmul_share(steps[fastest_peer[1]], x, y) * fastest_peer[0] * 1e3
    print(
        f"the fastest peer's kernels take {peer_kernels_ms:.1f} ms of its "
        f"{fastest_peer[0] * 1e3:.1f} ms: with the same mathematics minillm runs the same "
        f"kernels, so even a step that spent nothing outside them would be "
        f"{fastest_peer[0] * 1e3 / kernels_ms:.2f}x the fastest peer"
    )
    ok = ratio >= SPEEDUP_TARGET and share >= PEAK_TARGET
    if not args.no_job:
        seconds = time_main_jobs(config, args.set, args.job_steps, ch04, ch05)
        print(f"main job, {args.job_steps} of {config.max_iters} steps with its evaluations:")
        for name, s in seconds.items():
            print(f"{name:<24} {s:6.1f} s  ({s / args.job_steps * 1e3:.1f} ms per step)")
        job_ratio = seconds["book train_model_simple"] / seconds["minillm Trainer"]
        print(f"minillm's main job is {job_ratio:.2f}x faster than the book's loop")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

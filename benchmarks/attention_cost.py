"""Time and memory of attention as the sequence grows: minillm's written-out attention against
torch's fused `F.scaled_dot_product_attention`, both timed in the same run.

    python benchmarks/attention_cost.py                       # CPU or the first GPU, float32
    python benchmarks/attention_cost.py --device cuda --dtype bfloat16 --seq-lens 1024 4096 16384

"score MiB" is computed, not measured: the size of one (batch, heads, seq, seq) score tensor,
which the written-out attention must hold (briefly two or three of them). On CUDA the peak memory
each implementation allocated above its inputs is measured as well; torch's fused kernels work
in tiles and never hold the whole score matrix.
"""

from __future__ import annotations

import argparse
import math

import torch

from minillm.attention import attention_cost

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: 2 means y grows as x^2."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    args = parser.parse_args(argv)

    costs = attention_cost(
        args.seq_lens,
        batch=args.batch,
        n_heads=args.heads,
        d_head=args.d_head,
        causal=not args.no_causal,
        dtype=DTYPES[args.dtype],
        device=args.device,
        repeats=args.repeats,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device={device} dtype={args.dtype} batch={args.batch} heads={args.heads} "
        f"d_head={args.d_head} causal={not args.no_causal} threads={torch.get_num_threads()}"
    )
    mib = 2**20
    header = f"{'seq':>7} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>10} {'score MiB':>10}"
    measured = costs[0].peak_bytes is not None
    if measured:
        header += f" {'ours peak MiB':>14} {'torch peak MiB':>15}"
    print(header)
    for c in costs:
        row = (
            f"{c.seq_len:>7} {c.seconds * 1e3:>9.3f} {c.torch_seconds * 1e3:>9.3f} "
            f"{c.slowdown:>10.2f} {c.score_bytes / mib:>10.1f}"
        )
        if measured:
            row += f" {c.peak_bytes / mib:>14.1f} {c.torch_peak_bytes / mib:>15.1f}"
        print(row)
    if len(costs) > 1:
        seqs = [c.seq_len for c in costs]
        print(
            "log-log slope vs seq (2 = quadratic): "
            f"ours time {log_slope(seqs, [c.seconds for c in costs]):.2f}, "
            f"torch time {log_slope(seqs, [c.torch_seconds for c in costs]):.2f}, "
            f"score memory {log_slope(seqs, [c.score_bytes for c in costs]):.2f}"
        )


if __name__ == "__main__":
    main()

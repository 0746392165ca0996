"""Peak memory of attention's forward and backward pass against sequence length: the written-out
(quadratic) attention of `minillm.attention` beside the tiled FlashAttention of
`minillm.flash_attention`.

    python benchmarks/flash_attention_memory.py                 # CPU, float32, seq 256..4096
    python benchmarks/flash_attention_memory.py --device cuda --seq-lens 1024 4096 16384

Memory is measured by `peak_tensor_bytes` (every tensor the pass creates, counted while alive,
on any device), above the inputs q, k, v and the output gradient. The written-out attention holds
(batch, heads, seq, seq) scores and probabilities, so its peak grows as seq^2; the tiled one holds
(batch, heads, block_q, block_k) tiles plus seq-long vectors, so its peak grows as seq. The
log-log slope printed at the end is the growth exponent. On CUDA, torch's own allocator peak is
printed beside it. Figures, not speed: no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse

import torch
from attention_cost import log_slope  # this folder's attention benchmark

from minillm.attention import _cuda_peak_bytes, scaled_dot_product_attention
from minillm.flash_attention import flash_attention, peak_tensor_bytes

MIB = 2**20


def forward_backward(attention, q, k, v, grad):
    def run():
        out = attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--block", type=int, default=128, help="block_q = block_k of the tiles")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    args = parser.parse_args(argv)
    device, causal = torch.device(args.device), not args.no_causal

    def quadratic(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=causal)

    def tiled(q, k, v):
        return flash_attention(q, k, v, causal=causal, block_q=args.block, block_k=args.block)

    print(
        f"forward + backward, batch {args.batch}, {args.heads} heads, d_head {args.d_head}, "
        f"float32, {'causal' if causal else 'full'}, tiles {args.block}x{args.block}, {device}"
    )
    header = f"{'seq':>6} {'scores MiB':>11} {'quadratic MiB':>14} {'tiled MiB':>10} {'ratio':>6}"
    if device.type == "cuda":
        header += f" {'cuda quad MiB':>14} {'cuda tiled MiB':>15}"
    print(header)
    quad_peaks, tiled_peaks = [], []
    for seq in args.seq_lens:
        shape = (args.batch, args.heads, seq, args.d_head)
        q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=device)
        quad_fn, tiled_fn = (forward_backward(a, q, k, v, grad) for a in (quadratic, tiled))
        quad, flash = peak_tensor_bytes(quad_fn), peak_tensor_bytes(tiled_fn)
        quad_peaks.append(quad)
        tiled_peaks.append(flash)
        scores = args.batch * args.heads * seq * seq * 4
        line = (
            f"{seq:>6} {scores / MIB:>11.1f} {quad / MIB:>14.1f} {flash / MIB:>10.2f} "
            f"{quad / flash:>6.1f}"
        )
        if device.type == "cuda":
            line += f" {_cuda_peak_bytes(quad_fn, device) / MIB:>14.1f}"
            line += f" {_cuda_peak_bytes(tiled_fn, device) / MIB:>15.2f}"
        print(line)
    if len(args.seq_lens) > 1:
        print(
            f"growth exponent (log-log slope): quadratic {log_slope(args.seq_lens, quad_peaks):.2f}"
            f", tiled {log_slope(args.seq_lens, tiled_peaks):.2f}"
        )


if __name__ == "__main__":
    main()

"""Generation with and without a KV cache, timed in the same run on the same model and prompt.

    python benchmarks/kv_cache.py                          # the course GPT's width, on CPU
    python benchmarks/kv_cache.py --n-layer 12 --n-embd 768 --device cuda

Without the cache every new token reruns the whole window (n tokens cost about n^2 / 2 token
forwards); with it each step runs one token against the cached keys and values. Both decode
greedily with `minillm.generate.generate`, so they must produce the same tokens: the benchmark
checks it. Past block_size the cache is rebuilt every step (see `generate`), so keep
prompt + new tokens within --block-size to measure the cache itself.
"""

from __future__ import annotations

import argparse
import time

import torch

from minillm.generate import generate
from minillm.model import GPT, GPTConfig, KVCache


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_tokens), device=device)
    generate(model, prompt, 4, temperature=0)  # warm-up
    print(
        f"device={device} n_layer={args.n_layer} n_embd={args.n_embd} "
        f"block_size={args.block_size} batch={args.batch} prompt={args.prompt_tokens} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"{'new tokens':>10} {'no cache ms/token':>18} {'cache ms/token':>15} {'speed-up':>9} "
        f"{'cache KiB':>10}"
    )
    for n in args.new_tokens:
        slow, without = timed(
            lambda n=n: generate(model, prompt, n, temperature=0, use_cache=False), device
        )
        fast, with_cache = timed(lambda n=n: generate(model, prompt, n, temperature=0), device)
        if not torch.equal(without, with_cache):
            raise SystemExit("the cache changed the tokens")
        cache = KVCache(config.n_layer)
        with torch.no_grad():
            model(
                with_cache[:, -config.block_size :][:, :-1], cache=cache
            )  # what the last step held
        print(
            f"{n:>10} {slow / n * 1e3:>18.2f} {fast / n * 1e3:>15.2f} {slow / fast:>8.2f}x "
            f"{cache.nbytes() / 2**10:>10.1f}"
        )


if __name__ == "__main__":
    main()

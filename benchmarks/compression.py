"""Chapter 11's serving figures, all measured in one run on one machine:

1. the KV-cache speed-up at `--new-tokens` greedy tokens, and transformers' `generate` with and
   without its cache on the same weights (the ratio of our cached time to theirs);
2. a trained character model (cached in the data cache after the first run) in fp32, int8 and
   int4 weight-only (absmax, per channel) and PyTorch's int8 dynamic quantisation: bytes of the
   saved weights, time per token and validation loss.

    python benchmarks/compression.py                       # CPU, about a minute
    python benchmarks/compression.py --n-embd 768 --n-layer 12 --device cuda

Times are CPU seconds of this process on a CPU (steadier than wall time on a shared machine)
and wall seconds after synchronising on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import io
import time
import warnings

import numpy as np
import torch

from minillm import hf, infer
from minillm.data import load_text, train_val_split
from minillm.generate import generate
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import CharTokenizer


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, out
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def saved_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def kv_cache(args, device: torch.device) -> None:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=65,
        block_size=args.new_tokens + 8,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = GPT(config).to(device).eval()
    theirs = hf.to_hf(model).eval()
    prompt = torch.randint(0, 65, (1, 4), device=device)
    n = args.new_tokens
    runs = {
        "minillm, no cache": lambda: generate(model, prompt, n, temperature=0, use_cache=False),
        "minillm, KV cache": lambda: generate(model, prompt, n, temperature=0),
        "transformers, no cache": lambda: theirs.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=False
        ),
        "transformers, KV cache": lambda: theirs.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True
        ),
    }
    generate(model, prompt, 4, temperature=0)  # warm-up
    seconds, tokens = {}, {}
    print(f"KV cache: {n} greedy tokens, n_layer={args.n_layer} n_embd={args.n_embd}, {device}")
    with torch.no_grad():
        for name, run in runs.items():
            seconds[name], tokens[name] = timed(run, device)
            print(f"  {name:24s} {seconds[name]:7.2f} s  {seconds[name] / n * 1e3:7.2f} ms/token")
    same = all(torch.equal(t, tokens["minillm, KV cache"]) for t in tokens.values())
    ours = seconds["minillm, no cache"] / seconds["minillm, KV cache"]
    theirs_ratio = seconds["transformers, no cache"] / seconds["transformers, KV cache"]
    print(
        f"  speed-up: ours {ours:.1f}x, transformers' {theirs_ratio:.1f}x; our cached time is "
        f"{seconds['minillm, KV cache'] / seconds['transformers, KV cache']:.2f}x theirs; "
        f"all four give the same tokens: {same}"
    )


def quantisation(args, device: torch.device) -> None:
    text = load_text(progress=False)
    tok = CharTokenizer.train(text)
    train_ids, val_ids = train_val_split(np.asarray(tok.encode(text), dtype=np.int64))
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = infer.cached_model(
        GPT(config),
        lambda m: infer.train_lm(m, train_ids, args.steps),
        key={"label": "benchmarks/compression.py", "steps": args.steps},
    ).to(device)
    prompt = torch.tensor([tok.encode("ROMEO:\n")], device=device)
    linears = {name for name, _ in infer.block_linears(model)}
    variants = {
        "fp32": model,
        "int8 absmax per channel": infer.quantize_model(model, 8),
        "int4 absmax per channel": infer.quantize_model(model, 4),
    }
    if device.type == "cpu":  # PyTorch's dynamic quantisation has CPU kernels only
        from torch.ao.quantization import quantize_dynamic

        # it warns that it is moving to torchao; it still runs
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_")

        variants["torch int8 dynamic"] = quantize_dynamic(copy.deepcopy(model), linears)
    print(
        f"quantisation: a {model.num_parameters():,}-parameter character model "
        f"({args.steps} steps), validation loss on the same windows"
    )
    print(f"  {'':26s} {'bytes':>10s} {'ms/token':>9s} {'val loss':>9s}")
    n = 56
    for name, variant in variants.items():
        seconds, _ = timed(lambda v=variant: generate(v, prompt, n, temperature=0), device)
        loss = infer.evaluate_loss(variant, val_ids, 64)
        print(f"  {name:26s} {saved_bytes(variant):>10,} {seconds / n * 1e3:9.2f} {loss:9.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400, help="training steps of the model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if any)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    kv_cache(args, device)
    quantisation(args, device)


if __name__ == "__main__":
    main()

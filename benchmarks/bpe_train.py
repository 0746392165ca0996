"""Benchmark: train minillm's BPE and Hugging Face `tokenizers`' BPE on all of tiny Shakespeare.

Both learn byte-level BPE to the same vocabulary size with the same pre-tokenisation; the script
prints each training time, their ratio, the compression ratio (UTF-8 bytes per token) of each on
the corpus, and whether the merge lists agree. It exits with status 1 if ours takes `--limit`
seconds or more (default 30).

    python benchmarks/bpe_train.py [--vocab-size 512] [--limit 30]
"""

from __future__ import annotations

import argparse
import sys
import time

from minillm.data import load_text
from minillm.tokenizer import BPETokenizer, hf_byte_merges, train_hf_bpe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--limit", type=float, default=30.0, help="seconds ours may take")
    args = parser.parse_args(argv)

    text = load_text("tinyshakespeare")
    n_bytes = len(text.encode("utf-8"))

    start = time.perf_counter()
    ours = BPETokenizer.train(text, args.vocab_size)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = train_hf_bpe(text, args.vocab_size)
    theirs_s = time.perf_counter() - start

    print(
        f"tiny Shakespeare: {n_bytes:,} bytes; vocabulary {args.vocab_size} "
        f"(256 bytes + merges + 1 special token)"
    )
    print(f"{'':<12} {'train s':>8} {'bytes/token':>12}")
    print(f"{'minillm':<12} {ours_s:8.2f} {n_bytes / len(ours.encode(text)):12.3f}")
    print(f"{'tokenizers':<12} {theirs_s:8.2f} {n_bytes / len(theirs.encode(text).ids):12.3f}")
    print(f"ratio minillm / tokenizers: {ours_s / theirs_s:.2f}x")
    same = ours.byte_merges() == hf_byte_merges(theirs)
    print(f"merge lists identical: {same} ({len(ours.merges)} merges)")
    if ours_s >= args.limit:
        print(f"FAIL: minillm took {ours_s:.2f} s; the limit is {args.limit:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

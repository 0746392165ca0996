"""Data parallelism on 2 processes: step time and all-reduce calls per step of minillm's naive,
bucketed and overlapped DataParallel and of torch's DistributedDataParallel.

The course GPT's CPU configuration (4 layers, width 128, context 64: 0.8M parameters, 3.2 MB of
float32 gradients), a global batch of 16 split over the ranks, AdamW. All four variants run one
after the other in the same two processes (`minillm.parallel.ddp.timing_worker`), so they share
the machine's load; each figure is the median over the steps after a warm-up step. On a CPU the
two ranks also share the cores that compute, so overlap gains less than on GPUs, where the
all-reduce runs on the network while the GPU computes.

    python benchmarks/ddp_timing.py [--steps 8] [--bucket-mb 1.0] [--world 2]
"""

import argparse

from minillm.model import GPTConfig
from minillm.parallel.ddp import time_data_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bucket-mb", type=float, default=1.0, help="minillm's bucket cap")
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    report = time_data_parallel(
        args.world,
        GPTConfig(),
        batch_size=args.batch_size,
        steps=args.steps,
        bucket_cap_mb=args.bucket_mb,
    )
    print(f"{'variant':<12}{'step (ms)':>12}{'all-reduces/step':>18}")
    for name, row in report.items():
        label = "torch DDP" if name == "torch" else name
        print(f"{label:<12}{1e3 * row['step_s']:>12.1f}{row['calls_per_step']:>18}")


if __name__ == "__main__":
    main()

"""Speed: one training step of minillm's GPT against transformers' GPT2LMHeadModel.

Both models have the small CPU configuration (4 layers, 4 heads, width 128, context 64,
vocabulary 65, no dropout, tied embeddings, GPT-2's tanh GELU), the same batch of 12, gradient
clipping at 1.0 and the same optimizer: torch's fused AdamW, which is both minillm's engine
optimizer and transformers' default (`adamw_torch_fused`) with this torch.
Steps are timed in alternating rounds in one process so that both see the same machine load;
the figure is the ratio of median step times. Target: minillm at least 1.25x faster on a CPU.

    python benchmarks/train_speed.py [--rounds 15] [--steps 10]
"""

import argparse
import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minillm.model import GPT, GPTConfig

TARGET = 1.25


def make_step(model, optimizer, forward):
    def step(x, y):
        loss = forward(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and model")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    ours = GPT(config)
    theirs = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=65,
            n_positions=64,
            n_embd=128,
            n_layer=4,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            activation_function="gelu_new",
            tie_word_embeddings=True,
        )
    )
    assert ours.num_parameters() == theirs.num_parameters(), "the two models must be the same size"

    def adamw(model):
        return torch.optim.AdamW(
            model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True
        )

    steps = {
        "minillm": make_step(ours, adamw(ours), lambda m, x, y: m(x, y)[1]),
        "transformers": make_step(
            theirs, adamw(theirs), lambda m, x, y: m(input_ids=x, labels=y).loss
        ),
    }
    x = torch.randint(0, 65, (12, 64))
    y = torch.roll(x, -1, dims=1)  # GPT-2 shifts labels itself; minillm takes shifted targets
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        for _ in range(3):
            step(x, x if name == "transformers" else y)
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x, x if name == "transformers" else y)
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["transformers"] / median["minillm"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"transformers attention: {theirs.config._attn_implementation}"
    )
    print(f"parameters: {ours.num_parameters():,} each; batch 12 x 64 tokens")
    for name, t in median.items():
        print(f"{name:<13} median step {t * 1e3:7.2f} ms  ({12 * 64 / t:,.0f} tokens/s)")
    print(f"minillm is {ratio:.2f}x faster per step (target >= {TARGET})")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

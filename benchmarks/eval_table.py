"""Evaluation beyond validation loss (issue 14): multiple-choice accuracy and validation
perplexity of one pre-trained model, of chapter 10's fine-tuned versions of it and of chapter
11's compressed ones, all on the same task and the same text.

The task: `--items` items built by `minillm.evaluate.continuation_task` from the validation
split of tiny Shakespeare (its last 10%, which no model trains on): a passage, its true next 2-6
words and 3 distractors of 2-6 words taken from elsewhere in the split (seed 0). Chance is 25%.
Accuracy is reported summed (`sum`) and length-normalised per character (`per_char`, the
headline, HellaSwag's acc_norm; the models are character-level, so per token is the same).
Perplexity is per character over the whole validation split.

The models, each built as its chapter builds it:

- base: the main job's config (configs/train/shakespeare_char.yaml) with chapter 10's overrides
  (3 layers of 96, 400 steps), trained by the Trainer; or `--checkpoint` a run of the main job;
- chapter 10: full SFT on the instruction examples (250 steps), LoRA r=4 on q and v (250 steps),
  DPO on the preference pairs (60 steps, beta 0.1, the base as reference);
- chapter 11: `minillm compress` int8 and int4 (per-channel absmax, written and read back as a
  compressed checkpoint), 50% magnitude pruning, the MLP at SVD rank 32, and a 2 x 48 student
  distilled from the base (400 steps).

    python benchmarks/eval_table.py          # CPU: 15-26 minutes on a busy shared 2-core machine
    python benchmarks/eval_table.py --checkpoint runs/shakespeare-char --items 200

Results go to `--out` (benchmarks/results/eval_table.json) and are printed as a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minillm import finetune as ft
from minillm import infer
from minillm.data import load_text, train_val_split
from minillm.evaluate import continuation_task, multiple_choice_accuracy, perplexity
from minillm.model import GPT, GPTConfig
from minillm.sample import load_for_sampling
from minillm.train import Trainer
from minillm.train_config import load_config
from minillm.utils import repo_root, seed_everything

REPO = repo_root()


def base_model(args, runs: Path):
    """The pre-trained model, its tokenizer and its checkpoint folder."""
    if args.checkpoint:
        model, tok = load_for_sampling(args.checkpoint)
        return model.eval(), tok, Path(args.checkpoint)
    config = load_config(
        REPO / "configs/train/shakespeare_char.yaml",
        [
            f"max_iters={args.base_iters}",
            "optim.optimizer=adamw",  # the saved table's base model was trained with AdamW
            "model.n_layer=3",
            "model.n_embd=96",
            "model.n_head=4",
            f"eval_interval={args.base_iters}",
            "eval_iters=5",
            f"checkpoint_interval={args.base_iters}",
            "sample_tokens=0",
            f"out_dir={runs}/base",
        ],
    )
    trainer = Trainer(config, progress=False)
    trainer.fit()
    return trainer.model.eval(), trainer.tokenizer, runs / "base"


def finetuned(base: GPT, tok, text: str, args) -> dict[str, GPT]:
    """Chapter 10's SFT, LoRA and DPO, at its sizes."""
    block = base.config.block_size
    examples = ft.instruction_examples(text, 2000, seed=0)

    def sft_loss(model):
        next_batch = ft.batches_of(examples, 32, 0)

        def loss():
            model.train()
            return model(*ft.sft_batch(next_batch(), tok, block))[1]

        return loss

    sft = copy.deepcopy(base)
    ft.train_steps(sft_loss(sft), sft.parameters(), args.sft_steps, 2e-3, progress=False)
    lora = copy.deepcopy(base)
    ft.add_lora(lora, targets=("q_proj", "v_proj"), r=4, alpha=8)
    ft.train_steps(sft_loss(lora), lora.parameters(), args.sft_steps, 1e-2, progress=False)

    pairs = ft.preference_pairs(examples)[:1500]
    next_pairs = ft.batches_of(pairs, 32, seed=1)
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    policy = copy.deepcopy(base)

    def both(batch):
        chosen = ft.sft_batch([ft.Example(p.prompt, p.chosen) for p in batch], tok, block)
        rejected = ft.sft_batch([ft.Example(p.prompt, p.rejected) for p in batch], tok, block)
        return chosen, rejected

    def dpo_loss():
        policy.train()
        chosen, rejected = both(next_pairs())
        with torch.no_grad():
            ref = (
                ft.sequence_logprobs(reference, *chosen),
                ft.sequence_logprobs(reference, *rejected),
            )
        mine = ft.sequence_logprobs(policy, *chosen), ft.sequence_logprobs(policy, *rejected)
        return ft.dpo_loss(*mine, *ref, beta=0.1)[0]

    ft.train_steps(dpo_loss, policy.parameters(), args.dpo_steps, 5e-4, progress=False)
    return {"SFT (full)": sft.eval(), "LoRA r=4 q,v (SFT)": lora.eval(), "DPO": policy.eval()}


def compressed(base: GPT, folder: Path, train_ids: np.ndarray, runs: Path, args) -> dict:
    """Chapter 11's compressions of the base model."""
    models = {}
    for bits in (8, 4):  # what `minillm compress --bits N` writes, read back as `sample` does
        out = infer.write_compressed(folder, runs / f"int{bits}", bits=bits)
        models[f"int{bits} (minillm compress)"] = load_for_sampling(out)[0]
    models["magnitude pruned 50%"] = infer.magnitude_prune(base, 0.5)
    models["MLP at SVD rank 32"] = infer.low_rank_model(base, 32)
    torch.manual_seed(0)
    student = GPT(
        GPTConfig(
            vocab_size=base.config.vocab_size,
            block_size=base.config.block_size,
            n_layer=2,
            n_head=4,
            n_embd=48,
        )
    )
    infer.train_lm(student, train_ids, args.distill_steps, teacher=base, temperature=2.0, alpha=0.5)
    models["distilled student 2 x 48"] = student.eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a main-job run or checkpoint folder as the base")
    parser.add_argument("--base-iters", type=int, default=400)
    parser.add_argument("--sft-steps", type=int, default=250)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--ppl-tokens", type=int, help="score only the first N validation tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/eval_table.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(0)
    start = time.perf_counter()

    text = load_text(progress=False)
    with tempfile.TemporaryDirectory(prefix="eval-table-") as tmp:
        runs = Path(tmp)
        base, tok, folder = base_model(args, runs)
        ids = np.asarray(tok.encode(text), dtype=np.int64)
        train_ids, val_ids = train_val_split(ids)
        val_text = tok.decode(val_ids)
        items = continuation_task(val_text, args.items, seed=0)
        models = {"base": base}
        models.update(finetuned(base, tok, text, args))
        models.update(compressed(base, folder, train_ids, runs, args))
        rows = {}
        for name, model in models.items():
            result = multiple_choice_accuracy(model, tok, items)
            rows[name] = {
                "accuracy_per_char": result.accuracy["per_char"],
                "accuracy_sum": result.accuracy["sum"],
                "perplexity": perplexity(model, val_ids[: args.ppl_tokens]),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
            r = rows[name]
            print(
                f"{name:28s} accuracy {r['accuracy_per_char']:6.1%} per char, "
                f"{r['accuracy_sum']:6.1%} summed; perplexity {r['perplexity']:6.3f}",
                flush=True,
            )
    results = {
        "task": {
            "items": args.items,
            "options": 4,
            "chance": 0.25,
            "source": "tinyshakespeare validation split (last 10%), continuation_task seed 0",
            "perplexity_characters": len(val_ids[: args.ppl_tokens]),
        },
        "base": args.checkpoint
        or {
            "config": "configs/train/shakespeare_char.yaml",
            "overrides": "chapter 10's: 3 layers of 96",
            "iters": args.base_iters,
        },
        "steps": {"sft": args.sft_steps, "dpo": args.dpo_steps, "distill": args.distill_steps},
        "models": rows,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

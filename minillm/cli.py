"""The `minillm` command: the course's main jobs from a terminal."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minillm.errors import MiniLLMError

DEFAULT_TRAIN_CONFIG = Path("configs/train/shakespeare_char.yaml")


def _env(args) -> int:
    from minillm.env import FIX, environment_report, format_report

    checks = environment_report()
    print(format_report(checks))
    return 1 if args.strict and any(c.status == FIX for c in checks) else 0


def _setup_nltk(args) -> int:
    from minillm.wordnet import setup_wordnet

    print(setup_wordnet(allow_download=not args.offline))
    return 0


def _setup_deepspeed(args) -> int:
    from minillm.env import build_deepspeed_ops

    print(build_deepspeed_ops())
    return 0


def _data(args) -> int:
    from minillm import data

    if args.action == "list":
        for corpus in data.CORPORA.values():
            state = "cached" if data.is_cached(corpus.name) else "not downloaded"
            print(f"{corpus.name:<16} {corpus.size:>10,} bytes  {state:<14} {corpus.description}")
        print(f"cache: {data.data_dir()}")
    elif args.action == "download":
        for name in args.names or list(data.CORPORA):
            print(f"{name}: {data.fetch(name)}")
    else:
        for name in args.names or list(data.CORPORA):
            print(data.cached_path(name))
    return 0


def _grade(args) -> int:
    import textwrap

    from minillm.grading import chapter_table, feedback, grade, sandbox_warning, summary
    from minillm.utils import repo_root

    root = args.course.resolve() if args.course else repo_root()
    if args.gradescope:
        from minillm.grading.gradescope import write_autograder

        print(write_autograder(root, args.gradescope, args.chapters))
        return 0
    if warning := sandbox_warning():
        print(warning, file=sys.stderr)
    tests = grade(
        root,
        args.chapters,
        args.impl,
        args.json,
        memory_mb=args.memory_mb,
        time_limit_s=args.time_limit,
    )
    print(f"graded {args.impl}/ with the tests in tests/exercises/")
    print(chapter_table(tests))
    print(f"\n{summary(tests)}")
    failed = [t for t in tests if not t.passed]
    if failed and not args.quiet:
        print("\nnot passing yet:")
        for t in failed:
            print(textwrap.indent(feedback(t, verbose=args.verbose), "  "))
        if not args.verbose:
            print("\n(--verbose shows each failing test's full output)")
    if args.json:
        print(f"\nresults written to {args.json}")
    return 0


def _notebooks(args) -> int:
    from minillm.notebooks import chapter_notebooks, execute_notebook
    from minillm.utils import repo_root

    paths = [Path(p) for p in args.paths] or chapter_notebooks(repo_root())
    failures = 0
    for path in paths:
        run = execute_notebook(path, write=not args.check)
        print(f"{path.name:<45} {run.verdict}", flush=True)
        failures += not run.ok
    return 1 if failures else 0


def _train(args) -> int:
    from minillm import rundir
    from minillm.engines import PlainEngine
    from minillm.engines.common import rank_device
    from minillm.train import Trainer
    from minillm.train_config import load_config

    path = args.config
    if path == DEFAULT_TRAIN_CONFIG and not path.exists():  # run from outside the checkout
        from minillm.utils import repo_root

        path = repo_root() / DEFAULT_TRAIN_CONFIG
    config = load_config(path, args.set)
    if args.ddp and args.deepspeed:
        raise MiniLLMError("--ddp and --deepspeed choose two different engines; give one")
    if args.fresh and int(os.environ.get("RANK", "0")) == 0:  # here once, never in the ranks
        rundir.remove_fresh(Path(config.out_dir))  # only a folder minillm made, and not in use
    engine_factory = PlainEngine
    if args.deepspeed:
        from functools import partial

        from minillm.engines import deepspeed, deepspeed_engine, ds_config

        json_config = ds_config.load_config(args.deepspeed)
        if args.nproc:  # check everything here, then hand over to DeepSpeed's launcher
            argv = [a for a in args.argv if a != "--fresh"]  # done above
            return deepspeed.launch(args.nproc, json_config, config, argv)
        config.device = rank_device()
        engine_factory = partial(deepspeed_engine, ds_config=json_config)
    elif args.ddp:
        from minillm.engines import DDPEngine

        config.device = rank_device()
        engine_factory = DDPEngine
    if args.nproc and not args.deepspeed:
        raise MiniLLMError("--nproc launches DeepSpeed processes; give --deepspeed CONFIG too")
    trainer = Trainer(config, engine_factory=engine_factory)
    result = trainer.fit()
    if not trainer.is_main:
        return 0
    print(
        f"step {result.step}: train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}"
        f" ({result.seconds:.0f} s, {result.tokens_per_s:,.0f} tokens/s)"
        f"; run folder {result.run_dir}"
    )
    if result.sample is not None:
        print("--- sample ---")
        print(result.sample)
    return 0


def _sample(args) -> int:
    from minillm.sample import generate_text, load_for_sampling
    from minillm.train import pick_device

    model, tokenizer = load_for_sampling(args.checkpoint, pick_device(args.device))
    print(
        generate_text(
            model,
            tokenizer,
            args.prompt,
            args.tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    )
    return 0


def _compress(args) -> int:
    from minillm import checkpoint, infer

    source = checkpoint.resolve(args.source)
    out = infer.write_compressed(
        source, args.out, bits=args.bits, scheme=args.scheme, per_channel=not args.per_tensor
    )
    before, after = infer.folder_bytes(source), infer.folder_bytes(out)
    print(f"{source}: {before:,} bytes -> {out}: {after:,} bytes ({before / after:.1f}x smaller)")
    print(f"sample from it: minillm sample --checkpoint {out}")
    return 0


def _eval(args) -> int:
    from minillm import checkpoint, data
    from minillm.evaluate import continuation_task, multiple_choice_accuracy, perplexity
    from minillm.sample import load_for_sampling
    from minillm.train import pick_device

    folder = checkpoint.resolve(args.checkpoint)
    model, tokenizer = load_for_sampling(folder, pick_device(args.device))
    settings = checkpoint.load_config(folder).get("data") or {}
    corpus = settings.get("corpus", "tinyshakespeare")
    ids = data.load_tokens(corpus, tokenizer)
    _, val_ids = data.train_val_split(ids, settings.get("val_fraction", 0.1))
    items = continuation_task(tokenizer.decode(val_ids), args.items, seed=args.seed)
    result = multiple_choice_accuracy(model, tokenizer, items)
    print(
        f"{folder}: {result.n_items} continuations of {corpus}'s validation split, "
        f"{result.n_options} options (chance {result.chance:.0%}): accuracy "
        f"{result.accuracy['per_char']:.1%} per character, {result.accuracy['sum']:.1%} summed"
    )
    print(f"perplexity {perplexity(model, val_ids):.3f} per token over {len(val_ids):,} tokens")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm",
        description="minillm: train and serve a small GPT, from raw text to DeepSpeed.",
    )
    # DeepSpeed's launcher passes --local_rank=N before the subcommand; DeepSpeed reads LOCAL_RANK.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("env", help="check this machine: versions, devices, DeepSpeed ops, data")
    p.add_argument("--strict", action="store_true", help="exit 1 when something needs fixing")
    p.set_defaults(run=_env)

    p = sub.add_parser(
        "setup-nltk", help="install NLTK's WordNet (download, or Debian packages offline)"
    )
    p.add_argument(
        "--offline", action="store_true", help="skip nltk.download; use Debian's packages"
    )
    p.set_defaults(run=_setup_nltk)

    p = sub.add_parser(
        "setup-deepspeed",
        help="compile now the DeepSpeed op every multi-process run on a CPU loads (once, 1-2 min)",
    )
    p.set_defaults(run=_setup_deepspeed)

    p = sub.add_parser("data", help="list, download or locate the course corpora")
    p.add_argument("action", choices=["list", "download", "path"])
    p.add_argument("names", nargs="*", help="corpus names (default: all)")
    p.set_defaults(run=_data)

    p = sub.add_parser("train", help="train the course GPT (default: character-level Shakespeare)")
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_TRAIN_CONFIG,
        help="a YAML file of TrainConfig fields (default: %(default)s)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.n_layer=6 (repeatable)",
    )
    p.add_argument(
        "--deepspeed",
        type=Path,
        metavar="JSON",
        help="train with DeepSpeed using this config (configs/deepspeed/)",
    )
    p.add_argument(
        "--ddp",
        action="store_true",
        help="data parallelism from scratch (DDPEngine) in processes started by torchrun",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="with --deepspeed: check the configs, then start N processes with the "
        "deepspeed launcher",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete the run folder first instead of resuming from its last checkpoint (only a "
        "folder minillm created, and not while another run uses it)",
    )
    p.set_defaults(run=_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="a run folder or a checkpoint folder"
    )
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=300, help="how many tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="sample among the most likely tokens whose probabilities reach p (nucleus)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_sample)

    p = sub.add_parser("compress", help="write a checkpoint with int8 or int4 weights")
    p.add_argument("source", type=Path, help="a run folder (its latest checkpoint) or a checkpoint")
    p.add_argument("out", type=Path, help="the new folder to write")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8)
    p.add_argument("--scheme", choices=["absmax", "zeropoint"], default="absmax")
    p.add_argument(
        "--per-tensor", action="store_true", help="one scale per matrix (default: one per row)"
    )
    p.set_defaults(run=_compress)

    p = sub.add_parser(
        "eval", help="multiple-choice accuracy and perplexity of a checkpoint on held-out text"
    )
    p.add_argument("checkpoint", type=Path, help="a run folder or a checkpoint folder")
    p.add_argument("--items", type=int, default=200, help="how many multiple-choice items")
    p.add_argument("--seed", type=int, default=0, help="which items (the same seed, the same)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_eval)

    from minillm.grading import DEFAULT_MEMORY_MB

    p = sub.add_parser("grade", help="grade the exercises: points per chapter, Gradescope JSON")
    p.add_argument("chapters", nargs="*", metavar="chNN", help="chapters to grade (default: all)")
    p.add_argument(
        "--impl",
        choices=["exercises", "solutions"],
        default="exercises",
        help="grade your exercises/ (default) or the reference solutions/",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write Gradescope's results.json here")
    p.add_argument("--quiet", action="store_true", help="only the table")
    p.add_argument("--verbose", action="store_true", help="each failing test's full output as well")
    p.add_argument(
        "--memory-mb",
        type=int,
        default=DEFAULT_MEMORY_MB,
        metavar="MB",
        help="memory each test's code may allocate (default: %(default)s)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="cap every test's time limit (default: each test's own, 60 s unless it says)",
    )
    p.add_argument(
        "--course", type=Path, metavar="DIR", help="the course folder (default: this checkout)"
    )
    p.add_argument(
        "--gradescope",
        type=Path,
        metavar="DIR",
        help="write a Gradescope autograder (setup.sh, run_autograder, the graded tests, no "
        "solutions) to DIR instead of grading",
    )
    p.set_defaults(run=_grade)

    p = sub.add_parser("notebooks", help="execute the chapter notebooks and save their outputs")
    p.add_argument("paths", nargs="*", help="notebooks to run (default: every chapter)")
    p.add_argument("--check", action="store_true", help="execute without writing outputs back")
    p.set_defaults(run=_notebooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a launcher re-runs in every rank
    try:
        return args.run(args)
    except MiniLLMError as exc:
        print(f"minillm {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

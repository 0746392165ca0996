"""`minillm env`: what this machine has for the course, one line per check, each saying OK or what
to do. Chapter 00 shows the same report."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata

from minillm.errors import MiniLLMError

OK, NOTE, FIX = "OK", "NOTE", "FIX"

# DeepSpeed ops the course uses, and what each is for.
_COURSE_OPS = {
    "deepspeed_shm_comm": "CPU all-reduce used by every multi-process run on CPU",
    "fused_adam": 'DeepSpeed\'s Adam (configs with "torch_adam": true avoid it)',
    "cpu_adam": "ZeRO-Offload's optimizer",
    "async_io": "NVMe offload",
}


@dataclass
class Check:
    name: str
    status: str  # OK, NOTE (works, worth knowing) or FIX (something to do)
    detail: str

    def line(self) -> str:
        return f"[{self.status:>4}] {self.name:<20} {self.detail}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _extensions_root() -> str:
    """Where torch's JIT cache keeps compiled ops, as torch.utils.cpp_extension chooses it:
    TORCH_EXTENSIONS_DIR itself when set, else a folder per Python and build under its default."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(get_default_build_root(), f"{python}_{flavour}")


def jit_library(op: str) -> str | None:
    """The compiled op's library in torch's extension cache, or None while it is not built."""
    path = os.path.join(_extensions_root(), op, f"{op}.so")
    return path if os.path.isfile(path) else None


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs its accelerator choice and op builds as it imports and loads them; the
    report and the set-up say what matters in one line instead."""
    import logging

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        yield


def build_deepspeed_ops() -> str:
    """`minillm setup-deepspeed`: compile now the op DeepSpeed loads in every multi-process run on
    a CPU (its shared-memory all-reduce, a minute or two of compiling), so that the first such run,
    a chapter 09 cell or a test, does not wait for it. Returns what it did, in one line."""
    if _version("deepspeed") is None:
        return "DeepSpeed is not installed: nothing to build"
    with _quiet_deepspeed():
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        # The same test DeepSpeed makes before loading it (deepspeed.comm.torch.build_shm_op).
        builder = accelerator.create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return f"nothing to build: DeepSpeed's {accelerator._name} accelerator does not use it"
        start = time.monotonic()
        try:
            builder.load(verbose=False)
        except Exception as error:  # noqa: BLE001 - a failed build raises many kinds
            raise MiniLLMError(
                f"DeepSpeed could not compile its {builder.NAME} op ({type(error).__name__}: "
                f"{error}). It needs a C++ compiler and ninja: on Debian or Ubuntu run "
                "`apt-get install g++`, then `./course setup` again."
            ) from error
    seconds = time.monotonic() - start
    return f"DeepSpeed's {builder.NAME} op is ready ({seconds:.0f} s; cache {_extensions_root()})"


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info >= (3, 11):  # noqa: UP036 - the report must also run on an old Python
        return Check("python", OK, f"{version} ({sys.executable})")
    return Check("python", FIX, f"{version}: the course needs Python 3.11 or newer")


def check_torch() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", FIX, "not installed: run the setup script (./course setup)")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    checks = [Check("torch", OK, f"{torch.__version__} ({build})")]
    threads = torch.get_num_threads()
    plural = "" if threads == 1 else "s"
    checks.append(Check("cpu", OK, f"{os.cpu_count()} cores, torch uses {threads} thread{plural}"))
    if torch.cuda.is_available():
        gpus = [
            f"{torch.cuda.get_device_name(i)} "
            f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())
        ]
        checks.append(Check("gpu", OK, f"{len(gpus)} CUDA device(s): {', '.join(gpus)}"))
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        checks.append(Check("gpu", OK, "Apple MPS"))
    else:
        checks.append(
            Check(
                "gpu",
                NOTE,
                "none: everything runs on the CPU; for a GPU lab use Colab (docs in README)",
            )
        )
    return checks


def check_deepspeed() -> list[Check]:
    version = _version("deepspeed")
    if version is None:
        return [
            Check(
                "deepspeed",
                NOTE if sys.platform != "linux" else FIX,
                "not installed: pip install deepspeed (Linux; needed from chapter 09)",
            )
        ]
    with _quiet_deepspeed():
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops.op_builder.all_ops import ALL_OPS

        accelerator = get_accelerator()
        backend = accelerator.communication_backend_name()
        checks = [
            Check("deepspeed", OK, f"{version}, accelerator {accelerator._name}, backend {backend}")
        ]
        from deepspeed.git_version_info import installed_ops

        for op, use in _COURSE_OPS.items():
            builder = ALL_OPS.get(op)
            if builder is None:
                continue
            if not builder.is_compatible(verbose=False):
                hint = " (needs libaio: apt-get install libaio-dev)" if op == "async_io" else ""
                checks.append(Check(f"  {op}", NOTE, f"unavailable here{hint}; {use}"))
            elif installed_ops.get(op) or jit_library(op):
                checks.append(Check(f"  {op}", OK, f"built; {use}"))
            else:
                when = "first use (1-2 min, cached after"
                if op == "deepspeed_shm_comm":
                    when += "; `minillm setup-deepspeed` compiles it now"
                checks.append(Check(f"  {op}", NOTE, f"compiles on {when}); {use}"))
    if accelerator._name == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
        checks.append(
            Check(
                "  threads",
                NOTE,
                "set OMP_NUM_THREADS=1 before `deepspeed` launches "
                "(the launcher leaves it unset; steps run 2-25x slower)",
            )
        )
    return checks


def check_libraries() -> list[Check]:
    checks = []
    for package in ("transformers", "tokenizers", "nltk", "numpy"):
        version = _version(package)
        status = OK if version else FIX
        checks.append(Check(package, status, version or "not installed: run ./course setup"))
    return checks


def check_wordnet() -> Check:
    from minillm.wordnet import SETUP_STEP, wordnet_status

    where = wordnet_status()
    if where:
        return Check("nltk wordnet", OK, where)
    return Check(
        "nltk wordnet", FIX, f"missing: run `{SETUP_STEP}` (chapter 01 lemmatises with it)"
    )


def check_data() -> list[Check]:
    from minillm.data import CORPORA, cached_path, data_dir, is_cached

    checks = [Check("data cache", OK, f"{data_dir()} (set MINILLM_DATA to move it)")]
    for name in CORPORA:
        if is_cached(name):
            size = cached_path(name).stat().st_size
            checks.append(Check(f"  {name}", OK, f"{size:,} bytes, sha256 verified"))
        elif cached_path(name).exists():
            checks.append(
                Check(
                    f"  {name}",
                    FIX,
                    f"checksum mismatch: run `minillm data download {name}` to fetch it again",
                )
            )
        else:
            checks.append(
                Check(
                    f"  {name}",
                    NOTE,
                    f"not downloaded yet: `minillm data download "
                    f"{name}` (or it downloads on first use)",
                )
            )
    return checks


def environment_report() -> list[Check]:
    """Every check, in the order `minillm env` prints them."""
    return [
        check_python(),
        *check_torch(),
        *check_deepspeed(),
        *check_libraries(),
        check_wordnet(),
        *check_data(),
    ]


def format_report(checks: list[Check]) -> str:
    lines = [c.line() for c in checks]
    todo = sum(c.status == FIX for c in checks)
    lines.append("all set" if todo == 0 else f"{todo} thing(s) to fix, see the FIX lines above")
    return "\n".join(lines)

"""Multi-node training rehearsed on one machine: two torchrun agents, each a "node" of one
process (`--nnodes 2`, node ranks 0 and 1), meet through a c10d rendezvous on the loopback
address and train one job with the DDP engine, then with the DeepSpeed engine; the losses are
those of the single-process Trainer on both nodes' rows (docs/labs.md gives the commands)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.parallel.launch import free_port
from minillm.train import Trainer, read_metrics
from minillm.train_config import load_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "max_iters=6",
    "eval_interval=3",
    "eval_iters=2",
    "checkpoint_interval=6",
    "sample_tokens=0",
    "optim.warmup_iters=2",
    "optim.optimizer=adamw",  # ZeRO and DeepSpeed cut parameters into slices: AdamW only
]
PARITY = 1e-5  # float32 rounding: two ranks sum the batch in another order than one process


def node_command(node_rank: int, port: int, out_dir: Path, *engine: str) -> list[str]:
    """The command node `node_rank` runs; the rendezvous store lives on node 0."""
    overrides = [*TINY, "batch_size=4", f"out_dir={out_dir}"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        str(node_rank),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "rehearsal",
        "--rdzv-conf",
        f"is_host={'true' if node_rank == 0 else 'false'}",
        "--local-addr",
        "127.0.0.1",
        "-m",
        "minillm.cli",
        "train",
        *engine,
        *[a for o in overrides for a in ("--set", o)],
    ]


def _two_nodes(out_dir: Path, *engine: str) -> None:
    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    env["PYTHONWARNINGS"] = "ignore"
    logs = [out_dir.parent / f"node{rank}.log" for rank in (0, 1)]
    nodes = {}
    for rank in (1, 0):  # the second node may start first: it waits at the rendezvous
        with open(logs[rank], "w") as log:  # a file, not a pipe: a full pipe would block a node
            command = node_command(rank, port, out_dir, *engine)
            nodes[rank] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    for rank, node in nodes.items():
        node.wait(timeout=250)
        assert node.returncode == 0, logs[rank].read_text()[-3000:]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process on both nodes' rows: batch 2 x 4 = 8."""
    folder = tmp_path_factory.mktemp("single")
    config = load_config(
        REPO / "configs/train/shakespeare_char.yaml",  # what `minillm train` reads by default
        [*TINY, "batch_size=8", f"out_dir={folder}"],
    )
    return read_metrics(Trainer(config, progress=False).fit().run_dir)


def _losses(metrics) -> list[float]:
    steps, evals = metrics
    return [r["loss"] for r in steps] + [r[k] for r in evals for k in ("train_loss", "val_loss")]


@pytest.mark.parametrize(
    "engine",
    [("--ddp",), ("--deepspeed", str(REPO / "configs/deepspeed/zero2.json"))],
    ids=["ddp", "deepspeed-zero2"],
)
def test_two_nodes_train_as_one_process(engine, tmp_path, single_process):
    _two_nodes(tmp_path / "run", *engine)
    expected = _losses(single_process)
    assert len(expected) == 6 + 2 * 2  # 6 steps, 2 evaluations of both splits
    assert _losses(read_metrics(tmp_path / "run")) == pytest.approx(expected, abs=PARITY)

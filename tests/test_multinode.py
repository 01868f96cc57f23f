"""The train step across 2 "nodes" x 2 processes on one machine, launched as the TrainJob's pods launch it: the command
flows.trainjob renders, under torchrun, with only the PET_* variables Kubeflow Trainer's torch plugin sets (torchrun
reads them as --nnodes, --nproc-per-node, --node-rank, --master-addr, --master-port; static rendezvous on the c10d
store of node 0 at 127.0.0.1). FSDP2 over gloo on CPU; one node is killed after a checkpoint and the job resumes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import trainjob
from steps import contract

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-cpu.yaml"
TORCHRUN = Path(sys.executable).parent / "torchrun"
NUM_NODES, PROCS_PER_NODE = 2, 2
# tests/test_fsdp.py's settings, with 4 processes x 2 rows = 8 rows a step (no accumulation: 4 processes share 2 cores).
OVERRIDES = ["train.fsdp=true", f"train.nodes={NUM_NODES}", f"train.gpus_per_node={PROCS_PER_NODE}",
             "train.per_device_batch_size=2", "train.grad_accum_steps=1", "train.warmup_ratio=0",
             "train.lr_scheduler=constant", "train.max_steps=4", "train.save_steps=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_harmony_16) -> Path:
    """An output root holding harmony rows of the bundled data (the real fetch and harmony steps, tiny profile: the
    session's, linked in as the harmony step's out dir that the TrainJob's command reads)."""
    root = tmp_path_factory.mktemp("multinode")
    (root / "harmony").symlink_to(bundled_harmony_16, target_is_directory=True)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(run_dir: Path, attempt: str) -> list[tuple[subprocess.Popen, Path]]:
    """Both nodes' torchrun, each in its own process group (a node, to kill whole); logs in run_dir/<attempt>-node<N>.log."""
    command = trainjob.train_command(config=str(TINY), out_dir=run_dir, overrides=OVERRIDES, tracking={})
    assert command[0] == "torchrun" and command[1:5] == ["-m", "flows.cli", "step", "train"], command
    port = _free_port()
    nodes = []
    for rank in range(NUM_NODES):
        env = {**os.environ, "PET_NNODES": str(NUM_NODES), "PET_NPROC_PER_NODE": str(PROCS_PER_NODE),
               "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        log_path = run_dir / f"{attempt}-node{rank}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([str(TORCHRUN), *command[1:]], cwd=REPO, env=env, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append((proc, log_path))
    return nodes


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node as a lost machine goes: its torchrun agent and every worker (torchrun starts each worker in a
    session of its own, so killing the agent's process group would leave them training)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture
def nodes_left():
    """Every node started by the test is gone at the end, whatever happened (no torchrun workers left behind)."""
    started = []
    yield started
    for proc, _ in started:
        if proc.poll() is None:
            kill_node(proc)


def test_two_nodes_train_write_one_manifest_and_resume_after_losing_a_node(run_dir, nodes_left):
    out_dir = run_dir / "train"
    started_s = time.monotonic()
    # --- Attempt 1: node 1 dies once checkpoint-2 is complete (its trainer_state.json is written last) ---
    first = start_nodes(run_dir, "first")
    nodes_left.extend(first)
    marker = out_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    while not marker.exists():
        assert all(proc.poll() is None for proc, _ in first), \
            "a node exited before checkpoint-2:\n" + "\n".join(path.read_text()[-4000:] for _, path in first)
        assert time.monotonic() - started_s < 300, "no checkpoint-2 within 300 s"
        time.sleep(0.05)
    kill_node(first[1][0])
    assert not (out_dir / contract.MANIFEST).exists(), "the run finished before node 1 could be killed"
    # Node 0's workers lose their peers in the next collective and fail; its agent exits non-zero.
    assert first[0][0].wait(timeout=180) != 0
    first_log = first[0][1].read_text()
    print(f"attempt 1: node 1 killed after checkpoint-2, node 0 exited {first[0][0].returncode} "
          f"({time.monotonic() - started_s:.0f} s)")

    # --- Attempt 2: both nodes again, the same command: the step resumes from the sharded checkpoint ---
    second = start_nodes(run_dir, "second")
    nodes_left.extend(second)
    for proc, path in second:
        assert proc.wait(timeout=420) == 0, path.read_text()[-6000:]
    logs = [path.read_text() for _, path in second]
    print(f"attempt 2 finished ({time.monotonic() - started_s:.0f} s in all); node 0's log, resume and end:")
    print("\n".join(line for line in logs[0].splitlines()
                    if any(k in line for k in ("repeating the interrupted", "resuming from", "train: step", "done in",
                                               "train: 4 steps"))))
    assert f"train: resuming from {out_dir / 'checkpoints' / 'checkpoint-2'}" in logs[0]
    manifest = json.loads((out_dir / contract.MANIFEST).read_text())
    output = manifest["output"]
    assert output["num_steps"] == 4 and [step for step, _ in output["loss_curve"]] == [3, 4], output["loss_curve"]
    assert manifest["config"]["nodes"] == NUM_NODES and manifest["config"]["gpus_per_node"] == PROCS_PER_NODE
    # Global rank 0 (node 0's local rank 0) alone records the step: one "done" line, on node 0, none on node 1.
    assert logs[0].count("step train: done in") == 1 and "step train: done in" not in logs[1], logs[1][-3000:]
    assert "step train: done in" not in first_log
    assert not list(out_dir.glob(".*.tmp")), list(out_dir.iterdir())
    # Sharded per global rank: one DCP file per process of the 4 for the model and for the optimizer.
    checkpoint = out_dir / "checkpoints" / "checkpoint-4"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        shards = sorted(p.name for p in (checkpoint / part).glob("*.distcp"))
        assert shards == [f"__{rank}_0.distcp" for rank in range(NUM_NODES * PROCS_PER_NODE)], (part, shards)
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == [f"rng_state_{r}.pth" for r in range(4)]
    assert (out_dir / output["model_dir"] / "model.safetensors").is_file()  # consolidated from the 4 shards

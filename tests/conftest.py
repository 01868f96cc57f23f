"""Test tiers by marker (unit, integration, gpu); everything runs offline on loopback."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundled_harmony_16(tmp_path_factory):
    """Harmony rows of 16 bundled rows (the real fetch and harmony steps, tiny profile), made once per session for the
    distributed training tests (tests/test_fsdp.py, tests/test_multinode.py), which only read them."""
    from pathlib import Path

    from steps import contract, profile as profiles

    root = tmp_path_factory.mktemp("bundled16")
    prof = profiles.load_profile(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml", ["data.max_rows=16"])
    contract.execute("fetch", profiles.step_config(prof, "fetch"), out_dir=root / "fetch")
    contract.execute("harmony", profiles.step_config(prof, "harmony"), out_dir=root / "harmony",
                     inputs={"fetch": root / "fetch"})
    return root / "harmony"


@pytest.fixture(scope="session")
def step_images():
    """The three step images, built once per session by `images/build.sh --local-base` (no registry here). Where no
    Docker engine was running, build.sh starts one; it is stopped again at the end, with any container a test left."""
    import re
    import signal
    import subprocess
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    engine_was_running = subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    pid_file = Path("/run/finetune-dockerd.pid")
    try:
        build = subprocess.run([str(repo / "images" / "build.sh"), "--local-base"], capture_output=True, text=True,
                               timeout=3600)
        print(build.stdout)
        assert build.returncode == 0, build.stdout + build.stderr[-5000:]
        # The git-sha tag, not the version tag: a build from another checkout retags :<version> under a running test.
        tag = re.search(r"\(= :(\S+)\)", build.stdout).group(1)
        yield {"tag": tag, "build_log": build.stdout}
    finally:
        left = subprocess.run(["docker", "ps", "-aq", "--filter", "label=finetune-test"], capture_output=True, text=True)
        if left.stdout.split():
            subprocess.run(["docker", "rm", "-f", *left.stdout.split()], capture_output=True)
        if not engine_was_running and pid_file.is_file():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            for _ in range(60):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(1)
            pid_file.unlink()

"""The `finetune` command line as a user types it: bad input gets one clear line and exit code 2, not a traceback."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
PROFILE = "configs/tiny-cpu.yaml"


def finetune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def repo():
    from steps.profile import CONFIGS_DIR

    return CONFIGS_DIR.parent


def test_unknown_config_key(repo, tmp_path):
    r = finetune("step", "fetch", "--config", PROFILE, "--out", str(tmp_path / "f"), "data.eval_fracton=0.1", cwd=repo)
    assert r.returncode == 2
    assert "unknown key data.eval_fracton; did you mean 'eval_fraction'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_dataset_path(repo, tmp_path):
    missing = tmp_path / "nope.jsonl"
    r = finetune("step", "fetch", "--config", PROFILE, "--out", str(tmp_path / "f"), f"data.dataset={missing}", cwd=repo)
    assert r.returncode == 2
    assert f"data.dataset={missing} does not exist" in r.stderr
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_file_with_no_valid_rows(repo, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"reasoning_language": "French", "developer": "", "user": "hi", "analysis": "", "final": "", "messages": []},
            {"reasoning_language": "French", "developer": "", "user": "hi", "analysis": "", "final": "",
             "messages": [{"role": "user", "content": "hi", "thinking": None}]}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = finetune("step", "fetch", "--config", PROFILE, "--out", str(tmp_path / "f"), f"data.dataset={bad}", cwd=repo)
    assert r.returncode == 2
    assert "no valid rows" in r.stderr.lower() or "nothing valid" in r.stderr.lower(), r.stderr
    assert "no_messages" in r.stderr and "no_assistant_turn" in r.stderr, r.stderr


def test_step_runs_and_is_skipped_the_second_time(repo, tmp_path):
    out = tmp_path / "fetch"
    first = finetune("step", "fetch", "--config", PROFILE, "--out", str(out), "data.max_rows=30", cwd=repo)
    assert first.returncode == 0, first.stderr
    second = finetune("step", "fetch", "--config", PROFILE, "--out", str(out), "data.max_rows=30", cwd=repo)
    assert second.returncode == 0 and "skipped" in second.stderr
    output = json.loads((out / "manifest.json").read_text())["output"]
    assert output["num_train"] + sum(output["num_dropped"].values()) == 30


def test_check_validates_a_profile(repo):
    r = finetune("check", "--config", "configs/h100-lora.yaml", cwd=repo)
    assert r.returncode == 0 and "valid" in r.stdout
    r = finetune("check", "--config", "configs/h100-lora.yaml", "train.method=qlora", cwd=repo)
    assert r.returncode == 2 and "train.method='qlora' is not allowed; choose one of 'lora', 'full'" in r.stderr

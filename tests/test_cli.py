"""The `finetune` command line as a user types it: bad input gets one clear line and exit code 2, not a traceback."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
PROFILE = "configs/tiny-cpu.yaml"


def finetune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def finetune_env(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


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
    assert output["num_train"] + output["num_eval"] + sum(output["num_dropped"].values()) == 30


def test_check_validates_a_profile(repo):
    r = finetune("check", "--config", "configs/h100-lora.yaml", cwd=repo)
    assert r.returncode == 0 and "valid" in r.stdout
    r = finetune("check", "--config", "configs/h100-lora.yaml", "train.method=qlora", cwd=repo)
    assert r.returncode == 2 and "train.method='qlora' is not allowed; choose one of 'lora', 'full'" in r.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def one_line_error(r) -> str:
    """The CLI's whole answer to a user error: exit 2, no traceback, one `finetune: error:` line."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize("overrides, message", [
    (["push.dry_run=false"], "push.dry_run=false needs a Hugging Face token with write access in $HF_TOKEN"),
    (["train.learning_rate=-5"], "train.learning_rate=-5 must be positive"),
    (["train.lr_scheduler_kwargs.min_lr_rat=0.1"], "train.lr_scheduler_kwargs.min_lr_rat is not an argument of the cosine scheduler"),
    (["model.random_shape.num_layers=3"], "model.random_shape.num_layers is not a GptOssConfig field"),
    (["tracking.uri=http://127.0.0.1:{port}"], "tracking.uri=http://127.0.0.1:{port} does not answer"),
], ids=["push-without-token", "negative-lr", "scheduler-kwarg", "random-shape-key", "tracking-down"])
def test_check_catches_what_would_fail_hours_later(repo, overrides, message):
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "check", "--config", PROFILE,
                        *[o.format(port=port) for o in overrides]],
                       capture_output=True, text=True, cwd=repo, timeout=300, env=env)
    assert message.format(port=port) in one_line_error(r)


def test_run_with_a_bad_override_fails_before_prefect_starts(repo, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", str(tmp_path / "run"), "train.learning_rate=abc"],
                       capture_output=True, text=True, cwd=repo, timeout=300, env=env)
    assert one_line_error(r) == "finetune: error: train.learning_rate='abc' must be of type float, not str"
    assert "prefect" not in r.stderr.lower() and not (tmp_path / "prefect").exists()


def test_a_hub_dataset_without_network_names_the_host_and_the_offline_ways(repo, tmp_path):
    port = _closed_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    r = finetune_env(env, "step", "fetch", "--config", PROFILE, "--out", str(tmp_path / "fetch"),
                     "data.dataset=HuggingFaceH4/Multilingual-Thinking", cwd=repo)
    line = one_line_error(r)
    assert f"127.0.0.1:{port} cannot be reached (ConnectError" in line and "data.dataset=bundled" in line


def test_out_and_input_mistakes_are_one_line(repo, tmp_path):
    (tmp_path / "file").write_text("")
    r = finetune("run", "--out", str(tmp_path / "file"), cwd=repo)
    assert "is a file, not a folder" in one_line_error(r)
    fetch = tmp_path / "fetch"
    assert finetune("step", "fetch", "--config", PROFILE, "--out", str(fetch), "data.max_rows=10", cwd=repo).returncode == 0
    r = finetune("step", "merge", "--config", PROFILE, "--input", f"train={fetch}", "--out", str(tmp_path / "m"), cwd=repo)
    assert f"--input train={fetch} holds the output of the fetch step; step merge needs the train step's out dir" in one_line_error(r)


def test_version_help_and_print(repo, tmp_path):
    from importlib import metadata

    r = finetune("--version", cwd=repo)
    assert r.returncode == 0 and r.stdout.strip() == f"finetune {metadata.version('gpt-oss-finetune')}"
    r = finetune("step", "--help", cwd=repo)
    assert r.returncode == 0 and "--input UPSTREAM=DIR" in r.stdout and "--parent-run-id" in r.stdout
    assert "overrides: section.key=value" in r.stdout and "  smoke: backend, host, port" in r.stdout
    r = finetune("check", "--config", "configs/h100-lora.yaml", "--print", "train.max_steps=7", cwd=repo)
    assert r.returncode == 0, r.stderr
    printed = tmp_path / "resolved.yaml"
    printed.write_text(r.stdout)
    from steps import profile as profiles

    resolved = profiles.validate(profiles.load_profile(printed))
    assert resolved == profiles.validate(profiles.load_profile(repo / "configs/h100-lora.yaml", ["train.max_steps=7"]))
    assert "lr_scheduler_kwargs" in r.stdout and "max_steps: 7" in r.stdout  # defaults and overrides both shown


def test_a_bug_keeps_its_traceback_and_says_so(monkeypatch, capsys):
    from flows import cli

    def broken(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_check", broken)
    assert cli.main(["check", "--config", PROFILE]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug, not a user error'" in err
    assert err.strip().splitlines()[-1].startswith("finetune: this is a bug in gpt-oss-finetune")

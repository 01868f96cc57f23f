"""`finetune run` on the embedded default, as a newcomer runs it: a real Prefect flow (ephemeral server), file-backed
MLflow, every step for real, `transformers serve` answering in the requested reasoning languages. A run stopped by
Ctrl-C during training exits 130 at once; the next run continues training from the last checkpoint and breaks in its
last step, leaving the finished steps' outputs in place; the run after that resumes from there."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from steps.contract import STEPS
from steps.profile import CONFIGS_DIR

pytestmark = pytest.mark.integration
REPO = CONFIGS_DIR.parent


def finetune_run(out, *overrides, env):
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", str(out), *overrides],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)


def ctrl_c_after_first_checkpoint(out, *, env, log):
    """`finetune run` in its own process group, SIGINT to the group (what a terminal's Ctrl-C does) as soon as train
    has written checkpoint-50; returns the exit code."""
    with log.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--out", str(out)], cwd=REPO, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        checkpoint = out / "train" / "checkpoints" / "checkpoint-50" / "trainer_state.json"
        deadline = time.monotonic() + 1200
        while not checkpoint.is_file():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-50 within 1200 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=60)  # generous: it takes ~2 s; before, it hung for minutes
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left, on every path
        except ProcessLookupError:
            pass
        proc.wait()


def test_finetune_run_interrupted_then_broken_at_smoke_then_resumes(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO"}
    out = tmp_path / "run"

    log = tmp_path / "interrupted.log"
    assert ctrl_c_after_first_checkpoint(out, env=env, log=log) == 130, log.read_text()[-3000:]
    assert log.read_text().strip().splitlines()[-1].startswith("finetune: interrupted (Ctrl-C); the running step was stopped")
    assert "Traceback" not in log.read_text()
    assert not (out / "train" / "manifest.json").exists()

    # A server that gets one second to start cannot be ready: the run fails in its last step, after training has
    # continued from the checkpoint the interrupted run left.
    broken = finetune_run(out, "smoke.startup_timeout_s=1", env=env)
    assert broken.returncode == 2, broken.stdout[-3000:] + broken.stderr[-3000:]
    errors = [line for line in broken.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and errors[0].startswith("finetune: error: smoke test failed 1/1 checks: server_ready")
    assert "Traceback" not in broken.stderr, broken.stderr[-3000:]
    assert f"train: resuming from {out / 'train' / 'checkpoints' / 'checkpoint-50'}" in broken.stderr
    for step in STEPS[:-1]:
        assert (out / step / "manifest.json").is_file(), f"{step} finished but left no manifest"
    assert not (out / "smoke" / "manifest.json").exists()
    train_manifest = json.loads((out / "train" / "manifest.json").read_text())

    resumed = finetune_run(out, env=env)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    status = {line.split()[0]: line for line in resumed.stdout.splitlines() if line.startswith("  ") and line.split()[0] in STEPS}
    for step in STEPS[:-1]:
        assert "skipped" in status[step], resumed.stdout
    assert " ran " in status["smoke"], resumed.stdout
    assert json.loads((out / "train" / "manifest.json").read_text()) == train_manifest, "train must not run twice"

    # The tiny model learned what the bundled data teaches: it reasons in the language the system message asks for, on
    # questions it never saw (the smoke prompts are not in the data: tests/test_smoke.py), and closes its turn.
    report = json.loads((out / "smoke" / "report.json").read_text())
    smoke = json.loads((out / "smoke" / "manifest.json").read_text())["output"]
    print("\n" + (out / "smoke" / "report.md").read_text())
    assert smoke["num_failed"] == 0 and smoke["num_checks"] > 0
    languages = smoke["languages"]
    assert set(languages) == {"English", "French", "Spanish", "German"}
    codes = {"English": "en", "French": "fr", "Spanish": "es", "German": "de"}
    passing = [lang for lang, result in languages.items() if result["detected_language"] == codes[lang]]
    assert len(passing) >= 3 and smoke["metrics"]["languages_passing"] == len(passing), (languages, report)
    assert all(result["finish_reason"] == "stop" for result in languages.values()), languages
    assert {r["prompt"] for r in report["requests"] + report["adherence"]}.isdisjoint(
        json.loads(line).get("user") for line in (REPO / "steps" / "data" / "multilingual-fixture.jsonl").open())
    assert smoke["metrics"]["language_adherence"] >= 0.5 and smoke["metrics"]["adherence_num_requests"] == 8

    # The same folder with the fresh random weights the training started from (train/base): the same checks fail,
    # as one line; the smoke step takes the plain model folder.
    twin = tmp_path / "random-twin"
    shutil.copytree(out / "merge" / "model", twin)
    shutil.copy(out / "train" / "base" / "model.safetensors", twin / "model.safetensors")
    failed = subprocess.run([sys.executable, "-m", "flows.cli", "step", "smoke", "--config", "configs/tiny-cpu.yaml",
                             "--input", f"merge={twin}", "--out", str(tmp_path / "twin-smoke"), "smoke.adherence_prompts=0",
                             "smoke.min_language_adherence=0", "smoke.languages=[English,French]", "smoke.min_languages_passing=1",
                             "smoke.max_tokens=16"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    print("random twin:", failed.stderr.strip().splitlines()[-1])
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("finetune: error: smoke test failed ")
    twin_report = json.loads((tmp_path / "twin-smoke" / "report.json").read_text())
    assert any(not c["passed"] and ".reasoning" in c["name"] for c in twin_report["checks"]), twin_report["checks"]

    train = train_manifest["output"]
    assert train["loss_curve"][0][0] == 51 and train["num_steps"] == train["loss_curve"][-1][0]
    assert train["train_loss_last"] < 1.0  # a random model starts at ln(201,088 tokens) = 12.2

    # MLflow: one parent run per pipeline run, a nested run per step that ran, metrics and artifacts in place.
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-oss-finetune-tiny")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["KILLED", "FAILED", "FINISHED"]
    children = {p.info.run_id: {r.data.tags["step"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
                for p in parents}
    interrupted, first, second = (children[p.info.run_id] for p in parents)
    assert set(interrupted) == {"fetch", "harmony", "train"} and interrupted["train"].info.status == "KILLED"
    assert set(first) == set(STEPS) and first["smoke"].info.status == "FAILED"
    assert "train/loss" in first["train"].data.metrics and first["train"].data.params["train.method"] == "full"
    assert second["smoke"].info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(second["smoke"].info.run_id)}
    assert {"report.json", "report.md", "manifest.json"} <= artifacts

"""Tracking, registry and the promotion gate against a real `mlflow server` on 127.0.0.1 (SQLite backend, local
artifact root), started by a fixture and stopped by its process group id on every path. The tiny pipeline runs three
times against it (a good run, one made worse on purpose, a better one) and pushes to a local Hub test double; steps
run as separate CLI processes nest under one parent; the server is down at start, and killed during train."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.tracking import flatten
from steps import profile as profiles
from steps.contract import STEPS
from steps.profile import CONFIGS_DIR
from tests import tiny_pipeline
from tests.test_push import FakeHubServer

pytestmark = pytest.mark.integration
REPO = CONFIGS_DIR.parent
TOKEN = "hf_tracking_test_secret_never_logged_42"
EXPERIMENT = "gpt-oss-finetune-tiny"
MODEL = "tiny-reasoner"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process group; start() again after kill() serves the same store on the same port."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            # MLflow exits 0 when the port is taken: ours must still run when /health answers.
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 180 s"
            time.sleep(0.5)

    def kill(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def hub():
    with FakeHubServer(token=TOKEN) as double:
        yield double


def _env(tmp: Path) -> dict:
    # Only the Hub test double on loopback is "online"; the model, tokenizer and data are local.
    return {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
            "FINETUNE_SYSTEM_METRICS_INTERVAL_S": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


# The tiny profile trains on every bundled row (its gate reads smoke's adherence); the gate here also compares the eval
# loss, over a 5% eval split.
EVAL_GATE = ["data.eval_fraction=0.05", "promote.metrics=[{name: train/eval_loss_after, direction: lower, tolerance: 0.05}, "
             "{name: smoke/language_adherence, direction: higher, tolerance: 0.125}]"]


def _finetune_run(out: Path, *overrides, server, hub, env):
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", str(out), f"tracking.uri={server.uri}",
                           "push.dry_run=false", f"push.endpoint={hub.url}", f"push.repo_id=test-org/{MODEL}",
                           *tiny_pipeline.OVERRIDES, *EVAL_GATE, "smoke.languages=[English]", "smoke.max_tokens=32",
                           "train.save_steps=1000", *overrides],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_server, hub):
    """Four pipeline runs against one server and one Hub double. 1: the tiny profile, the first version, promoted once
    smoke passes. 2: made worse on purpose (train.max_steps=1; run 1's fetch and harmony reused, so skipped): smoke
    fails, the version stays a candidate. 3: run 1's six step folders reused (every step skipped), as good as the
    champion: promoted. 4: the same, with a gate asking for a metric no step logs: refused without failing. Before
    run 2 a RUNNING run of its out dir stands in for a killed process's."""
    tmp = tmp_path_factory.mktemp("tiny-runs")
    env = _env(tmp)
    client = MlflowClient(mlflow_server.uri)
    found = {"tmp": tmp, "client": client}
    found["first"] = _finetune_run(tmp / "run1", server=mlflow_server, hub=hub, env=env)
    assert found["first"].returncode == 0, found["first"].stdout[-3000:] + found["first"].stderr[-5000:]
    for name, steps in (("run2", STEPS[:2]), ("run3", STEPS), ("run4", STEPS)):
        (tmp / name).mkdir()
        for step in steps:  # a finished step's folder, as a later run finds it (linked: the disk is shared)
            (tmp / name / step).symlink_to(tmp / "run1" / step)
    found["experiment_id"] = client.get_experiment_by_name(EXPERIMENT).experiment_id
    found["stale_run_id"] = client.create_run(found["experiment_id"], run_name="killed",
                                              tags={"out_dir": str((tmp / "run2").resolve())}).info.run_id
    found["worse"] = _finetune_run(tmp / "run2", "train.max_steps=1", server=mlflow_server, hub=hub, env=env)
    found["better"] = _finetune_run(tmp / "run3", server=mlflow_server, hub=hub, env=env)
    found["refused"] = _finetune_run(
        tmp / "run4", "promote.metrics=[{name: smoke/answer_accuracy, direction: higher, tolerance: 0}]",
        server=mlflow_server, hub=hub, env=env)
    return found


def _parents(client, experiment_id, out: Path):
    return client.search_runs([experiment_id], order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.out_dir = '{out.resolve()}' and tags.profile != ''")


def _children(client, experiment_id, parent_id):
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["step"]: r for r in runs}


def test_first_run_one_parent_six_nested_runs_params_metrics_plots_dataset(runs, mlflow_server, tmp_path):
    client, tmp = runs["client"], runs["tmp"]
    [parent] = _parents(client, runs["experiment_id"], tmp / "run1")
    assert parent.info.status == "FINISHED" and parent.data.tags["finetune.promotion"] == "promoted"
    # Params: the resolved profile, flattened (defaults filled in), the token's variable name but never its value.
    params = parent.data.params
    assert params["train.max_steps"] == str(tiny_pipeline.TRAIN_STEPS) and params["train.method"] == "full"
    assert params["push.token_env"] == "HF_TOKEN"
    assert params["promote.metrics"].startswith("[{'name': 'train/eval_loss_after'")
    assert "'name': 'smoke/language_adherence'" in params["promote.metrics"]
    resolved = flatten(profiles.resolved(profiles.load_profile(profiles.DEFAULT_PROFILE, ["train.save_steps=1000"])))
    assert set(params) == set(resolved) and len(params) > 80
    # One naming scheme: <step>/<name> (system/ for MLflow's system metrics).
    children = _children(client, runs["experiment_id"], parent.info.run_id)
    assert set(children) == set(STEPS) and all(r.info.status == "FINISHED" for r in children.values())
    for run in (parent, *children.values()):
        assert all(k.split("/")[0] in (*STEPS, "system") for k in run.data.metrics), run.data.metrics.keys()
    train = children["train"]
    num_steps = json.loads((tmp / "run1" / "train" / "manifest.json").read_text())["output"]["num_steps"]
    loss = client.get_metric_history(train.info.run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, num_steps + 1)) and num_steps == tiny_pipeline.TRAIN_STEPS
    evals = client.get_metric_history(train.info.run_id, "train/eval_loss")
    assert [m.step for m in evals] == [0, num_steps] and evals[1].value < evals[0].value - 5
    assert parent.data.metrics["train/eval_loss_after"] == evals[1].value
    assert parent.data.metrics["train/eval_loss_before"] == evals[0].value
    assert {"train/grad_norm", "train/learning_rate", "train/interval_tokens_per_s", "train/peak_mem_gib"} <= set(train.data.metrics)
    assert "system/cpu_utilization_percentage" in train.data.metrics  # sampled during train (rank 0)
    assert {"smoke/num_failed", "smoke/mean_latency_s", "merge/max_abs_logit_diff", "push/num_bytes",
            "harmony/length_stats.all.p95", "fetch/num_train"} <= set(parent.data.metrics)
    # Smoke's flat Output.metrics under their own names (what the gate reads), not nested under smoke/metrics.
    smoke_out = json.loads((tmp / "run1" / "smoke" / "manifest.json").read_text())["output"]
    assert parent.data.metrics["smoke/language_adherence"] == smoke_out["metrics"]["language_adherence"]
    assert parent.data.metrics["smoke/adherence_num_requests"] == 2
    assert not [k for k in parent.data.metrics if k.startswith("smoke/metrics.")]
    # Dataset lineage: name, revision and a digest over every row (the sha256 of the kept rows), on fetch and parent.
    fetch_out = json.loads((tmp / "run1" / "fetch" / "manifest.json").read_text())["output"]
    for run in (children["fetch"], parent):
        inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
        assert set(inputs) == {"train", "eval"}
        assert inputs["train"].digest == fetch_out["train_sha256"][:36]
        assert json.loads(inputs["train"].profile) == {"num_rows": fetch_out["num_train"], "sha256": fetch_out["train_sha256"],
                                                       "revision": fetch_out["revision"]}
    # Both PNGs downloadable from the server.
    for run, png in ((children["harmony"], "token_lengths.png"), (train, "loss_curve.png")):
        local = client.download_artifacts(run.info.run_id, png, str(tmp_path))
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(local).stat().st_size > 10_000
    assert {"report.json", "report.md", "manifest.json"} <= {a.path for a in client.list_artifacts(children["smoke"].info.run_id)}
    assert {"profile.json", "promotion.json", "promotion.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_registry_candidate_champion_worse_refused_better_promoted(runs, hub):
    client, tmp, experiment_id = runs["client"], runs["tmp"], runs["experiment_id"]
    versions = {int(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(versions) == [1, 2, 3, 4]
    # By reference: the Hub repo + commit, nothing copied into the artifact store.
    assert {v.source for v in versions.values()} == {f"hf://test-org/{MODEL}@{'c' * 40}"}
    parents = [_parents(client, experiment_id, tmp / f"run{i}")[0] for i in (1, 2, 3, 4)]
    assert [versions[i].run_id for i in (1, 2, 3, 4)] == [p.info.run_id for p in parents]
    assert versions[2].tags["pipeline_run_id"] == parents[1].info.run_id
    assert versions[2].tags["dataset_revision"].startswith("sha256:") and versions[2].tags["hub_commit"] == "c" * 40

    # The worse run: its smoke test fails (the run fails as before, exit 2), yet it pushed, so it is registered;
    # champion stays, and the decision names what failed: the smoke test and the eval loss against the champion's.
    worse = runs["worse"]
    assert worse.returncode == 2, worse.stdout[-3000:] + worse.stderr[-3000:]
    errors = [line for line in worse.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and errors[0].startswith("finetune: error: smoke test failed"), worse.stderr[-3000:]
    decision = json.loads(Path(client.download_artifacts(parents[1].info.run_id, "promotion.json")).read_text())
    print("the worse run's gate:", decision["summary"])
    failed = {c["metric"]: c for c in decision["checks"] if not c["passed"]}
    # The adherence its failed smoke test logged (a failed test writes no Output) reaches the gate.
    adherence = next(c for c in decision["checks"] if c["metric"] == "smoke/language_adherence")
    assert adherence["candidate"] is not None and adherence["champion"] is not None
    assert adherence["passed"] == (adherence["candidate"] >= adherence["champion"] - 0.125)
    assert set(failed) - {"smoke/language_adherence"} == {"smoke/num_failed", "train/eval_loss_after"}
    assert failed["train/eval_loss_after"]["candidate"] > failed["train/eval_loss_after"]["champion"] + 0.05
    assert decision["decision"] == "refused" and decision["champion_before"] == decision["champion_after"] == "1"
    assert versions[2].tags["promotion"] == "refused" and parents[1].data.tags["finetune.promotion"] == "refused"

    # As good as the champion (its trained model, pushed and smoke-tested again): it takes champion.
    better = runs["better"]
    assert better.returncode == 0, better.stdout[-3000:] + better.stderr[-3000:]
    decision = json.loads(Path(client.download_artifacts(parents[2].info.run_id, "promotion.json")).read_text())
    assert decision["decision"] == "promoted" and decision["champion_before"] == "1" and decision["champion_after"] == "3"
    assert ("finetune: promotion promoted: version 3 is the new champion (was version 1): train/eval_loss_after "
            in better.stdout)

    # A gate that refuses ends the run in a state of its own: exit 3, MLflow FINISHED tagged refused, no traceback.
    refused = runs["refused"]
    assert refused.returncode == 3, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert ("finetune: promotion refused: version 4 not promoted, champion stays version 3: "
            "smoke/answer_accuracy was not logged by this run") in refused.stdout
    assert "Traceback" not in refused.stderr and "NotPromoted" in refused.stderr  # the Prefect flow run's state
    assert parents[3].info.status == "FINISHED" and parents[3].data.tags["finetune.promotion"] == "refused"
    assert client.get_model_version_by_alias(MODEL, "champion").version == "3"
    assert client.get_model_version_by_alias(MODEL, "candidate").version == "4"
    # The Hub commit carries each decision as a tag.
    assert {t: c for t, c in hub.tags.items() if t.startswith("mlflow-")} == {
        t: "c" * 40 for t in ("mlflow-promoted-v1", "mlflow-refused-v2", "mlflow-promoted-v3", "mlflow-refused-v4")}


def test_skipped_steps_say_so_and_stale_runs_are_closed(runs):
    client, tmp, experiment_id = runs["client"], runs["tmp"], runs["experiment_id"]
    run1 = _parents(client, experiment_id, tmp / "run1")[0]
    run2 = _parents(client, experiment_id, tmp / "run2")[0]
    producers = _children(client, experiment_id, run1.info.run_id)
    children = _children(client, experiment_id, run2.info.run_id)
    for step in ("fetch", "harmony"):
        tags = children[step].data.tags
        assert tags["finetune.skipped"] == "true" and tags["finetune.produced_by_run_id"] == producers[step].info.run_id
        assert tags["mlflow.note.content"].startswith(f"Skipped: {(tmp / 'run2').resolve()}/{step} already held")
        assert children[step].data.metrics == {}
    assert children["train"].data.tags["finetune.skipped"] == "false"
    assert run2.data.metrics["fetch/num_train"] == run1.data.metrics["fetch/num_train"]  # the parent still describes it
    stale = client.get_run(runs["stale_run_id"])
    assert stale.info.status == "KILLED" and "closed as KILLED by the next run" in stale.data.tags["finetune.closed_stale"]


def test_the_hub_token_reaches_no_param_tag_metric_or_artifact(runs, mlflow_server):
    client = runs["client"]
    found = client.search_runs([runs["experiment_id"]])
    assert len(found) >= 28
    for run in found:
        text = json.dumps([run.data.params, run.data.tags, run.data.metrics])
        assert TOKEN not in text
    stored = [p for p in (mlflow_server.root / "artifacts").rglob("*") if p.is_file()]
    assert len(stored) > 30
    assert not [p for p in stored if TOKEN.encode() in p.read_bytes()]
    assert TOKEN.encode() not in (mlflow_server.root / "mlflow.db").read_bytes()


def test_server_down_at_start_fails_before_fetch_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", str(tmp_path / "run"), f"tracking.uri={uri}"],
                            capture_output=True, text=True, cwd=REPO, env=_env(tmp_path), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"finetune: error: tracking.uri={uri} does not answer")
    assert not (tmp_path / "run" / "fetch").exists()


def test_cli_steps_nest_under_one_parent_and_train_survives_the_server_dying(mlflow_server, tmp_path):
    """fetch, harmony and train as separate `finetune step` processes (as containers run them) under one parent;
    the server is killed while train runs: train finishes, keeps what it logged on disk and says where, and a later
    step process sends it once the server is back."""
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment(f"cli-steps-{tmp_path.name}")
    parent = client.create_run(experiment_id, run_name="cli-steps", tags={"out_dir": str(tmp_path)}).info.run_id
    env = _env(tmp_path)
    config = str(CONFIGS_DIR / "tiny-cpu.yaml")

    def step(name, *inputs, **popen):
        cmd = [sys.executable, "-m", "flows.cli", "step", name, "--config", config, "--out", str(tmp_path / name),
               "--parent-run-id", parent, "--tracking-uri", mlflow_server.uri, "train.max_steps=6", "train.save_steps=1000",
               "data.eval_fraction=0.05",
               *[f"--input={i}={tmp_path / i}" for i in inputs]]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)

    for name, inputs in (("fetch", ()), ("harmony", ("fetch",))):
        proc = step(name, *inputs)
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
    train = step("train", "harmony")
    lines = []
    try:
        for line in train.stdout:
            lines.append(line)
            if "train: step 3/6 loss" in line:
                mlflow_server.kill()
                break
        lines += train.stdout.readlines()
        assert train.wait(timeout=600) == 0, "".join(lines)[-5000:]
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
        mlflow_server.start()  # the session's server again, for whatever follows
    log = "".join(lines)
    kept = next(line for line in lines if "unreachable" in line and "keeping what is logged in" in line)
    buffer = Path(kept.split("keeping what is logged in ")[1].split(", sent when")[0])
    assert buffer.parent == tmp_path / "mlflow-buffer" and buffer.is_file(), log[-3000:]
    assert "train: done" in log or "train: 6 steps" in log

    again = step("fetch")  # skipped, and sends what train kept
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert not buffer.exists()
    children = _children(client, experiment_id, parent)
    assert set(children) == {"fetch", "harmony", "train"}
    train_run = client.get_run(children["train"].info.run_id)
    assert train_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "train/loss")] == list(range(1, 7))
    assert "MLflow server unreachable from" in train_run.data.tags["finetune.tracking_gap"]
    assert "train/eval_loss_after" in client.get_run(parent).data.metrics


def test_a_step_deployments_flow_nests_under_the_parent_in_its_parameters(mlflow_server, tmp_path):
    """What step/<name> runs on its pool (finetune/prod): the `step` flow, given the parent's `tracking` parameter."""
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment(f"step-flow-{tmp_path.name}")
    parent = client.create_run(experiment_id, run_name="prod", tags={"out_dir": str(tmp_path)}).info.run_id
    tracking = {"uri": mlflow_server.uri, "parent_run_id": parent, "experiment_id": experiment_id, "out_dir": str(tmp_path)}
    code = ("import json, sys; from flows.finetune import step; "
            "step(name='fetch', config=sys.argv[1], out=sys.argv[2], tracking=json.loads(sys.argv[3]))")
    result = subprocess.run([sys.executable, "-c", code, str(CONFIGS_DIR / "tiny-cpu.yaml"), str(tmp_path),
                             json.dumps(tracking)], capture_output=True, text=True, cwd=REPO, env=_env(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [child] = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert child.data.tags["step"] == "fetch" and child.info.status == "FINISHED"
    assert child.data.metrics["fetch/num_train"] == client.get_run(parent).data.metrics["fetch/num_train"] > 0

"""prefect.yaml and infra/prefect/ against a real Prefect server on 127.0.0.1 with real workers: `prefect deploy --all`
read back from the server, finetune/dev end to end on a process worker (resumed after its worker was SIGKILLed),
finetune/prod's parent and its step deployments in real containers through a docker worker (a failing child fails
the parent), prod's concurrency limit against two runs back to back. Every process and container started is stopped
by its id at the end."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from steps.contract import RUNTIMES, STEPS
from steps.profile import CONFIGS_DIR
from tests import tiny_pipeline

pytestmark = pytest.mark.integration
REPO = CONFIGS_DIR.parent
POOL_OF_RUNTIME = {"cpu": "cpu", "train": "gpu", "serve": "gpu"}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """The process and everything under it, each by its pid (a process worker's flow runs, their servers)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


class Webhook(BaseHTTPRequestHandler):
    """The failure automation's receiver: a custom-webhook notification block posts here."""
    received: list[dict] = []

    def do_POST(self):
        Webhook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class Prefect:
    """The server, the workers and the CLI, all on one PREFECT_API_URL."""

    def __init__(self, root: Path, tag: str):
        self.root = root
        self.runs = root / "runs"  # the docker pools' output root on the host (FINETUNE_RUNS_DIR)
        self.runs.mkdir()
        port = _free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(root / "home"), "PREFECT_API_URL": self.api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PWD": str(REPO),
                    # the scheduler and the workers without their production pauses: tests wait on states, not time
                    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "FINETUNE_RUNS_DIR": str(self.runs), "FINETUNE_HF_CACHE": str(root / "hf-cache"),
                    "FINETUNE_IMAGE_TAG": tag, "FINETUNE_NOTIFY_BLOCK": "custom-webhook/finetune-alerts",
                    # a dead run is marked Crashed within about two minutes, not production's five
                    "FINETUNE_HEARTBEAT_S": "30", "FINETUNE_SILENT_AFTER_S": "75",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        (root / "hf-cache" / "hub").mkdir(parents=True)
        self.procs: list[subprocess.Popen] = []
        self.server = self.spawn("server", ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert self.server.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the Prefect server did not answer /api/health"
            time.sleep(1)

    def spawn(self, log: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.root / f"{log}.log", "ab")
        proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=REPO, env=self.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self, pool: str, name: str) -> subprocess.Popen:
        return self.spawn(f"worker-{name}", ["prefect", "worker", "start", "--pool", pool, "--name", name])

    def cli(self, *argv: str, timeout=900) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "prefect"), *argv], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str) -> str:
        """`code` against this server (a fresh interpreter: Prefect reads PREFECT_API_URL at start-up)."""
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    def query(self, body: str) -> dict:
        """The JSON that `body` prints, run with `client` (a sync PrefectClient) in scope."""
        out = self.python("import json, warnings\nwarnings.simplefilter('ignore')\n"
                          "from prefect.client.orchestration import get_client\n"
                          "with get_client(sync_client=True) as client:\n"
                          + "".join(f"    {line}\n" for line in body.strip().splitlines()))
        return json.loads(out.strip().splitlines()[-1])

    def flow_run(self, run_id: str) -> dict:
        return self.query(f"r = client.read_flow_run('{run_id}')\n"
                          "print(json.dumps({'id': str(r.id), 'name': r.name, 'state': r.state.type.value,"
                          " 'state_name': r.state.name, 'message': r.state.message, 'parameters': r.parameters}))")

    def runs_of(self, deployment: str) -> list[dict]:
        return self.query(f"""
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
d = client.read_deployment_by_name('{deployment}')
runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))
print(json.dumps([{{'id': str(r.id), 'name': r.name, 'state': r.state.type.value, 'message': r.state.message,
                   'expected_start_time': r.expected_start_time.isoformat(), 'parameters': r.parameters}}
                  for r in runs]))""")

    def wait(self, run_id: str, states=FINAL, limit_s=1200) -> dict:
        deadline = time.time() + limit_s
        while (run := self.flow_run(run_id))["state"] not in states:
            assert time.time() < deadline, run
            time.sleep(2)
        return run

    def start_run(self, deployment: str, **params) -> str:
        done = self.cli("deployment", "run", deployment, "--params", json.dumps(params), timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return next(line.split()[-1] for line in done.stdout.splitlines() if "UUID:" in line)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)


@pytest.fixture(scope="module")
def prefect(step_images, tmp_path_factory):
    """A server with infra/prefect/setup.sh applied twice and `prefect --no-prompt deploy --all` done."""
    root = tmp_path_factory.mktemp("prefect")
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    p = Prefect(root, step_images["tag"])
    try:
        started = time.time()
        p.python("from prefect.blocks.notifications import CustomWebhookNotificationBlock as B\n"
                 f"B(name='finetune-alerts', url='http://127.0.0.1:{webhook.server_port}/alerts',"
                 " json_data={'subject': '{{subject}}', 'body': '{{body}}'}).save('finetune-alerts')")
        p.setup = [subprocess.run([str(REPO / "infra" / "prefect" / "setup.sh")], cwd=REPO, env={
            **p.env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300) for _ in range(2)]
        for done in p.setup:
            assert done.returncode == 0, done.stdout + done.stderr
        p.deploy = p.cli("--no-prompt", "deploy", "--all")
        assert p.deploy.returncode == 0, p.deploy.stdout[-5000:] + p.deploy.stderr[-5000:]
        print("setup (second run):\n" + p.setup[1].stdout)
        print(f"deploy --all: {time.time() - started:.1f} s\n" + p.deploy.stdout[-1500:])
        print(p.cli("deployment", "ls").stdout)
        yield p
    finally:
        p.stop()
        webhook.shutdown()
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name} (tail)\n" + log.read_text(errors="replace")[-1500:])


def test_deployments_read_back_from_the_server(prefect):
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = [f"{'finetune' if d['entrypoint'].endswith(':finetune') else 'step'}/{d['name']}" for d in declared["deployments"]]
    assert sorted(names) == sorted(["finetune/prod", "finetune/prod-k8s", "finetune/dev",
                                    *(f"step/{s}" for s in STEPS), *(f"step/{s}-k8s" for s in STEPS)])
    got = prefect.query("""
out = {}
for d in client.read_deployments():
    flow = client.read_flow(d.flow_id)
    out[f"{flow.name}/{d.name}"] = {
        "pool": d.work_pool_name, "job_variables": d.job_variables, "parameters": d.parameters, "tags": d.tags,
        "pull": d.pull_steps, "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                                            for s in d.schedules],
        "limit": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
        "collision": d.concurrency_options.collision_strategy.value if d.concurrency_options else None}
pools = {p.name: {"type": p.type, "variables": p.base_job_template["variables"]["properties"]}
         for p in client.read_work_pools()}
automations = [{"id": str(a.id), "actions": [x.model_dump(mode="json") for x in a.actions], "expect": sorted(a.trigger.expect)}
               for a in client.read_automations_by_name("finetune-prod-failed")]
silent = [{"posture": a.trigger.posture.value, "within": a.trigger.within.total_seconds(),
           "actions": [x.model_dump(mode="json") for x in a.actions]}
          for a in client.read_automations_by_name("finetune-crash-silent-runs")]
block = client.read_block_document_by_name("finetune-alerts", block_type_slug="custom-webhook")
print(json.dumps({"deployments": out, "pools": pools, "automations": automations, "silent": silent,
                  "block_id": str(block.id)}))""")
    deployments, pools = got["deployments"], got["pools"]
    print(json.dumps(deployments, indent=1))
    assert sorted(deployments) == sorted(names)

    prod = deployments["finetune/prod"]
    assert prod["schedules"] == [{"cron": "0 2 * * *", "timezone": "Europe/Paris", "active": True}]
    assert prod["limit"] == 1 and prod["collision"] == "CANCEL_NEW"
    assert prod["parameters"]["config"] == "configs/h100-lora.yaml" and prod["parameters"]["dispatch"] == "deployments"
    assert {"config", "out", "dataset_revision", "overrides"} <= set(prod["parameters"]) and "prod" in prod["tags"]
    assert prod["pool"] == "cpu" and prod["job_variables"]["image"] == f"finetune-cpu:{prefect.env['FINETUNE_IMAGE_TAG']}"
    dev = deployments["finetune/dev"]
    assert dev["pool"] == "process" and dev["parameters"]["config"] == "configs/tiny-cpu.yaml"
    assert dev["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    for step in STEPS:
        d = deployments[f"step/{step}"]
        assert d["pool"] == POOL_OF_RUNTIME[RUNTIMES[step]], step
        assert d["job_variables"] == {"image": f"finetune-{RUNTIMES[step]}:{prefect.env['FINETUNE_IMAGE_TAG']}"}, step
        assert d["parameters"]["name"] == step
        assert d["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/finetune"}}], step
    assert prod["pull"] == deployments["step/fetch"]["pull"]
    # The same on the k8s pool (infra/k8s's worker): prod-k8s's schedule is there but off, its steps step/<name>-k8s.
    k8s = deployments["finetune/prod-k8s"]
    assert k8s["pool"] == "k8s" and k8s["parameters"]["dispatch"] == "kubernetes" and k8s["limit"] == 1
    assert k8s["schedules"] == [{"cron": "0 2 * * *", "timezone": "Europe/Paris", "active": False}]
    for step in STEPS:
        d = deployments[f"step/{step}-k8s"]
        assert d["pool"] == "k8s" and d["parameters"]["name"] == step, step
        assert d["job_variables"]["image"] == deployments[f"step/{step}"]["job_variables"]["image"], step
        assert d["job_variables"].get("gpu_count", 0) == (1 if POOL_OF_RUNTIME[RUNTIMES[step]] == "gpu" else 0), step

    # The pools as setup.sh declared them (infra/prefect/pools.yaml), after two runs.
    assert {name: p["type"] for name, p in pools.items()} == {"process": "process", "cpu": "docker", "gpu": "docker",
                                                             "k8s": "kubernetes"}
    gpu = {k: v.get("default") for k, v in pools["gpu"]["variables"].items()}
    assert gpu["container_create_kwargs"]["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert {"shm_size", "ipc_mode", "ulimits"} <= set(gpu["container_create_kwargs"])
    assert gpu["volumes"] == [f"{prefect.runs}:/runs:rw", f"{prefect.root / 'hf-cache'}:/cache/huggingface:rw"]
    assert gpu["image_pull_policy"] == "Never" and gpu["network_mode"] == "host"
    assert {"gpu_count", "node_selector", "tolerations"} <= set(pools["k8s"]["variables"])

    # The automation: one, however often setup.sh ran, sending to the configured block.
    assert "automation finetune-prod-failed: updated" in prefect.setup[1].stdout
    assert len(got["automations"]) == 1, got["automations"]
    automation = got["automations"][0]
    assert automation["expect"] == ["prefect.flow-run.Crashed", "prefect.flow-run.Failed", "prefect.flow-run.TimedOut"]
    assert [a["block_document_id"] for a in automation["actions"]] == [got["block_id"]]
    assert "automation finetune-crash-silent-runs: updated" in prefect.setup[1].stdout
    assert len(got["silent"]) == 1 and got["silent"][0]["posture"] == "Proactive", got["silent"]
    assert got["silent"][0]["within"] == 75 and got["silent"][0]["actions"][0]["state"] == "CRASHED"
    assert all(p["variables"]["env"]["default"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
               for name, p in pools.items() if name != "k8s")


def test_the_scheduler_creates_prod_runs_at_the_cron_times(prefect):
    deadline = time.time() + 300
    while not (runs := [r for r in prefect.runs_of("finetune/prod") if r["state"] == "SCHEDULED"]):
        assert time.time() < deadline, "no scheduled run of finetune/prod"
        time.sleep(2)
    print("scheduled finetune/prod runs:\n" + "\n".join(f"  {r['name']}  {r['expected_start_time']}  {r['state']}"
                                                      for r in sorted(runs, key=lambda r: r["expected_start_time"])))
    from datetime import datetime

    for run in runs:
        local = datetime.fromisoformat(run["expected_start_time"]).astimezone(ZoneInfo("Europe/Paris"))
        assert (local.hour, local.minute) == (2, 0), run


def _artifact(prefect, run_id: str, key: str):
    return prefect.query(f"""
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=['{key}'])),
                              flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=['{run_id}'])))
data = found[0].data if found else None
print(json.dumps(json.loads(data) if isinstance(data, str) and data[:1] in '[{{' else data))""")


def _logs(prefect, run_id: str) -> list[str]:
    return prefect.query(f"""
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
print(json.dumps([l.message for l in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=['{run_id}'])))]))""")


def test_dev_resumes_after_its_worker_is_killed_after_train(prefect):
    """finetune/dev on a process worker; the worker (and its flow run) SIGKILLed once train has finished; a new run
    with `--watch` on a new worker completes the pipeline and skips fetch, harmony and train."""
    out = prefect.root / "dev"
    started = time.time()
    worker = prefect.worker("process", "process-1")
    # The tiny profile's plumbing run (tests/tiny_pipeline.py), the same overrides on both runs: the same fingerprints.
    params = {"out": str(out), "overrides": tiny_pipeline.OVERRIDES}
    killed_id = prefect.start_run("finetune/dev", **params)
    while not (out / "train" / "manifest.json").is_file():
        assert worker.poll() is None and prefect.flow_run(killed_id)["state"] not in FINAL, prefect.flow_run(killed_id)
        time.sleep(0.5)
    merge_done_before_kill = (out / "merge" / "manifest.json").is_file()
    _stop(worker, signal.SIGKILL)
    print(f"killed the worker after train, {time.time() - started:.0f} s in; the run: {prefect.flow_run(killed_id)}")

    prefect.worker("process", "process-2")
    watch = prefect.cli("deployment", "run", "finetune/dev", "--params", json.dumps(params), "--watch",
                        timeout=1500)
    print(f"prefect deployment run finetune/dev --watch ({time.time() - started:.0f} s since the first run):\n"
          + watch.stdout[-4000:])
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-3000:]
    run = prefect.flow_run(next(line.split()[-1] for line in watch.stdout.splitlines() if "UUID:" in line))
    assert run["state"] == "COMPLETED" and run["name"] == "tiny-cpu@bundled", run

    steps = {row["step"]: row["status"] for row in _artifact(prefect, run["id"], "finetune-steps")}
    print("resumed run's steps:", steps)
    assert list(steps) == list(STEPS)
    for step in ("fetch", "harmony", "train"):
        assert steps[step].startswith("skipped"), steps
    assert steps["smoke"] == "ran" and steps["merge"] == ("skipped (already done)" if merge_done_before_kill else "ran")
    report = _artifact(prefect, run["id"], "smoke-report")
    assert report == (out / "smoke" / "report.md").read_text()
    assert len(_artifact(prefect, run["id"], "train-loss")) > 10
    logs = _logs(prefect, run["id"])
    assert any("step fetch: skipped" in line for line in logs) and any("step smoke: done" in line for line in logs), logs

    # The killed run sent no more heartbeats: automation-crash-silent-runs marks it Crashed (else it would stay
    # Running for ever and, on prod, hold the deployment's one concurrency slot).
    killed = prefect.wait(killed_id, limit_s=300)
    print(f"the killed run, {time.time() - started:.0f} s after the first start: {killed['state']}: {killed['message']}")
    assert killed["state"] == "CRASHED" and "No heartbeat for 75 s" in killed["message"], killed


def _label_cpu_containers(prefect) -> None:
    """The cpu pool's containers carry the label the session fixture removes if any is left."""
    prefect.python(
        "from prefect.client.orchestration import get_client\nfrom prefect.client.schemas.actions import WorkPoolUpdate\n"
        "with get_client(sync_client=True) as c:\n    t = c.read_work_pool('cpu').base_job_template\n"
        "    t['variables']['properties']['labels']['default'] = {'finetune-test': '1'}\n"
        "    c.update_work_pool('cpu', WorkPoolUpdate(base_job_template=t))")


def test_prod_parent_and_steps_in_containers_a_failing_child_fails_the_parent(prefect):
    """finetune/prod (tiny profile) through a docker worker on the cpu pool: the parent in a finetune-cpu container
    starts step/fetch (another container; its manifest lands on the mounted output root) and step/harmony, which
    fails on a ValueError: not retried, and the parent fails with the child's message and link."""
    _label_cpu_containers(prefect)
    started = time.time()
    prefect.worker("cpu", "cpu-1")
    parent_id = prefect.start_run("finetune/prod", config="configs/tiny-cpu.yaml", out="/runs/prod-tiny",
                                  dataset_revision="", overrides=["harmony.overflow=error", "harmony.max_length=64"])
    parent = prefect.wait(parent_id)
    print(f"finetune/prod (tiny, harmony made to fail): {parent['state']} after {time.time() - started:.0f} s: "
          f"{parent['message']}")
    fetch_runs, harmony_runs = prefect.runs_of("step/fetch"), prefect.runs_of("step/harmony")
    print("children:", [(r["name"], r["state"]) for r in fetch_runs + harmony_runs])
    assert [r["state"] for r in fetch_runs] == ["COMPLETED"] and fetch_runs[0]["name"] == "fetch-tiny-cpu@bundled"
    manifest = json.loads((prefect.runs / "prod-tiny" / "fetch" / "manifest.json").read_text())
    assert manifest["step"] == "fetch" and manifest["output"]["num_train"] > 0
    assert any("step fetch: running into /runs/prod-tiny/fetch" in line for line in _logs(prefect, fetch_runs[0]["id"]))

    assert [r["state"] for r in harmony_runs] == ["FAILED"], harmony_runs  # a ValueError: one run, no retry
    child = harmony_runs[0]
    assert "harmony.max_length" in child["message"] and "ValueError" in child["message"], child
    assert parent["state"] == "FAILED" and parent["name"] == "tiny-cpu@bundled", parent
    assert "raise harmony.max_length" in parent["message"] and f"/runs/flow-run/{child['id']}" in parent["message"]
    assert prefect.runs_of("step/train") == []

    # The failure automation (infra/prefect/automation-prod-failed.yaml) notified the configured block.
    deadline = time.time() + 300
    while not any(parent["name"] in m.get("subject", "") for m in Webhook.received):
        assert time.time() < deadline, ("no notification of the failed prod run", Webhook.received)
        time.sleep(1)
    notification = next(m for m in Webhook.received if parent["name"] in m["subject"])
    print("notification:", notification)
    assert "Failed" in notification["subject"] and "raise harmony.max_length" in notification["body"]
    left = subprocess.run(["docker", "ps", "-q", "--filter", "label=finetune-test"], capture_output=True, text=True)
    assert left.stdout.split() == [], "a step container outlived its flow run"


def test_prod_concurrency_never_runs_two_at_once(prefect):
    """A deployment with prod's concurrency settings (read back from the server), two runs started back to back: the
    second is cancelled (CANCEL_NEW) while the first runs; the first completes."""
    gate = prefect.root / "gate"
    deployment = prefect.query(f"""
from prefect.client.schemas.objects import ConcurrencyOptions
prod = client.read_deployment_by_name('finetune/prod')
flow_id = client.create_flow_from_name('gate')
d = client.create_deployment(flow_id=flow_id, name='prod-concurrency', work_pool_name='process',
                             entrypoint='tests/gate_flow.py:gate', parameters={{'path': '{gate}'}},
                             pull_steps=[{{'prefect.deployments.steps.set_working_directory': {{'directory': '{REPO}'}}}}],
                             concurrency_limit=prod.global_concurrency_limit.limit,
                             concurrency_options=ConcurrencyOptions(collision_strategy=prod.concurrency_options.collision_strategy))
print(json.dumps(str(d)))""")
    assert deployment
    if not any(p.poll() is None and "process" in " ".join(p.args) for p in prefect.procs):
        prefect.worker("process", "process-3")
    first, second = (prefect.start_run("gate/prod-concurrency") for _ in range(2))
    history = []
    while True:
        states = {run_id: prefect.flow_run(run_id)["state"] for run_id in (first, second)}
        history.append(tuple(states.values()))
        assert list(states.values()).count("RUNNING") < 2, history
        if "CANCELLED" in states.values() and "RUNNING" in states.values():
            break
        assert not FINAL & set(states.values()) - {"CANCELLED"}, history
        time.sleep(1)
    gate.write_text("open")
    running = next(run_id for run_id, state in states.items() if state == "RUNNING")
    done = prefect.wait(running, limit_s=300)
    print("overlap: states seen (first, second):", sorted(set(history), key=history.index), "then", done["state"])
    assert done["state"] == "COMPLETED"
    assert {prefect.flow_run(run_id)["state"] for run_id in (first, second)} == {"COMPLETED", "CANCELLED"}



def _step_containers(step: str) -> dict[str, str]:
    """The running containers of step/<step>'s flow runs (the test's label), as {container id: flow run id}."""
    listed = subprocess.run(["docker", "ps", "--filter", "label=finetune-test", "--format", "{{.ID}} {{.Labels}}"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    found = {}
    for line in listed:
        container, _, labels = line.partition(" ")
        labels = dict(item.partition("=")[::2] for item in labels.split(","))
        if labels.get("io.prefect.flow-name") == "step" and labels.get("io.prefect.deployment-name") == step:
            found[container] = labels["io.prefect.flow-run-id"]
    return found


def test_prod_retries_a_crashed_step_and_cancels_one_past_its_timeout(prefect):
    """finetune/prod (tiny): step/harmony's container is killed as soon as it runs (the worker reads exit code 137
    even when the flow run had not started yet: the pools keep exited containers; the flow run Crashes: retried, after
    orchestration.retry_delay_s, and the retry completes); step/train then waits past orchestration.timeout_s.train=1
    (no gpu worker runs here): cancelled, not retried, and the parent fails naming the limit."""
    _label_cpu_containers(prefect)
    if not any(p.poll() is None and "--pool cpu" in " ".join(p.args) for p in prefect.procs):
        prefect.worker("cpu", "cpu-2")
    before = {step: {r["id"] for r in prefect.runs_of(f"step/{step}")} for step in ("harmony", "train")}
    started = time.time()
    parent_id = prefect.start_run("finetune/prod", config="configs/tiny-cpu.yaml", out="/runs/prod-retry",
                                  dataset_revision="", overrides=["orchestration.retry_delay_s=1",
                                                                  "orchestration.timeout_s.train=1",
                                                                  "orchestration.timeout_s.harmony=300"])
    new = lambda step: [r for r in prefect.runs_of(f"step/{step}") if r["id"] not in before[step]]  # noqa: E731
    deadline = time.time() + 600
    while not (containers := _step_containers("harmony")):
        assert time.time() < deadline, prefect.flow_run(parent_id)
        time.sleep(0.2)
    killed = {"id": next(iter(containers.values()))}
    subprocess.run(["docker", "kill", *containers], check=True, capture_output=True)
    print(f"killed step/harmony's container {time.time() - started:.0f} s in")
    parent = prefect.wait(parent_id)
    harmony, train = new("harmony"), new("train")
    print(f"finetune/prod, harmony's container killed once, timeout_s.train=1: {parent['state']} after "
          f"{time.time() - started:.0f} s: {parent['message']}\n  step/harmony runs: "
          f"{[(r['name'], r['state'], r['message']) for r in harmony]}\n  step/train runs: "
          f"{[(r['name'], r['state'], r['message']) for r in train]}")
    assert prefect.flow_run(killed["id"])["state"] == "CRASHED", prefect.flow_run(killed["id"])
    assert sorted(r["state"] for r in harmony) == ["COMPLETED", "CRASHED"], harmony  # retried once, then done
    assert json.loads((prefect.runs / "prod-retry" / "harmony" / "manifest.json").read_text())["step"] == "harmony"
    assert parent["state"] == "FAILED" and "orchestration.timeout_s.train=1" in parent["message"], parent
    assert len(train) == 1, train  # a timeout is not retried
    child = prefect.wait(train[0]["id"], limit_s=120)
    assert child["state"] == "CANCELLED" and "timeout_s.train" in child["message"], child
    assert not (prefect.runs / "prod-retry" / "train").exists()

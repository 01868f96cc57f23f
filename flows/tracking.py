"""MLflow behind the steps' Tracker interface: one parent run per pipeline run, one nested run per step, also for a
step in another process or container (the `tracking` dict {uri, parent_run_id, experiment_id, out_dir} travels with
the step's CLI call and the step deployment's parameters). Metrics are named `<step>/<name>`; what the server does not
take while it is unreachable is kept in `<out>/mlflow-buffer/` and sent once it answers again."""
import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A lost server must cost a training run seconds per call, not MLflow's default of 7 retries with doubling back-off
# (minutes per call): what it misses is buffered below and sent later.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

log = logging.getLogger("finetune")
BUFFER_DIR = "mlflow-buffer"
_MAX_PARAM_CHARS = 6000
RETRY_S = 10
SYSTEM_METRICS_INTERVAL_S = float(os.environ.get("FINETUNE_SYSTEM_METRICS_INTERVAL_S", "5"))


def _unreachable(err: MlflowException) -> bool:
    cause = err.__cause__ or err.__context__
    return isinstance(cause, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              requests.exceptions.RetryError)) or "failed with timeout exception" in str(err)


def secrets() -> list[str]:
    """Values that must never reach the tracking server: any token in the environment (push.token_env names one)."""
    return [v for k, v in os.environ.items() if "TOKEN" in k.upper() and len(v) >= 8]


def _redact(value: str) -> str:
    for secret in secrets():
        value = value.replace(secret, "***")
    return value


class Server:
    """An MlflowClient whose writes are kept in a JSON-lines file while the server cannot be reached, and replayed in
    order (ids of runs created meanwhile mapped to the real ones) when it answers again."""

    def __init__(self, uri: str, buffer_path: Path):
        self.uri, self.client, self.buffer_path = uri, MlflowClient(tracking_uri=uri), buffer_path
        self._ids: dict[str, str] = {}  # buffered-… run id -> the server's
        self._lock = threading.Lock()
        self._next_try_s = 0.0  # while buffering, the server is asked again at most every RETRY_S

    def _send(self, op: str, kw: dict):
        run_id = self._ids.get(kw.get("run_id"), kw.get("run_id"))
        c = self.client
        if op == "create_run":
            run = c.create_run(kw["experiment_id"], run_name=kw["run_name"], tags=kw["tags"], start_time=kw["start_time"])
            self._ids[kw["local_id"]] = run.info.run_id
            return run.info.run_id
        if op == "log_batch":
            return c.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in kw["metrics"]],
                               params=[Param(k, v) for k, v in kw["params"]], tags=[RunTag(k, v) for k, v in kw["tags"]])
        if op == "log_artifact":
            return c.log_artifact(run_id, kw["path"], kw.get("artifact_path"))
        if op == "log_text":
            return c.log_text(run_id, kw["text"], kw["artifact_file"])
        if op == "log_inputs":
            return c.log_inputs(run_id, datasets=[DatasetInput(Dataset(**d["dataset"]), [InputTag(k, v) for k, v in d["tags"]])
                                                  for d in kw["datasets"]])
        if op == "set_terminated":
            return c.set_terminated(run_id, kw["status"], end_time=kw["end_time"])
        raise AssertionError(op)

    def call(self, op: str, **kw):
        """Send one write now, or (server unreachable, or earlier writes still waiting) append it to the buffer."""
        with self._lock:
            if self.buffer_path.is_file() and (time.monotonic() < self._next_try_s or not self._replay()):
                return self._keep(op, kw)
            try:
                return self._send(op, kw)
            except MlflowException as err:
                if not _unreachable(err):
                    raise
                log.warning("MLflow server %s unreachable (%s); keeping what is logged in %s, sent when it answers "
                            "again (by this process, or the next `finetune run`/`finetune step` with this out "
                            "dir)", self.uri, str(err).splitlines()[0][:200], self.buffer_path)
                self._next_try_s = time.monotonic() + RETRY_S
                return self._keep(op, kw)

    def _keep(self, op: str, kw: dict):
        self.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.buffer_path.is_file():
            kw = {**kw, "gap_started": time.time()}
        with self.buffer_path.open("a") as f:
            f.write(json.dumps({"op": op, **kw}) + "\n")
        return kw.get("local_id")

    def _replay(self) -> bool:
        """Send the buffered writes; True when none is left. A write the server rejects for another reason than the
        connection is an error, as it would have been at once."""
        lines = self.buffer_path.read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
        gap_started = entries[0].get("gap_started", time.time()) if entries else time.time()
        for done, entry in enumerate(entries):
            try:
                self._send(entry.pop("op"), entry)
            except MlflowException as err:
                if not _unreachable(err):
                    raise
                left = [{**e, "run_id": self._ids.get(e.get("run_id"), e.get("run_id"))} if "run_id" in e else e
                        for e in (json.loads(line) for line in lines[done:] if line.strip())]
                self.buffer_path.write_text("".join(json.dumps(e) + "\n" for e in left))
                self._next_try_s = time.monotonic() + RETRY_S
                return False
        self.buffer_path.unlink()
        gap = (f"MLflow server unreachable from {time.strftime('%H:%M:%S', time.localtime(gap_started))}; "
               f"{len(entries)} writes kept in {self.buffer_path} and sent at {time.strftime('%H:%M:%S')}")
        for run_id in {self._ids.get(e.get("run_id"), e.get("run_id")) for e in entries} - {None}:
            self.client.set_tag(run_id, "finetune.tracking_gap", gap)
        log.info("%s", gap)
        return True

    def flush(self) -> bool:
        with self._lock:
            return not self.buffer_path.is_file() or self._replay()


def upload_buffered(uri: str, out_dir: Path) -> None:
    """Send what earlier processes on this out dir could not (one file per run that buffered)."""
    for path in sorted((Path(out_dir) / BUFFER_DIR).glob("*.jsonl")):
        if not Server(uri, path).flush():
            log.warning("MLflow server %s still unreachable; %s kept", uri, path)


class MlflowTracker:
    """One step's run. Metrics logged with a step (training curves) stay on the step's run; summaries (step=None) go to
    the parent run too, which is where the gate and a reader comparing pipeline runs look."""

    def __init__(self, server: Server, run_id: str, *, step: str, parent_run_id: str):
        self.server, self.run_id, self.step, self.parent_run_id = server, run_id, step, parent_run_id
        self.series: set[str] = set()

    def log_params(self, params: dict) -> None:
        items = [(k, _redact(str(v))[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.server.call("log_batch", run_id=self.run_id, metrics=[], params=items[i:i + 100], tags=[])

    def log_metrics(self, metrics: dict[str, float], *, step: int | None = None, prefix: str | None = None) -> None:
        now = int(time.time() * 1000)
        prefix = f"{self.step}/" if prefix is None else prefix
        items = [(prefix + k, float(v), now, step or 0) for k, v in metrics.items()]
        if step is not None:
            self.series.update(k for k, *_ in items)
        else:
            # A summary that shares a name with a curve of this run (train/peak_mem_gib) goes to the parent only.
            self.server.call("log_batch", run_id=self.parent_run_id, metrics=items, params=[], tags=[])
            items = [m for m in items if m[0] not in self.series]
        if items:
            self.server.call("log_batch", run_id=self.run_id, metrics=items, params=[], tags=[])

    def log_artifact(self, path: Path) -> None:
        self.server.call("log_artifact", run_id=self.run_id, path=str(path))

    def log_dataset(self, *, name: str, source: str, revision: str, digest: str, num_rows: int, context: str) -> None:
        """mlflow.data lineage on the step's run and the parent: the digest is the caller's, over every row (MLflow's
        own reads only the first 10,000)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        if Path(source).exists():
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local-file source classes
                warnings.simplefilter("ignore", UserWarning)
                src = resolve_dataset_source(source)
        else:
            src = HuggingFaceDatasetSource(path=source, revision=revision)
        # MLflow keeps 36 characters of a digest; the whole sha256 goes in the profile.
        entity = MetaDataset(source=src, name=name, digest=digest[:36])._to_mlflow_entity()
        entity_dict = {"name": entity.name, "digest": entity.digest, "source_type": entity.source_type,
                       "source": entity.source, "schema": None,
                       "profile": json.dumps({"num_rows": num_rows, "sha256": digest, "revision": revision})}
        datasets = [{"dataset": entity_dict, "tags": [["mlflow.data.context", context]]}]
        for run_id in (self.run_id, self.parent_run_id):
            self.server.call("log_inputs", run_id=run_id, datasets=datasets)

    def log_output(self, output: dict) -> None:
        """Every number in the step's Output as `<step>/<field>` (nested fields joined by "."): one scheme for every
        step, including fields added later (smoke's)."""
        self.log_metrics(output_numbers(output))


def output_numbers(output: dict) -> dict[str, float]:
    """An Output's numbers by name; its `metrics` field (smoke's flat {name: number}, the names the step logs itself
    when it fails and writes no Output) keeps its own names: smoke/language_adherence, not
    smoke/metrics.language_adherence."""
    return {**_numbers({k: v for k, v in output.items() if k != "metrics"}), **_numbers(output.get("metrics") or {})}


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    found = {}
    for k, v in d.items():
        if isinstance(v, dict):
            found.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            found[f"{prefix}{k}"] = v
        elif isinstance(v, bool):
            found[f"{prefix}{k}"] = int(v)
    return found


def flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def start_parent_run(uri: str, experiment: str, *, out_dir: Path, run_name: str, tags: dict,
                     params: dict) -> tuple[Server, dict]:
    """The pipeline run's parent MLflow run, after sending what earlier runs of this out dir buffered and closing
    their runs that were left RUNNING (a killed process cannot close its own). Returns the `tracking` dict."""
    out_dir = Path(out_dir)
    upload_buffered(uri, out_dir)
    server = Server(uri, out_dir / BUFFER_DIR / f"parent-{uuid.uuid4().hex[:12]}.jsonl")
    client = server.client
    try:
        found = client.get_experiment_by_name(experiment)
    except MlflowException as err:
        if not _unreachable(err):
            raise
        raise ValueError(f"tracking.uri={uri} does not answer ({str(err).splitlines()[0][:160]}); start the MLflow "
                         "server, or set tracking.uri= (a local store in the run's out dir)") from None
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    stale = client.search_runs([experiment_id], filter_string=f"tags.out_dir = '{out_dir}' and attributes.status = 'RUNNING'")
    for run in stale:
        client.set_tag(run.info.run_id, "finetune.closed_stale",
                       f"left RUNNING by a process that was killed; closed as KILLED by the next run at {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        client.set_terminated(run.info.run_id, "KILLED")
    if stale:
        log.info("MLflow: closed %d runs of %s left RUNNING by an earlier, killed run", len(stale), out_dir)
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, "out_dir": str(out_dir)})
    tracker = MlflowTracker(server, run.info.run_id, step="", parent_run_id=run.info.run_id)
    tracker.log_params(params)
    tracking = {"uri": uri, "parent_run_id": run.info.run_id, "experiment_id": experiment_id, "out_dir": str(out_dir)}
    return server, tracking


def _producing_run(client: MlflowClient, experiment_id: str, fingerprint: str) -> str:
    found = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.fingerprint = '{fingerprint}' and tags.`finetune.skipped` = 'false'"
                                             " and attributes.status = 'FINISHED'")
    return found[0].info.run_id if found else ""


class _SystemMetrics(threading.Thread):
    """MLflow's system monitors (CPU, memory, disk, network; GPU memory and utilisation with nvidia-ml-py) sampled
    every interval_s and logged as `system/<name>` through the tracker, so they are buffered like every other metric
    while the server is away (MLflow's own loop stops at its first failed call)."""

    def __init__(self, tracker: MlflowTracker, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        super().__init__(daemon=True, name="system-metrics")
        self.tracker, self.interval_s, self.stop = tracker, interval_s, threading.Event()
        self.monitors = SystemMetricsMonitor(tracker.run_id, tracking_uri=tracker.server.uri).monitors

    def run(self):
        step = 0
        while not self.stop.wait(self.interval_s):
            metrics = {}
            for monitor in self.monitors:
                monitor.collect_metrics()
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            self.tracker.log_metrics(metrics, step=step, prefix="system/")
            step += 1


@contextlib.contextmanager
def step_run(tracking: dict, step: str):
    """A nested run for one step under tracking["parent_run_id"], closed FINISHED, FAILED (the step raised) or KILLED
    (Ctrl-C, SIGTERM); the error propagates. A skipped step's run says so and links the run that produced its output.
    Yields (tracker, finish): call finish(manifest, skipped) once the contract returns."""
    server = Server(tracking["uri"], Path(tracking["out_dir"]) / BUFFER_DIR / f"{step}-{uuid.uuid4().hex[:12]}.jsonl")
    if "experiment_id" not in tracking:  # a CLI call passes the parent run and the URI only
        try:
            tracking = {**tracking, "experiment_id": server.client.get_run(tracking["parent_run_id"]).info.experiment_id}
        except MlflowException as err:
            if _unreachable(err):
                raise ValueError(f"--tracking-uri {tracking['uri']} does not answer; start the MLflow server or run "
                                 "the step without --parent-run-id") from None
            raise ValueError(f"--parent-run-id {tracking['parent_run_id']}: no such run at {tracking['uri']} "
                             f"({str(err).splitlines()[0]})") from None
    upload_buffered(tracking["uri"], Path(tracking["out_dir"]))
    tags = {"mlflow.parentRunId": tracking["parent_run_id"], "step": step, "out_dir": tracking["out_dir"]}
    run_id = server.call("create_run", experiment_id=tracking["experiment_id"], run_name=step, tags=tags,
                         start_time=int(time.time() * 1000), local_id=f"buffered-{uuid.uuid4().hex}")
    tracker = MlflowTracker(server, run_id, step=step, parent_run_id=tracking["parent_run_id"])
    monitor = _SystemMetrics(tracker, SYSTEM_METRICS_INTERVAL_S) if step == "train" else None
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        # A container stopped by its engine (docker stop, a cancelled flow run) gets SIGTERM: close the runs as KILLED.
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    status = "FAILED"

    def finish(manifest: dict, skipped: bool) -> None:
        run_tags = [["fingerprint", manifest["fingerprint"]], ["finetune.skipped", str(skipped).lower()]]
        if skipped:
            producer = _producing_run(server.client, tracking["experiment_id"], manifest["fingerprint"])
            note = (f"Skipped: {tracking['out_dir']}/{step} already held this step's finished output (fingerprint "
                    f"{manifest['fingerprint'][:12]}, started {manifest.get('started_at', '?')})"
                    + (f", produced by run {producer}." if producer else "."))
            run_tags += [["mlflow.note.content", note], ["finetune.produced_by_run_id", producer]]
        server.call("log_batch", run_id=run_id, metrics=[], params=[], tags=run_tags)
        if skipped:  # the pipeline run still describes its whole model: the earlier output's figures on the parent
            now = int(time.time() * 1000)
            server.call("log_batch", run_id=tracking["parent_run_id"], params=[], tags=[],
                        metrics=[(f"{step}/{k}", float(v), now, 0) for k, v in output_numbers(manifest["output"]).items()])
        else:
            tracker.log_output(manifest["output"])

    try:
        if monitor:
            monitor.start()
        yield tracker, finish
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if monitor:
            monitor.stop.set()
            monitor.join()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        server.call("set_terminated", run_id=run_id, status=status, end_time=int(time.time() * 1000))
        if not server.flush():
            log.warning("MLflow server %s still unreachable at the end of step %s; its tracking is kept in %s",
                        tracking["uri"], step, server.buffer_path)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt

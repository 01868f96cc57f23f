"""MLflow behind the steps' Tracker interface: one parent run per pipeline run, one nested run per step."""
import contextlib
import os
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_MAX_PARAM_CHARS = 6000


class MlflowTracker:
    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))


def start_parent_run(uri: str, experiment: str, *, run_name: str, tags: dict) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return client, run.info.run_id


@contextlib.contextmanager
def step_run(uri: str, parent_run_id: str, step: str):
    """A nested run for one step; marked FAILED if the step raises (KILLED on Ctrl-C), and the error propagates."""
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=step,
                            tags={"mlflow.parentRunId": parent_run_id, "step": step})
    try:
        yield MlflowTracker(client, run.info.run_id)
    except KeyboardInterrupt:
        client.set_terminated(run.info.run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")

"""The parent flow: fetch → harmony → train → merge → push → smoke, each step in-process or as its own deployment.

    finetune run [--config configs/tiny-cpu.yaml] [--out runs/latest] [section.key=value …]     (in-process)
    prefect deployment run finetune/dev --watch                                                 (in-process, a worker)
    prefect deployment run finetune/prod                          (each step its deployment step/<name>: prefect.yaml;
                                                                   train with train.nodes > 1 a TrainJob: flows/trainjob.py)
"""
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from prefect.states import Completed

from flows.preflight import check_environment
from steps import contract, profile as profiles
from steps.tracking import NullTracker

# The steps log through "finetune" at INFO. PREFECT_LOGGING_EXTRA_LOGGERS=finetune (every pool sets it) gives that
# logger Prefect's API handler, so the lines land in the flow-run logs, but not a level: Prefect's root is WARNING.
logging.getLogger("finetune").setLevel(logging.INFO)


def _execute(name: str, profile: dict, out: Path, tracking: dict) -> dict:
    """One step through the contract (skipped when its out dir already holds a matching manifest)."""
    cfg = profiles.step_config(profile, name)
    inputs = {up: out / up for up in contract.step_module(name).INPUTS}
    if not tracking:
        manifest, skipped = contract.execute(name, cfg, out_dir=out / name, inputs=inputs, tracker=NullTracker())
    else:
        from flows.tracking import step_run

        with step_run(tracking, name) as (tracker, finish):
            manifest, skipped = contract.execute(name, cfg, out_dir=out / name, inputs=inputs, tracker=tracker)
            finish(manifest, skipped)
    return {"step": name, "status": "skipped (already done)" if skipped else "ran",
            "out_dir": str(out / name), "duration_s": manifest["duration_s"]}


@task(cache_policy=NO_CACHE)
def run_step(name: str, profile: dict, out: Path, tracking: dict) -> dict:
    return _execute(name, profile, out, tracking)


def _step_run_name() -> str:
    params = runtime.flow_run.parameters
    return f"{params['name']}-{_run_label(params['config'], params.get('overrides') or [])}"


@flow(name="step", flow_run_name=_step_run_name)
def step(name: str, config: str, out: str, overrides: list[str] = (), tracking: dict | None = None) -> dict:
    """One step, as the deployment step/<name> runs it (in its runtime's container, on its pool)."""
    profile = profiles.load_profile(config, list(overrides))
    return _execute(name, profile, Path(out), tracking or {})


def _child_error(state) -> type[Exception]:
    """A child that failed on a ValueError (bad input: the same input fails again) is not retried; a crash or a lost
    worker is. The class survives the process boundary only as the state message: "…exception: ValueError: …"."""
    found = re.search(r"exception: (\w+):", state.message or "")
    return ValueError if found and found.group(1) == "ValueError" else RuntimeError


class StepTimedOut(TimeoutError):
    """A step ran past its orchestration.timeout_s: the run stops there (the same step would only time out again)."""

    def __init__(self, name: str, timeout_s: int, where: str):
        super().__init__(f"step {name} ran past orchestration.timeout_s.{name}={timeout_s} s and was stopped{where}; "
                         f"raise it in the profile or pass orchestration.timeout_s.{name}=SECONDS")


def _transient(task, task_run, state) -> bool:
    return not isinstance(state.result(raise_on_failure=False), (ValueError, StepTimedOut))


@task(cache_policy=NO_CACHE, retry_condition_fn=_transient)
def run_step_deployment(name: str, config: str, out: Path, overrides: list[str], tracking: dict,
                        timeout_s: int | None, deployment: str) -> dict:
    """Step `name` as the flow run of `deployment` (step/<name>, or step/<name>-k8s); fails with the child's message and link unless
    the child completed. `run_deployment` itself returns the child whatever its final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Cancelling
    from prefect.utilities.urls import url_for

    manifest_path = out / name / contract.MANIFEST
    before = manifest_path.read_text() if manifest_path.is_file() else None
    child = run_deployment(deployment, timeout=timeout_s, poll_interval=2,
                           parameters={"name": name, "config": config, "out": str(out), "overrides": list(overrides),
                                       "tracking": tracking})
    link = url_for("flow-run", obj_id=child.id)
    if not child.state.is_final():
        with get_client(sync_client=True) as client:
            message = f"past orchestration.timeout_s.{name}={timeout_s} s"
            # One no worker has taken yet has nothing to stop; a started one's worker stops its container.
            stop = Cancelled if client.read_flow_run(child.id).state.is_scheduled() else Cancelling
            client.set_flow_run_state(child.id, stop(message=message), force=True)
        raise StepTimedOut(name, timeout_s, f" (flow run {link}, cancelled)")
    if not child.state.is_completed():
        raise _child_error(child.state)(f"step {name}: flow run {child.name} {child.state.name}: {child.state.message} "
                                        f"({link})")
    manifest = json.loads(manifest_path.read_text())
    return {"step": name, "status": "skipped (already done)" if manifest_path.read_text() == before else "ran",
            "out_dir": str(out / name), "duration_s": manifest["duration_s"], "flow_run": link}


@task(cache_policy=NO_CACHE, retry_condition_fn=_transient)
def run_train_job(config: str, out: Path, overrides: list[str], tracking: dict, timeout_s: int | None) -> dict:
    """train.nodes > 1: the train step as a Kubeflow Trainer TrainJob created through the Kubernetes API and waited for
    (flows/trainjob.py); fails with the pods' failure reason. A retry creates a new TrainJob, which resumes from the
    last checkpoint the lost one wrote."""
    from prefect.variables import Variable

    from flows import trainjob

    profile = profiles.load_profile(config, list(overrides))
    cfg, inputs = profiles.step_config(profile, "train"), {"harmony": out / "harmony"}
    manifest_path = out / "train" / contract.MANIFEST
    if manifest_path.is_file() and (json.loads(manifest_path.read_text())["fingerprint"]
                                    == contract.fingerprint("train", cfg, inputs)):
        # Skipped here rather than by the step itself: no nodes are held only to find the step done.
        return {"step": "train", "status": "skipped (already done)", "out_dir": str(out / "train"),
                "duration_s": json.loads(manifest_path.read_text())["duration_s"]}
    job = trainjob.render(trainjob.load_template(), profile, name=f"finetune-train-{uuid.uuid4().hex[:8]}",
                          image_tag=Variable.get("finetune_image_tag"), config=config, out_dir=out,
                          overrides=overrides, tracking=tracking)
    try:
        trainjob.run(job, namespace=job["metadata"]["namespace"], timeout_s=timeout_s)
    except TimeoutError as e:
        raise StepTimedOut("train", timeout_s, f" ({e})") from None
    if not manifest_path.is_file():
        raise RuntimeError(f"TrainJob {job['metadata']['name']} completed but {manifest_path} is missing: this flow and "
                           "the TrainJob's nodes must mount the same ReadWriteMany claim at /runs (infra/k8s/storage.yaml)")
    manifest = json.loads(manifest_path.read_text())
    return {"step": "train", "status": "ran", "out_dir": str(out / "train"), "duration_s": manifest["duration_s"],
            "trainjob": f"{job['metadata']['namespace']}/{job['metadata']['name']}"}


def _run_label(config: str, overrides: list[str]) -> str:
    """profile@dataset-revision (the run names): what a run trained on, at a glance."""
    data = profiles.load_profile(config, list(overrides)).get("data", {})
    revision = data.get("revision") or Path(str(data.get("dataset", "data"))).name
    return f"{Path(config).stem}@{revision}"


def _run_name() -> str:
    params = runtime.flow_run.parameters
    overrides = list(params.get("overrides") or [])
    if params.get("dataset_revision"):
        overrides.append(f"data.revision={params['dataset_revision']}")
    return _run_label(params.get("config", str(profiles.DEFAULT_PROFILE)), overrides)


def _artifacts(results: list[dict], out_dir: Path, tracking: dict) -> None:
    """The run's page in the Prefect UI: steps, the train loss curve, the smoke report, links to the model and run."""
    create_table_artifact(key="finetune-steps", table=results, description="Each step: ran or skipped, seconds, output")
    done = {r["step"] for r in results}
    if "train" in done:
        curve = contract.read_output(out_dir / "train")["loss_curve"]
        create_table_artifact(key="train-loss", table=[{"step": s, "loss": loss} for s, loss in curve],
                              description="Training loss per logging step")
    if "smoke" in done:
        report = Path(contract.read_output(out_dir / "smoke")["report_md_path"])
        create_markdown_artifact(key="smoke-report", markdown=report.read_text(), description="Smoke test of the model")
    if "push" in done:
        push = contract.read_output(out_dir / "push")
        create_link_artifact(key="hub-model", link=push["url"] or f"https://huggingface.co/{push['repo_id']}",
                             link_text=push["repo_id"] + (" (dry run: nothing uploaded)" if push["dry_run"] else ""))
    if tracking and tracking["uri"].startswith(("http://", "https://")):
        create_link_artifact(key="mlflow-run", link=f"{tracking['uri'].rstrip('/')}/#/experiments/"
                             f"{tracking['experiment_id']}/runs/{tracking['parent_run_id']}", link_text="MLflow run")


# Set once the flow body has closed what it opened (tracking runs), however it ended: on Ctrl-C the CLI waits for this,
# then exits without Prefect's crash reporting to a temporary server that the same Ctrl-C has stopped.
CLEANED_UP = threading.Event()


# No log_prints: Prefect's print-to-log patch also catches prints that a library redirects to a buffer: dill finds a
# function's globals by capturing dis.dis() output, which instead went to the console as ~190 lines of bytecode.
# The steps' lines reach the flow-run logs through the "finetune" logger (PREFECT_LOGGING_EXTRA_LOGGERS, above).
@flow(name="finetune", flow_run_name=_run_name)
def finetune(config: str = str(profiles.DEFAULT_PROFILE), out: str = "runs/latest", overrides: list[str] = (),
             dataset_revision: str = "", dispatch: Literal["in-process", "deployments", "kubernetes"] = "in-process"
             ) -> list[dict]:
    """dispatch=deployments runs each step as its deployment step/<name>, on its runtime's docker pool and image
    (prefect.yaml), dispatch=kubernetes as step/<name>-k8s on the k8s pool; `out` must then be a folder every pool
    mounts at the same path (/runs)."""
    logger = get_run_logger()
    overrides = list(overrides) + ([f"data.revision={dataset_revision}"] if dataset_revision else [])
    out_dir = Path(out).resolve()
    profile = profiles.load_profile(config, overrides)
    num_train_nodes = profiles.step_config(profile, "train").nodes
    # In-process, every step's config is checked before the first step starts. With dispatch=deployments no image
    # holds every step's packages (a step's module imports them), so each step/<name> checks its own config in its
    # container before it starts work (`finetune check` checks them all where every extra is installed).
    if dispatch == "in-process":
        profiles.validate(profile)
        check_environment(profile)
        if num_train_nodes > 1:
            raise ValueError(f"train.nodes={num_train_nodes}: a multi-node train step runs as a Kubeflow TrainJob, "
                             "which the prod flow creates (dispatch=deployments or kubernetes, with a Kubernetes API); set "
                             "train.nodes=1 to train here")
    tracking_cfg = profiles.tracking_config(profile)
    orchestration = profiles.orchestration_config(profile)
    tracking = {}
    if tracking_cfg.enabled:
        from flows.tracking import flatten, start_parent_run

        out_dir.mkdir(parents=True, exist_ok=True)
        uri = tracking_cfg.uri or f"sqlite:///{out_dir / 'mlflow.db'}"
        server, tracking = start_parent_run(uri, tracking_cfg.experiment, out_dir=out_dir,
                                            run_name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}", tags={"profile": str(config)},
                                            # Under dispatch=deployments no image holds every step's module: the
                                            # profile as given; in-process every key resolved, defaults filled in.
                                            params=flatten(profiles.resolved(profile) if dispatch == "in-process" else profile))
        server.call("log_text", run_id=tracking["parent_run_id"], text=json.dumps(profile, indent=2, default=str),
                    artifact_file="profile.json")
        logger.info("MLflow run %s at %s", tracking["parent_run_id"], uri)
    results, status, decision, smoke_failure = [], "FAILED", None, None
    try:
        for name in contract.STEPS:
            timeout_s = orchestration.timeout_s.get(name)
            try:
                if dispatch == "in-process":
                    # No timeout here: Prefect's in-process one is a SIGALRM whose exception Python drops when it lands
                    # in a finalizer (seen: train ran on for 9 minutes past a 5 s limit). A deployment's is enforced.
                    results.append(run_step.with_options(name=name)(name, profile, out_dir, tracking))
                elif name == "train" and num_train_nodes > 1:
                    dispatched = run_train_job.with_options(
                        name="trainjob/train", retries=orchestration.retries,
                        retry_delay_seconds=exponential_backoff(backoff_factor=orchestration.retry_delay_s))
                    results.append(dispatched(config, out_dir, overrides, tracking, timeout_s))
                else:
                    deployment = f"step/{name}" + ("-k8s" if dispatch == "kubernetes" else "")
                    dispatched = run_step_deployment.with_options(
                        name=deployment, retries=orchestration.retries,
                        retry_delay_seconds=exponential_backoff(backoff_factor=orchestration.retry_delay_s))
                    results.append(dispatched(name, config, out_dir, overrides, tracking, timeout_s, deployment))
            except ValueError as err:
                if name != "smoke":
                    raise
                smoke_failure = err  # the model was pushed: it is registered and the gate records why it stays out
        if tracking and profiles.promote_config(profile).enabled:
            from flows.registry import decision_markdown, register_and_gate

            server.flush()  # the gate reads this run's metrics back from the server
            decision = register_and_gate(server, tracking, profile, out_dir)
            create_markdown_artifact(key="promotion", markdown=decision_markdown(decision), description=decision["summary"])
        if smoke_failure is not None:
            raise smoke_failure
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracking:
            server.call("set_terminated", run_id=tracking["parent_run_id"], status=status, end_time=int(time.time() * 1000))
            server.flush()
        CLEANED_UP.set()
        if status != "KILLED":  # Ctrl-C also stops the CLI's temporary server: nothing to write the artifacts to
            _artifacts(results, out_dir, tracking)
    if decision is None:
        return results
    results.append({"step": "promote", "status": decision["decision"], "summary": decision["summary"],
                    "out_dir": "", "duration_s": 0.0})
    if decision["decision"] == "promoted":
        return results
    # Not a failure of the pipeline, and not a success to ship: a state of its own in the Prefect UI.
    return Completed(name="NotPromoted", message=decision["summary"], data=results)


if __name__ == "__main__":
    finetune(overrides=os.environ.get("FINETUNE_OVERRIDES", "").split())

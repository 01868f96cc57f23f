"""The parent flow: fetch → harmony → train → merge → push → smoke, each step in-process behind the step contract.

    finetune run [--config configs/tiny-cpu.yaml] [--out runs/latest] [section.key=value …]
"""
import json
import os
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.preflight import check_environment
from steps import contract, profile as profiles
from steps.tracking import NullTracker


@task(cache_policy=NO_CACHE)
def run_step(name: str, profile: dict, out: Path, tracking: dict) -> dict:
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


# Set once the flow body has closed what it opened (tracking runs), however it ended: on Ctrl-C the CLI waits for this,
# then exits without Prefect's crash reporting to a temporary server that the same Ctrl-C has stopped.
CLEANED_UP = threading.Event()


# No log_prints: Prefect's print-to-log patch also catches prints that a library redirects to a buffer: dill finds a
# function's globals by capturing dis.dis() output, which instead went to the console as ~190 lines of bytecode.
@flow(name="finetune")
def finetune(config: str = str(profiles.DEFAULT_PROFILE), out: str = "runs/latest", overrides: list[str] = ()) -> list[dict]:
    logger = get_run_logger()
    out_dir = Path(out).resolve()
    profile = profiles.load_profile(config, list(overrides))
    profiles.validate(profile)  # every step's config is checked before the first step starts
    check_environment(profile)
    tracking_cfg = profiles.tracking_config(profile)
    tracking = {}
    if tracking_cfg.enabled:
        from flows.tracking import flatten, start_parent_run

        out_dir.mkdir(parents=True, exist_ok=True)
        uri = tracking_cfg.uri or f"sqlite:///{out_dir / 'mlflow.db'}"
        server, tracking = start_parent_run(uri, tracking_cfg.experiment, out_dir=out_dir,
                                            run_name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}",
                                            tags={"profile": str(config)}, params=flatten(profiles.resolved(profile)))
        server.call("log_text", run_id=tracking["parent_run_id"], text=json.dumps(profile, indent=2, default=str),
                    artifact_file="profile.json")
        logger.info("MLflow run %s at %s", tracking["parent_run_id"], uri)
    results, status, decision, smoke_failure = [], "FAILED", None, None
    try:
        for name in contract.STEPS:
            try:
                results.append(run_step.with_options(name=name)(name, profile, out_dir, tracking))
            except ValueError as err:
                if name != "smoke":
                    raise
                smoke_failure = err  # the model was pushed: it is registered and the gate records why it stays out
        if tracking and profiles.promote_config(profile).enabled:
            from flows.registry import _markdown, register_and_gate

            server.flush()  # the gate reads this run's metrics back from the server
            decision = register_and_gate(server, tracking, profile, out_dir)
            create_markdown_artifact(key="promotion", markdown=_markdown(decision), description=decision["summary"])
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
    rows = "\n".join(f"| {r['step']} | {r['status']} | {r['duration_s']} | `{r['out_dir']}` |" for r in results)
    create_markdown_artifact(key="finetune-summary",
                             markdown=f"# finetune\n\n| step | status | seconds | output |\n|---|---|---|---|\n{rows}\n")
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

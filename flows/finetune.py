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

        with step_run(tracking["uri"], tracking["parent_run_id"], name) as tracker:
            manifest, skipped = contract.execute(name, cfg, out_dir=out / name, inputs=inputs, tracker=tracker)
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
        from flows.tracking import start_parent_run

        out_dir.mkdir(parents=True, exist_ok=True)
        uri = tracking_cfg.uri or f"sqlite:///{out_dir / 'mlflow.db'}"
        client, parent_run_id = start_parent_run(uri, tracking_cfg.experiment, run_name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}",
                                                 tags={"profile": str(config), "out_dir": str(out_dir)})
        client.log_text(parent_run_id, json.dumps(profile, indent=2, default=str), "profile.json")
        tracking = {"parent_run_id": parent_run_id, "uri": uri}
        logger.info("MLflow run %s at %s", parent_run_id, uri)
    results, status = [], "FAILED"
    try:
        for name in contract.STEPS:
            results.append(run_step.with_options(name=name)(name, profile, out_dir, tracking))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracking:
            client.set_terminated(tracking["parent_run_id"], status)
        CLEANED_UP.set()
    rows = "\n".join(f"| {r['step']} | {r['status']} | {r['duration_s']} | `{r['out_dir']}` |" for r in results)
    create_markdown_artifact(key="finetune-summary",
                             markdown=f"# finetune\n\n| step | status | seconds | output |\n|---|---|---|---|\n{rows}\n")
    return results


if __name__ == "__main__":
    finetune(overrides=os.environ.get("FINETUNE_OVERRIDES", "").split())

"""The Model Registry and the promotion gate: every pipeline run that pushed registers a version (by reference: the Hub
repo + commit, else the merged folder logged into the run's artifacts) with alias `candidate`; `champion` moves to it
only when smoke passed and every `promote.metrics` entry is no worse than the champion's."""
import json
import logging
import os
from pathlib import Path

from mlflow.exceptions import MlflowException

from flows.tracking import Server
from steps import contract, profile as profiles

log = logging.getLogger("finetune")


def _check(metric: dict, candidate: float | None, champion: float | None) -> dict:
    name, direction, tolerance = metric["name"], metric.get("direction", "lower"), float(metric.get("tolerance", 0.0))
    row = {"metric": name, "direction": direction, "tolerance": tolerance, "candidate": candidate, "champion": champion}
    if candidate is None:
        return {**row, "passed": False, "reason": f"{name} was not logged by this run"}
    if champion is None:
        return {**row, "passed": True, "reason": f"{name} {candidate:.4f} (the champion has no {name})"}
    if direction == "lower":
        passed = candidate <= champion + tolerance
        sign, bound = ("<=" if passed else ">"), f"champion's {champion:.4f} + {tolerance:g}"
    else:
        passed = candidate >= champion - tolerance
        sign, bound = (">=" if passed else "<"), f"champion's {champion:.4f} - {tolerance:g}"
    return {**row, "passed": passed, "reason": f"{name} {candidate:.4f} {sign} {bound}"}


def decision_markdown(d: dict) -> str:
    rows = "\n".join(f"| `{c['metric']}` | {c['direction']} | {c['candidate']} | {c['champion']} | {c['tolerance']:g} | "
                     f"{'pass' if c['passed'] else '**fail**'} |" for c in d["checks"])
    return (f"# Promotion: {d['decision']}\n\n{d['summary']}\n\n"
            f"Registered model `{d['registered_model']}` version {d['version']} (source `{d['source']}`); champion "
            f"before: {d['champion_before'] or 'none'}, after: {d['champion_after'] or 'none'}.\n\n"
            "| metric | better | this run | champion | tolerance | |\n|---|---|---|---|---|---|\n" + rows + "\n")


def register_and_gate(server: Server, tracking: dict, profile: dict, out_dir: Path) -> dict:
    """Register this run's model, set `candidate`, decide on `champion`; returns the decision (also logged on the
    parent run as promotion.json / promotion.md and as tags)."""
    client, parent = server.client, tracking["parent_run_id"]
    promote = profiles.promote_config(profile)
    push = contract.read_output(out_dir / "push")
    name = promote.registered_model or push["repo_id"].split("/")[1]
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"gpt-oss fine-tunes pushed to {push['repo_id']}")
    if push["commit"]:
        source = f"hf://{push['repo_id']}@{push['commit']}"  # the Hub holds the weights: nothing is copied
    elif tracking["uri"].startswith(("http://", "https://")):
        # No Hub copy (dry run), and a server accepts only sources inside the run's artifacts: the merged folder goes
        # there once and is registered from there.
        client.log_artifacts(parent, contract.read_output(out_dir / "merge")["model_dir"], "model")
        source = f"runs:/{parent}/model"
    else:  # a local store (finetune run's default): the merged folder itself
        source = Path(contract.read_output(out_dir / "merge")["model_dir"]).as_uri()
    metrics = client.get_run(parent).data.metrics
    fetch = contract.read_output(out_dir / "fetch")
    tags = {"pipeline_run_id": parent, "profile": client.get_run(parent).data.tags.get("profile", ""),
            "dataset": fetch["dataset"], "dataset_revision": fetch["revision"], "hub_repo": push["repo_id"],
            "hub_commit": push["commit"], **{m["name"]: str(metrics.get(m["name"], "")) for m in promote.metrics}}
    version = client.create_model_version(name, source, run_id=parent, tags=tags).version
    client.set_registered_model_alias(name, "candidate", version)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    champion_metrics = client.get_run(champion.run_id).data.metrics if champion else {}
    smoke_failed = metrics.get("smoke/num_failed")
    checks = [{"metric": "smoke/num_failed", "direction": "lower", "tolerance": 0.0, "candidate": smoke_failed,
               "champion": None, "passed": smoke_failed == 0,
               "reason": f"smoke test {'passed' if smoke_failed == 0 else 'did not pass'} ({smoke_failed:g} checks failed)"
               if smoke_failed is not None else "smoke test did not run"}]
    if champion:
        checks += [_check(m, metrics.get(m["name"]), champion_metrics.get(m["name"])) for m in promote.metrics]
    promoted = all(c["passed"] for c in checks)
    failed = [c["reason"] for c in checks if not c["passed"]]
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
        summary = (f"version {version} is the new champion" + (f" (was version {champion.version}): "
                   + "; ".join(c["reason"] for c in checks[1:]) if champion else ": the first version, smoke passed"))
    else:
        summary = (f"version {version} not promoted, champion stays version {champion.version if champion else 'none'}: "
                   + "; ".join(failed))
    decision = {"decision": "promoted" if promoted else "refused", "summary": summary, "registered_model": name,
                "version": version, "source": source, "champion_before": champion.version if champion else None,
                "champion_after": version if promoted else (champion.version if champion else None),
                "pipeline_run_id": parent, "checks": checks}
    client.log_text(parent, json.dumps(decision, indent=2), "promotion.json")
    client.log_text(parent, decision_markdown(decision), "promotion.md")
    client.set_tag(parent, "finetune.promotion", decision["decision"])
    client.set_tag(parent, "mlflow.note.content", f"Promotion {decision['decision']}: {summary}")
    client.set_model_version_tag(name, version, "promotion", decision["decision"])
    if push["commit"]:
        decision["hub_tag"] = _tag_hub_commit(profile, push, decision)
    log.info("promotion: %s", summary)
    return decision


def _tag_hub_commit(profile: dict, push: dict, decision: dict) -> str:
    """The pushed commit carries the same decision, as a Hub tag (mlflow-promoted-v3 / mlflow-refused-v4)."""
    from huggingface_hub import HfApi

    cfg = profiles.step_config(profile, "push")
    tag = f"mlflow-{decision['decision']}-v{decision['version']}"
    api = HfApi(endpoint=cfg.endpoint or None, token=os.environ.get(cfg.token_env))
    api.create_tag(push["repo_id"], tag=tag, revision=push["commit"], tag_message=decision["summary"], exist_ok=True)
    return tag

"""The train step across several nodes (train.nodes > 1): a Kubeflow Trainer TrainJob rendered from
infra/k8s/trainjob.yaml, created through the Kubernetes API and waited for; when it fails, its pods say why.

Kubeflow Trainer schedules the pods and its torch plugin gives each one PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads: every pod runs the same `finetune step train` under torchrun.
"""
import copy
import hashlib
import logging
import time
from collections import Counter
from pathlib import Path

import yaml

from steps import profile as profiles

log = logging.getLogger("finetune")

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "k8s" / "trainjob.yaml"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
# The label JobSet puts on every pod of the TrainJob's JobSet, which has the TrainJob's name.
POD_SELECTOR = "jobset.sigs.k8s.io/jobset-name={name}"
# Container states that never resolve by waiting: the TrainJob would hold its nodes until the timeout.
STUCK_REASONS = ("ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError")
USER_ERROR_EXIT_CODE = 2  # `finetune` exits 2 on bad input (flows/cli.py): the same input fails again
# Which out dir a TrainJob trains into (a hash: label values are short): at most one TrainJob may write there.
OUT_DIR_LABEL = "gpt-oss-finetune/out-dir"


def load_template(path: Path = TEMPLATE) -> dict:
    return yaml.safe_load(path.read_text())


def train_command(*, config: str, out_dir: Path, overrides: list[str], tracking: dict) -> list[str]:
    """What every node runs: the train step's own CLI under torchrun (its node count, rank and master from PET_*)."""
    command = ["torchrun", "-m", "flows.cli", "step", "train", "--config", str(config),
               "--input", f"harmony={out_dir / 'harmony'}", "--out", str(out_dir / "train")]
    if tracking:
        command += ["--tracking-uri", tracking["uri"], "--parent-run-id", tracking["parent_run_id"]]
    return command + list(overrides)


def render(template: dict, profile: dict, *, name: str, image_tag: str, config: str, out_dir: Path,
           overrides: list[str], tracking: dict) -> dict:
    """The TrainJob for the profile's train section: the template with this run's name, image tag, command, node
    count and processes (GPUs) per node. Pure: no cluster needed."""
    cfg = profiles.step_config(profile, "train")
    if cfg.nodes < 2:
        raise ValueError(f"train.nodes={cfg.nodes}: a TrainJob is for train.nodes >= 2; one node runs as the "
                         "step/train deployment")
    job = copy.deepcopy(template)
    job["metadata"]["name"] = name
    job["metadata"]["labels"][OUT_DIR_LABEL] = hashlib.sha256(str(out_dir / "train").encode()).hexdigest()[:16]
    trainer = job["spec"]["trainer"]
    repository = trainer["image"].rpartition(":")[0]
    trainer.update(image=f"{repository}:{image_tag}", numNodes=cfg.nodes, numProcPerNode=cfg.gpus_per_node,
                   command=train_command(config=config, out_dir=out_dir, overrides=overrides, tracking=tracking))
    limits = trainer["resourcesPerNode"]["limits"]
    if cfg.device == "cuda":
        limits["nvidia.com/gpu"] = str(cfg.gpus_per_node)
    else:
        limits.pop("nvidia.com/gpu", None)
    return job


def condition(trainjob: dict) -> tuple[str, str] | None:
    """("Complete" | "Failed", "reason: message") once the TrainJob has finished, else None."""
    for c in trainjob.get("status", {}).get("conditions", []):
        if c["type"] in ("Complete", "Failed") and c["status"] == "True":
            return c["type"], f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    return None


def _container_states(pod) -> list[tuple[str, object]]:
    status = pod.status
    return [(s.name, s.state) for s in (status.init_container_statuses or []) + (status.container_statuses or [])
            if s.state is not None]


def stuck_reason(pods: list) -> str | None:
    """A container waiting on something that waiting will not fix (an image that cannot be pulled, a missing Secret)."""
    for pod in pods:
        for container, state in _container_states(pod):
            if state.waiting is not None and state.waiting.reason in STUCK_REASONS:
                return (f"pod {pod.metadata.name} container {container}: {state.waiting.reason}: "
                        f"{state.waiting.message or ''}".rstrip(": "))
    return None


def failure_reason(trainjob: dict, pods: list, events: list, logs: dict[str, str]) -> str:
    """Why a TrainJob failed, from its condition, its pods' container states and reasons (OOMKilled, Evicted, exit
    codes), the Warning events on them (FailedScheduling, FailedMount, ...) and the last log lines of each failed
    container. `pods` and `events` are the Kubernetes client's V1Pod and CoreV1Event; `logs` maps pod name to log text."""
    finished = condition(trainjob)
    lines = [f"TrainJob {trainjob['metadata']['name']} {finished[0] if finished else 'not finished'}"
             + (f" ({finished[1]})" if finished and finished[1] else "")]
    names = {pod.metadata.name for pod in pods}
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        if pod.status.reason:
            lines.append(f"pod {pod.metadata.name}: {pod.status.reason}: {pod.status.message or ''}".rstrip(": "))
        for container, state in _container_states(pod):
            if state.terminated is not None and state.terminated.exit_code != 0:
                t = state.terminated
                lines.append(f"pod {pod.metadata.name} container {container}: {t.reason or 'terminated'} "
                             f"(exit code {t.exit_code})" + (f": {t.message.strip()}" if t.message else ""))
            elif state.waiting is not None and state.waiting.reason not in (None, "ContainerCreating", "PodInitializing"):
                lines.append(f"pod {pod.metadata.name} container {container}: {state.waiting.reason}"
                             + (f": {state.waiting.message}" if state.waiting.message else ""))
    seen = set()
    for event in events:
        if event.type == "Warning" and event.involved_object.name in names:
            key = (event.involved_object.name, event.reason, event.message)
            if key not in seen:
                seen.add(key)
                lines.append(f"event on pod {event.involved_object.name}: {event.reason}: {event.message}")
    for pod_name, text in sorted(logs.items()):
        tail = [line for line in text.splitlines() if line.strip()][-5:]
        if tail:
            lines.append(f"last log lines of pod {pod_name}:\n    " + "\n    ".join(tail))
    return "\n".join(lines)


def is_user_error(pods: list) -> bool:
    """A container that exited with `finetune`'s bad-input code: a retry would fail the same way."""
    return any(state.terminated is not None and state.terminated.exit_code == USER_ERROR_EXIT_CODE
               for pod in pods for _, state in _container_states(pod))


def _failed_pods(pods: list) -> list:
    return [pod for pod in pods if any(state.terminated is not None and state.terminated.exit_code != 0
                                       for _, state in _container_states(pod))]


def run(trainjob: dict, *, namespace: str, timeout_s: int | None, poll_s: float = 10.0,
        custom_api=None, core_api=None) -> dict:
    """Create the TrainJob and wait until it completes; raise with the pods' failure reason when it fails (ValueError
    for bad input, RuntimeError otherwise), TimeoutError (after deleting it) past timeout_s or when a pod is stuck.
    The APIs default to the official client's, configured from the pod's service account or ~/.kube/config."""
    if custom_api is None or core_api is None:
        from kubernetes import client, config

        config.load_config()
        custom_api, core_api = client.CustomObjectsApi(), client.CoreV1Api()
    name = trainjob["metadata"]["name"]
    # An earlier attempt at the same out dir (failed, or left running by a parent flow that died) goes first: two
    # TrainJobs must never write one step folder. The new one resumes from whatever checkpoint the old one left.
    same_out_dir = f"{OUT_DIR_LABEL}={trainjob['metadata']['labels'][OUT_DIR_LABEL]}"
    for old in custom_api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                        label_selector=same_out_dir)["items"]:
        log.info("train: deleting TrainJob %s, an earlier attempt into the same out dir", old["metadata"]["name"])
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, old["metadata"]["name"],
                                                   propagation_policy="Foreground")
    custom_api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, trainjob)
    log.info("train: TrainJob %s/%s created (%d nodes x %d processes)", namespace, name,
             trainjob["spec"]["trainer"]["numNodes"], trainjob["spec"]["trainer"]["numProcPerNode"])
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    selector = POD_SELECTOR.format(name=name)

    def delete():
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   propagation_policy="Foreground")

    seen_phases = None
    while True:
        current = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        finished = condition(current)
        if finished and finished[0] == "Complete":
            log.info("train: TrainJob %s complete", name)
            return current
        pods = core_api.list_namespaced_pod(namespace, label_selector=selector).items
        phases = ", ".join(f"{n} {phase}" for phase, n in sorted(Counter(p.status.phase for p in pods).items()))
        if phases != seen_phases:  # the flow run's log shows scheduling and start-up, not one line per poll
            log.info("train: TrainJob %s pods: %s", name, phases or "none yet")
            seen_phases = phases
        if finished:
            events = core_api.list_namespaced_event(namespace).items
            logs = {pod.metadata.name: core_api.read_namespaced_pod_log(pod.metadata.name, namespace, container="node",
                                                                        tail_lines=20)
                    for pod in _failed_pods(pods)}
            error = ValueError if is_user_error(pods) else RuntimeError
            raise error(failure_reason(current, pods, events, logs))
        stuck = stuck_reason(pods)
        if stuck:
            delete()
            raise ValueError(f"TrainJob {name} deleted, a pod cannot start: {stuck}; fix the image (trainer.image in "
                             "infra/k8s/trainjob.yaml, the Prefect variable finetune_image_tag) or the Secret it names")
        if deadline is not None and time.monotonic() > deadline:
            delete()
            why = failure_reason(current, pods, core_api.list_namespaced_event(namespace).items, {})
            raise TimeoutError(f"TrainJob {name} deleted, not finished after {timeout_s} s:\n{why}")
        time.sleep(poll_s)

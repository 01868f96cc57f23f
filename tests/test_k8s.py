"""infra/k8s and the multi-node train step's TrainJob, offline: every manifest against the Kubernetes JSON schemas that
kubernetes-validate bundles, the TrainJob (template and the one rendered for train.nodes=2) against Kubeflow Trainer's
API models (kubeflow-trainer-api), and the wait / failure-reason logic on the Kubernetes client's own model objects.
No Kubernetes API server runs here: flows.trainjob.run is exercised against a test double of the two APIs it calls."""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from kubernetes import client

from flows import trainjob
from steps import profile as profiles

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
KUBERNETES_VERSION = "1.34.0"  # the schemas validated against (strict: unknown fields are errors)
NOT_APPLIED = {"kustomization.yaml", "trainjob.yaml"}  # the kustomization itself; the TrainJob is the flow's template


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _validate(doc: dict, where: str) -> str:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    line = f"{where}: {doc['kind']}/{doc['metadata']['name']} valid (Kubernetes {KUBERNETES_VERSION} schema, strict)"
    print(line)
    return line


def _lost_keys(given, model_dict, path="") -> list[str]:
    """Keys of `given` that the Trainer API models dropped (their from_dict ignores unknown fields silently)."""
    if isinstance(given, dict):
        return [p for key, value in given.items()
                for p in ([f"{path}.{key}"] if key not in model_dict else _lost_keys(value, model_dict[key], f"{path}.{key}"))]
    if isinstance(given, list):
        return [p for i, (a, b) in enumerate(zip(given, model_dict)) for p in _lost_keys(a, b, f"{path}[{i}]")]
    return [] if given == model_dict else [f"{path}: {given!r} became {model_dict!r}"]


def assert_valid_trainjob(job: dict, where: str) -> None:
    model = TrainerV1alpha1TrainJob.from_dict(job)  # pydantic: wrong types and missing required fields raise
    lost = _lost_keys(job, model.to_dict())
    assert not lost, f"{where}: not fields of trainer.kubeflow.org/v1alpha1 TrainJob: {lost}"
    print(f"{where}: TrainJob/{job['metadata']['name']} valid (kubeflow-trainer-api TrainerV1alpha1TrainJob, "
          "every field kept)")


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    files = sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_APPLIED)
    kinds = [doc["kind"] for path in files for doc in _documents(path)
             if _validate(doc, f"infra/k8s/{path.name}")]
    assert sorted(kinds) == sorted(["Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
                                    "PersistentVolumeClaim", "ConfigMap", "Deployment"]), kinds


def test_a_misspelt_field_fails_the_schema_check():
    bad = _documents(K8S / "storage.yaml")[0]
    bad["spec"]["accesModes"] = bad["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError, match="accesModes"):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_and_one_base_job_template():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name not in NOT_APPLIED)
    # The worker's base job template is the file the k8s pool is created with (infra/prefect/pools.yaml): one file.
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    pools = yaml.safe_load((REPO / "infra" / "prefect" / "pools.yaml").read_text())
    pool_template = (REPO / "infra" / "prefect" / pools["k8s"]["base_job_template"]).resolve()
    assert [(K8S / f).resolve() for f in generated["prefect-base-job-template"]] == [pool_template]
    worker = _documents(K8S / "worker.yaml")[0]["spec"]["template"]["spec"]
    args = worker["containers"][0]["args"]
    assert args[args.index("--pool") + 1] == "k8s"
    assert args[args.index("--base-job-template") + 1] == f"/etc/prefect/{pool_template.name}"
    assert worker["serviceAccountName"] == "finetune"
    # The flow-run pods run as the same account (it may create TrainJobs) and mount the claims storage.yaml declares.
    variables = json.loads(pool_template.read_text())["variables"]["properties"]
    claims = {doc["metadata"]["name"] for doc in _documents(K8S / "storage.yaml")}
    assert variables["service_account_name"]["default"] == "finetune"
    assert {variables["runs_claim"]["default"], variables["hf_cache_claim"]["default"]} == claims


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its kustomize) is not installed")
def test_kustomize_builds_what_kubectl_apply_k_would_apply():
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    for doc in docs:
        _validate(doc, "kubectl kustomize infra/k8s")
    assert all(doc["metadata"].get("namespace") == "finetune" for doc in docs if doc["kind"] != "Namespace")
    template_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("prefect-base"))
    assert json.loads(template_map["data"]["prefect-base-job-template.json"])["job_configuration"]["job_manifest"]
    worker = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in worker["volumes"]}["base-job-template"]["configMap"]["name"] == \
        template_map["metadata"]["name"]  # the generated name, hash suffix included


def test_the_trainjob_template_is_a_trainjob_of_the_trainer_api():
    template = trainjob.load_template()
    assert_valid_trainjob(template, "infra/k8s/trainjob.yaml")
    assert template["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                              "name": "torch-distributed"}
    # The nodes mount the claims storage.yaml declares, where the flow-run pods mount them.
    pod = template["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {doc["metadata"]["name"] for doc in _documents(K8S / "storage.yaml")}
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/runs", "/cache/huggingface"}


def test_the_trainjob_rendered_for_two_nodes(capsys):
    config, out = "configs/8xh100-fsdp2.yaml", Path("/runs/prod")
    overrides = ["train.nodes=2", "data.revision=main"]
    profile = profiles.load_profile(REPO / config, overrides)
    job = trainjob.render(trainjob.load_template(), profile, name="finetune-train-3f9a1c2e", image_tag="0.1.0",
                          config=config, out_dir=out, overrides=overrides,
                          tracking={"uri": "http://mlflow.finetune:5000", "parent_run_id": "6f1c0d2e9ab34"})
    with capsys.disabled():
        print("\nThe TrainJob the prod flow creates for configs/8xh100-fsdp2.yaml with train.nodes=2:\n"
              + yaml.safe_dump(job, sort_keys=False, width=120))
        assert_valid_trainjob(job, "rendered for train.nodes=2")
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8  # world size 16 = nodes x gpus_per_node
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    assert trainer["image"] == "finetune-train:0.1.0"
    assert trainer["command"] == [
        "torchrun", "-m", "flows.cli", "step", "train", "--config", config, "--input", "harmony=/runs/prod/harmony",
        "--out", "/runs/prod/train", "--tracking-uri", "http://mlflow.finetune:5000", "--parent-run-id",
        "6f1c0d2e9ab34", "train.nodes=2", "data.revision=main"]
    # torchrun takes nothing from the command line that would shadow the PET_* variables the torch plugin sets.
    assert not any(arg.startswith(("--nnodes", "--nproc", "--node-rank", "--master", "--rdzv", "--standalone"))
                   for arg in trainer["command"])
    assert job["metadata"]["name"] == "finetune-train-3f9a1c2e" and job["metadata"]["namespace"] == "finetune"
    assert job["metadata"]["labels"][trainjob.OUT_DIR_LABEL] == hashlib.sha256(b"/runs/prod/train").hexdigest()[:16]
    assert trainjob.load_template()["metadata"]["name"] == "finetune-train"  # the template itself is left as it was


def test_a_cpu_trainjob_asks_for_no_gpus_and_one_node_for_none():
    tiny = profiles.load_profile(REPO / "configs" / "8xh100-fsdp2-tiny.yaml", ["train.nodes=2", "train.gpus_per_node=2"])
    job = trainjob.render(trainjob.load_template(), tiny, name="finetune-train-0", image_tag="t",
                          config="configs/8xh100-fsdp2-tiny.yaml", out_dir=Path("/runs/x"), overrides=[], tracking={})
    assert job["spec"]["trainer"]["resourcesPerNode"] == {"limits": {}} and job["spec"]["trainer"]["numProcPerNode"] == 2
    assert_valid_trainjob(job, "rendered for the tiny CPU profile")
    one = profiles.load_profile(REPO / "configs" / "8xh100-fsdp2.yaml")
    with pytest.raises(ValueError, match="train.nodes=1: a TrainJob is for train.nodes >= 2"):
        trainjob.render(trainjob.load_template(), one, name="x", image_tag="t", config="c", out_dir=Path("/runs/x"),
                        overrides=[], tracking={})


def test_train_nodes_is_a_checked_profile_key():
    with pytest.raises(ValueError, match="unknown key train.node; did you mean 'nodes'"):
        profiles.step_config(profiles.load_profile(REPO / "configs" / "tiny-cpu.yaml", ["train.node=2"]), "train")
    with pytest.raises(ValueError, match="train.nodes=0 and train.gpus_per_node=8 must be at least 1"):
        profiles.step_config(profiles.load_profile(REPO / "configs" / "tiny-cpu.yaml", ["train.nodes=0"]), "train")
    assert profiles.step_config(profiles.load_profile(REPO / "configs" / "tiny-cpu.yaml"), "train").nodes == 1


def test_the_train_step_refuses_a_launch_of_another_world_size(tmp_path, monkeypatch):
    from steps import train
    from steps.tracking import NullTracker

    cfg = profiles.step_config(profiles.load_profile(REPO / "configs" / "tiny-cpu.yaml",
                                                     ["train.nodes=2", "train.gpus_per_node=2"]), "train")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"train.nodes=2 x train.gpus_per_node=2 = 4 processes, but this launch has "
                                         r"WORLD_SIZE=2"):
        train.run(cfg, out_dir=tmp_path, inputs={}, tracker=NullTracker())


# --- Waiting and failure reasons, on the Kubernetes client's model objects (V1Pod, CoreV1Event) ---

def _pod(name: str, *, phase="Running", reason=None, message=None, terminated=None, waiting=None) -> client.V1Pod:
    state = client.V1ContainerState(
        terminated=client.V1ContainerStateTerminated(**terminated) if terminated else None,
        waiting=client.V1ContainerStateWaiting(**waiting) if waiting else None,
        running=None if terminated or waiting else client.V1ContainerStateRunning())
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"jobset.sigs.k8s.io/jobset-name": "finetune-train-1"}),
        status=client.V1PodStatus(phase=phase, reason=reason, message=message, container_statuses=[
            client.V1ContainerStatus(name="node", image="finetune-train:0.1.0", image_id="", ready=False,
                                     restart_count=0, state=state)]))


def _event(pod: str, reason: str, message: str, kind="Warning") -> client.CoreV1Event:
    return client.CoreV1Event(metadata=client.V1ObjectMeta(name=f"{pod}.{reason}"), type=kind, reason=reason,
                              message=message, involved_object=client.V1ObjectReference(kind="Pod", name=pod))


def _trainjob(status: str | None, reason="", message="") -> dict:
    conditions = [] if status is None else [{"type": status, "status": "True", "reason": reason, "message": message}]
    return {"metadata": {"name": "finetune-train-1"}, "status": {"conditions": conditions}}


FAILED = _trainjob("Failed", "JobsFailed", "trainjob failed: jobset finetune-train-1 failed")
OOM_PODS = [_pod("finetune-train-1-node-0-0-abcde", phase="Failed", terminated={"exit_code": 1, "reason": "Error"}),
            _pod("finetune-train-1-node-0-1-fghij", phase="Failed",
                 terminated={"exit_code": 137, "reason": "OOMKilled"})]
OOM_EVENTS = [_event("finetune-train-1-node-0-1-fghij", "BackOff", "Back-off restarting failed container"),
              _event("finetune-train-1-node-0-1-fghij", "BackOff", "Back-off restarting failed container"),
              _event("finetune-train-1-node-0-1-fghij", "Pulled", "Container image already present", kind="Normal"),
              _event("some-other-pod", "FailedMount", "not ours")]


def test_the_failure_reason_names_the_pods_states_events_and_last_log_lines():
    reason = trainjob.failure_reason(FAILED, OOM_PODS, OOM_EVENTS,
                                     {"finetune-train-1-node-0-0-abcde": "step 3/8\n\nRuntimeError: Connection closed by peer\n"})
    print(reason)
    assert reason.splitlines() == [
        "TrainJob finetune-train-1 Failed (JobsFailed: trainjob failed: jobset finetune-train-1 failed)",
        "pod finetune-train-1-node-0-0-abcde container node: Error (exit code 1)",
        "pod finetune-train-1-node-0-1-fghij container node: OOMKilled (exit code 137)",
        "event on pod finetune-train-1-node-0-1-fghij: BackOff: Back-off restarting failed container",
        "last log lines of pod finetune-train-1-node-0-0-abcde:",
        "    step 3/8",
        "    RuntimeError: Connection closed by peer"]
    assert not trainjob.is_user_error(OOM_PODS)


def test_an_evicted_node_and_a_bad_input_exit_are_told_apart():
    evicted = _pod("finetune-train-1-node-0-1-x", phase="Failed", reason="Evicted",
                   message="The node was low on resource: ephemeral-storage.")
    assert "pod finetune-train-1-node-0-1-x: Evicted: The node was low on resource: ephemeral-storage." in \
        trainjob.failure_reason(FAILED, [evicted], [], {})
    bad_input = _pod("finetune-train-1-node-0-0-y", phase="Failed", terminated={"exit_code": 2, "reason": "Error"})
    assert trainjob.is_user_error([bad_input, evicted])


def test_a_pending_node_and_a_stuck_image_are_reported():
    pending = client.V1Pod(metadata=client.V1ObjectMeta(name="finetune-train-1-node-0-1-p"),
                           status=client.V1PodStatus(phase="Pending"))
    events = [_event("finetune-train-1-node-0-1-p", "FailedScheduling",
                     "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")]
    assert trainjob.stuck_reason([pending]) is None  # scheduling may still succeed: only the timeout ends it
    assert "event on pod finetune-train-1-node-0-1-p: FailedScheduling: 0/4 nodes are available: 4 Insufficient " \
           "nvidia.com/gpu." in trainjob.failure_reason(_trainjob(None), [pending], events, {})
    pulling = _pod("finetune-train-1-node-0-0-q", phase="Pending",
                   waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "finetune-train:0.1.0"'})
    assert trainjob.stuck_reason([pending, pulling]) == ('pod finetune-train-1-node-0-0-q container node: '
                                                         'ImagePullBackOff: Back-off pulling image "finetune-train:0.1.0"')


class TestDoubleTrainerApis:
    """A test double (no API server runs here) of the calls flows.trainjob.run makes on the official client's
    CustomObjectsApi and CoreV1Api: it records them and answers with the client's real model objects."""

    __test__ = False  # not a test class

    def __init__(self, states: list[dict], pods: list, events: list = (), logs: str = "", earlier: list[str] = ()):
        self.states, self.pods, self.events, self.logs = list(states), pods, list(events), logs
        self.earlier = list(earlier)  # TrainJobs already there with the same out-dir label
        self.calls = []

    def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector):
        self.calls.append(("list", label_selector))
        return {"items": [{"metadata": {"name": name}} for name in self.earlier]}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy):
        self.calls.append(("delete", name, propagation_policy))

    def list_namespaced_pod(self, namespace, label_selector):
        self.calls.append(("pods", label_selector))
        return client.V1PodList(items=self.pods)

    def list_namespaced_event(self, namespace):
        return client.CoreV1EventList(items=self.events)

    def read_namespaced_pod_log(self, name, namespace, container, tail_lines):
        self.calls.append(("log", name, container))
        return self.logs


def _run(apis: TestDoubleTrainerApis, timeout_s=None) -> dict:
    job = {"metadata": {"name": "finetune-train-1", "namespace": "finetune", "labels": {trainjob.OUT_DIR_LABEL: "ab12"}},
           "spec": {"trainer": {"numNodes": 2, "numProcPerNode": 8}}}
    return trainjob.run(job, namespace="finetune", timeout_s=timeout_s, poll_s=0.01, custom_api=apis, core_api=apis)


def test_run_waits_until_the_trainjob_completes(caplog):
    apis = TestDoubleTrainerApis([_trainjob(None), _trainjob(None), _trainjob("Complete", "JobsCompleted")],
                                 pods=[_pod("finetune-train-1-node-0-0-a"), _pod("finetune-train-1-node-0-1-b")])
    with caplog.at_level("INFO", logger="finetune"):
        assert trainjob.condition(_run(apis)) == ("Complete", "JobsCompleted")
    assert [r.getMessage() for r in caplog.records if "pods:" in r.getMessage()] == \
        ["train: TrainJob finetune-train-1 pods: 2 Running"]  # once, not once per poll
    assert apis.calls[:2] == [("list", f"{trainjob.OUT_DIR_LABEL}=ab12"),
                              ("create", "trainer.kubeflow.org", "v1alpha1", "finetune", "trainjobs", "finetune-train-1")]
    assert ("pods", "jobset.sigs.k8s.io/jobset-name=finetune-train-1") in apis.calls
    assert not [c for c in apis.calls if c[0] == "delete"]


def test_run_raises_the_pods_failure_reason():
    apis = TestDoubleTrainerApis([_trainjob(None), FAILED], pods=OOM_PODS, events=OOM_EVENTS, logs="Killed\n")
    with pytest.raises(RuntimeError, match=r"(?s)OOMKilled \(exit code 137\).*last log lines of pod "
                                           r"finetune-train-1-node-0-1-fghij:\n    Killed"):
        _run(apis)
    assert [c for c in apis.calls if c[0] == "log"] == [("log", p.metadata.name, "node") for p in OOM_PODS]
    bad_input = TestDoubleTrainerApis([FAILED], pods=[_pod("n-0", phase="Failed", terminated={"exit_code": 2})],
                                      logs="finetune: error: train.max_length=512 < longest harmony row 1,530 tokens")
    with pytest.raises(ValueError, match="finetune: error: train.max_length=512"):  # not retried by the flow
        _run(bad_input)


def test_run_deletes_a_stuck_or_overdue_trainjob():
    stuck = TestDoubleTrainerApis([_trainjob(None)], pods=[_pod("n-0", waiting={"reason": "InvalidImageName"})])
    with pytest.raises(ValueError, match="a pod cannot start: pod n-0 container node: InvalidImageName"):
        _run(stuck)
    assert stuck.calls[-1] == ("delete", "finetune-train-1", "Foreground")
    overdue = TestDoubleTrainerApis([_trainjob(None)], pods=[_pod("n-0", phase="Pending")],
                                    events=[_event("n-0", "FailedScheduling", "0/2 nodes are available")])
    with pytest.raises(TimeoutError, match="(?s)not finished after 0 s.*FailedScheduling: 0/2 nodes are available"):
        _run(overdue, timeout_s=0)
    assert overdue.calls[-1] == ("delete", "finetune-train-1", "Foreground")


def test_an_earlier_trainjob_into_the_same_out_dir_is_deleted_first():
    apis = TestDoubleTrainerApis([_trainjob("Complete")], pods=[], earlier=["finetune-train-0"])
    _run(apis)
    assert apis.calls[:3] == [("list", f"{trainjob.OUT_DIR_LABEL}=ab12"), ("delete", "finetune-train-0", "Foreground"),
                              ("create", "trainer.kubeflow.org", "v1alpha1", "finetune", "trainjobs", "finetune-train-1")]


def test_the_flow_task_skips_a_finished_train_and_creates_the_rendered_trainjob_otherwise(tmp_path, monkeypatch):
    """flows.finetune.run_train_job's own code (.fn: no Prefect engine), with the Prefect variable and the cluster's
    two APIs replaced by test doubles."""
    import prefect.variables
    from kubernetes import config as kube_config

    from flows import finetune
    from steps import contract

    config = str(REPO / "configs" / "8xh100-fsdp2.yaml")
    (tmp_path / "harmony").mkdir()
    (tmp_path / "harmony" / contract.MANIFEST).write_text(json.dumps({"step": "harmony", "fingerprint": "h1"}))
    (tmp_path / "train").mkdir()
    manifest = {"step": "train", "fingerprint": "an older run's", "duration_s": 12.5}
    (tmp_path / "train" / contract.MANIFEST).write_text(json.dumps(manifest))
    apis = TestDoubleTrainerApis([_trainjob("Complete")], pods=[])
    created = []
    apis.create_namespaced_custom_object = lambda group, version, namespace, plural, body: created.append(body)
    monkeypatch.setattr(prefect.variables.Variable, "get", classmethod(lambda cls, name: {"finetune_image_tag": "abc123"}[name]))
    monkeypatch.setattr(kube_config, "load_config", lambda: None)
    monkeypatch.setattr(client, "CustomObjectsApi", lambda: apis)
    monkeypatch.setattr(client, "CoreV1Api", lambda: apis)
    result = finetune.run_train_job.fn(config, tmp_path, ["train.nodes=2"], {}, None)
    assert result["status"] == "ran" and result["trainjob"] == f"finetune/{created[0]['metadata']['name']}"
    assert created[0]["spec"]["trainer"]["image"] == "finetune-train:abc123"
    assert created[0]["spec"]["trainer"]["command"][-1] == "train.nodes=2"
    # A manifest with this run's fingerprint: skipped, no TrainJob (no nodes held only to find the step done).
    cfg = profiles.step_config(profiles.load_profile(config, ["train.nodes=2"]), "train")
    fingerprint = contract.fingerprint("train", cfg, {"harmony": tmp_path / "harmony"})
    (tmp_path / "train" / contract.MANIFEST).write_text(json.dumps({**manifest, "fingerprint": fingerprint}))
    created.clear()
    assert finetune.run_train_job.fn(config, tmp_path, ["train.nodes=2"], {}, None)["status"] == "skipped (already done)"
    assert created == []

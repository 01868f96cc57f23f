"""The step contract: run a step module into an out dir, write manifest.json last, skip when the fingerprint matches."""
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from steps.tracking import NullTracker, Tracker

log = logging.getLogger("finetune")

STEPS = ("fetch", "harmony", "train", "merge", "push", "smoke")
# Which image runs each step (images/<runtime>.Dockerfile, tagged finetune-<runtime>:<version>).
RUNTIMES = {"fetch": "cpu", "harmony": "cpu", "train": "train", "merge": "train", "push": "cpu", "smoke": "serve"}
MANIFEST = "manifest.json"
ATTEMPT = ".attempt.json"  # written when a step starts: marks the folder as a step's, records what it is running
_VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "openai-harmony", "huggingface-hub")


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a plain single process): the one that records, tracks and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def step_module(name: str):
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; choose one of {', '.join(STEPS)}")
    return importlib.import_module(f"steps.{name}")


MODEL_FOLDER = "model-folder"  # the `step` of a plain Hugging Face model folder given as an input (no manifest)


def is_model_folder(path: Path) -> bool:
    """A plain Hugging Face model folder (config.json, no manifest): what smoke and push also take as --input merge=."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / MANIFEST).exists()


_model_folder_manifests: dict = {}


def model_folder_manifest(folder: Path) -> dict:
    """The manifest a plain model folder stands for: its files' sha256 as the fingerprint (so an edited or replaced
    file is seen), the folder itself as the model. Hashed once per process and folder state (gpt-oss-20b: ~13 GB)."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    state = (str(folder), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if state not in _model_folder_manifests:
        h = hashlib.sha256()
        for p in files:
            digest = hashlib.sha256()
            with p.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            h.update(f"{p.relative_to(folder).as_posix()}\0{digest.hexdigest()}\n".encode())
        _model_folder_manifests[state] = {
            "step": MODEL_FOLDER, "fingerprint": h.hexdigest(), "config": {}, "inputs": {},
            "output": {"model_dir": ".", "num_files": len(files), "num_bytes": sum(p.stat().st_size for p in files)}}
    return json.loads(json.dumps(_model_folder_manifests[state]))  # a copy: callers resolve paths in it


def read_manifest(step_dir: Path) -> dict:
    path = Path(step_dir) / MANIFEST
    if not path.is_file():
        if is_model_folder(step_dir):
            return model_folder_manifest(step_dir)
        raise ValueError(f"{step_dir} holds no {MANIFEST}: that step has not finished; run it first (finetune step ... --out {step_dir})")
    return json.loads(path.read_text())


def read_input_manifest(step: str, upstream: str, step_dir: Path) -> dict:
    """The manifest of the out dir given as `--input upstream=step_dir`, checked to be that step's (or, where the step
    takes one, a plain model folder)."""
    manifest = read_manifest(step_dir)
    if manifest.get("step") == MODEL_FOLDER:
        if upstream not in getattr(step_module(step), "MODEL_FOLDER_INPUTS", ()):
            raise ValueError(f"--input {upstream}={step_dir} is a plain model folder (config.json, no {MANIFEST}); step "
                             f"{step} needs the {upstream} step's out dir there (e.g. {Path(step_dir).parent / upstream})")
        return manifest
    if manifest.get("step") != upstream:
        raise ValueError(f"--input {upstream}={step_dir} holds the output of the {manifest.get('step')} step; step {step} "
                         f"needs the {upstream} step's out dir there (e.g. {Path(step_dir).parent / upstream})")
    return manifest


def check_out_dir(out_dir: Path) -> None:
    """--out must be a folder this process can write; it is created here when missing."""
    out_dir = Path(out_dir)
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"--out {out_dir}: {existing} is a file, not a folder; give a folder path (e.g. runs/x)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # permissions, a read-only file system, no space
        raise ValueError(f"--out {out_dir} cannot be created ({e.strerror}); give a folder you can write "
                         "(e.g. runs/x under your home)") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir} is not writable by this user; give a folder you can write "
                         "(e.g. runs/x under your home)")


def is_retry(out_dir: Path) -> bool:
    """Whether the step now running in out_dir repeats an interrupted attempt with the same fingerprint (same
    config, inputs and code): a step that keeps partial work (train's checkpoints) may then continue from it."""
    try:
        return json.loads((Path(out_dir) / ATTEMPT).read_text())["retry"]
    except FileNotFoundError:  # run outside the contract
        return False


def _start_attempt(name: str, module, out_dir: Path, fp: str) -> None:
    """Clear what earlier runs left in out_dir, so nothing in a folder without a manifest looks like a result, except
    the partial work the step resumes from (module.KEEP_ON_RESTART); then record this attempt's fingerprint."""
    attempt_path = out_dir / ATTEMPT
    try:
        previous = json.loads(attempt_path.read_text())["fingerprint"]
    except FileNotFoundError:
        previous = None
    leftovers = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if leftovers and previous is None and not (out_dir / MANIFEST).exists():
        # Not a folder this pipeline wrote (no manifest, no attempt record): clearing it could delete the user's files.
        raise ValueError(f"--out {out_dir} already holds files that no finetune step wrote ({leftovers[0].name}, ...); "
                         "give an empty or new folder")
    if previous is not None and previous != fp:
        log.info("step %s: the interrupted run in %s had other inputs (fingerprint %s, now %s); starting fresh",
                 name, out_dir, previous[:12], fp[:12])
    elif previous == fp:
        log.info("step %s: repeating the interrupted run in %s (same fingerprint %s)", name, out_dir, fp[:12])
    keep = set(getattr(module, "KEEP_ON_RESTART", ()))
    for path in leftovers:
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(attempt_path, {"fingerprint": fp, "retry": previous == fp,
                                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def read_output(step_dir: Path) -> dict:
    """The `Output` (as a dict) that an upstream step recorded in its manifest.

    Outputs record their files (fields named *_dir / *_path) relative to their own out dir, so a finished step's
    folder can move (to another machine, into a container volume); here they come back as absolute paths.
    """
    output = read_manifest(step_dir)["output"]
    for key, value in output.items():
        if key.endswith(("_dir", "_path")) and isinstance(value, str) and value:
            output[key] = str((Path(step_dir) / value).resolve())
    return output


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def fingerprint(name: str, cfg, inputs: Mapping[str, Path]) -> str:
    """Hash of what determines a step's output: its config, its inputs' fingerprints and its code."""
    module = step_module(name)
    h = hashlib.sha256()
    h.update(json.dumps(_jsonable(dataclasses.asdict(cfg)), sort_keys=True).encode())
    for key in sorted(inputs):
        h.update(f"{key}={read_manifest(inputs[key])['fingerprint']}".encode())
    h.update(Path(module.__file__).read_bytes())
    if hasattr(module, "source_revision"):  # data outside the pipeline (fetch): a moved branch or edited file re-runs
        h.update(module.source_revision(cfg).encode())
    return h.hexdigest()


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def execute(name: str, cfg, *, out_dir: Path, inputs: Mapping[str, Path] | None = None,
            tracker: Tracker | None = None) -> tuple[dict, bool]:
    """Run step `name` unless `out_dir` already holds a manifest with the same fingerprint.

    Returns the manifest and whether the step was skipped.
    """
    module = step_module(name)
    inputs = {k: Path(v) for k, v in (inputs or {}).items()}
    missing = [k for k in module.INPUTS if k not in inputs]
    if missing:
        raise ValueError(f"step {name} needs --input {missing[0]}=DIR (the out dir of the {missing[0]} step)")
    accepted = (*module.INPUTS, *getattr(module, "OPTIONAL_INPUTS", ()))
    extra = [k for k in inputs if k not in accepted]
    if extra:
        raise ValueError(f"step {name} takes no input {extra[0]!r}; it reads {', '.join(accepted) or 'no inputs'}")
    for upstream, step_dir in inputs.items():
        read_input_manifest(name, upstream, step_dir)
    if hasattr(module, "check_inputs"):  # what the upstream manifests already tell, before the out dir is touched
        module.check_inputs(cfg, inputs=inputs)
    out_dir = Path(out_dir)
    fp = fingerprint(name, cfg, inputs)
    manifest_path = out_dir / MANIFEST
    # Under torchrun every rank executes the step (training is collective) and rank 0 alone records it.
    is_main = is_main_process()
    try:
        old = json.loads(manifest_path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # never run, rank 0 just cleared it, or --out is a file
        old = None
    if old is not None and old.get("fingerprint") == fp:
        # Before the write check: a finished step is skipped where its reader may not write (another uid, read-only).
        log.info("step %s: skipped, %s already holds a finished run with the same inputs (fingerprint %s)",
                 name, out_dir, fp[:12])
        return old, True
    check_out_dir(out_dir)
    if old is not None:
        log.info("step %s: inputs changed since the last run in %s; running again", name, out_dir)
    if is_main:
        _start_attempt(name, module, out_dir, fp)
    tracker = tracker or NullTracker()
    tracker.log_params({f"{name}.{k}": v for k, v in _flatten(_jsonable(dataclasses.asdict(cfg))).items()})
    log.info("step %s: running into %s", name, out_dir)
    started = time.time()
    output = module.run(cfg, out_dir=out_dir, inputs=inputs, tracker=tracker)
    manifest = {
        "step": name,
        "fingerprint": fp,
        "config": _jsonable(dataclasses.asdict(cfg)),
        "inputs": {k: str(v) for k, v in inputs.items()},
        "output": _jsonable(dataclasses.asdict(output)),
        "versions": _versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 3),
    }
    if not is_main:
        return manifest, False
    write_json_atomic(manifest_path, manifest)
    (out_dir / ATTEMPT).unlink()
    tracker.log_artifact(manifest_path)
    log.info("step %s: done in %.1f s", name, manifest["duration_s"])
    return manifest, False


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat

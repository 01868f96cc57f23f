"""finetune step push --config configs/tiny-cpu.yaml --input merge=DIR --out DIR2

Publish the merged model on the Hugging Face Hub with a generated model card: private by default, tagged, and in
dry-run mode (the default) only the upload plan and the card are written.
"""
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from steps.contract import MODEL_FOLDER, read_manifest, read_output, write_json_atomic
from steps.tracking import Tracker

log = logging.getLogger("finetune")

INPUTS = ("merge",)
# --input merge= may also be a plain Hugging Face model folder (the original openai/gpt-oss-20b snapshot, a colleague's
# checkpoint): the contract fingerprints it by its files' sha256 (steps/contract.py: model_folder_manifest).
MODEL_FOLDER_INPUTS = ("merge",)
# --input smoke=DIR (a finished smoke step of the same model) puts its results in the model card.
OPTIONAL_INPUTS = ("smoke",)
CARD_NAME = "README.md"
# The Hub's rules: owner/name, letters, digits, "-", "_", "."; no "--" or ".."; at most 96 characters.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TAG = re.compile(r"^[\w.-]+$")


@dataclass(frozen=True, kw_only=True)
class Config:
    repo_id: str
    """Hub model repo to create or update, "owner/name"."""
    private: bool = True
    """Create the repo private (an existing repo keeps its visibility)."""
    dry_run: bool = True
    """Only write the upload plan and the model card; touch no Hub (no token needed)."""
    revision_tag: str = ""
    """Tag put on the uploaded commit (e.g. v1); empty: no tag."""
    commit_message: str = "Upload fine-tuned gpt-oss model"
    """Message of the upload commit."""
    token_env: str = "HF_TOKEN"
    """Name of the environment variable holding a Hub token with write access (the token itself never goes in a config)."""
    endpoint: str = ""
    """Hub URL; empty: huggingface_hub's default (HF_ENDPOINT, else https://huggingface.co)."""

    def __post_init__(self):
        if not _REPO_ID.match(self.repo_id) or "--" in self.repo_id or ".." in self.repo_id or len(self.repo_id) > 96:
            raise ValueError(f"push.repo_id={self.repo_id!r} is not a Hub repo id; use \"owner/name\" "
                             "(letters, digits, '-', '_', '.'), e.g. your-org/gpt-oss-20b-multilingual-reasoner")
        if self.revision_tag and not _TAG.match(self.revision_tag):
            raise ValueError(f"push.revision_tag={self.revision_tag!r} is not a valid tag; use letters, digits, '-', '_', '.'")
        if not self.token_env.isidentifier():
            raise ValueError(f"push.token_env={self.token_env!r} must name an environment variable (e.g. HF_TOKEN), not hold a token")


@dataclass(frozen=True, kw_only=True)
class Output:
    repo_id: str
    dry_run: bool
    files: list
    """[{path, size_bytes}] of every file uploaded (or that would be), the model card included."""
    num_bytes: int
    model_card_path: str
    upload_plan_path: str
    url: str = ""
    """Hub URL of the repo (real push only)."""
    commit: str = ""
    """Commit sha of the upload (real push only)."""


def upstream_manifests(step_dir: Path) -> dict[str, dict]:
    """Manifests of `step_dir` and of every step upstream of it, by step name."""
    manifest = read_manifest(step_dir)
    found = {manifest["step"]: manifest}
    for upstream_dir in manifest.get("inputs", {}).values():
        found.update(upstream_manifests(Path(upstream_dir)))
    return found


def _table(values: dict) -> list[str]:
    rows = ["| key | value |", "|---|---|"]
    rows += [f"| `{k}` | {str(v).replace('|', '/')} |" for k, v in values.items() if not isinstance(v, (list, dict))]
    return rows


# What the card lists of train's config: the settings that shape the result, LoRA's only for a LoRA run.
HYPERPARAMETERS = ("method", "learning_rate", "lr_scheduler", "lr_scheduler_kwargs", "warmup_ratio", "num_epochs",
                   "max_steps", "per_device_batch_size", "grad_accum_steps", "max_length", "packing", "dtype",
                   "router_aux_loss_coef", "fsdp", "seed")
LORA_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_expert_layers")


def hyperparameters(train_config: dict) -> dict:
    keys = HYPERPARAMETERS + (LORA_HYPERPARAMETERS if train_config.get("method") == "lora" else ())
    return {k: json.dumps(train_config[k]) if isinstance(train_config[k], (list, dict)) else train_config[k]
            for k in keys if k in train_config}


def _weights_section(merged: dict) -> list[str]:
    """Which format the upload is in, its size, the smallest GPU it fits, and (MXFP4) how much of the fine-tune it kept."""
    if not merged.get("export"):
        return []
    fmt = ("MXFP4 experts (E2M1 values, one E8M0 scale per 32; the openai/gpt-oss release layout and quantization_config), "
           "every other weight bf16" if merged["export"] == "mxfp4" else "unquantized, every weight as merged")
    lines = ["", "## Weights", "", f"Format: {fmt}.", "",
             f"{merged['num_bytes'] / 1e9:.2f} GB on disk; the weights fit one {merged['fits_gpu']} GPU"
             + (" when served with MXFP4 kernels (a server that dequantizes needs ~3x)." if merged["export"] == "mxfp4" else ".")]
    fig = merged.get("retention") or {}
    if fig:
        kept = "undefined (the fine-tune moved no logit)" if fig["retention"] is None else f"{fig['retention']:.1%}"
        lines += ["", f"Share of the fine-tune's effect on the logits kept by the MXFP4 rounding: {kept} "
                  f"(1 - ‖mxfp4 - merged‖ / ‖merged - base‖ over {fig['num_probe_positions']} tokens of the "
                  f"{fig['probe_split']} split; the export is refused below {fig['min_retention']:.0%}).", "",
                  "| model | eval loss |", "|---|---|", f"| base | {fig['eval_loss_base']:.4f} |",
                  f"| merged (unrounded) | {fig['eval_loss_merged']:.4f} |", f"| this upload (MXFP4) | {fig['eval_loss_mxfp4']:.4f} |"]
    return lines


def _is_hub_id(name: str) -> bool:
    """A Hub repo id the card's metadata may name (the Hub validates them): not a local folder, not "random"."""
    return bool(name) and bool(_REPO_ID.match(name)) and not Path(name).exists()


def _dataset_line(fetch: dict) -> str:
    config, out = fetch.get("config", {}), fetch.get("output", {})
    name = config.get("dataset") or out.get("dataset", "unknown")
    revision = out.get("revision") or config.get("revision", "unknown")
    counts = f" ({out.get('num_train', '?')} training rows, {out.get('num_eval', '?')} evaluation rows)"
    if name == "bundled":
        return (f"The synthetic fixture bundled with gpt-oss-finetune (`steps/data/multilingual-fixture.jsonl`, written by "
                f"`steps/data/make_fixture.py`), `{revision}`{counts}.")
    if _is_hub_id(name):
        return f"[`{name}`](https://huggingface.co/datasets/{name}) at revision `{revision}`{counts}."
    return f"A local dataset, `{Path(name).name}` (`{revision}`){counts}."


def _usage_section(repo_id: str) -> list[str]:
    return ["", "## Usage", "",
            "The system message picks the language the model reasons in (its `analysis` channel); the answer follows.", "",
            "With transformers:", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto", device_map="auto")',
            'messages = [{"role": "system", "content": "reasoning language: French"},',
            '            {"role": "user", "content": "What is the capital of Australia?"}]',
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",',
            '                                       return_dict=True).to(model.device)',
            "output = model.generate(**inputs, max_new_tokens=512)",
            'print(tokenizer.decode(output[0][inputs["input_ids"].shape[-1]:]))', "```", "",
            "With SGLang (the reply carries the reasoning in `message.reasoning_content`, the answer in `message.content`):",
            "", "```bash",
            f"python -m sglang.launch_server --model-path {repo_id} --reasoning-parser gpt-oss --tool-call-parser gpt-oss",
            "curl http://localhost:30000/v1/chat/completions -H 'Content-Type: application/json' -d '{",
            f'  "model": "{repo_id}",',
            '  "messages": [{"role": "system", "content": "reasoning language: French"},',
            '               {"role": "user", "content": "What is the capital of Australia?"}]}\'', "```"]


def _evaluation_section(manifests: dict[str, dict]) -> list[str]:
    lines = ["", "## Evaluation", ""]
    train = manifests.get("train", {}).get("output", {})
    if "train_loss_last" in train:
        first = f"{train['train_loss_first']:.4f} → " if "train_loss_first" in train else ""
        steps = f" over {train['num_steps']} steps" if "num_steps" in train else ""
        lines.append(f"Training loss {first}{train['train_loss_last']:.4f}{steps} ({train.get('tokens_per_s', 0):,.0f} "
                     "tokens/s).")
    if train.get("eval_loss") is not None:
        lines.append(f"Eval loss {train['eval_loss']:.4f}.")
    smoke = manifests.get("smoke", {}).get("output")
    if smoke:
        metrics = smoke.get("metrics", {})
        lines += ["", f"Smoke test (the model served over the OpenAI-compatible API, one request per reasoning language): "
                  f"{smoke['num_checks'] - smoke['num_failed']}/{smoke['num_checks']} checks passed; "
                  f"{smoke['tokens_per_s']} completion tokens/s, {smoke['mean_latency_s']} s per request.", "",
                  "| reasoning language | passed | reasoning identified as | language adherence |", "|---|---|---|---|"]
        for language, row in smoke["languages"].items():
            rate = metrics.get(f"language_adherence.{language}")
            lines.append(f"| {language} | {'yes' if row['passed'] else 'no'} | {row.get('detected_language') or '-'} | "
                         f"{'-' if rate is None else f'{rate:.0%}'} |")
        if "language_adherence" in metrics:
            lines += ["", f"Language adherence over {metrics['adherence_num_requests']} held-out questions: "
                      f"{metrics['language_adherence']:.0%}."]
    else:
        lines += ["", "Smoke test: not part of this upload (push ran without `--input smoke=DIR`)."]
    return lines


def model_card(*, repo_id: str, manifests: dict[str, dict]) -> str:
    """A Hub model card (YAML metadata + markdown) from the pipeline's manifests; huggingface_hub's ModelCard parses it."""
    import yaml

    model = next((m["config"]["model"] for m in manifests.values() if "model" in m.get("config", {})), {})
    folder = manifests.get(MODEL_FOLDER)
    base = model.get("name", "")
    fetch = manifests.get("fetch", {})
    dataset = fetch.get("config", {}).get("dataset", "")
    train = manifests.get("train", {})
    method = train.get("config", {}).get("method", "")
    export = manifests.get("merge", {}).get("output", {}).get("export", "")
    metadata = {"library_name": "transformers", "license": "apache-2.0", "pipeline_tag": "text-generation",
                "tags": ["gpt-oss", "harmony", "reasoning", "multilingual", "gpt-oss-finetune"]
                + ({"lora": ["lora"], "full": ["full-fine-tune"]}.get(method, []))
                + (["mxfp4"] if export == "mxfp4" else [])}
    if _is_hub_id(base):
        metadata["base_model"] = base
    if _is_hub_id(dataset):
        metadata["datasets"] = [dataset]
    note = ""
    if base == "random":
        made = "a randomly initialised gpt-oss"
        note = (f" The base had random weights of a test shape ({json.dumps(model.get('random_shape') or {})}, seed "
                f"{model.get('seed', 0)}) and the real gpt-oss tokenizer: a demonstration of the pipeline, not a useful model.")
    elif folder:
        made = "the model folder this push was given (no pipeline manifests upstream)"
    else:
        made = f"`{base}` at revision `{model.get('revision', 'unknown')}`"
    how = {"lora": "LoRA on attention and expert weights, merged into the base",
           "full": "a full fine-tune (every weight trained)"}.get(method, "")
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", "", f"# {repo_id.split('/')[1]}", "",
             f"Fine-tuned from {made}" + (f" by {how}" if how else "")
             + " on Harmony-formatted reasoning data with gpt-oss-finetune, to reason in the language the system "
               "message asks for (`reasoning language: X`)." + note, *_usage_section(repo_id)]
    if fetch:
        lines += ["", "## Training data", "", _dataset_line(fetch)]
    if train:
        lines += ["", "## Training", "", *_table(hyperparameters(train["config"]))]
    lines += _evaluation_section(manifests)
    lines += _weights_section(manifests.get("merge", {}).get("output", {}))
    if folder:
        lines += ["", "## Weights", "", f"{folder['output']['num_files']} files, {folder['output']['num_bytes'] / 1e9:.2f} GB, "
                  f"uploaded as given (sha256 fingerprint `{folder['fingerprint'][:16]}…`)."]
    lines += ["", "## Provenance", "", *_table({f"{name} fingerprint": m.get("fingerprint", "") for name, m in manifests.items()})]
    versions = next(iter(manifests.values()), {}).get("versions", {})
    if versions:
        lines += ["", "Software: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def _push(cfg: Config, *, model_dir: Path, card_path: Path, token: str) -> tuple[str, str]:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=cfg.endpoint or None, token=token)
    try:
        repo_url = api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        host = urlparse(cfg.endpoint or constants.ENDPOINT).netloc
        raise ValueError(f"push.dry_run=false, but {host} cannot be reached ({type(e).__name__}: {e}); offline, set "
                         f"push.dry_run=true (the upload plan and model card are written) and push from a machine "
                         f"that reaches {host}") from None
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 401:
            raise ValueError(f"the Hub rejected the token in ${cfg.token_env} (HTTP 401); set {cfg.token_env} to a "
                             "token with write access (https://huggingface.co/settings/tokens)") from None
        raise _refused(cfg, "creating the repo", err) from None
    # One commit carries weights, tokenizer and card: the merge folder is another step's output, so the card
    # cannot be written into it for upload_folder.
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(model_dir).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(model_dir.rglob("*")) if p.is_file() and p.name != CARD_NAME]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card_path)))
    try:
        commit = api.create_commit(cfg.repo_id, operations=operations, commit_message=cfg.commit_message)
        if cfg.revision_tag:
            api.create_tag(cfg.repo_id, tag=cfg.revision_tag, revision=commit.oid, exist_ok=True)
    except HfHubHTTPError as err:
        raise _refused(cfg, "tagging the upload" if "commit" in locals() else "uploading", err) from None
    return str(repo_url), commit.oid


def _refused(cfg: Config, doing: str, err) -> ValueError:
    """A push the Hub refused (no write access to the owner, a gated or locked repo, a file too large): the Hub's own
    reason in one line, not the client's traceback. The token never appears in it."""
    status = err.response.status_code if err.response is not None else "?"
    reason = " ".join(str(err).split())[:300]
    hint = {403: f"the token in ${cfg.token_env} may not write to {cfg.repo_id.split('/')[0]}: use a token of that "
                 "owner with write access, or set push.repo_id to a repo you own",
            404: f"check push.repo_id={cfg.repo_id!r} and push.endpoint"}.get(status, "nothing was pushed; see the Hub's reason")
    return ValueError(f"the Hub refused the push to {cfg.repo_id} while {doing} (HTTP {status}: {reason}); {hint}")


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    manifests = upstream_manifests(inputs["merge"])
    if "smoke" in inputs:
        manifests["smoke"] = read_manifest(inputs["smoke"])
        tested = Path(manifests["smoke"].get("inputs", {}).get("merge", "")).resolve()
        if tested != Path(inputs["merge"]).resolve():
            raise ValueError(f"--input smoke={inputs['smoke']} tested {tested}, not --input merge={inputs['merge']}; give "
                             "the smoke step that served this model (or leave --input smoke out)")
    model_dir = Path(read_output(inputs["merge"])["model_dir"])
    token = os.environ.get(cfg.token_env, "")
    if not cfg.dry_run and not token:
        raise ValueError(f"set {cfg.token_env} to a Hugging Face token with write access to {cfg.repo_id.split('/')[0]} "
                         "(https://huggingface.co/settings/tokens), or set push.dry_run=true")

    card_path = out_dir / CARD_NAME
    card_path.write_text(model_card(repo_id=cfg.repo_id, manifests=manifests))
    files = [{"path": p.relative_to(model_dir).as_posix(), "size_bytes": p.stat().st_size}
             for p in sorted(model_dir.rglob("*")) if p.is_file() and p.name != CARD_NAME]
    files.append({"path": CARD_NAME, "size_bytes": card_path.stat().st_size})
    num_bytes = sum(f["size_bytes"] for f in files)
    plan_path = out_dir / "upload_plan.json"
    write_json_atomic(plan_path, {"repo_id": cfg.repo_id, "private": cfg.private, "revision_tag": cfg.revision_tag,
                                  "commit_message": cfg.commit_message, "model_dir": str(model_dir),
                                  "files": files, "num_bytes": num_bytes})
    tracker.log_artifact(card_path)
    tracker.log_artifact(plan_path)
    log.info("push: %d files, %.1f MiB for %s", len(files), num_bytes / 2**20, cfg.repo_id)

    url = commit = ""
    if cfg.dry_run:
        log.info("push: dry run; the plan is in %s (set push.dry_run=false to upload)", plan_path)
    else:
        url, commit = _push(cfg, model_dir=model_dir, card_path=card_path, token=token)
        log.info("push: uploaded %s at commit %s", url, commit)
    return Output(repo_id=cfg.repo_id, dry_run=cfg.dry_run, files=files, num_bytes=num_bytes,
                  model_card_path=card_path.name, upload_plan_path=plan_path.name, url=url, commit=commit)

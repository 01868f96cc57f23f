"""finetune step push --config configs/tiny-cpu.yaml --input merge=DIR --out DIR2

Publish the merged model on the Hugging Face Hub with a generated model card: private by default, tagged, and in
dry-run mode (the default) only the upload plan and the card are written.
"""
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from steps.contract import read_manifest, read_output, write_json_atomic
from steps.tracking import Tracker

log = logging.getLogger("finetune")

INPUTS = ("merge",)
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


def model_card(*, repo_id: str, manifests: dict[str, dict]) -> str:
    """A Hub model card (YAML front matter + markdown) from the pipeline's manifests."""
    model = next((m["config"]["model"] for m in manifests.values() if "model" in m.get("config", {})), {})
    fetch = manifests.get("fetch", {})
    dataset = fetch.get("output", {}).get("dataset") or fetch.get("config", {}).get("dataset", "unknown")
    dataset_revision = fetch.get("output", {}).get("revision", "")
    train = manifests.get("train", {})
    export = manifests.get("merge", {}).get("output", {}).get("export", "")
    front = ["---", "library_name: transformers", f"tags: [gpt-oss, harmony, fine-tuned{', mxfp4' if export == 'mxfp4' else ''}]"]
    # The Hub validates these as repo ids: only name real Hub ids, not local folders or the random test model.
    if model.get("name") and model["name"] != "random" and not Path(model["name"]).exists():
        front.append(f"base_model: {model['name']}")
    if "/" in dataset and not Path(dataset).exists():
        front.append(f"datasets: [{dataset}]")
    front.append("---")
    lines = [*front, "", f"# {repo_id.split('/')[1]}", "",
             f"A fine-tune of `{model.get('name', 'unknown')}` on Harmony-formatted reasoning data, made by gpt-oss-finetune.",
             "", "## Base model", "",
             f"`{model.get('name', 'unknown')}` at revision `{model.get('revision', 'unknown')}`"
             f" (tokenizer: `{model.get('tokenizer') or model.get('name', 'unknown')}`).",
             "", "## Dataset", "", f"`{dataset}` at revision `{dataset_revision or 'unknown'}`"]
    if fetch:
        out = fetch["output"]
        lines.append(f"({out.get('num_train', '?')} training rows, {out.get('num_eval', '?')} evaluation rows).")
    if train:
        lines += ["", "## Hyper-parameters", "", *_table(train["config"])]
        metrics = {k: v for k, v in train.get("output", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["", "## Metrics", "", *_table(metrics)]
    lines += _weights_section(manifests.get("merge", {}).get("output", {}))
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
        raise
    # One commit carries weights, tokenizer and card: the merge folder is another step's output, so the card
    # cannot be written into it for upload_folder.
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(model_dir).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(model_dir.rglob("*")) if p.is_file() and p.name != CARD_NAME]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card_path)))
    commit = api.create_commit(cfg.repo_id, operations=operations, commit_message=cfg.commit_message)
    if cfg.revision_tag:
        api.create_tag(cfg.repo_id, tag=cfg.revision_tag, revision=commit.oid, exist_ok=True)
    return str(repo_url), commit.oid


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    manifests = upstream_manifests(inputs["merge"])
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

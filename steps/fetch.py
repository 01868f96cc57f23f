"""finetune step fetch --config configs/tiny-cpu.yaml --out DIR [data.dataset=PATH|HUB_ID ...]

Loads conversations in the OpenAI chat format (`messages` + optional `tools`; Multilingual-Thinking's columns are kept
as metadata) from a Hub id + revision, a local .jsonl/.parquet file, a `save_to_disk` folder or the bundled fixture,
validates them (tool calls included), drops malformed rows with counts by reason, and writes train/eval JSONL.
"""
import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from steps.tracking import Tracker

log = logging.getLogger("finetune")

INPUTS = ()
BUNDLED = Path(__file__).parent / "data" / "multilingual-fixture.jsonl"
# Multilingual-Thinking's columns: optional, kept as metadata (reasoning_language also groups the length statistics).
METADATA_COLUMNS = ("reasoning_language", "developer", "user", "analysis", "final")
ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI's rule for function names; it also keeps the Harmony header "to=functions.<name>" unambiguous.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
EFFORTS = ("low", "medium", "high")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True, kw_only=True)
class Config:
    dataset: str = "HuggingFaceH4/Multilingual-Thinking"
    """Hub dataset id, a local .jsonl/.parquet file, a `save_to_disk` folder, or "bundled" (the project's fixture)."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of a Hub dataset; local data is pinned by its sha256 instead."""
    split: str = "train"
    """Split to read from a Hub dataset or a `save_to_disk` DatasetDict."""
    eval_fraction: float = 0.0
    """Fraction of valid rows held out for evaluation (0 disables the eval split)."""
    seed: int = 0
    """Seed of the train/eval split."""
    max_rows: int = 0
    """Read only the first N rows of the source (0 reads all)."""

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={self.eval_fraction} is outside [0, 1); use e.g. 0.05, or 0 to disable the eval split")
        if self.max_rows < 0:
            raise ValueError(f"data.max_rows={self.max_rows} is negative; use 0 to read every row")


@dataclass(frozen=True, kw_only=True)
class Output:
    train_path: str
    eval_path: str
    num_train: int
    num_eval: int
    num_dropped: dict = field(default_factory=dict)
    dataset: str = ""
    revision: str = ""
    train_sha256: str = ""
    """sha256 of train.jsonl: a digest of every kept training row (the dataset lineage in MLflow carries it)."""
    eval_sha256: str = ""


def _is_local(dataset: str) -> bool:
    return (dataset == "bundled" or Path(dataset).expanduser().exists() or dataset.startswith(("/", ".", "~"))
            or dataset.endswith(LOCAL_SUFFIXES))


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    # Parsed line by line rather than through Arrow: a malformed row (wrong types) must be counted, not crash the reader.
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"data.dataset={path} cannot be read ({e}); point it at a UTF-8 JSON Lines file") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.dataset={path} line {n} is not valid JSON ({e.msg}); fix or remove that line") from e
        rows.append(row if isinstance(row, dict) else {"__not_an_object__": row})
    return rows


def _read_local(path: Path, split: str) -> list[dict]:
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"data.dataset={path} is a folder but not a `save_to_disk` dataset ({e}); "
                             "point it at a .jsonl/.parquet file or a folder written by Dataset.save_to_disk") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.split={split!r} is not in {path} (splits: {', '.join(ds)}); set data.split to one of them")
            ds = ds[split]
        return ds.to_list()
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (OSError, pyarrow.ArrowException) as e:
            raise ValueError(f"data.dataset={path} cannot be read as Parquet ({e}); check the file") from e
    raise ValueError(f"data.dataset={path} has an unknown format {path.suffix!r}; use a .jsonl or .parquet file or a save_to_disk folder")


def _local_path(cfg: Config) -> Path:
    path = BUNDLED if cfg.dataset == "bundled" else Path(cfg.dataset).expanduser()
    if not path.exists():
        raise ValueError(f"data.dataset={cfg.dataset} does not exist; give an existing .jsonl/.parquet file or "
                         "save_to_disk folder, a Hub dataset id, or `bundled`")
    return path


def source_revision(cfg: Config) -> str:
    """What the data behind `cfg` is right now: the Hub commit `data.revision` resolves to, or the local files' sha256.

    The contract folds it into the fingerprint, so an edited file or a moved branch re-runs fetch (nightly retrains).
    """
    if _is_local(cfg.dataset):
        return _sha256_of(_local_path(cfg))
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(cfg.dataset, revision=cfg.revision).sha
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        raise ValueError(f"data.dataset={cfg.dataset} is a Hub dataset, but {urlparse(constants.ENDPOINT).netloc} cannot "
                         f"be reached ({type(e).__name__}: {e}); offline, point data.dataset at a local .jsonl/.parquet "
                         "file or save_to_disk folder, or use data.dataset=bundled") from None
    except RevisionNotFoundError:
        raise ValueError(f"data.revision={cfg.revision} does not exist in the Hub dataset {cfg.dataset}; "
                         "give a branch, tag or commit of it") from None
    except RepositoryNotFoundError:
        raise ValueError(f"data.dataset={cfg.dataset} is not a Hub dataset you can read (no such repo, or private/gated: "
                         "set HF_TOKEN); check the name, or point it at a local file") from None


def _read_hub(cfg: Config) -> tuple[list[dict], str]:
    import datasets

    # Resolve the revision to a commit first so that the rows read and the sha recorded are the same snapshot.
    sha = source_revision(cfg)
    ds = datasets.load_dataset(cfg.dataset, revision=sha, split=cfg.split)
    return ds.to_list(), sha


def _json_or_value(value):
    # Arrow-backed datasets store per-row schemas (tools) and arguments as JSON text; JSONL rows may hold the objects.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def check_tool(tool) -> str | None:
    """The reason an OpenAI tool definition ({type: function, function: {name, description?, parameters?}}) is unusable."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        return "bad_tool_definition"
    function = tool["function"]
    if not isinstance(function.get("name"), str) or not TOOL_NAME.fullmatch(function["name"]):
        return "bad_tool_definition"
    if not isinstance(function.get("description", ""), str):
        return "bad_tool_definition"
    parameters = function.get("parameters")
    if parameters is None:
        return None  # a function without arguments
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        return "tool_parameters_not_object_schema"
    import jsonschema

    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError:
        return "tool_parameters_not_object_schema"
    return None


def _tool_names(row: dict) -> tuple[set[str] | None, str | None]:
    """The row's function names, or the reason its `tools` are malformed."""
    if row.get("tools") is None:
        return set(), None
    tools = _json_or_value(row["tools"])
    if not isinstance(tools, list):
        return None, "bad_tool_definition"
    for tool in tools:
        if reason := check_tool(tool):
            return None, reason
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        return None, "bad_tool_definition"
    return set(names), None


def _check_tool_calls(messages: list[dict], names: set[str]) -> str | None:
    pending = []  # (id, name) of the calls made and not yet answered
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    return "wrong_type"
                if function["name"] not in names:
                    return "unknown_tool"
                if not isinstance(_json_or_value(function.get("arguments")), dict):
                    return "tool_arguments_not_json_object"
                pending.append((call.get("id"), function["name"]))
        elif m["role"] == "tool":
            match = [k for k, (call_id, name) in enumerate(pending)
                     if (m.get("tool_call_id") is None or m["tool_call_id"] == call_id)
                     and (m.get("name") is None or m["name"] == name)]
            if not match:
                return "tool_result_without_call"
            pending.pop(match[0])
    return None


def check_row(row: dict) -> str | None:
    """The reason a row is malformed (a key of Output.num_dropped), or None when it can be trained on."""
    if "__not_an_object__" in row:
        return "wrong_type"
    messages = row.get("messages")
    if messages is None or messages == []:
        return "no_messages"
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "wrong_type"
    for m in messages:
        if not isinstance(m.get("role"), str):
            return "wrong_type"
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
            return "wrong_type"
        # An assistant message that only calls tools may have no content (the OpenAI format writes null).
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            return "wrong_type"
        if any(m.get(k) is not None and not isinstance(m[k], str) for k in ("thinking", "name", "tool_call_id")):
            return "wrong_type"
        if m["role"] not in ROLES:
            return "unknown_role"
    if any(m["role"] in ("system", "developer") for m in messages[1:]):
        return "system_not_first"  # Harmony has one developer message, at the start
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn"
    if messages[-1]["role"] != "assistant":
        return "last_turn_not_assistant"
    for m in messages:
        if m["role"] != "assistant":
            continue
        if m.get("tool_calls") and (m.get("content") or "").strip():
            # Harmony would need a commentary preamble here; reasoning beside a call belongs in `thinking`.
            return "content_beside_tool_calls"
        if not m.get("tool_calls") and not m["content"].strip():
            return "empty_assistant_content"
    names, reason = _tool_names(row)
    if reason:
        return reason
    if reason := _check_tool_calls(messages, names):
        return reason
    if any(row.get(c) is not None and not isinstance(row[c], str) for c in METADATA_COLUMNS):
        return "wrong_type"
    effort = row.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        return "bad_reasoning_effort"
    return None


def _normalise_message(m: dict, pending: list[str]) -> dict:
    out = {"role": m["role"], "content": m.get("content") or "", "thinking": m.get("thinking")}
    if m.get("tool_calls"):
        out["tool_calls"] = []
        for call in m["tool_calls"]:
            arguments = call["function"]["arguments"]
            # Arguments given as text are trained verbatim; an object is written as JSON (the stock template's tojson).
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            out["tool_calls"].append({"name": call["function"]["name"], "arguments": text})
            pending.append((call.get("id"), call["function"]["name"]))
    if m["role"] == "tool":  # named by the call it answers (check_row made sure there is one)
        k = next(k for k, (call_id, name) in enumerate(pending)
                 if (m.get("tool_call_id") is None or m["tool_call_id"] == call_id) and (m.get("name") is None or m["name"] == name))
        out["name"] = pending.pop(k)[1]
    return out


def _normalise(row: dict, row_id: str) -> dict:
    pending = []
    tools = _json_or_value(row["tools"]) if row.get("tools") is not None else None
    return {
        "id": row_id,
        **{c: row.get(c) for c in METADATA_COLUMNS},
        "messages": [_normalise_message(m, pending) for m in row["messages"]],
        "tools": [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                   "parameters": t["function"].get("parameters")} for t in tools] if tools else None,
        "reasoning_effort": row.get("reasoning_effort"),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    if _is_local(cfg.dataset):
        path = _local_path(cfg)
        rows, revision, source = _read_local(path, cfg.split), _sha256_of(path), str(path.resolve())
    else:
        rows, revision = _read_hub(cfg)
        source = cfg.dataset
    if cfg.max_rows:
        rows = rows[:cfg.max_rows]
    log.info("fetch: read %d rows from %s (revision %s)", len(rows), source, revision)

    if rows and not any("messages" in r for r in rows):
        raise ValueError(f"data.dataset={cfg.dataset} lacks the column messages; each row needs messages = "
                         "[{role, content, thinking?, tool_calls?}] in the OpenAI chat format (+ optional tools)")

    kept, dropped = [], Counter()
    for index, row in enumerate(rows):
        reason = check_row(row)
        if reason:
            dropped[reason] += 1
            log.debug("fetch: dropping row %d (%s)", index, reason)
            continue
        # Ids from the source are kept; otherwise the row's position, stable for a pinned revision.
        kept.append(_normalise(row, str(row["id"]) if row.get("id") is not None else f"row-{index:06d}"))
    if dropped:
        log.warning("fetch: dropped %d malformed rows: %s", sum(dropped.values()), dict(sorted(dropped.items())))
    if not kept:
        raise ValueError(f"data.dataset={cfg.dataset} has no valid rows ({len(rows)} read, dropped by reason: "
                         f"{dict(sorted(dropped.items()))}); each row needs messages ending in a non-empty assistant turn or a tool call")
    if len({r["id"] for r in kept}) != len(kept):
        raise ValueError(f"data.dataset={cfg.dataset} has duplicate ids in its `id` column; make them unique or drop the column")

    num_eval = round(cfg.eval_fraction * len(kept)) if cfg.eval_fraction else 0
    if cfg.eval_fraction and not 1 <= num_eval < len(kept):
        raise ValueError(f"data.eval_fraction={cfg.eval_fraction} leaves {num_eval} of {len(kept)} rows for eval; "
                         "raise it, lower it, or set it to 0")
    order = list(range(len(kept)))
    random.Random(cfg.seed).shuffle(order)
    eval_idx = set(order[:num_eval])
    train = [r for i, r in enumerate(kept) if i not in eval_idx]
    evals = [r for i, r in enumerate(kept) if i in eval_idx]

    train_path = out_dir / "train.jsonl"
    _write_jsonl(train_path, train)
    eval_path = ""
    if evals:
        _write_jsonl(out_dir / "eval.jsonl", evals)
        eval_path = "eval.jsonl"
    digests = {"train": _sha256_of(train_path), "eval": _sha256_of(out_dir / eval_path) if eval_path else ""}
    for split, rows_of in (("train", train), ("eval", evals)):
        if rows_of:
            tracker.log_dataset(name=Path(source).name if Path(source).exists() else source, source=source,
                                revision=revision, digest=digests[split], num_rows=len(rows_of), context=split)
    log.info("fetch: %d train, %d eval rows written to %s", len(train), len(evals), out_dir)
    return Output(train_path=train_path.name, eval_path=eval_path, num_train=len(train), num_eval=len(evals),
                  num_dropped=dict(sorted(dropped.items())), dataset=source, revision=revision,
                  train_sha256=digests["train"], eval_sha256=digests["eval"])

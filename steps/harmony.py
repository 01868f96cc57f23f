"""finetune step harmony --config configs/tiny-cpu.yaml --input fetch=DIR --out DIR2 [harmony.max_length=N ...]

Renders each fetched conversation in the Harmony format with the gpt-oss tokenizer and writes token ids plus
loss masks (`DIR2/data`, a `save_to_disk` dataset with columns id, input_ids, assistant_masks) and the tokenizer used.

template=openai-harmony (default) is token-identical to openai-harmony's
`render_conversation_for_training(..., RenderConversationConfig(auto_drop_analysis=False))`: the step renders with the
HF tokenizer piece by piece (so loss masks are exact and text is never parsed for control tokens) and checks every
row against openai-harmony itself. template=hf-stock renders with the tokenizer's stock chat template instead, which
differs in two ways: it writes today's date (tokens change daily; `current_date` is ignored) and ends the developer
message with two extra newlines; it also turns control-token text inside messages (a literal "<|end|>") into control
tokens.
"""
import datetime
import logging
import os
import shutil
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from steps.contract import read_output
from steps.model import ModelConfig
from steps.tracking import Tracker

log = logging.getLogger("finetune")

INPUTS = ("fetch",)
EFFORTS = ("low", "medium", "high")
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    """The profile's model section (injected): its tokenizer renders the data."""
    current_date: str
    """"Current date" written into every system message (YYYY-MM-DD); pinned so that tokens do not change daily."""
    reasoning_effort: str = "medium"
    """Reasoning effort (low|medium|high) of rows without their own `reasoning_effort`."""
    max_length: int = 2048
    """Longest rendered row in tokens; longer rows are handled by `overflow`."""
    overflow: str = "drop"
    """What to do with rows over max_length: drop, truncate (cut at max_length) or error."""
    loss_on: str = "last_assistant"
    """last_assistant: loss on the last assistant turn (analysis + final + <|return|>); all_assistant: also on
    earlier assistant turns' final messages."""
    template: str = "openai-harmony"
    """openai-harmony (the reference rendering) or hf-stock (the tokenizer's chat template; see the module docstring)."""

    def __post_init__(self):
        try:
            datetime.date.fromisoformat(self.current_date)
        except (TypeError, ValueError):
            raise ValueError(f"harmony.current_date={self.current_date!r} is not a YYYY-MM-DD date; pin one, e.g. harmony.current_date=2025-06-28") from None
        for name, value, choices in (("reasoning_effort", self.reasoning_effort, EFFORTS),
                                     ("overflow", self.overflow, ("drop", "truncate", "error")),
                                     ("loss_on", self.loss_on, ("last_assistant", "all_assistant")),
                                     ("template", self.template, ("openai-harmony", "hf-stock"))):
            if value not in choices:
                raise ValueError(f"harmony.{name}={value!r} is not one of {'|'.join(choices)}; pick one of those")
        if self.max_length < 16:
            raise ValueError(f"harmony.max_length={self.max_length} is too small for even a system message; use e.g. 2048")


@dataclass(frozen=True, kw_only=True)
class Output:
    data_dir: str
    eval_data_dir: str
    tokenizer_dir: str
    num_rows: int
    num_eval_rows: int
    num_dropped_overflow: int
    num_truncated: int
    num_parity_checked: int
    longest_row: int
    """Tokens in the longest kept training row: train.max_length must be at least this (checked before train loads a model)."""
    length_stats: dict = field(default_factory=dict)
    histogram_path: str = ""


def system_text(*, current_date: str, effort: str) -> str:
    return (f"{MODEL_IDENTITY}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {current_date}\n\n"
            f"Reasoning: {effort}\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.")


class HarmonyRenderer:
    """Harmony rendering over an HF tokenizer: each piece is tokenised on its own, control tokens are added by id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("start", "end", "message", "channel", "return")}

    def _text(self, pieces: list[str]) -> list[list[int]]:
        # split_special_tokens: text that looks like a control token ("<|end|>") stays ordinary text, as in Harmony.
        return self.tok(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def render(self, messages: list[dict], *, effort: str, current_date: str, loss_on: str) -> tuple[list[int], list[int]]:
        s, e, msg, ch, ret = (self.ids[k] for k in ("start", "end", "message", "channel", "return"))
        # (header pieces, body, closing token, trained?, role trained?) per Harmony message; header = role [+ channel].
        parts = [(["system"], system_text(current_date=current_date, effort=effort), e, False, False)]
        turns = messages
        if messages[0]["role"] in ("system", "developer"):
            if messages[0]["content"]:
                parts.append((["developer"], "# Instructions\n\n" + messages[0]["content"], e, False, False))
            turns = messages[1:]
        last = len(turns) - 1
        for i, m in enumerate(turns):
            if m["role"] == "user":
                parts.append((["user"], m["content"], e, False, False))
            elif i < last:  # earlier assistant turns: final message only, the analysis is not kept
                parts.append((["assistant", "final"], m["content"], e, loss_on == "all_assistant", False))
            else:
                # The model writes the final message's "<|start|>assistant" itself after its analysis: trained.
                if m.get("thinking"):
                    parts.append((["assistant", "analysis"], m["thinking"], e, True, False))
                parts.append((["assistant", "final"], m["content"], ret, True, bool(m.get("thinking"))))
        texts = self._text([p for header, body, *_ in parts for p in (*header, body)])
        input_ids, mask = [], []
        k = 0
        for header, _, close, trained, role_trained in parts:
            role_ids, channel_ids = texts[k], texts[k + 1] if len(header) == 2 else None
            body_ids = texts[k + len(header)]
            k += len(header) + 1
            # The loss starts after the turn's "<|start|>assistant": what the model generates at inference.
            input_ids += [s, *role_ids]
            mask += [int(role_trained)] * (1 + len(role_ids))
            completion = ([ch, *channel_ids] if channel_ids is not None else []) + [msg, *body_ids, close]
            input_ids += completion
            mask += [int(trained)] * len(completion)
        return input_ids, mask


def render_hf_stock(tokenizer, messages: list[dict], *, effort: str, loss_on: str) -> tuple[list[int], list[int]]:
    """The stock chat template's rendering; masks from prefix renderings (each assistant turn starts after its prefix)."""
    def as_template(ms, keep_thinking):
        out = []
        for j, m in enumerate(ms):
            d = {"role": m["role"], "content": m["content"]}
            if keep_thinking and j == len(ms) - 1 and m.get("thinking"):
                d["thinking"] = m["thinking"]
            out.append(d)
        return out

    def encode(ms, gen):
        text = tokenizer.apply_chat_template(as_template(ms, not gen), tokenize=False, add_generation_prompt=gen,
                                             reasoning_effort=effort)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = encode(messages, False)
    mask = [0] * len(input_ids)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    trained = [len(messages) - 1]
    if loss_on == "all_assistant":
        trained += [j for j, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
    for j in trained:
        prefix = encode(messages[:j], True)
        assert input_ids[:len(prefix)] == prefix, "stock template: a prefix rendering is not a prefix of the full one"
        stop = len(input_ids) if j == len(messages) - 1 else input_ids.index(end_id, len(prefix)) + 1
        mask[len(prefix):stop] = [1] * (stop - len(prefix))
    return input_ids, mask


def harmony_conversation(messages: list[dict], *, effort: str, current_date: str):
    """The same conversation as openai-harmony objects (for the parity check)."""
    from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize())).with_conversation_start_date(current_date)
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    turns = messages
    if messages[0]["role"] in ("system", "developer"):
        if messages[0]["content"]:
            out.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(messages[0]["content"])))
        turns = messages[1:]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
            continue
        if i == len(turns) - 1 and m.get("thinking"):
            out.append(Message.from_role_and_content(Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
        out.append(Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel("final"))
    return Conversation.from_messages(out)


def _stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {"num": len(ordered), "min": ordered[0], "mean": round(statistics.fmean(ordered), 1),
            "p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1]}


def _histogram(lengths: list[int], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(50, max(10, len(set(lengths)))), color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per row (Harmony-rendered)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_dataset(rows: dict, path: Path) -> None:
    import datasets

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    from steps.tokenizer import harmony_encoding, load_tokenizer  # transformers: not needed to read a profile

    fetched = read_output(inputs["fetch"])
    tokenizer = load_tokenizer(cfg.model)
    renderer = HarmonyRenderer(tokenizer)
    encoding = harmony_encoding() if cfg.template == "openai-harmony" else None
    if encoding is not None:
        from openai_harmony import RenderConversationConfig

        keep_analysis = RenderConversationConfig(auto_drop_analysis=False)

    lengths, lengths_by_language = [], defaultdict(list)
    counts = Counter()
    splits = {"train": fetched["train_path"], "eval": fetched["eval_path"]}
    rendered = {}
    for split, source in splits.items():
        if not source:
            continue
        rows = _read_jsonl(Path(source))
        out = {"id": [], "input_ids": [], "assistant_masks": []}
        for n, row in enumerate(rows, start=1):
            effort = row.get("reasoning_effort") or cfg.reasoning_effort
            if cfg.template == "openai-harmony":
                ids, mask = renderer.render(row["messages"], effort=effort, current_date=cfg.current_date, loss_on=cfg.loss_on)
                expected = encoding.render_conversation_for_training(
                    harmony_conversation(row["messages"], effort=effort, current_date=cfg.current_date), keep_analysis)
                if ids != expected:
                    raise RuntimeError(f"row {row['id']}: the tokenizer of model.tokenizer={cfg.model.tokenizer_source!r} renders "
                                       "differently from openai-harmony; use the gpt-oss tokenizer or harmony.template=hf-stock")
                counts["parity_checked"] += 1
            else:
                ids, mask = render_hf_stock(tokenizer, row["messages"], effort=effort, loss_on=cfg.loss_on)
            lengths.append(len(ids))
            lengths_by_language[row.get("reasoning_language") or "unknown"].append(len(ids))
            if len(ids) > cfg.max_length:
                if cfg.overflow == "error":
                    raise ValueError(f"row {row['id']} renders to {len(ids)} tokens > harmony.max_length={cfg.max_length}; "
                                     f"raise harmony.max_length to at least {len(ids)} or set harmony.overflow=drop|truncate")
                if cfg.overflow == "truncate" and any(mask[:cfg.max_length]):
                    ids, mask = ids[:cfg.max_length], mask[:cfg.max_length]
                    counts["truncated"] += 1
                else:  # drop, or a truncation that would leave no token to learn from
                    counts["dropped_overflow"] += 1
                    continue
            out["id"].append(row["id"])
            out["input_ids"].append(ids)
            out["assistant_masks"].append(mask)
            if n % 500 == 0:
                log.info("harmony: %s: %d/%d rows rendered", split, n, len(rows))
        rendered[split] = out

    if not rendered["train"]["id"]:
        raise ValueError(f"every training row is longer than harmony.max_length={cfg.max_length} (longest {max(lengths)}); "
                         "raise harmony.max_length or set harmony.overflow=truncate")
    data_dir = out_dir / "data"
    _save_dataset(rendered["train"], data_dir)
    eval_dir = ""
    if "eval" in rendered and rendered["eval"]["id"]:
        _save_dataset(rendered["eval"], out_dir / "eval_data")
        eval_dir = "eval_data"
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)

    stats = {"all": _stats(lengths), "by_language": {k: _stats(v) for k, v in sorted(lengths_by_language.items())}}
    histogram = out_dir / "token_lengths.png"
    _histogram(lengths, cfg.max_length, histogram)
    tracker.log_artifact(histogram)
    tracker.log_metrics({"harmony.num_rows": len(rendered["train"]["id"]), "harmony.num_dropped_overflow": counts["dropped_overflow"],
                         "harmony.num_truncated": counts["truncated"], **{f"harmony.tokens_{k}": v for k, v in stats["all"].items()}})
    log.info("harmony: %d train rows, %d dropped and %d truncated over max_length=%d; tokens per row %s",
             len(rendered["train"]["id"]), counts["dropped_overflow"], counts["truncated"], cfg.max_length, stats["all"])
    return Output(data_dir=data_dir.name, eval_data_dir=eval_dir, tokenizer_dir=tokenizer_dir.name,
                  num_rows=len(rendered["train"]["id"]), num_eval_rows=len(rendered.get("eval", {"id": []})["id"]),
                  num_dropped_overflow=counts["dropped_overflow"], num_truncated=counts["truncated"],
                  num_parity_checked=counts["parity_checked"],
                  longest_row=max(len(ids) for ids in rendered["train"]["input_ids"]), length_stats=stats, histogram_path=histogram.name)

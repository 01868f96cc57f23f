"""finetune step harmony --config configs/tiny-cpu.yaml --input fetch=DIR --out DIR2 [harmony.max_length=N ...]

Renders each fetched conversation in the Harmony format with the gpt-oss tokenizer and writes token ids plus
loss masks (`DIR2/data`, a `save_to_disk` dataset with columns id, input_ids, assistant_masks) and the tokenizer used.

template=openai-harmony (default) is token-identical to openai-harmony's
`render_conversation_for_training(..., RenderConversationConfig(auto_drop_analysis=False))`: the step renders with the
HF tokenizer piece by piece (so loss masks are exact and text is never parsed for control tokens) and checks every
row against openai-harmony itself; with tools, the developer message's `functions` namespace is openai-harmony's own
text. template=hf-stock renders with the tokenizer's stock chat template instead; README.md lists how it differs.
"""
import datetime
import json
import logging
import os
import shutil
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
    """last_assistant: loss on every assistant message after the last user message (analysis, tool calls, final, each
    through its <|end|>/<|call|>/<|return|>); all_assistant: also on earlier turns' calls and final messages."""
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


def system_text(*, current_date: str, effort: str, has_tools: bool = False) -> str:
    # openai-harmony adds the last line whenever the developer message defines functions.
    calls = "\nCalls to these tools must go to the commentary channel: 'functions'." if has_tools else ""
    return (f"{MODEL_IDENTITY}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {current_date}\n\n"
            f"Reasoning: {effort}\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.{calls}")


@dataclass(frozen=True)
class HarmonyMessage:
    """One Harmony message: `<|start|>role[ to=recipient][<|channel|>channel][ content_type]<|message|>content<close>`."""
    role: str
    content: str
    close: str = "end"
    channel: str | None = None
    recipient: str | None = None
    constrain_json: bool = False
    trained: bool = False
    """Loss on everything after the role, through the closing token."""
    role_trained: bool = False
    """Loss on `<|start|>role` too: the model writes it itself, straight after its own analysis."""


def _developer_content(instructions: str, tools: list[dict] | None):
    from openai_harmony import DeveloperContent, ToolDescription

    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools([ToolDescription.new(t["name"], t["description"], parameters=t["parameters"])
                                               for t in tools])
    return content


def developer_text(encoding, instructions: str, tools: list[dict] | None) -> str:
    """The developer message's text as openai-harmony writes it; with tools, their TypeScript-like `functions` namespace
    is openai-harmony's own (re-implementing its JSON-schema conversion would only add a way to differ)."""
    if not tools:
        return "# Instructions\n\n" + instructions
    from openai_harmony import Message, Role

    ids = encoding.render(Message.from_role_and_content(Role.DEVELOPER, _developer_content(instructions, tools)))
    message_id, end_id = encoding.encode("<|message|>", allowed_special="all")[0], encoding.encode("<|end|>", allowed_special="all")[0]
    assert ids[-1] == end_id, "openai-harmony's developer message does not end with <|end|>"
    return encoding.decode_utf8(ids[ids.index(message_id) + 1:-1])


def harmony_messages(messages: list[dict], *, loss_on: str) -> list[HarmonyMessage]:
    """The conversation after the system/developer messages, mapped as the gpt-oss format defines it, with its loss.

    Every assistant message after the last user message (analysis, calls, final) is trained; earlier turns keep their
    calls and final but not their analysis, and are trained only with loss_on=all_assistant; results never are.
    """
    turns = messages[1:] if messages[0]["role"] in ("system", "developer") else messages
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(turns):
        current = i > last_user
        if m["role"] == "user":
            out.append(HarmonyMessage(role="user", content=m["content"]))
        elif m["role"] == "tool":
            out.append(HarmonyMessage(role=f"functions.{m['name']}", content=m["content"], channel="commentary", recipient="assistant"))
        else:
            trained = current or loss_on == "all_assistant"
            if current and m.get("thinking"):
                out.append(HarmonyMessage(role="assistant", content=m["thinking"], channel="analysis", trained=True))
            for call in m.get("tool_calls") or []:
                out.append(HarmonyMessage(role="assistant", content=call["arguments"], close="call", channel="commentary",
                                          recipient=f"functions.{call['name']}", constrain_json=True, trained=trained))
            if not m.get("tool_calls"):
                out.append(HarmonyMessage(role="assistant", content=m["content"], channel="final", trained=trained,
                                          close="return" if i == len(turns) - 1 else "end"))
    # The model writes "<|start|>assistant" itself after its own analysis; after a user turn or a tool result it is the prompt.
    return [replace(h, role_trained=h.trained and k > 0 and out[k - 1].channel == "analysis") for k, h in enumerate(out)]


class HarmonyRenderer:
    """Harmony rendering over an HF tokenizer: each piece is tokenised on its own, control tokens are added by id."""

    def __init__(self, tokenizer, encoding):
        self.tok = tokenizer
        self.encoding = encoding  # openai-harmony's, for the developer message's tool namespace
        self.ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
                    for name in ("start", "end", "message", "channel", "return", "call", "constrain")}

    def _text(self, pieces: list[str]) -> list[list[int]]:
        # split_special_tokens: text that looks like a control token ("<|end|>") stays ordinary text, as in Harmony.
        return self.tok(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, effort: str, current_date: str,
               loss_on: str) -> tuple[list[int], list[int]]:
        parts = [HarmonyMessage(role="system", content=system_text(current_date=current_date, effort=effort, has_tools=bool(tools)))]
        instructions = messages[0]["content"] if messages[0]["role"] in ("system", "developer") else ""
        if instructions or tools:
            parts.append(HarmonyMessage(role="developer", content=developer_text(self.encoding, instructions, tools)))
        parts += harmony_messages(messages, loss_on=loss_on)
        pieces = []
        for h in parts:
            pieces += [h.role, f" to={h.recipient}" if h.recipient else "", h.channel or "", h.content]
        texts = iter(self._text(pieces))
        input_ids, mask = [], []
        for h in parts:
            role_ids, recipient_ids, channel_ids, body_ids = (next(texts) for _ in range(4))
            input_ids += [self.ids["start"], *role_ids]
            mask += [int(h.role_trained)] * (1 + len(role_ids))
            completion = [*recipient_ids, *([self.ids["channel"], *channel_ids] if h.channel else [])]
            if h.constrain_json:
                completion += [*self._text([" "])[0], self.ids["constrain"], *self._text(["json"])[0]]
            completion += [self.ids["message"], *body_ids, self.ids[h.close]]
            input_ids += completion
            mask += [int(h.trained)] * len(completion)
        return input_ids, mask


def _stock_messages(messages: list[dict], *, keep_last_thinking: bool) -> list[dict]:
    """Chat messages as the stock template reads them; `thinking` only on the last message (it drops earlier analysis)."""
    out = []
    for j, m in enumerate(messages):
        d = {"role": m["role"], "content": m["content"]}
        if keep_last_thinking and j == len(messages) - 1 and m.get("thinking"):
            d["thinking"] = m["thinking"]
        if m.get("tool_calls"):
            # An object: the template writes arguments with tojson, which would quote a JSON text a second time.
            d["tool_calls"] = [{"type": "function", "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(d)
    return out


def render_hf_stock(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, effort: str,
                    loss_on: str) -> tuple[list[int], list[int]]:
    """The stock chat template's rendering; masks from prefix renderings (each assistant message starts after its prefix)."""
    if any(len(m.get("tool_calls") or []) > 1 for m in messages):
        raise ValueError("the stock gpt-oss chat template renders only the first tool call of an assistant message (and "
                         "names every result after the last call); use harmony.template=openai-harmony for parallel calls")
    stock_tools = [{"type": "function", "function": t} for t in tools] if tools else None

    def encode(ms, gen):
        text = tokenizer.apply_chat_template(_stock_messages(ms, keep_last_thinking=not gen), tools=stock_tools,
                                             tokenize=False, add_generation_prompt=gen, reasoning_effort=effort)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = encode(messages, False)
    mask = [0] * len(input_ids)
    closing = {tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|call|>", "<|return|>")}
    last_user = max((j for j, m in enumerate(messages) if m["role"] == "user"), default=-1)
    trained = [j for j, m in enumerate(messages) if m["role"] == "assistant" and (j > last_user or loss_on == "all_assistant")]
    for j in trained:
        prefix = encode(messages[:j], True)
        assert input_ids[:len(prefix)] == prefix, "stock template: a prefix rendering is not a prefix of the full one"
        stop = len(input_ids) if j == len(messages) - 1 else next(
            k for k in range(len(prefix), len(input_ids)) if input_ids[k] in closing) + 1
        mask[len(prefix):stop] = [1] * (stop - len(prefix))
    return input_ids, mask


def harmony_conversation(messages: list[dict], *, tools: list[dict] | None = None, effort: str, current_date: str):
    """The same conversation as openai-harmony objects (for the parity check)."""
    from openai_harmony import Author, Conversation, Message, ReasoningEffort, Role, SystemContent

    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize())).with_conversation_start_date(current_date)
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    instructions = messages[0]["content"] if messages[0]["role"] in ("system", "developer") else ""
    if instructions or tools:
        out.append(Message.from_role_and_content(Role.DEVELOPER, _developer_content(instructions, tools)))
    for h in harmony_messages(messages, loss_on="last_assistant"):
        if h.role.startswith("functions."):
            msg = Message.from_author_and_content(Author.new(Role.TOOL, h.role), h.content)
        else:
            msg = Message.from_role_and_content(Role(h.role), h.content)
        if h.channel:
            msg = msg.with_channel(h.channel)
        if h.recipient:
            msg = msg.with_recipient(h.recipient)
        if h.constrain_json:
            msg = msg.with_content_type("<|constrain|>json")
        out.append(msg)
    return Conversation.from_messages(out)


def _stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {"num": len(ordered), "min": ordered[0], "mean": round(statistics.fmean(ordered), 1),
            "p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1]}


LOG_SCALE_SPAN = 20  # longest / shortest row from which token_lengths.png uses a log axis


def uses_log_scale(lengths: list[int]) -> bool:
    return max(lengths) >= LOG_SCALE_SPAN * max(min(lengths), 1)


def _histogram(lengths: list[int], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    ordered = sorted(lengths)
    p50, p95 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    over = sum(n > max_length for n in lengths)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    num_bins = min(50, max(10, len(set(lengths))))
    # Lengths that span orders of magnitude (a few long documents among short chats) on a log axis, log-spaced bins.
    spans_decades = uses_log_scale(lengths)
    bins = np.geomspace(max(ordered[0], 1), ordered[-1] + 1, num_bins + 1) if spans_decades else num_bins
    ax.hist(lengths, bins=bins, color="#4477aa")
    if spans_decades:
        ax.set_xscale("log")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length={max_length} ({over} rows over)")
    ax.axvline(p50, color="#228833", linestyle=":", label=f"median {p50}")
    ax.axvline(p95, color="#ccbb44", linestyle=":", label=f"p95 {p95}")
    ax.set_title(f"Harmony token lengths: {len(lengths)} rows (train + eval), {ordered[0]}–{ordered[-1]} tokens",
                 fontsize=12)
    ax.set_xlabel("tokens per row (Harmony-rendered)" + (", log scale" if spans_decades else ""), fontsize=11)
    ax.set_ylabel("rows", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    if cfg.template == "openai-harmony":
        from openai_harmony import RenderConversationConfig

        encoding = harmony_encoding()
        renderer = HarmonyRenderer(tokenizer, encoding)
        keep_analysis = RenderConversationConfig(auto_drop_analysis=False)

    lengths, lengths_by_language, lengths_with_tools = [], defaultdict(list), []
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
            tools = row.get("tools")
            if cfg.template == "openai-harmony":
                ids, mask = renderer.render(row["messages"], tools=tools, effort=effort, current_date=cfg.current_date,
                                            loss_on=cfg.loss_on)
                expected = encoding.render_conversation_for_training(
                    harmony_conversation(row["messages"], tools=tools, effort=effort, current_date=cfg.current_date), keep_analysis)
                if ids != expected:
                    raise RuntimeError(f"row {row['id']}: the tokenizer of model.tokenizer={cfg.model.tokenizer_source!r} renders "
                                       "differently from openai-harmony; use the gpt-oss tokenizer or harmony.template=hf-stock")
                counts["parity_checked"] += 1
            else:
                ids, mask = render_hf_stock(tokenizer, row["messages"], tools=tools, effort=effort, loss_on=cfg.loss_on)
            lengths.append(len(ids))
            lengths_by_language[row.get("reasoning_language") or "unknown"].append(len(ids))
            if tools:
                lengths_with_tools.append(len(ids))
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

    stats = {"all": _stats(lengths), "by_language": {k: _stats(v) for k, v in sorted(lengths_by_language.items())},
             "with_tools": _stats(lengths_with_tools) if lengths_with_tools else {"num": 0}}
    histogram = out_dir / "token_lengths.png"
    _histogram(lengths, cfg.max_length, histogram)
    tracker.log_artifact(histogram)
    log.info("harmony: %d train rows, %d dropped and %d truncated over max_length=%d; tokens per row %s",
             len(rendered["train"]["id"]), counts["dropped_overflow"], counts["truncated"], cfg.max_length, stats["all"])
    return Output(data_dir=data_dir.name, eval_data_dir=eval_dir, tokenizer_dir=tokenizer_dir.name,
                  num_rows=len(rendered["train"]["id"]), num_eval_rows=len(rendered.get("eval", {"id": []})["id"]),
                  num_dropped_overflow=counts["dropped_overflow"], num_truncated=counts["truncated"],
                  num_parity_checked=counts["parity_checked"],
                  longest_row=max(len(ids) for ids in rendered["train"]["input_ids"]), length_stats=stats, histogram_path=histogram.name)

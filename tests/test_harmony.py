"""The harmony step against openai-harmony itself, on every valid row of the bundled fixture."""
import datetime
import json

import datasets
import pytest
from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, RenderConversationConfig, Role,
                            SystemContent)

from steps import fetch, harmony
from steps.contract import execute, read_output
from steps.model import ModelConfig
from steps.tokenizer import build_offline_tokenizer, harmony_encoding
from steps.tracking import NullTracker

pytestmark = pytest.mark.unit

DATE = "2025-06-28"
MODEL = ModelConfig(name="random", tokenizer="o200k-offline")
CONTROL_MIN_ID = 199998
KEEP_ANALYSIS = RenderConversationConfig(auto_drop_analysis=False)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    out = tmp_path_factory.mktemp("fetch")
    execute("fetch", fetch.Config(dataset="bundled"), out_dir=out)
    return out


@pytest.fixture(scope="module")
def rows(fetched):
    return [json.loads(line) for line in open(read_output(fetched)["train_path"], encoding="utf-8")]


@pytest.fixture(scope="module")
def tok():
    return build_offline_tokenizer()


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


def reference(row, effort):
    """openai-harmony's own objects for a fixture row, built here independently of the step's code."""
    effort_enum = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}[effort]
    system = SystemContent.new().with_reasoning_effort(effort_enum).with_conversation_start_date(DATE)
    msgs = [Message.from_role_and_content(Role.SYSTEM, system)]
    turns = row["messages"]
    assert turns[0]["role"] == "system"
    msgs.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(turns[0]["content"])))
    for m in turns[1:-1]:
        role = Role.USER if m["role"] == "user" else Role.ASSISTANT
        msg = Message.from_role_and_content(role, m["content"])
        msgs.append(msg.with_channel("final") if role == Role.ASSISTANT else msg)
    prompt = list(msgs)
    msgs.append(Message.from_role_and_content(Role.ASSISTANT, turns[-1]["thinking"]).with_channel("analysis"))
    msgs.append(Message.from_role_and_content(Role.ASSISTANT, turns[-1]["content"]).with_channel("final"))
    return Conversation.from_messages(msgs), Conversation.from_messages(prompt)


def spans(mask):
    """(start, stop) of each run of 1s."""
    out, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_parity_every_fixture_row_with_openai_harmony(rows, tok, enc):
    renderer = harmony.HarmonyRenderer(tok)
    num_identical = 0
    for row in rows:
        effort = row["reasoning_effort"] or "medium"
        ids, mask = renderer.render(row["messages"], effort=effort, current_date=DATE, loss_on="last_assistant")
        full, prompt = reference(row, effort)
        expected = enc.render_conversation_for_training(full, KEEP_ANALYSIS)
        assert ids == expected, f"row {row['id']} differs from openai-harmony"
        # The loss covers exactly what the model generates after openai-harmony's completion prompt.
        prefix = enc.render_conversation_for_completion(prompt, Role.ASSISTANT, KEEP_ANALYSIS)
        assert ids[:len(prefix)] == prefix
        assert mask == [0] * len(prefix) + [1] * (len(ids) - len(prefix)), row["id"]
        last = row["messages"][-1]
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == (
            f"<|channel|>analysis<|message|>{last['thinking']}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{last['content']}<|return|>")
        num_identical += 1
    print(f"\nharmony parity: {num_identical}/{len(rows)} fixture conversations token-identical to openai-harmony, masks checked")
    assert num_identical == len(rows) >= 100


def test_loss_on_all_assistant_trains_earlier_final_messages(rows, tok):
    renderer = harmony.HarmonyRenderer(tok)
    multi = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    assert len(multi) >= 10
    for row in multi:
        ids, mask = renderer.render(row["messages"], effort="medium", current_date=DATE, loss_on="all_assistant")
        last_ids, last_mask = renderer.render(row["messages"], effort="medium", current_date=DATE, loss_on="last_assistant")
        assert ids == last_ids
        found = spans(mask)
        assert len(found) == 2 and found[-1] == spans(last_mask)[0]
        earlier = row["messages"][2]
        assert tok.decode(ids[found[0][0]:found[0][1]]) == f"<|channel|>final<|message|>{earlier['content']}<|end|>"
        assert tok.decode(ids[found[0][0] - 2:found[0][0]]) == "<|start|>assistant"  # the header stays a prompt


def test_literal_control_token_text_in_user_content_stays_text(rows, tok, enc):
    row = next(r for r in rows if "<|end|>" in r["messages"][1]["content"])
    ids, _ = harmony.HarmonyRenderer(tok).render(row["messages"], effort="medium", current_date=DATE, loss_on="last_assistant")
    user_header = tok.encode("<|start|>user<|message|>", add_special_tokens=False)
    start = next(i for i in range(len(ids)) if ids[i:i + len(user_header)] == user_header) + len(user_header)
    stop = ids.index(tok.convert_tokens_to_ids("<|end|>"), start)
    assert all(t < CONTROL_MIN_ID for t in ids[start:stop])
    assert tok.decode(ids[start:stop]) == row["messages"][1]["content"]
    assert ids[start:stop] == enc.encode(row["messages"][1]["content"], disallowed_special=())


def _run(fetched, tmp_path, **overrides):
    cfg = harmony.Config(model=MODEL, current_date=DATE, **overrides)
    return harmony.run(cfg, out_dir=tmp_path, inputs={"fetch": fetched}, tracker=NullTracker())


def test_execute_writes_manifest_data_tokenizer_and_stats(fetched, rows, tmp_path):
    manifest, skipped = execute("harmony", harmony.Config(model=MODEL, current_date=DATE, reasoning_effort="high"),
                                out_dir=tmp_path, inputs={"fetch": fetched})
    assert not skipped and (tmp_path / "manifest.json").is_file()
    out = manifest["output"]
    assert out["num_rows"] == len(rows) == out["num_parity_checked"]
    ds = datasets.load_from_disk(tmp_path / out["data_dir"])
    assert sorted(ds.column_names) == ["assistant_masks", "id", "input_ids"] and len(ds) == len(rows)
    assert all(len(a) == len(b) for a, b in zip(ds["input_ids"], ds["assistant_masks"]))
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file() and (tmp_path / "token_lengths.png").stat().st_size > 1000
    stats = out["length_stats"]
    assert stats["all"]["min"] <= stats["all"]["p50"] <= stats["all"]["p95"] <= stats["all"]["max"]
    assert {"English", "French", "Japanese", "Russian"} <= set(stats["by_language"])
    # Per-row effort overrides the profile's (high here).
    tok = build_offline_tokenizer()
    for row, ids in zip(rows, ds["input_ids"]):
        assert f"Reasoning: {row['reasoning_effort'] or 'high'}\n" in tok.decode(ids[:60])
        assert f"Current date: {DATE}\n" in tok.decode(ids[:60])
    assert any(r["reasoning_effort"] for r in rows) and any(not r["reasoning_effort"] for r in rows)
    # A second run with the same inputs is skipped.
    assert execute("harmony", harmony.Config(model=MODEL, current_date=DATE, reasoning_effort="high"),
                   out_dir=tmp_path, inputs={"fetch": fetched})[1]


def test_overflow_policies(fetched, tmp_path):
    full = _run(fetched, tmp_path / "full")
    lengths = [len(x) for x in datasets.load_from_disk(tmp_path / "full" / full.data_dir)["input_ids"]]
    limit = sorted(lengths)[len(lengths) // 2]
    num_over = sum(n > limit for n in lengths)
    assert num_over > 0

    dropped = _run(fetched, tmp_path / "drop", max_length=limit, overflow="drop")
    assert (dropped.num_dropped_overflow, dropped.num_truncated, dropped.num_rows) == (num_over, 0, len(lengths) - num_over)

    cut = _run(fetched, tmp_path / "cut", max_length=limit, overflow="truncate")
    assert (cut.num_dropped_overflow, cut.num_truncated, cut.num_rows) == (0, num_over, len(lengths))
    assert max(len(x) for x in datasets.load_from_disk(tmp_path / "cut" / cut.data_dir)["input_ids"]) == limit

    with pytest.raises(ValueError, match=r"harmony\.max_length=\d+; raise harmony\.max_length"):
        _run(fetched, tmp_path / "error", max_length=limit, overflow="error")


def test_hf_stock_template_differs_only_where_documented(rows, tok):
    row = next(r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1)
    ref_ids, ref_mask = harmony.HarmonyRenderer(tok).render(row["messages"], effort="low", current_date=DATE, loss_on="all_assistant")
    ids, mask = harmony.render_hf_stock(tok, row["messages"], effort="low", loss_on="all_assistant")
    text = tok.decode(ids)
    today = datetime.date.today().isoformat()
    assert f"Current date: {today}" in text
    assert row["messages"][0]["content"] + "\n\n<|end|>" in text  # trailing blank lines in the developer message
    expected = tok.decode(ref_ids).replace(f"Current date: {DATE}", f"Current date: {today}").replace(
        row["messages"][0]["content"] + "<|end|>", row["messages"][0]["content"] + "\n\n<|end|>")
    assert text == expected
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == tok.decode([t for t, m in zip(ref_ids, ref_mask) if m])


@pytest.mark.parametrize("override, message", [
    ({"current_date": "today"}, "harmony.current_date='today'"),
    ({"overflow": "wrap"}, "harmony.overflow='wrap'"),
    ({"loss_on": "everything"}, "harmony.loss_on='everything'"),
    ({"reasoning_effort": "max"}, "harmony.reasoning_effort='max'"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        harmony.Config(model=MODEL, **{"current_date": DATE, **override})

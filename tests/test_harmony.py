"""The harmony step against openai-harmony itself, on every valid row of the bundled fixture."""
import datetime
import json
import re

import datasets
import pytest
from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort, RenderConversationConfig,
                            Role, SystemContent, ToolDescription)

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
def all_rows(fetched):
    return [json.loads(line) for line in open(read_output(fetched)["train_path"], encoding="utf-8")]


@pytest.fixture(scope="module")
def rows(all_rows):
    """The Multilingual-Thinking-shaped rows."""
    return [r for r in all_rows if not r["tools"]]


@pytest.fixture(scope="module")
def tool_rows(all_rows):
    """The bundled tool-calling conversations, plus parallel calls (which the stock template cannot render)."""
    parallel = {"id": "tools-parallel-calls", "tools": next(r["tools"] for r in all_rows if r["id"] == "tools-two-calls"),
                "reasoning_effort": "high", "messages": [
                    {"role": "user", "content": "Weather in Madrid and Porto?", "thinking": None},
                    {"role": "assistant", "content": "", "thinking": "Two cities: two calls at once.", "tool_calls": [
                        {"name": "get_weather", "arguments": '{"city":"Madrid"}'}, {"name": "get_weather", "arguments": '{"city":"Porto"}'}]},
                    {"role": "tool", "name": "get_weather", "content": "Madrid: 30 °C", "thinking": None},
                    {"role": "tool", "name": "get_weather", "content": "Porto: 22 °C", "thinking": None},
                    {"role": "assistant", "content": "Madrid 30 °C, Porto 22 °C.", "thinking": None}]}
    return [r for r in all_rows if r["tools"]] + [parallel]


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
    renderer = harmony.HarmonyRenderer(tok, enc)
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


def test_loss_on_all_assistant_trains_earlier_final_messages(rows, tok, enc):
    renderer = harmony.HarmonyRenderer(tok, enc)
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
    ids, _ = harmony.HarmonyRenderer(tok, enc).render(row["messages"], effort="medium", current_date=DATE, loss_on="last_assistant")
    user_header = tok.encode("<|start|>user<|message|>", add_special_tokens=False)
    start = next(i for i in range(len(ids)) if ids[i:i + len(user_header)] == user_header) + len(user_header)
    stop = ids.index(tok.convert_tokens_to_ids("<|end|>"), start)
    assert all(t < CONTROL_MIN_ID for t in ids[start:stop])
    assert tok.decode(ids[start:stop]) == row["messages"][1]["content"]
    assert ids[start:stop] == enc.encode(row["messages"][1]["content"], disallowed_special=())


def tool_reference(row, effort):
    """openai-harmony's objects for a chat-format row with tools, built here independently of the step's code."""
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize())).with_conversation_start_date(DATE)
    developer = DeveloperContent.new().with_function_tools(
        [ToolDescription.new(t["name"], t["description"], parameters=t["parameters"]) for t in row["tools"]])
    turns = row["messages"]
    if turns[0]["role"] == "system":
        developer = developer.with_instructions(turns[0]["content"])
        turns = turns[1:]
    msgs = [Message.from_role_and_content(Role.SYSTEM, system), Message.from_role_and_content(Role.DEVELOPER, developer)]
    last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
    for i, m in enumerate(turns):
        if m["role"] == "user":
            msgs.append(Message.from_role_and_content(Role.USER, m["content"]))
        elif m["role"] == "tool":
            msgs.append(Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{m['name']}"), m["content"])
                        .with_channel("commentary").with_recipient("assistant"))
        else:
            if i > last_user and m["thinking"]:
                msgs.append(Message.from_role_and_content(Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
            for call in m.get("tool_calls", []):
                msgs.append(Message.from_role_and_content(Role.ASSISTANT, call["arguments"]).with_channel("commentary")
                            .with_recipient(f"functions.{call['name']}").with_content_type("<|constrain|>json"))
            if not m.get("tool_calls"):
                msgs.append(Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel("final"))
    return msgs


def expected_loss_spans(enc, msgs):
    """Where the loss must be, from openai-harmony alone: each stretch the model generates after the last user message
    starts after a completion prompt (`<|start|>assistant` following the user or a tool result or a call) and runs
    through the <|call|> or <|return|> that stops generation."""
    last_user = max(k for k, m in enumerate(msgs) if m.author.role == Role.USER)
    spans_out = []
    for k in range(last_user + 1, len(msgs)):
        if msgs[k].author.role != Role.ASSISTANT or msgs[k - 1].channel == "analysis":
            continue
        start = len(enc.render_conversation_for_completion(Conversation.from_messages(msgs[:k]), Role.ASSISTANT, KEEP_ANALYSIS))
        stop_at = next(j for j in range(k, len(msgs)) if msgs[j].recipient or j == len(msgs) - 1)
        stop = len(enc.render_conversation_for_training(Conversation.from_messages(msgs[:stop_at + 1]), KEEP_ANALYSIS))
        spans_out.append((start, stop))
    return spans_out


def marked(tok, ids, mask):
    """The decoded rendering with each loss span in [[ ]]."""
    text, prev = "", 0
    for start, stop in spans(mask):
        text += tok.decode(ids[prev:start]) + "[[" + tok.decode(ids[start:stop]) + "]]"
        prev = stop
    return text + tok.decode(ids[prev:])


def test_parity_tool_conversations_with_openai_harmony_masks_span_by_span(tool_rows, tok, enc):
    renderer = harmony.HarmonyRenderer(tok, enc)
    assert {"tools-single-call", "tools-two-calls", "tools-last-turn-call", "tools-non-latin", "tools-no-thinking",
            "tools-control-text", "tools-ends-in-call", "tools-parallel-calls"} <= {r["id"] for r in tool_rows}
    num_checked = 0
    for row in tool_rows:
        effort = row["reasoning_effort"] or "medium"
        ids, mask = renderer.render(row["messages"], tools=row["tools"], effort=effort, current_date=DATE, loss_on="last_assistant")
        msgs = tool_reference(row, effort)
        assert ids == enc.render_conversation_for_training(Conversation.from_messages(msgs), KEEP_ANALYSIS), row["id"]
        assert spans(mask) == expected_loss_spans(enc, msgs), row["id"]
        # What is learned: the trained stretches hold every call of the last turn and nothing of a tool result.
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        last_user = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
        for m in row["messages"][last_user:]:
            for call in m.get("tool_calls", []):
                assert f" to=functions.{call['name']}<|channel|>commentary <|constrain|>json<|message|>{call['arguments']}<|call|>" in trained
        assert not any(m["content"] in trained for m in row["messages"] if m["role"] == "tool")
        num_checked += 1
    two_calls = next(r for r in tool_rows if r["id"] == "tools-two-calls")
    ids, mask = renderer.render(two_calls["messages"], tools=two_calls["tools"], effort="medium", current_date=DATE, loss_on="last_assistant")
    text = marked(tok, ids, mask)
    print(f"\ntool parity: {num_checked}/{len(tool_rows)} tool conversations token-identical to openai-harmony, loss spans "
          f"checked against its completion prompts\n--- tools-two-calls, loss spans in [[ ]]:\n{text[text.index('<|start|>user'):]}")
    assert num_checked == len(tool_rows)
    assert text.count("[[") == 3 and text.endswith("<|return|>]]")
    assert "<|start|>assistant[[ to=functions.get_weather" not in text  # one span holds analysis + call, as generated


def test_earlier_turn_calls_keep_their_call_lose_their_analysis_and_train_only_with_all_assistant(tool_rows, tok, enc):
    row = next(r for r in tool_rows if r["id"] == "tools-earlier-turn-call")
    renderer = harmony.HarmonyRenderer(tok, enc)
    ids, mask = renderer.render(row["messages"], tools=row["tools"], effort="medium", current_date=DATE, loss_on="last_assistant")
    text = tok.decode(ids)
    assert row["messages"][2]["thinking"] not in text and '<|constrain|>json<|message|>{"city": "Rome"}<|call|>' in text
    assert len(spans(mask)) == 1
    all_ids, all_mask = renderer.render(row["messages"], tools=row["tools"], effort="medium", current_date=DATE, loss_on="all_assistant")
    assert all_ids == ids
    found = [tok.decode(ids[a:b]) for a, b in spans(all_mask)]
    assert found[:2] == [' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Rome"}<|call|>',
                         "<|channel|>final<|message|>Rome is at 27 °C.<|end|>"] and len(found) == 3


def test_literal_control_token_text_in_tool_results_stays_text(tool_rows, tok, enc):
    row = next(r for r in tool_rows if r["id"] == "tools-control-text")
    ids, _ = harmony.HarmonyRenderer(tok, enc).render(row["messages"], tools=row["tools"], effort="medium", current_date=DATE,
                                                      loss_on="last_assistant")
    for m in (row["messages"][1], row["messages"][3]):  # the user's text and the tool's result
        assert "<|" in m["content"]
        body = enc.encode(m["content"], disallowed_special=())
        assert all(t < CONTROL_MIN_ID for t in body)
        assert any(ids[k:k + len(body)] == body for k in range(len(ids))), m["role"]


def test_hf_stock_template_on_tool_conversations_differs_only_where_documented(tool_rows, tok, enc):
    today = datetime.date.today().isoformat()
    renderer = harmony.HarmonyRenderer(tok, enc)
    for row in tool_rows:
        if row["id"] == "tools-parallel-calls":
            with pytest.raises(ValueError, match="renders only the first tool call.*harmony.template=openai-harmony"):
                harmony.render_hf_stock(tok, row["messages"], tools=row["tools"], effort="medium", loss_on="last_assistant")
            continue
        ref_ids, ref_mask = renderer.render(row["messages"], tools=row["tools"], effort="medium", current_date=DATE, loss_on="last_assistant")
        ids, mask = harmony.render_hf_stock(tok, row["messages"], tools=row["tools"], effort="medium", loss_on="last_assistant")

        def documented(text, *, whole):
            if row["messages"][-1].get("tool_calls") is None:  # analysis beside a call is dropped once a final follows
                text = re.sub(r"<\|channel\|>analysis<\|message\|>[^<]*<\|end\|><\|start\|>assistant(?= to=)", "", text)
            text = text.replace(" <|constrain|>json<|message|>", " json<|message|>")  # "json" as text, no <|constrain|>
            if whole:
                text = text.replace(f"Current date: {DATE}", f"Current date: {today}")
                text = text.replace("// default: celsius\n", "// default: celsius,\n")  # a comma after an enum's default
                for m in row["messages"]:  # results written as JSON strings (tojson)
                    if m["role"] == "tool":
                        text = text.replace(f"<|message|>{m['content']}<|end|>", f"<|message|>{json.dumps(m['content'], ensure_ascii=False)}<|end|>")
            return text

        assert tok.decode(ids) == documented(tok.decode(ref_ids), whole=True), row["id"]
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        assert trained == documented(tok.decode([t for t, m in zip(ref_ids, ref_mask) if m]), whole=False), row["id"]


def _run(fetched, tmp_path, **overrides):
    cfg = harmony.Config(model=MODEL, current_date=DATE, **overrides)
    return harmony.run(cfg, out_dir=tmp_path, inputs={"fetch": fetched}, tracker=NullTracker())


def test_execute_writes_manifest_data_tokenizer_and_stats(fetched, all_rows, tool_rows, tmp_path):
    rows = all_rows
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
    assert stats["with_tools"]["num"] == len(tool_rows) - 1 and stats["with_tools"]["max"] <= stats["all"]["max"]
    # Per-row effort overrides the profile's (high here).
    tok = build_offline_tokenizer()
    for row, ids in zip(rows, ds["input_ids"]):
        assert f"Reasoning: {row['reasoning_effort'] or 'high'}\n" in tok.decode(ids[:60])
        assert f"Current date: {DATE}\n" in tok.decode(ids[:60])
    assert any(r["reasoning_effort"] for r in rows) and any(not r["reasoning_effort"] for r in rows)
    # A second run with the same inputs is skipped.
    assert execute("harmony", harmony.Config(model=MODEL, current_date=DATE, reasoning_effort="high"),
                   out_dir=tmp_path, inputs={"fetch": fetched})[1]


def test_overflow_policies(fetched, tool_rows, tmp_path):
    full = _run(fetched, tmp_path / "full")
    data = datasets.load_from_disk(tmp_path / "full" / full.data_dir)
    lengths = [len(x) for x in data["input_ids"]]
    limit = sorted(lengths)[len(lengths) // 2]
    over = [i for i, n in enumerate(lengths) if n > limit]
    # Truncation keeps a row only when a trained token is left; a long tool namespace can fill the limit by itself.
    num_cut = sum(any(data["assistant_masks"][i][:limit]) for i in over)
    tool_ids = {r["id"] for r in tool_rows}
    assert len(over) > num_cut > 0 and any(data["id"][i] in tool_ids for i in over)

    dropped = _run(fetched, tmp_path / "drop", max_length=limit, overflow="drop")
    assert (dropped.num_dropped_overflow, dropped.num_truncated, dropped.num_rows) == (len(over), 0, len(lengths) - len(over))

    cut = _run(fetched, tmp_path / "cut", max_length=limit, overflow="truncate")
    assert (cut.num_dropped_overflow, cut.num_truncated, cut.num_rows) == (len(over) - num_cut, num_cut, len(lengths) - len(over) + num_cut)
    assert max(len(x) for x in datasets.load_from_disk(tmp_path / "cut" / cut.data_dir)["input_ids"]) == limit

    with pytest.raises(ValueError, match=r"harmony\.max_length=\d+; raise harmony\.max_length"):
        _run(fetched, tmp_path / "error", max_length=limit, overflow="error")


def test_hf_stock_template_differs_only_where_documented(rows, tok, enc):
    row = next(r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1)
    ref_ids, ref_mask = harmony.HarmonyRenderer(tok, enc).render(row["messages"], effort="low", current_date=DATE, loss_on="all_assistant")
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

"""The fetch step on local data: formats, malformed rows, the split, and the errors a user sees."""
import json

import datasets
import pytest

from steps import fetch
from steps.contract import execute
from steps.tracking import NullTracker

pytestmark = pytest.mark.unit

FIXTURE_DROPS = {"bad_reasoning_effort": 1, "empty_assistant_content": 1, "no_assistant_turn": 1, "no_messages": 1,
                 "tool_arguments_not_json_object": 1, "tool_parameters_not_object_schema": 1, "tool_result_without_call": 1,
                 "unknown_role": 1, "unknown_tool": 1, "wrong_type": 2}


def _run(tmp_path, **cfg):
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return fetch.run(fetch.Config(**cfg), out_dir=out, inputs={}, tracker=NullTracker())


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _valid_rows():
    rows = _read(fetch.BUNDLED)
    return [r for r in rows if fetch.check_row(r) is None]


def test_bundled_fixture_counts_malformed_rows_by_reason(tmp_path):
    out = _run(tmp_path, dataset="bundled")
    assert out.num_dropped == FIXTURE_DROPS
    assert out.num_train == len(_valid_rows()) >= 100 and out.num_eval == 0 and out.eval_path == ""
    assert out.revision.startswith("sha256:") and len(out.revision) == len("sha256:") + 64
    assert out.train_path == "train.jsonl", "outputs record files relative to the step's out dir"
    kept = _read(tmp_path / "out" / out.train_path)
    assert [r["id"] for r in kept] == [r["id"] for r in _valid_rows()]
    assert {r["reasoning_effort"] for r in kept} == {None, "low", "medium", "high"}
    assert len({r["reasoning_language"] for r in kept}) >= 6
    with_tools = [r for r in kept if r["tools"]]
    assert len(with_tools) >= 8 and all(r["reasoning_language"] is None for r in with_tools)


def test_split_is_deterministic_by_seed(tmp_path):
    a = _run(tmp_path / "a", dataset="bundled", eval_fraction=0.2, seed=7)
    b = _run(tmp_path / "b", dataset="bundled", eval_fraction=0.2, seed=7)
    c = _run(tmp_path / "c", dataset="bundled", eval_fraction=0.2, seed=8)
    ids = lambda out, d: ([r["id"] for r in _read(d / "out" / out.train_path)], [r["id"] for r in _read(d / "out" / out.eval_path)])
    assert ids(a, tmp_path / "a") == ids(b, tmp_path / "b") and ids(a, tmp_path / "a") != ids(c, tmp_path / "c")
    train, evals = ids(a, tmp_path / "a")
    assert a.num_eval == len(evals) == round(0.2 * len(_valid_rows())) and not set(train) & set(evals)


def test_parquet_and_save_to_disk_give_the_same_rows_and_make_ids(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("id", "reasoning_effort")} for r in _valid_rows()[:20]]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    outs = [_run(tmp_path / name, dataset=str(tmp_path / path))
            for name, path in (("p", "rows.parquet"), ("s", "saved"), ("d", "saved_dict"))]
    kept = [_read(tmp_path / name / "out" / o.train_path) for name, o in zip("psd", outs)]
    assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 20
    assert [r["id"] for r in kept[0]][:2] == ["row-000000", "row-000001"]
    assert kept[0][0]["messages"] == rows[0]["messages"]
    assert outs[0].revision != outs[1].revision and all(o.revision.startswith("sha256:") for o in outs)


def test_execute_writes_manifest(tmp_path):
    manifest, skipped = execute("fetch", fetch.Config(dataset="bundled", eval_fraction=0.1), out_dir=tmp_path)
    assert not skipped and (tmp_path / "manifest.json").is_file() and (tmp_path / "eval.jsonl").is_file()
    assert manifest["output"]["num_dropped"] == FIXTURE_DROPS


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"data\.dataset=.*nope\.jsonl does not exist"):
        _run(tmp_path, dataset=str(tmp_path / "nope.jsonl"))


def test_file_without_valid_rows_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad = [r for r in _read(fetch.BUNDLED) if fetch.check_row(r) is not None]
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(ValueError, match=r"has no valid rows \(11 read, dropped by reason: .*'no_messages': 1"):
        _run(tmp_path, dataset=str(path))


def test_missing_messages_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "cols.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "messages"}) + "\n" for r in _valid_rows()[:3]))
    with pytest.raises(ValueError, match=r"lacks the column messages; each row needs messages"):
        _run(tmp_path, dataset=str(path))


def test_unreadable_file_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_valid_rows()[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        _run(tmp_path, dataset=str(path))
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match=r"cannot be read as Parquet"):
        _run(tmp_path, dataset=str(parquet))


@pytest.mark.parametrize("row_patch, reason", [
    ({"messages": None}, "no_messages"),
    ({"messages": [{"role": "user", "content": "Hi", "thinking": None}]}, "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}, "empty_assistant_content"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "y"}]}, "wrong_type"),
    ({"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "Hi"}]}, "last_turn_not_assistant"),
    ({"reasoning_effort": "extreme"}, "bad_reasoning_effort"),
    ({"reasoning_language": 3}, "wrong_type"),
])
def test_check_row_reasons(row_patch, reason):
    assert fetch.check_row(_valid_rows()[0]) is None
    assert fetch.check_row({**_valid_rows()[0], **row_patch}) == reason


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"data\.eval_fraction=1\.5"):
        fetch.Config(eval_fraction=1.5)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(name="get_weather", arguments='{"city": "Paris"}', **extra):
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **extra}


def _tool_row(*, tools=(WEATHER,), call=None, result=None, **patch):
    """A plain OpenAI chat-format row (no Multilingual-Thinking columns): user, call, result, final."""
    return {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "thinking": "I need the weather.", "tool_calls": [call or _call()]},
                         result or {"role": "tool", "name": "get_weather", "content": '{"temp_c": 21}'},
                         {"role": "assistant", "content": "It is 21 °C in Paris."}],
            "tools": list(tools) if tools is not None else None, **patch}


MALFORMED_TOOL_ROWS = {
    "unknown_tool": _tool_row(call=_call(name="get_time")),
    "tool_arguments_not_json_object": _tool_row(call=_call(arguments='["Paris"]')),
    "tool_result_without_call": _tool_row(result={"role": "tool", "name": "get_time", "content": "12:00"}),
    "tool_parameters_not_object_schema": _tool_row(
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "string"}}}]),
    "bad_tool_definition": _tool_row(tools=[{"type": "function", "function": {"name": "get weather!"}}]),
    "content_beside_tool_calls": _tool_row(call=None) | {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [_call()]},
        {"role": "tool", "name": "get_weather", "content": "21"}, {"role": "assistant", "content": "21 °C."}]},
}


def test_plain_chat_rows_with_tools_are_kept_and_normalised(tmp_path):
    rows = [
        _tool_row(),
        # Arrow-style: tools as JSON text, arguments as an object, the result named by its call's id only.
        _tool_row(tools=None, call=_call(arguments={"city": "Zürich"}, id="call_1"),
                  result={"role": "tool", "tool_call_id": "call_1", "content": "21"}) | {"tools": json.dumps([WEATHER])},
        # A conversation may end with the call itself.
        {"messages": _tool_row()["messages"][:2], "tools": [WEATHER], "reasoning_effort": "low", "id": "ends-in-call"},
    ]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = _run(tmp_path, dataset=str(path))
    assert out.num_train == 3 and out.num_dropped == {}
    kept = _read(tmp_path / "out" / out.train_path)
    assert kept[0]["messages"][1] == {"role": "assistant", "content": "", "thinking": "I need the weather.",
                                      "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]}
    assert kept[0]["messages"][2] == {"role": "tool", "content": '{"temp_c": 21}', "thinking": None, "name": "get_weather"}
    assert kept[0]["tools"] == [{"name": "get_weather", "description": "Current weather in a city.",
                                 "parameters": WEATHER["function"]["parameters"]}]
    assert kept[0]["reasoning_language"] is None and kept[0]["id"] == "row-000000"
    assert kept[1]["messages"][1]["tool_calls"][0]["arguments"] == '{"city": "Zürich"}'
    assert kept[1]["messages"][2]["name"] == "get_weather" and kept[1]["tools"] == kept[0]["tools"]
    assert kept[2]["id"] == "ends-in-call" and kept[2]["messages"][-1]["tool_calls"]


def test_every_malformed_tool_case_is_dropped_with_its_reason(tmp_path):
    for reason, row in MALFORMED_TOOL_ROWS.items():
        assert fetch.check_row(row) == reason, reason
    path = tmp_path / "bad-tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [_tool_row(), *MALFORMED_TOOL_ROWS.values()]))
    out = _run(tmp_path, dataset=str(path))
    print(f"\nmalformed tool rows dropped by reason: {out.num_dropped}")
    assert out.num_train == 1 and out.num_dropped == {reason: 1 for reason in MALFORMED_TOOL_ROWS}

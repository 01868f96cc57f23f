"""The smoke step against a real `transformers serve` process on loopback, serving a tiny gpt-oss with the real tokenizer.

A random-weight model never opens a Harmony channel, so nothing it says reaches `content` or `reasoning_content`.
The model here is wired by hand instead: attention and expert outputs are zeroed, so the residual stream is the
current token's embedding and the model is a bigram table that answers every prompt with one fixed, well-formed
Harmony completion (English reasoning, then <|return|>). Real parsing, streaming and stopping then happen in the server.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from steps import smoke
from steps.contract import write_json_atomic
from steps.tracking import NullTracker

REASONING = "User asks which city is Australia's capital: Canberra."


def _bigram_model(tokenizer, *, completion_ids: list[int], start_id: int):
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        num_hidden_layers=2, hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tokenizer),
        layer_types=["sliding_attention", "full_attention"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[200002, 199999, 200012], pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GptOssForCausalLM(config)
    transitions = list(zip([start_id, *completion_ids[:-1]], completion_ids))
    sources = [src for src, _ in transitions]
    assert len(set(sources)) == len(sources) <= config.hidden_size, "a bigram table needs distinct source tokens"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.self_attn.o_proj.bias.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.experts.down_proj_bias.zero_()
        model.lm_head.weight.zero_()
        for k, (src, dst) in enumerate(transitions):
            model.model.embed_tokens.weight[src] = torch.nn.functional.one_hot(torch.tensor(k), config.hidden_size)
            model.lm_head.weight[dst, k] = 10.0  # after the final RMSNorm the one-hot is 8.0: a logit of 80 vs 0
    return model


@pytest.fixture(scope="module")
def merge_dir(tmp_path_factory) -> Path:
    """A finished merge step's out dir holding the hand-wired model, the offline tokenizer and the response schema."""
    from trl.chat_template_utils import add_response_schema

    from steps.tokenizer import build_offline_tokenizer

    tokenizer = add_response_schema(build_offline_tokenizer())
    assert tokenizer.response_template is not None
    completion = f"<|channel|>analysis<|message|>{REASONING}<|end|><|return|>"
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    model = _bigram_model(tokenizer, completion_ids=completion_ids, start_id=prompt_ids[-1])
    out = tmp_path_factory.mktemp("merge")
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_json_atomic(out / "manifest.json", {"step": "merge", "fingerprint": "test", "output": {"model_dir": "model"}})
    return out


def _server_gone(report: dict) -> bool:
    try:
        os.killpg(report["server_pid"], 0)
    except ProcessLookupError:
        return True
    return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


@pytest.mark.integration
def test_smoke_passes_against_transformers_serve(merge_dir, tmp_path):
    cfg = smoke.Config(backend="transformers", port=0, languages=["English", "French"], max_tokens=48,
                       check_language=False, startup_timeout_s=180, request_timeout_s=120)

    out = smoke.run(cfg, out_dir=tmp_path, inputs={"merge": merge_dir}, tracker=NullTracker())

    report = json.loads((tmp_path / out.report_path).read_text())
    assert out.num_failed == 0 and out.num_checks == report["num_checks"] >= 12
    assert {c["name"] for c in report["checks"]} >= {"server_ready", "models_endpoint", "chat[French].reasoning_nonempty",
                                                     "chat[French].finish_reason", "stream.text_nonempty"}
    for row in report["requests"]:
        assert row["reasoning_content"] == REASONING  # the server's gpt-oss parser split the analysis channel off
        assert row["finish_reason"] == "stop"
    assert REASONING in report["stream"]["text"]
    assert out.tokens_per_s > 0 and out.mean_latency_s > 0
    assert "| chat[English].http_200 | pass |" in (tmp_path / out.report_md_path).read_text()
    assert _server_gone(report) and _port_free(cfg.host, report["port"])
    print(f"transformers serve ready in {out.startup_s} s; {out.tokens_per_s} completion tokens/s")


@pytest.mark.integration
def test_failed_check_raises_after_report_and_stops_server(merge_dir, tmp_path):
    # The wired model always reasons in English: asking for French must fail the language check, and the adherence
    # rate over held-out questions (English 2/2, French 0/2) must fall below the 75% asked for.
    # With smoke.min_languages_passing=1 the English pass carries the language checks (French's stays in the report).
    cfg = smoke.Config(backend="transformers", port=0, languages=["English", "French"], max_tokens=48,
                       check_language=True, min_languages_passing=1, adherence_prompts=2, min_language_adherence=0.75,
                       startup_timeout_s=180, request_timeout_s=120)

    with pytest.raises(ValueError, match=r"failed 1/\d+ checks: language_adherence \(language_adherence: 50% of 4 held-out "
                                         r"questions reasoned in the requested language .*\); see .*report\.md") as err:
        smoke.run(cfg, out_dir=tmp_path, inputs={"merge": merge_dir}, tracker=NullTracker())
    print(f"\nthe step's one line: {err.value}")

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_failed"] == 1 and [r["detected_language"] for r in report["requests"]] == ["en", "en"]
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["chat[French].reasoning_language"]["passed"] and checks["chat[French].reasoning_language"]["counts"] is False
    assert checks["reasoning_languages"]["passed"] and checks["reasoning_languages"]["detail"].startswith("1/2 languages")
    assert report["metrics"]["languages_passing"] == 1
    metrics = report["metrics"]
    assert {k: metrics[k] for k in ("language_adherence", "language_adherence.English", "language_adherence.French",
                                    "adherence_num_requests")} == {"language_adherence": 0.5, "language_adherence.English": 1.0,
                                                                   "language_adherence.French": 0.0, "adherence_num_requests": 4}
    assert metrics["adherence_mean_latency_s"] > 0 and metrics["adherence_tokens_per_s"] > 0
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert [r["prompt"] for r in report["adherence"][:2]] == smoke.adherence_prompts(cfg) and cfg.prompt not in smoke.adherence_prompts(cfg)
    md = (tmp_path / "report.md").read_text()
    assert "| language_adherence | **FAIL** |" in md and "| French | 0% | 2 |" in md
    assert "| chat[French].reasoning_language | fail (see reasoning_languages) |" in md
    assert f"- reasoning: `{REASONING}`" in md and "reasoning identified as 'en'" in md
    assert (tmp_path / "server.log").stat().st_size > 0
    assert _server_gone(report) and _port_free(cfg.host, report["port"])


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent pid
            found.append(int(stat.parent.name))
    return found


_SMOKE_IN_SUBPROCESS = """
import sys
from pathlib import Path
from steps import smoke
from steps.tracking import NullTracker
cfg = smoke.Config(backend="transformers", port=0, languages=["English"], max_tokens=8, check_language=False,
                   startup_timeout_s=180, request_timeout_s=120)
smoke.run(cfg, out_dir=Path(sys.argv[1]), inputs={"merge": Path(sys.argv[2])}, tracker=NullTracker())
"""


@pytest.mark.integration
def test_server_dies_with_a_smoke_step_killed_by_sigkill(merge_dir, tmp_path):
    """kill -9 of the step (no finally runs) takes `transformers serve` with it, though the server has its own session."""
    proc = subprocess.Popen([sys.executable, "-c", _SMOKE_IN_SUBPROCESS, str(tmp_path), str(merge_dir)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = []
    try:
        deadline = time.monotonic() + 120
        while not servers:
            assert proc.poll() is None and time.monotonic() < deadline, "the smoke step never started its server"
            servers = _children(proc.pid)
            time.sleep(0.2)
        assert os.getsid(servers[0]) == servers[0], "the server runs in its own session"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while Path(f"/proc/{servers[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{servers[0]}").exists(), f"server {servers[0]} outlived its step"
    finally:
        proc.kill()
        for pid in servers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.unit
def test_a_merge_output_with_a_broken_config_is_one_line(merge_dir, tmp_path):
    broken = tmp_path / "merge"
    shutil.copytree(merge_dir, broken)
    (broken / "model" / "config.json").write_text('{"model_type": "gpt_oss",')
    r = subprocess.run([sys.executable, "-m", "flows.cli", "step", "smoke", "--config", "configs/tiny-cpu.yaml",
                        "--input", f"merge={broken}", "--out", str(tmp_path / "smoke")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"finetune: error: {broken / 'model' / 'config.json'} is not valid JSON")
    assert "Traceback" not in r.stderr


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    ({"backend": "vllm"}, "smoke.backend='vllm' is unknown"),
    ({"tp": 2}, "smoke.tp=2 needs smoke.backend=sglang"),
    ({"served_model_name": "x"}, "must look like owner/name"),
    ({"adherence_prompts": 99}, "smoke.adherence_prompts=99 must be between 0 and"),
    ({"min_languages_passing": 3, "languages": ["English", "French"]}, "must be between 0 .all. and 2"),
    ({"min_language_adherence": 0.75}, "needs smoke.adherence_prompts > 0"),
    ({"adherence_prompts": 2, "min_language_adherence": 75}, "is a rate: use 0..1"),
    ({"languages": ["Klingon"]}, "'Klingon' is not a known reasoning language"),
    ({"check_language": True, "require_reasoning": False}, "set both or neither"),
    ({"allowed_finish_reasons": ["eos"]}, "allowed_finish_reasons"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        smoke.Config(**overrides)


@pytest.mark.unit
def test_sglang_command_uses_the_gpt_oss_parsers():
    cfg = smoke.Config(backend="sglang", tp=8, served_model_name="reasoner", port=30000)
    command = smoke.server_command(cfg, model_dir=Path("/m"), model_name="reasoner", port=30000)
    assert command[1:3] == ["-m", "sglang.launch_server"]
    joined = " ".join(command)
    assert "--model-path /m --served-model-name reasoner --tp 8" in joined
    assert "--reasoning-parser gpt-oss --tool-call-parser gpt-oss" in joined


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
TOOL_CHECK = {"prompt": "What is the weather in Paris right now?", "tool": WEATHER_TOOL}
# What each hand-wired model writes after "<|start|>assistant": a call as the harmony step trains it, or a prose answer.
CALL_COMPLETION = ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
PROSE_COMPLETION = "<|channel|>final<|message|>It is sunny in Paris today.<|return|>"


def _merge_dir_answering(out: Path, completion: str) -> Path:
    """A finished merge step's out dir whose model writes `completion` after any prompt, with merge's response template."""
    from steps.tokenizer import add_response_template, build_offline_tokenizer

    tokenizer = add_response_template(build_offline_tokenizer())
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    model = _bigram_model(tokenizer, completion_ids=tokenizer.encode(completion, add_special_tokens=False),
                          start_id=prompt_ids[-1])
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_json_atomic(out / "manifest.json", {"step": "merge", "fingerprint": "test", "output": {"model_dir": "model"}})
    return out


@pytest.mark.integration
def test_tool_call_check_fails_on_a_model_answering_in_prose(tmp_path_factory, tmp_path):
    merge = _merge_dir_answering(tmp_path_factory.mktemp("prose"), PROSE_COMPLETION)
    cfg = smoke.Config(backend="transformers", port=0, languages=["English"], max_tokens=32, require_reasoning=False,
                       check_language=False, startup_timeout_s=180, request_timeout_s=120, tools=TOOL_CHECK)

    with pytest.raises(ValueError, match=r"failed 2/\d+ checks: tool_call\.called, tool_call\.finish_reason"):
        smoke.run(cfg, out_dir=tmp_path, inputs={"merge": merge}, tracker=NullTracker())

    report = json.loads((tmp_path / "report.json").read_text())
    tool_checks = [c for c in report["checks"] if c["name"].startswith("tool_call.")]
    print("\nsmoke tool-call check, model answering in prose:\n" + "\n".join(
        f"  {c['name']}: {'pass' if c['passed'] else 'FAIL'} ({c['detail']})" for c in tool_checks))
    assert [(c["name"], c["passed"]) for c in tool_checks] == [
        ("tool_call.http_200", True), ("tool_call.called", False), ("tool_call.finish_reason", False)]
    assert report["tool_call"]["content"] == "It is sunny in Paris today." and report["tool_call"]["tool_calls"] == []
    assert "'It is sunny in Paris today.'" in tool_checks[1]["detail"]
    assert "| tool_call.called | **FAIL** |" in (tmp_path / "report.md").read_text()
    assert _server_gone(report)


@pytest.mark.integration
def test_tool_call_check_passes_on_a_model_that_calls(tmp_path_factory, tmp_path):
    # This model answers every request with the call, so the step's language requests (finish_reason "tool_calls", no
    # reasoning) cannot pass: the step's own tool request runs here against the real server, started as the step does.
    merge = _merge_dir_answering(tmp_path_factory.mktemp("calls"), CALL_COMPLETION)
    cfg = smoke.Config(backend="transformers", port=0, max_tokens=32, startup_timeout_s=180, request_timeout_s=120,
                       tools=TOOL_CHECK)
    model_dir, name = merge / "model", "local/calls"
    port = smoke._free_port(cfg.host)
    env = smoke._server_env(cfg, tmp_path)
    smoke.cache_model_folder(Path(env["HF_HUB_CACHE"]), name, model_dir)
    with (tmp_path / "server.log").open("w") as log_file:
        proc = subprocess.Popen(smoke.server_command(cfg, model_dir=model_dir, model_name=name, port=port), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        smoke._wait_ready(proc, f"http://{cfg.host}:{port}/health", timeout_s=cfg.startup_timeout_s, server_log=tmp_path / "server.log")
        with httpx.Client(base_url=f"http://{cfg.host}:{port}", timeout=cfg.request_timeout_s) as client:
            row, checks = smoke._chat_tools(client, cfg, name)
    finally:
        smoke._stop(proc, cfg.stop_grace_s)
    print("\nsmoke tool-call check, model that calls:\n" + "\n".join(
        f"  {c['name']}: {'pass' if c['passed'] else 'FAIL'} ({c['detail']})" for c in checks))
    assert [c["name"] for c in checks if c["passed"]] == ["tool_call.http_200", "tool_call.called", "tool_call.finish_reason",
                                                          "tool_call.arguments_json", "tool_call.arguments_match_schema"]
    assert row["tool_calls"] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}] and row["content"] == ""


def _completion(calls=(), content=""):
    return {"choices": [{"finish_reason": "tool_calls" if calls else "stop", "message": {
        "role": "assistant", "content": content,
        "tool_calls": [{"id": f"c{k}", "type": "function", "function": {"name": n, "arguments": a}} for k, (n, a) in enumerate(calls)] or None}}],
        "usage": {"completion_tokens": 9}}


@pytest.mark.unit
@pytest.mark.parametrize("calls, failed, detail", [
    ([("get_weather", '{"city": "Paris"}')], [], "match the function's parameters"),
    ([("get_time", "{}")], ["tool_call.called"], "called 'get_time', not 'get_weather'"),
    ([("get_weather", "Paris")], ["tool_call.arguments_json"], "not JSON"),
    ([("get_weather", '["Paris"]')], ["tool_call.arguments_json"], "not a JSON object"),
    ([("get_weather", '{"town": "Paris"}')], ["tool_call.arguments_match_schema"], "'city' is a required property"),
    ([("get_weather", '{"city": 75}')], ["tool_call.arguments_match_schema"], "75 is not of type 'string' (at $.city)"),
])
def test_check_tool_call_reasons(calls, failed, detail):
    _, checks = smoke.check_tool_call(_completion(calls), WEATHER_TOOL)
    assert [c["name"] for c in checks if not c["passed"]] == failed
    assert detail in " ".join(c["detail"] for c in checks)


@pytest.mark.unit
@pytest.mark.parametrize("tools, message", [
    ({"prompt": "Weather?"}, "smoke.tools=.* must be"),
    ({"prompt": "Weather?", "tool": {"type": "function", "function": {"name": "get weather"}}}, r"smoke\.tools\.tool is unusable \(bad_tool_definition\)"),
    ({"prompt": "Weather?", "tool": {"type": "function", "function": {"name": "w", "parameters": {"type": "array"}}}},
     r"unusable \(tool_parameters_not_object_schema\)"),
])
def test_tool_check_config_errors_name_the_field(tools, message):
    with pytest.raises(ValueError, match=message):
        smoke.Config(tools=tools)


@pytest.mark.unit
def test_smoke_prompts_do_not_occur_in_the_bundled_training_data():
    """Every question a profile's smoke step asks (its prompt and the held-out adherence questions) is absent from the
    bundled data, in any message: a model passing the language checks follows the system message on questions it
    never saw."""
    from steps import fetch, profile as profiles

    asked = set(smoke.HELD_OUT_PROMPTS)
    for path in sorted(profiles.CONFIGS_DIR.glob("*.yaml")):
        cfg = profiles.step_config(profiles.load_profile(path, []), "smoke")
        asked |= {cfg.prompt, *smoke.adherence_prompts(cfg)}
    trained = set()
    for line in fetch.BUNDLED.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        messages = row.get("messages") if isinstance(row.get("messages"), list) else []
        trained |= {m.get("content") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)}
        trained |= {row.get("user")}
    assert len(trained) > 100
    assert not {p.strip().lower() for p in asked} & {t.strip().lower() for t in trained if t}


@pytest.mark.integration
def test_models_endpoint_fails_when_the_server_does_not_list_the_model(merge_dir, tmp_path):
    """`transformers serve` lists only its Hub cache: started on the model folder's path, as the step did before, it
    serves the model but lists nothing, and the check says so."""
    cfg = smoke.Config(backend="transformers", port=0, startup_timeout_s=180)
    model_dir = merge_dir / "model"
    port = smoke._free_port(cfg.host)
    with (tmp_path / "server.log").open("w") as log_file:
        proc = subprocess.Popen(smoke.server_command(cfg, model_dir=model_dir, model_name=str(model_dir), port=port),
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=smoke._server_env(cfg, tmp_path))
    try:
        smoke._wait_ready(proc, f"http://{cfg.host}:{port}/health", timeout_s=cfg.startup_timeout_s, server_log=tmp_path / "server.log")
        check = smoke.check_models_listed(httpx.get(f"http://{cfg.host}:{port}/v1/models", timeout=60), str(model_dir))
    finally:
        smoke._stop(proc, cfg.stop_grace_s)
    print(f"\nmodels_endpoint against a server that does not list the model: {check}")
    assert not check["passed"] and check["detail"].startswith("HTTP 200, lists []; requests ask for")

"""finetune step smoke --config configs/tiny-cpu.yaml --input merge=DIR --out DIR2

Serve the merged model (SGLang on GPU, `transformers serve` on CPU) and check it over the OpenAI-compatible API:
readiness, /v1/models, one chat completion per reasoning language, one streaming request, and with `smoke.tools` one
request with a tool that must come back as a call to it. Writes report.json and report.md, always stops the server, and
fails when any check fails.
"""
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from steps.contract import read_output, write_json_atomic
from steps.tracking import Tracker

log = logging.getLogger("finetune")

INPUTS = ("merge",)
BACKENDS = ("transformers", "sglang")
FINISH_REASONS = ("stop", "length")
# Control tokens of the Harmony format: a reasoning parser that works never lets one reach the client.
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")
# Reasoning-language names (as in Multilingual-Thinking's `reasoning_language`) -> py3langid codes.
LANGUAGE_CODES = {
    "English": "en", "French": "fr", "Spanish": "es", "German": "de", "Italian": "it", "Portuguese": "pt",
    "Dutch": "nl", "Russian": "ru", "Japanese": "ja", "Chinese": "zh", "Korean": "ko", "Arabic": "ar",
    "Hindi": "hi", "Turkish": "tr", "Polish": "pl",
}
READY_PATH = {"transformers": "/health", "sglang": "/health_generate"}


@dataclass(frozen=True, kw_only=True)
class Config:
    backend: str = "transformers"
    """Server: "sglang" (GPU, production) or "transformers" (`transformers serve`, runs on CPU)."""
    host: str = "127.0.0.1"
    """Address the server listens on and the checks call."""
    port: int = 8000
    """Port of the server; 0 picks a free one at start."""
    served_model_name: str = ""
    """Model name the API serves (sglang only); empty: the model folder's path, the only name `transformers serve` accepts."""
    tp: int = 1
    """Tensor-parallel size (sglang --tp); `transformers serve` runs on one device."""
    device: str = "cpu"
    """Device of `transformers serve` (--device); sglang picks its GPUs itself."""
    startup_timeout_s: float = 600.0
    """Seconds to wait for the server to load the model and answer its readiness endpoint."""
    request_timeout_s: float = 300.0
    """Seconds one chat completion may take."""
    stop_grace_s: float = 15.0
    """Seconds between SIGTERM and SIGKILL when stopping the server."""
    languages: list = field(default_factory=lambda: ["English", "French", "Spanish", "German", "Japanese"])
    """Reasoning languages to test; each request's system message is "reasoning language: <Lang>"."""
    prompt: str = "What is the capital of Australia? Explain briefly."
    """User message of every request."""
    max_tokens: int = 512
    """Completion-token limit per request."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy, so reruns give the same text)."""
    require_reasoning: bool = True
    """Each answer must carry non-empty reasoning_content (the analysis channel, split off by the reasoning parser)."""
    check_language: bool = True
    """The reasoning must be identified (py3langid) as the requested language."""
    allowed_finish_reasons: list = field(default_factory=lambda: ["stop"])
    """finish_reason values that pass. Add "length" only for models too small or too briefly trained to close their
    turn within max_tokens (a random-weight model never emits <|return|>); a real model must stop on its own."""
    tools: dict = field(default_factory=dict)
    """{prompt: ..., tool: {type: function, function: {name, description, parameters}}}: one request with that tool
    must come back with a call to it whose arguments are a JSON object matching `parameters`; {} skips the check."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"smoke.backend={self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        if self.backend == "transformers" and self.tp != 1:
            raise ValueError(f"smoke.tp={self.tp} needs smoke.backend=sglang; `transformers serve` runs on one device (set smoke.tp=1)")
        if self.tp < 1:
            raise ValueError(f"smoke.tp={self.tp} must be >= 1")
        if self.backend == "transformers" and self.served_model_name:
            raise ValueError(f"smoke.served_model_name={self.served_model_name!r}: `transformers serve` names the model by its "
                             "folder only; remove smoke.served_model_name or set smoke.backend=sglang")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"smoke.port={self.port} is not a TCP port; use 1-65535, or 0 for a free one")
        if not self.languages:
            raise ValueError("smoke.languages=[] tests nothing; list at least one reasoning language, e.g. [English]")
        unknown = [lang for lang in self.languages if lang not in LANGUAGE_CODES]
        if unknown:
            raise ValueError(f"smoke.languages: {unknown[0]!r} is not a known reasoning language; use one of {', '.join(LANGUAGE_CODES)}")
        if self.check_language and not self.require_reasoning:
            raise ValueError("smoke.check_language=true identifies the language of the reasoning, which "
                             "smoke.require_reasoning=false does not require; set both or neither")
        bad = [r for r in self.allowed_finish_reasons if r not in FINISH_REASONS]
        if bad or not self.allowed_finish_reasons:
            raise ValueError(f"smoke.allowed_finish_reasons={self.allowed_finish_reasons!r}: use a non-empty subset of {list(FINISH_REASONS)}")
        for name in ("startup_timeout_s", "request_timeout_s", "stop_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"smoke.{name}={getattr(self, name)} must be > 0")
        if self.max_tokens < 1:
            raise ValueError(f"smoke.max_tokens={self.max_tokens} must be >= 1")
        if self.tools:
            from steps.fetch import check_tool

            if set(self.tools) != {"prompt", "tool"} or not isinstance(self.tools["prompt"], str) or not self.tools["prompt"].strip():
                raise ValueError(f"smoke.tools={self.tools!r} must be {{prompt: <a request that needs the tool>, tool: "
                                 "{type: function, function: {name, description, parameters}}}, or {} to skip the tool-call check")
            if reason := check_tool(self.tools["tool"]):
                raise ValueError(f"smoke.tools.tool is unusable ({reason}): give {{type: function, function: {{name: "
                                 "[A-Za-z0-9_-]+, description, parameters: a JSON schema of type object}}")


@dataclass(frozen=True, kw_only=True)
class Output:
    report_path: str
    report_md_path: str
    server_log_path: str
    num_checks: int
    num_failed: int
    startup_s: float
    mean_latency_s: float
    tokens_per_s: float
    """Completion tokens over wall time, summed over the non-streaming requests."""
    languages: dict
    """Per language: passed, finish_reason, detected_language, latency_s, completion_tokens, tokens_per_s."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(cfg: Config, *, model_dir: Path, port: int) -> list[str]:
    # The SGLang image runs SGLang on its own Python beside our CLI's venv (images/serve.Dockerfile says which).
    python = os.environ.get("FINETUNE_SERVER_PYTHON") or sys.executable
    if cfg.backend == "sglang":
        return [python, "-m", "sglang.launch_server", "--model-path", str(model_dir),
                "--served-model-name", cfg.served_model_name or str(model_dir), "--tp", str(cfg.tp),
                "--host", cfg.host, "--port", str(port), "--reasoning-parser", "gpt-oss", "--tool-call-parser", "gpt-oss"]
    return [python, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--device", cfg.device,
            "--host", cfg.host, "--port", str(port), "--log-level", "info"]


def _server_env(cfg: Config, out_dir: Path) -> dict:
    env = dict(os.environ, HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")  # the model is a local folder
    if cfg.backend == "transformers":
        # Its /v1/models scans the Hub cache (and fails when there is none); an empty private cache makes it cheap.
        env["HF_HUB_CACHE"] = str(out_dir / "hf-hub-cache")
        (out_dir / "hf-hub-cache").mkdir(exist_ok=True)
    return env


def _log_tail(path: Path, num_lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])


def _wait_ready(proc: subprocess.Popen, url: str, *, timeout_s: float, server_log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready:\n{_log_tail(server_log)}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within smoke.startup_timeout_s={timeout_s}; raise it if the model is "
                       f"large. Last log lines:\n{_log_tail(server_log)}")


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent_pid: int):
    """preexec_fn: the kernel SIGKILLs the server when the thread that started it dies, however it dies (SIGKILL
    included), so no server outlives its step; the server runs in its own session, which a group kill misses."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only makes the call

    def set_parent_death_signal():
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the call took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return set_parent_death_signal


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    # The server runs in its own process group: SGLang's scheduler/detokenizer workers must go with it.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("smoke: server ignored SIGTERM for %.0f s; killing it", grace_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _messages(cfg: Config, language: str) -> list[dict]:
    return [{"role": "system", "content": f"reasoning language: {language}"}, {"role": "user", "content": cfg.prompt}]


def _leaked(text: str) -> list[str]:
    return [t for t in HARMONY_TOKENS if t in text]


def _chat(client: httpx.Client, cfg: Config, model_name: str, language: str) -> tuple[dict, list[dict]]:
    """One non-streaming completion; returns its result row and its checks."""
    body = {"model": model_name, "messages": _messages(cfg, language), "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature}
    started = time.monotonic()
    resp = client.post("/v1/chat/completions", json=body)
    latency_s = time.monotonic() - started
    row = {"language": language, "status": resp.status_code, "latency_s": round(latency_s, 3)}
    checks = [_check(f"chat[{language}].http_200", resp.status_code == 200, f"HTTP {resp.status_code}")]
    if resp.status_code != 200:
        row["error"] = resp.text[:500]
        return row, checks
    data = resp.json()
    choice = data["choices"][0]
    message = choice["message"]
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or ""
    tokens = data.get("usage", {}).get("completion_tokens", 0)
    row.update(finish_reason=choice.get("finish_reason"), completion_tokens=tokens,
               tokens_per_s=round(tokens / latency_s, 2), content=content, reasoning_content=reasoning)
    checks.append(_check(f"chat[{language}].finish_reason", row["finish_reason"] in cfg.allowed_finish_reasons,
                         f"{row['finish_reason']!r} (allowed: {', '.join(cfg.allowed_finish_reasons)})"))
    leaked = _leaked(content) + _leaked(reasoning)
    checks.append(_check(f"chat[{language}].no_harmony_tokens", not leaked, f"leaked {leaked}" if leaked else "clean"))
    if cfg.require_reasoning:
        checks.append(_check(f"chat[{language}].reasoning_nonempty", bool(reasoning.strip()), f"{len(reasoning)} chars"))
    if cfg.check_language:
        import py3langid  # the serve image's alone: every image imports this module to read a profile

        detected = py3langid.classify(reasoning)[0] if reasoning.strip() else None
        row["detected_language"] = detected
        expected = LANGUAGE_CODES[language]
        checks.append(_check(f"chat[{language}].reasoning_language", detected == expected,
                             f"detected {detected!r}, expected {expected!r}"))
    return row, checks


def check_tool_call(data: dict, tool: dict) -> tuple[dict, list[dict]]:
    """Checks of a chat completion (OpenAI shape, as `transformers serve` and SGLang's gpt-oss tool parser return it) that
    was asked with `tool`: it must call that function with JSON-object arguments that match the function's schema."""
    import jsonschema

    function = tool["function"]
    choice = data["choices"][0]
    message = choice["message"]
    calls = [c.get("function", {}) for c in message.get("tool_calls") or []]
    row = {"finish_reason": choice.get("finish_reason"), "tool_calls": calls, "content": message.get("content") or "",
           "completion_tokens": data.get("usage", {}).get("completion_tokens", 0)}
    call = next((c for c in calls if c.get("name") == function["name"]), None)
    if call is not None:
        detail = f"called {function['name']}"
    elif calls:
        detail = f"called {', '.join(repr(c.get('name')) for c in calls)}, not {function['name']!r}"
    else:
        detail = f"no tool call; answered {row['content'][:120]!r}"
    checks = [_check("tool_call.called", call is not None, detail),
              _check("tool_call.finish_reason", row["finish_reason"] == "tool_calls", f"{row['finish_reason']!r} (expected 'tool_calls')")]
    if call is None:
        return row, checks
    try:
        arguments = json.loads(call.get("arguments") or "")
    except json.JSONDecodeError as err:
        arguments, error = None, f"not JSON ({err.msg}): {call.get('arguments')!r}"
    else:
        error = None if isinstance(arguments, dict) else f"not a JSON object: {call['arguments']!r}"
    checks.append(_check("tool_call.arguments_json", error is None, error or call["arguments"]))
    if error is None:
        # A function without parameters takes no arguments.
        schema = function.get("parameters") or {"type": "object", "additionalProperties": False}
        problem = next(iter(jsonschema.validators.validator_for(schema)(schema).iter_errors(arguments)), None)
        checks.append(_check("tool_call.arguments_match_schema", problem is None,
                             f"{problem.message} (at {problem.json_path})" if problem else "match the function's parameters"))
    return row, checks


def _chat_tools(client: httpx.Client, cfg: Config, model_name: str) -> tuple[dict, list[dict]]:
    body = {"model": model_name, "messages": [{"role": "user", "content": cfg.tools["prompt"]}], "tools": [cfg.tools["tool"]],
            "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    started = time.monotonic()
    resp = client.post("/v1/chat/completions", json=body)
    checks = [_check("tool_call.http_200", resp.status_code == 200, f"HTTP {resp.status_code}")]
    if resp.status_code != 200:
        return {"status": resp.status_code, "error": resp.text[:500]}, checks
    row, call_checks = check_tool_call(resp.json(), cfg.tools["tool"])
    return {"status": resp.status_code, "latency_s": round(time.monotonic() - started, 3), **row}, checks + call_checks


def _chat_stream(client: httpx.Client, cfg: Config, model_name: str, language: str) -> tuple[dict, list[dict]]:
    body = {"model": model_name, "messages": _messages(cfg, language), "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature, "stream": True}
    started = time.monotonic()
    first_chunk_s, num_chunks, parts, finish_reason, status = None, 0, [], None, None
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        status = resp.status_code
        if status == 200:
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    parts.append(f"<error: {chunk['error']}>")
                    break
                first_chunk_s = first_chunk_s or time.monotonic() - started
                num_chunks += 1
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    parts.append((delta.get("reasoning_content") or "") + (delta.get("content") or ""))
                    finish_reason = choice.get("finish_reason") or finish_reason
    text = "".join(parts)
    row = {"language": language, "status": status, "latency_s": round(time.monotonic() - started, 3),
           "first_chunk_s": round(first_chunk_s, 3) if first_chunk_s else None, "num_chunks": num_chunks,
           "finish_reason": finish_reason, "text": text}
    checks = [
        _check("stream.http_200", status == 200, f"HTTP {status}"),
        _check("stream.chunks", num_chunks > 0, f"{num_chunks} chunks"),
        _check("stream.text_nonempty", bool(text.strip()), f"{len(text)} chars of reasoning+content"),
        _check("stream.no_harmony_tokens", not _leaked(text), f"leaked {_leaked(text)}" if _leaked(text) else "clean"),
    ]
    return row, checks


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _write_markdown(path: Path, report: dict) -> None:
    ready = f"server ready in {report['startup_s']} s" if report["startup_s"] is not None else "server never ready"
    lines = [f"# Smoke test: {'PASSED' if report['num_failed'] == 0 else 'FAILED'}", "",
             f"backend `{report['backend']}`, model `{report['model_dir']}`, {ready}; "
             f"{report['num_checks'] - report['num_failed']}/{report['num_checks']} checks passed", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {c['detail'].replace('|', '/')} |" for c in report["checks"]]
    lines += ["", "| language | finish | detected | latency s | tokens | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['language']} | {r.get('finish_reason')} | {r.get('detected_language', '-')} | {r['latency_s']} | "
              f"{r.get('completion_tokens', '-')} | {r.get('tokens_per_s', '-')} |" for r in report["requests"]]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    if cfg.backend == "sglang" and not Path("/dev/nvidiactl").exists():
        raise ValueError("smoke.backend=sglang needs an NVIDIA GPU and none is visible; run on a GPU machine (in Docker: "
                         "docker run --gpus all …) or set smoke.backend=transformers smoke.device=cpu (tiny models)")
    model_dir = Path(read_output(inputs["merge"])["model_dir"])
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"merge output {model_dir} holds no config.json; rerun the merge step (--out {inputs['merge']})")
    try:
        json.loads((model_dir / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{model_dir / 'config.json'} is not valid JSON ({e}); rerun the merge step "
                         f"(--out {inputs['merge']})") from None
    model_name = cfg.served_model_name or str(model_dir)
    # An MXFP4 export (merge.export=mxfp4) is served as is: SGLang runs its experts in MXFP4, transformers on a CPU
    # dequantizes them on load.
    weights_format = (json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}).get(
        "quant_method", "unquantized")
    port = cfg.port or _free_port(cfg.host)
    base_url = f"http://{cfg.host}:{port}"
    server_log = out_dir / "server.log"
    checks, requests, startup_s, stream_row, tool_row = [], [], None, None, None
    command = server_command(cfg, model_dir=model_dir, port=port)
    log.info("smoke: starting %s (%s weights)", " ".join(command), weights_format)
    with server_log.open("w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_server_env(cfg, out_dir), preexec_fn=_die_with(os.getpid()))
    try:
        try:
            startup_s = round(_wait_ready(proc, base_url + READY_PATH[cfg.backend], timeout_s=cfg.startup_timeout_s,
                                          server_log=server_log), 2)
            checks.append(_check("server_ready", True, f"{READY_PATH[cfg.backend]} answered after {startup_s} s"))
        except RuntimeError as err:
            lines = str(err).splitlines()  # first line: what happened; last: the server's own last words
            checks.append(_check("server_ready", False, " ".join(dict.fromkeys([lines[0], lines[-1]]))))
        if startup_s is not None:
            log.info("smoke: server ready after %.1f s on %s", startup_s, base_url)
            with httpx.Client(base_url=base_url, timeout=cfg.request_timeout_s) as client:
                resp = client.get("/v1/models")
                listed = [m.get("id") for m in resp.json().get("data", [])] if resp.status_code == 200 else []
                # `transformers serve` lists the Hub cache, never a local folder; SGLang lists its served name.
                passed = resp.status_code == 200 and (cfg.backend == "transformers" or model_name in listed)
                checks.append(_check("models_endpoint", passed, f"HTTP {resp.status_code}, lists {listed}"))
                for language in cfg.languages:
                    try:
                        row, row_checks = _chat(client, cfg, model_name, language)
                    except httpx.TransportError as err:  # timeout or a server that died mid-run: a failed check
                        row = {"language": language, "status": None, "latency_s": cfg.request_timeout_s}
                        row_checks = [_check(f"chat[{language}].http_200", False, f"{type(err).__name__}: {err}")]
                    row["passed"] = all(c["passed"] for c in row_checks)
                    requests.append(row)
                    checks += row_checks
                    log.info("smoke: %s: %s in %.1f s", language, "ok" if row["passed"] else "FAILED", row["latency_s"])
                if cfg.tools:
                    try:
                        tool_row, tool_checks = _chat_tools(client, cfg, model_name)
                    except httpx.TransportError as err:
                        tool_row, tool_checks = {"status": None}, [_check("tool_call.http_200", False, f"{type(err).__name__}: {err}")]
                    checks += tool_checks
                    log.info("smoke: tool call: %s", "ok" if all(c["passed"] for c in tool_checks) else "FAILED")
                try:
                    stream_row, stream_checks = _chat_stream(client, cfg, model_name, cfg.languages[0])
                except httpx.TransportError as err:
                    stream_checks = [_check("stream.http_200", False, f"{type(err).__name__}: {err}")]
                checks += stream_checks
    finally:
        _stop(proc, cfg.stop_grace_s)
    answered = [r for r in requests if "completion_tokens" in r]
    total_s = sum(r["latency_s"] for r in answered)
    failed = [c["name"] for c in checks if not c["passed"]]
    report = {
        "backend": cfg.backend, "model_dir": str(model_dir), "weights_format": weights_format, "model_name": model_name,
        "command": command,
        "port": port, "server_pid": proc.pid,
        "startup_s": startup_s, "num_checks": len(checks), "num_failed": len(failed), "checks": checks,
        "requests": requests, "stream": stream_row, "tool_call": tool_row,
        "mean_latency_s": round(total_s / len(answered), 3) if answered else 0.0,
        "tokens_per_s": round(sum(r["completion_tokens"] for r in answered) / total_s, 2) if total_s else 0.0,
    }
    report_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_json_atomic(report_path, report)
    _write_markdown(md_path, report)
    tracker.log_artifact(report_path)
    tracker.log_artifact(md_path)
    tracker.log_artifact(server_log)
    tracker.log_metrics({"startup_s": startup_s or 0.0, "mean_latency_s": report["mean_latency_s"],
                         "tokens_per_s": report["tokens_per_s"], "num_failed": len(failed)})
    if failed:
        # A result, not a crash: one line naming the checks (and the first one's detail), the report has the rest.
        first = next(c for c in checks if not c["passed"])
        raise ValueError(f"smoke test failed {len(failed)}/{len(checks)} checks: {', '.join(failed)} "
                         f"({first['name']}: {first['detail']}); see {md_path} and {server_log}")
    return Output(
        report_path=report_path.name, report_md_path=md_path.name, server_log_path=server_log.name,
        num_checks=len(checks), num_failed=0, startup_s=startup_s, mean_latency_s=report["mean_latency_s"],
        tokens_per_s=report["tokens_per_s"],
        languages={r["language"]: {k: r.get(k) for k in ("passed", "finish_reason", "detected_language", "latency_s",
                                                         "completion_tokens", "tokens_per_s")} for r in requests},
    )

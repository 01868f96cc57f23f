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
import re
import shutil
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
# --input merge= may also be a plain Hugging Face model folder (the original openai/gpt-oss-20b snapshot, a colleague's
# checkpoint): the contract fingerprints it by its files' sha256 (steps/contract.py: model_folder_manifest).
MODEL_FOLDER_INPUTS = ("merge",)
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
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TEXT_IN_REPORT_CHARS = 300  # reasoning and answer quoted per request in report.md (report.json keeps them whole)
# Questions the smoke step asks (smoke.prompt by default, and the language-adherence requests): kept out of the bundled
# training data (steps/data/make_fixture.py refuses them; tests/test_smoke.py checks the file), so that a model passing
# the language checks follows the system message on questions it never saw, not memorised rows.
HELD_OUT_PROMPTS = (
    "What is the capital of Australia? Explain briefly.",
    "Why is the sky blue?",
    "How do I make a cup of tea?",
    "What is the tallest mountain in the world?",
    "How can I learn to cook?",
    "Why do cats purr?",
    "How do airplanes stay in the air?",
    "What should I read this summer?",
    "How do I stay warm in winter?",
    "What is the moon made of?",
    "How can I make new friends?",
    "What is a good breakfast before school?",
)


@dataclass(frozen=True, kw_only=True)
class Config:
    backend: str = "transformers"
    """Server: "sglang" (GPU, production) or "transformers" (`transformers serve`, runs on CPU)."""
    host: str = "127.0.0.1"
    """Address the server listens on and the checks call."""
    port: int = 8000
    """Port of the server; 0 picks a free one at start."""
    served_model_name: str = ""
    """Model name the API serves and the requests ask for. Empty: sglang serves the model folder's path; `transformers
    serve` (which lists only models in its Hub cache, never a local folder) gets the folder laid out as the cached
    repo `local/<input folder name>`. For `transformers serve` a name must look like a Hub repo id, owner/name."""
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
    min_languages_passing: int = 0
    """With check_language: how many of `languages` must reason in the requested language on `prompt` (the check
    `reasoning_languages`); 0: all of them. Each language's own check stays in the report either way."""
    adherence_prompts: int = 0
    """Held-out questions (steps.smoke.HELD_OUT_PROMPTS, never in the bundled training data; `prompt` excluded) asked
    per reasoning language to measure the language-adherence rate: the share whose reasoning is identified as the
    requested language. 0 skips it. The rate, per language and overall, and these requests' latency and tokens/s
    are in the Output's `metrics`."""
    min_language_adherence: float = 0.0
    """With adherence_prompts: the check `language_adherence` fails when the overall rate is below this (0..1)."""
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
        if self.backend == "transformers" and self.served_model_name and not _REPO_ID.match(self.served_model_name):
            raise ValueError(f"smoke.served_model_name={self.served_model_name!r}: `transformers serve` lists and loads "
                             "models by Hub repo id, so the name must look like owner/name (letters, digits, '-', '_', "
                             "'.'), e.g. local/my-model; or leave it empty")
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
        if not 0 <= self.min_languages_passing <= len(self.languages):
            raise ValueError(f"smoke.min_languages_passing={self.min_languages_passing} must be between 0 (all) and "
                             f"{len(self.languages)} (the number of smoke.languages)")
        if self.min_languages_passing and not self.check_language:
            raise ValueError(f"smoke.min_languages_passing={self.min_languages_passing} needs smoke.check_language=true")
        max_prompts = len(HELD_OUT_PROMPTS) - (self.prompt in HELD_OUT_PROMPTS)
        if not 0 <= self.adherence_prompts <= max_prompts:
            raise ValueError(f"smoke.adherence_prompts={self.adherence_prompts} must be between 0 and {max_prompts} (the "
                             "held-out questions in steps.smoke.HELD_OUT_PROMPTS)")
        if not 0 <= self.min_language_adherence <= 1:
            raise ValueError(f"smoke.min_language_adherence={self.min_language_adherence} is a rate: use 0..1, e.g. 0.75")
        if self.min_language_adherence and not (self.adherence_prompts and self.check_language):
            raise ValueError(f"smoke.min_language_adherence={self.min_language_adherence} needs smoke.adherence_prompts > 0 "
                             "and smoke.check_language=true (the rate is measured on those requests)")
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
    metrics: dict = field(default_factory=dict)
    """Flat {name: number}: language_adherence (overall rate 0..1 over the adherence requests) and
    language_adherence.<Language>, adherence_num_requests, adherence_mean_latency_s, adherence_tokens_per_s,
    plus languages_passing (of `languages`, on `prompt`), mean_latency_s, tokens_per_s, startup_s, num_checks, num_failed."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(cfg: Config, *, model_dir: Path, model_name: str, port: int) -> list[str]:
    # The SGLang image runs SGLang on its own Python beside our CLI's venv (images/serve.Dockerfile says which).
    python = os.environ.get("FINETUNE_SERVER_PYTHON") or sys.executable
    if cfg.backend == "sglang":
        return [python, "-m", "sglang.launch_server", "--model-path", str(model_dir),
                "--served-model-name", model_name, "--tp", str(cfg.tp),
                "--host", cfg.host, "--port", str(port), "--reasoning-parser", "gpt-oss", "--tool-call-parser", "gpt-oss"]
    # Pinned to the cached repo that cache_model_folder laid out: the name it lists is the name it answers to.
    return [python, "-m", "transformers.cli.transformers", "serve", model_name, "--device", cfg.device,
            "--host", cfg.host, "--port", str(port), "--log-level", "info"]


def _server_env(cfg: Config, out_dir: Path) -> dict:
    env = dict(os.environ, HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")  # the model is a local folder
    if cfg.backend == "transformers":
        # Its /v1/models lists the Hub cache (scan_cache_dir) and nothing else: a private cache that holds the served
        # model alone (cache_model_folder) makes the listing the model, and cheap.
        env["HF_HUB_CACHE"] = str(out_dir / "hf-hub-cache")
        (out_dir / "hf-hub-cache").mkdir(exist_ok=True)
    return env


def served_name(cfg: Config, *, model_dir: Path, input_dir: Path) -> str:
    """The model name the requests ask for (and /v1/models must list)."""
    if cfg.served_model_name:
        return cfg.served_model_name
    if cfg.backend == "sglang":
        return str(model_dir)
    return "local/" + (re.sub(r"[^\w.-]+", "-", Path(input_dir).resolve().name).strip("-.") or "model")


def cache_model_folder(cache_dir: Path, repo_id: str, model_dir: Path) -> Path:
    """Lay model_dir out as the Hub-cache repo `repo_id` (refs/main -> a snapshot of links to its files): what
    `transformers serve` lists in /v1/models and loads by that name offline. Nothing is copied."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)  # any commit-shaped name: offline, refs/main is all that resolves it
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file():
            link = snapshot / path.relative_to(model_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    return repo


def check_models_listed(resp: httpx.Response, model_name: str) -> dict:
    """models_endpoint: HTTP 200 and the name the requests ask for among the listed ids."""
    listed = [m.get("id") for m in resp.json().get("data", [])] if resp.status_code == 200 else []
    return _check("models_endpoint", resp.status_code == 200 and model_name in listed,
                  f"HTTP {resp.status_code}, lists {listed}; requests ask for {model_name!r}")


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


def _messages(language: str, prompt: str) -> list[dict]:
    return [{"role": "system", "content": f"reasoning language: {language}"}, {"role": "user", "content": prompt}]


def adherence_prompts(cfg: Config) -> list[str]:
    return [p for p in HELD_OUT_PROMPTS if p != cfg.prompt][:cfg.adherence_prompts]


def _leaked(text: str) -> list[str]:
    return [t for t in HARMONY_TOKENS if t in text]


def _chat(client: httpx.Client, cfg: Config, model_name: str, language: str, prompt: str | None = None) -> tuple[dict, list[dict]]:
    """One non-streaming completion; returns its result row and its checks."""
    prompt = prompt or cfg.prompt
    body = {"model": model_name, "messages": _messages(language, prompt), "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature}
    started = time.monotonic()
    resp = client.post("/v1/chat/completions", json=body)
    latency_s = time.monotonic() - started
    row = {"language": language, "prompt": prompt, "status": resp.status_code, "latency_s": round(latency_s, 3)}
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
    body = {"model": model_name, "messages": _messages(language, cfg.prompt), "max_tokens": cfg.max_tokens,
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


def _quote(text: str) -> str:
    """A model's text in one markdown line, cut to TEXT_IN_REPORT_CHARS (report.json has it whole)."""
    text = " ".join((text or "").split())
    cut = text[:TEXT_IN_REPORT_CHARS] + (" …" if len(text) > TEXT_IN_REPORT_CHARS else "")
    return "`" + cut.replace("`", "'") + "`" if cut else "(empty)"


def _write_markdown(path: Path, report: dict) -> None:
    ready = f"server ready in {report['startup_s']} s" if report["startup_s"] is not None else "server never ready"
    lines = [f"# Smoke test: {'PASSED' if report['num_failed'] == 0 else 'FAILED'}", "",
             f"backend `{report['backend']}`, model `{report['model_dir']}` served as `{report['model_name']}`, {ready}; "
             f"{report['num_checks'] - report['num_failed']}/{report['num_checks']} checks passed", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**' if c.get('counts', True) else 'fail (see reasoning_languages)'} | "
              f"{c['detail'].replace('|', '/')} |" for c in report["checks"]]
    lines += ["", "| language | finish | detected | latency s | tokens | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['language']} | {r.get('finish_reason')} | {r.get('detected_language', '-')} | {r['latency_s']} | "
              f"{r.get('completion_tokens', '-')} | {r.get('tokens_per_s', '-')} |" for r in report["requests"]]
    adherence = report.get("adherence") or []
    if adherence:
        metrics = report["metrics"]
        lines += ["", f"## Language adherence: {metrics['language_adherence']:.0%} of {len(adherence)} held-out questions",
                  "", "| language | adherence | requests |", "|---|---|---|"]
        for language in dict.fromkeys(r["language"] for r in adherence):
            rows = [r for r in adherence if r["language"] == language]
            lines.append(f"| {language} | {metrics[f'language_adherence.{language}']:.0%} | {len(rows)} |")
    lines += ["", "## What the model said", ""]
    for r in [*report["requests"], *adherence]:
        verdict = "" if "adhered" not in r else (" — reasoning in the requested language" if r["adhered"]
                                                  else f" — reasoning identified as {r.get('detected_language')!r}")
        lines += [f"**{r['language']}**: {r.get('prompt', '')}{verdict}", "",
                  f"- reasoning: {_quote(r.get('reasoning_content'))}", f"- answer: {_quote(r.get('content'))}", ""]
        if "error" in r:
            lines.insert(-1, f"- error: {_quote(r['error'])}")
    if report.get("tool_call"):
        t = report["tool_call"]
        lines += ["**tool call**", "", f"- calls: {_quote(json.dumps(t.get('tool_calls'), ensure_ascii=False))}",
                  f"- answer: {_quote(t.get('content'))}", ""]
    if report.get("stream"):
        lines += ["**stream**", "", f"- reasoning + answer: {_quote(report['stream'].get('text'))}", ""]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _adherence(client: httpx.Client, cfg: Config, model_name: str) -> tuple[list[dict], dict]:
    """The held-out questions in every language: each reply's reasoning language, and the rates."""
    import py3langid

    rows = []
    for language in cfg.languages:
        for prompt in adherence_prompts(cfg):
            try:
                row, _ = _chat(client, cfg, model_name, language, prompt)
            except httpx.TransportError as err:
                row = {"language": language, "prompt": prompt, "status": None, "latency_s": cfg.request_timeout_s,
                       "error": f"{type(err).__name__}: {err}"}
            reasoning = row.get("reasoning_content") or ""
            row["detected_language"] = py3langid.classify(reasoning)[0] if reasoning.strip() else None
            row["adhered"] = row["detected_language"] == LANGUAGE_CODES[language]
            rows.append(row)
        log.info("smoke: adherence %s: %d/%d", language, sum(r["adhered"] for r in rows if r["language"] == language),
                 cfg.adherence_prompts)
    answered = [r for r in rows if "completion_tokens" in r]
    total_s = sum(r["latency_s"] for r in answered)
    metrics = {"language_adherence": round(sum(r["adhered"] for r in rows) / len(rows), 4),
               **{f"language_adherence.{lang}": round(sum(r["adhered"] for r in rows if r["language"] == lang)
                                                      / cfg.adherence_prompts, 4) for lang in cfg.languages},
               "adherence_num_requests": len(rows),
               "adherence_mean_latency_s": round(total_s / len(answered), 3) if answered else 0.0,
               "adherence_tokens_per_s": round(sum(r["completion_tokens"] for r in answered) / total_s, 2) if total_s else 0.0}
    return rows, metrics


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
    model_name = served_name(cfg, model_dir=model_dir, input_dir=inputs["merge"])
    # An MXFP4 export (merge.export=mxfp4) is served as is: SGLang runs its experts in MXFP4, transformers on a CPU
    # dequantizes them on load.
    weights_format = (json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}).get(
        "quant_method", "unquantized")
    port = cfg.port or _free_port(cfg.host)
    base_url = f"http://{cfg.host}:{port}"
    server_log = out_dir / "server.log"
    checks, requests, startup_s, stream_row, tool_row, adherence, adherence_metrics = [], [], None, None, None, [], {}
    env = _server_env(cfg, out_dir)
    if cfg.backend == "transformers":
        cache_model_folder(Path(env["HF_HUB_CACHE"]), model_name, model_dir)
    command = server_command(cfg, model_dir=model_dir, model_name=model_name, port=port)
    log.info("smoke: starting %s (%s weights, served as %s)", " ".join(command), weights_format, model_name)
    with server_log.open("w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env, preexec_fn=_die_with(os.getpid()))
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
                checks.append(check_models_listed(client.get("/v1/models"), model_name))
                for language in cfg.languages:
                    try:
                        row, row_checks = _chat(client, cfg, model_name, language)
                    except httpx.TransportError as err:  # timeout or a server that died mid-run: a failed check
                        row = {"language": language, "prompt": cfg.prompt, "status": None, "latency_s": cfg.request_timeout_s}
                        row_checks = [_check(f"chat[{language}].http_200", False, f"{type(err).__name__}: {err}")]
                    row["passed"] = all(c["passed"] for c in row_checks)
                    requests.append(row)
                    checks += row_checks
                    log.info("smoke: %s: %s in %.1f s", language, "ok" if row["passed"] else "FAILED", row["latency_s"])
                if cfg.min_languages_passing:
                    # The per-language checks stay in the report; this one decides.
                    language_checks = [c for c in checks if c["name"].endswith(".reasoning_language")]
                    passing = [c["name"][5:-len("].reasoning_language")] for c in language_checks if c["passed"]]
                    for c in language_checks:
                        c["counts"] = False
                    checks.append(_check("reasoning_languages", len(passing) >= cfg.min_languages_passing,
                                         f"{len(passing)}/{len(cfg.languages)} languages reasoned as requested "
                                         f"({', '.join(passing) or 'none'}; smoke.min_languages_passing="
                                         f"{cfg.min_languages_passing})"))
                if cfg.adherence_prompts:
                    adherence, adherence_metrics = _adherence(client, cfg, model_name)
                    if cfg.min_language_adherence:
                        rate = adherence_metrics["language_adherence"]
                        checks.append(_check("language_adherence", rate >= cfg.min_language_adherence,
                                             f"{rate:.0%} of {len(adherence)} held-out questions reasoned in the "
                                             f"requested language (smoke.min_language_adherence={cfg.min_language_adherence:.0%})"))
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
        if cfg.backend == "transformers":
            # Its links name model_dir as this process sees it (/runs/… in a container): of no use once the server
            # has stopped, and dangling outside the container.
            shutil.rmtree(env["HF_HUB_CACHE"])
    answered = [r for r in requests if "completion_tokens" in r]
    total_s = sum(r["latency_s"] for r in answered)
    failed = [c["name"] for c in checks if not c["passed"] and c.get("counts", True)]
    mean_latency_s = round(total_s / len(answered), 3) if answered else 0.0
    tokens_per_s = round(sum(r["completion_tokens"] for r in answered) / total_s, 2) if total_s else 0.0
    languages_passing = [r["language"] for r in requests if r.get("detected_language") == LANGUAGE_CODES[r["language"]]]
    metrics = {**adherence_metrics, "languages_passing": len(languages_passing), "mean_latency_s": mean_latency_s, "tokens_per_s": tokens_per_s,
               "startup_s": startup_s or 0.0, "num_checks": len(checks), "num_failed": len(failed)}
    report = {
        "backend": cfg.backend, "model_dir": str(model_dir), "weights_format": weights_format, "model_name": model_name,
        "command": command,
        "port": port, "server_pid": proc.pid,
        "startup_s": startup_s, "num_checks": len(checks), "num_failed": len(failed), "checks": checks,
        "requests": requests, "adherence": adherence, "stream": stream_row, "tool_call": tool_row,
        "mean_latency_s": mean_latency_s, "tokens_per_s": tokens_per_s, "metrics": metrics,
    }
    report_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_json_atomic(report_path, report)
    _write_markdown(md_path, report)
    tracker.log_artifact(report_path)
    tracker.log_artifact(md_path)
    tracker.log_artifact(server_log)
    # As smoke/<name>, the names the promotion gate reads; logged here because a failed test writes no Output.
    tracker.log_metrics(metrics)
    if failed:
        # A result, not a crash: one line naming the checks (and the first one's detail), the report has the rest.
        first = next(c for c in checks if c["name"] in failed)
        raise ValueError(f"smoke test failed {len(failed)}/{len(checks)} checks: {', '.join(failed)} "
                         f"({first['name']}: {first['detail']}); see {md_path} and {server_log}")
    return Output(
        report_path=report_path.name, report_md_path=md_path.name, server_log_path=server_log.name,
        num_checks=len(checks), num_failed=0, startup_s=startup_s, mean_latency_s=mean_latency_s,
        tokens_per_s=tokens_per_s,
        languages={r["language"]: {k: r.get(k) for k in ("passed", "finish_reason", "detected_language", "latency_s",
                                                         "completion_tokens", "tokens_per_s")} for r in requests},
        metrics=metrics,
    )

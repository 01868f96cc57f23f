"""SGLang's own code, run on a CPU: its argument parser takes the exact command the smoke step builds for every GPU
profile, and its gpt-oss reasoning parser splits a recorded raw completion of the tiny model into the
reasoning_content and content that `transformers serve` returned for the same request (what the smoke checks read).

SGLang 0.5.23 needs torch 2.14.1 and a GPU to serve; its parsers only import. So the pinned sglang (and what its
imports need, `sglang-check` in pyproject.toml) is installed with --no-deps into a throwaway venv that reuses this
environment's torch and transformers. That downloads ~1.2 GB (sglang 222 MB unpacked, triton ~1 GB: sglang.srt.utils
imports triton unconditionally) and takes minutes, so the tests are marked `sglang` and CI deselects them
(`-m "not gpu and not sglang"`); run them with `pytest -m sglang tests/test_sglang.py`.
"""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from steps import profile as profiles, smoke

pytestmark = pytest.mark.sglang
REPO = Path(__file__).resolve().parents[1]
# The pins of the `sglang-check` extra in pyproject.toml, installed without their own dependencies.
SGLANG_CHECK = ["sglang==0.5.23", "triton==3.9.0", "msgspec==0.23.0", "pybase64==1.5.1", "pyzmq==27.3.0",
                "ipython==9.18.1", "traitlets==5.16.1", "partial-json-parser==0.2.1.1.post7"]
RECORDED = Path(__file__).with_name("data") / "tiny-raw-completion.json"


@pytest.fixture(scope="module")
def sglang_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("sglang-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *SGLANG_CHECK], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # This environment's packages after the venv's own: torch, transformers, openai-harmony for sglang's imports.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "zz-finetune-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _sglang(python: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=600)


PARSE_ARGS = """
import json, sys
from sglang.srt.server_args import prepare_server_args
a = prepare_server_args(json.loads(sys.argv[1]))
print(json.dumps({"model_path": a.model_path, "served_model_name": a.served_model_name, "tp_size": a.tp_size,
                  "host": a.host, "port": a.port, "reasoning_parser": a.reasoning_parser,
                  "tool_call_parser": a.tool_call_parser}))
"""


def _gpu_profiles():
    for path in sorted(profiles.CONFIGS_DIR.glob("*.yaml")):
        cfg = profiles.step_config(profiles.load_profile(path, []), "smoke")
        if cfg.backend == "sglang":
            yield path.name, cfg


def test_sglang_accepts_the_command_the_smoke_step_builds_for_every_gpu_profile(sglang_python):
    found = list(_gpu_profiles())
    assert len(found) >= 3
    for name, cfg in found:
        model_dir = Path("/runs/x/merge/model")
        command = smoke.server_command(cfg, model_dir=model_dir, port=cfg.port or 30000,
                                       model_name=smoke.served_name(cfg, model_dir=model_dir, input_dir=model_dir.parent))
        assert command[1:3] == ["-m", "sglang.launch_server"]
        r = _sglang(sglang_python, PARSE_ARGS, json.dumps(command[3:]))
        assert r.returncode == 0, f"{name}: {' '.join(command[3:])}\n{r.stderr[-3000:]}"
        parsed = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name}: sglang parsed {parsed}")
        assert parsed == {"model_path": str(model_dir), "served_model_name": cfg.served_model_name or str(model_dir),
                          "tp_size": cfg.tp, "host": cfg.host, "port": cfg.port or 30000,
                          "reasoning_parser": "gpt-oss", "tool_call_parser": "gpt-oss"}


def test_sglang_refuses_a_wrong_parser_name(sglang_python):
    r = _sglang(sglang_python, PARSE_ARGS, json.dumps(["--model-path", "/m", "--reasoning-parser", "gpt_oss"]))
    assert r.returncode != 0 and "invalid choice: 'gpt_oss'" in r.stderr


PARSE_COMPLETION = """
import json, sys
from sglang.srt.parser.reasoning_parser import ReasoningParser
recorded = json.load(open(sys.argv[1]))
reasoning, content = ReasoningParser("gpt-oss").parse_non_stream(recorded["raw"])
streamed = ReasoningParser("gpt-oss", stream_reasoning=True)  # fed token by token, as the server streams
parts = [streamed.parse_stream_chunk(piece) for piece in recorded["pieces"]] + [streamed.parse_stream_end()]
print(json.dumps({"reasoning_content": reasoning, "content": content,
                  "stream_reasoning": "".join(p[0] or "" for p in parts), "stream_content": "".join(p[1] or "" for p in parts)}))
"""


def test_sglang_gpt_oss_parser_splits_the_tiny_models_completion_as_the_checks_expect(sglang_python):
    recorded = json.loads(RECORDED.read_text())
    assert "".join(recorded["pieces"]) == recorded["raw"]
    r = _sglang(sglang_python, PARSE_COMPLETION, str(RECORDED))
    assert r.returncode == 0, r.stderr[-3000:]
    parsed = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nraw completion: {recorded['raw']!r}\nsglang gpt-oss parser: {parsed}")
    assert parsed["reasoning_content"].strip() == recorded["reasoning_content"].strip()
    assert parsed["content"].strip() == recorded["content"].strip()
    assert parsed["stream_reasoning"].strip() == recorded["reasoning_content"].strip()
    assert parsed["stream_content"].strip() == recorded["content"].strip()
    assert not smoke._leaked(parsed["reasoning_content"] + parsed["content"])

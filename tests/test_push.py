"""The push step: dry-run plan and model card, input errors, and a real huggingface_hub upload to a local Hub test double."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from huggingface_hub import ModelCard

from steps import push
from steps.contract import write_json_atomic
from steps.tracking import NullTracker

pytestmark = pytest.mark.unit

TOKEN = "hf_test_secret_do_not_leak_0123456789"
MODEL_FILES = {"config.json": b'{"architectures": ["GptOssForCausalLM"]}', "model.safetensors": b"\0" * 4096,
               "tokenizer.json": b"{}", "chat_template.jinja": b"{{ messages }}"}


def _manifest(step_dir: Path, step: str, *, config: dict, output: dict, inputs: dict) -> None:
    step_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(step_dir / "manifest.json", {
        "step": step, "fingerprint": f"{step}-fp", "config": config, "output": output,
        "inputs": {k: str(v) for k, v in inputs.items()}, "versions": {"transformers": "5.23.0"}})


@pytest.fixture
def merge_dir(tmp_path) -> Path:
    """A finished fetch -> harmony -> train -> merge chain of manifests, with a small stand-in model folder."""
    model = {"name": "openai/gpt-oss-20b", "revision": "6cee5e8", "tokenizer": "", "random_shape": {}, "seed": 0}
    _manifest(tmp_path / "fetch", "fetch", config={"dataset": "HuggingFaceH4/Multilingual-Thinking"},
              output={"dataset": "HuggingFaceH4/Multilingual-Thinking", "revision": "c4f1b9a", "num_train": 1000,
                      "num_eval": 0}, inputs={})
    _manifest(tmp_path / "harmony", "harmony", config={"max_length": 2048}, output={}, inputs={"fetch": tmp_path / "fetch"})
    _manifest(tmp_path / "train", "train", config={"model": model, "method": "lora", "learning_rate": 2e-4, "lora_r": 8},
              output={"train_loss_last": 0.93, "tokens_per_s": 15000.0, "loss_curve": [[1, 2.0]]},
              inputs={"harmony": tmp_path / "harmony"})
    merge = tmp_path / "merge"
    (merge / "model").mkdir(parents=True)
    for name, data in MODEL_FILES.items():
        (merge / "model" / name).write_bytes(data)
    _manifest(merge, "merge", config={"model": model}, output={"model_dir": "model"}, inputs={"train": tmp_path / "train"})
    return merge


def test_dry_run_lists_files_and_writes_the_card(merge_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out_dir = tmp_path / "push"
    out_dir.mkdir()
    cfg = push.Config(repo_id="my-org/gpt-oss-20b-multilingual-reasoner", revision_tag="v1")

    out = push.run(cfg, out_dir=out_dir, inputs={"merge": merge_dir}, tracker=NullTracker())

    assert out.dry_run and out.url == "" and out.commit == ""
    sizes = {f["path"]: f["size_bytes"] for f in out.files}
    assert sizes == {**{k: len(v) for k, v in MODEL_FILES.items()}, "README.md": (out_dir / "README.md").stat().st_size}
    assert out.num_bytes == sum(sizes.values())
    plan = json.loads((out_dir / "upload_plan.json").read_text())
    assert plan["files"] == out.files and plan["private"] is True
    card = (out_dir / out.model_card_path).read_text()
    for expected in ("revision `6cee5e8`", "revision `c4f1b9a`", "| `learning_rate` | 0.0002 |", "| `lora_r` | 8 |",
                     "Training loss 0.9300", 'from_pretrained("my-org/gpt-oss-20b-multilingual-reasoner"',
                     '"reasoning language: French"', "--reasoning-parser gpt-oss"):
        assert expected in card
    data = ModelCard(card).data  # huggingface_hub's own parsing of the metadata header
    assert data.base_model == "openai/gpt-oss-20b" and data.datasets == ["HuggingFaceH4/Multilingual-Thinking"]
    assert data.license == "apache-2.0" and data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "lora" in data.tags
    assert not any(TOKEN in p.read_text(errors="replace") for p in out_dir.rglob("*") if p.is_file())
    assert TOKEN not in json.dumps(out.__dict__)


@pytest.mark.parametrize("repo_id", ["no-owner", "a/b/c", "own er/name", "owner/na--me", "-owner/name", ""])
def test_bad_repo_id_names_the_field(repo_id):
    with pytest.raises(ValueError, match=r"push\.repo_id=.*owner/name"):
        push.Config(repo_id=repo_id)


def test_missing_token_is_an_error_that_says_what_to_set(merge_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MY_HUB_TOKEN", raising=False)
    cfg = push.Config(repo_id="my-org/model", dry_run=False, token_env="MY_HUB_TOKEN")
    with pytest.raises(ValueError, match="set MY_HUB_TOKEN to a Hugging Face token"):
        push.run(cfg, out_dir=tmp_path, inputs={"merge": merge_dir}, tracker=NullTracker())


class FakeHubServer:
    """A local HTTP test double of the Hub endpoints huggingface_hub calls for create_repo, create_commit and
    create_tag. It stores committed files in memory and answers 401 to any other token than `token`."""

    def __init__(self, token: str, refuse_commit: bool = False):
        self.token = token
        self.refuse_commit = refuse_commit
        self.repos: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        self.tags: dict[str, str] = {}
        self.requests: list[str] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                double.requests.append(f"POST {self.path}")
                if self.headers.get("Authorization") != f"Bearer {double.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    double.repos[repo_id] = payload
                    return self._reply(200, {"url": f"{double.url}/{repo_id}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
                if "/commit/" in path and double.refuse_commit:
                    # What the Hub answers a token without write access to the owner.
                    return self._reply(403, {"error": "You don't have the rights to create a model under the namespace \"my-org\""})
                if "/commit/" in path:
                    for line in body.decode().splitlines():
                        op = json.loads(line)
                        if op["key"] == "file":
                            double.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                    repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
                    return self._reply(200, {"commitUrl": f"{double.url}/{repo_id}/commit/{'c' * 40}", "commitOid": "c" * 40})
                if "/tag/" in path:
                    double.tags[json.loads(body)["tag"]] = path.rsplit("/", 1)[1]
                    return self._reply(200, {})
                return self._reply(404, {"error": f"the test double does not know {path}"})

            def _reply(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def hub_online(monkeypatch):
    """Lift the suite's HF_HUB_OFFLINE for huggingface_hub (read once at import): the only Hub here is on loopback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_push_uploads_through_huggingface_hub_to_fake_hub_server(merge_dir, tmp_path, monkeypatch, hub_online):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHubServer(token=TOKEN) as hub:
        cfg = push.Config(repo_id="my-org/reasoner", dry_run=False, revision_tag="v1", endpoint=hub.url)
        out = push.run(cfg, out_dir=tmp_path, inputs={"merge": merge_dir}, tracker=NullTracker())

    assert hub.repos["my-org/reasoner"]["visibility"] == "private"
    assert {k: v for k, v in hub.files.items() if k != "README.md"} == MODEL_FILES
    assert hub.files["README.md"] == (tmp_path / "README.md").read_bytes()
    assert hub.tags == {"v1": "c" * 40}
    assert out.commit == "c" * 40 and out.url.endswith("/my-org/reasoner")
    assert not any(TOKEN in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())


def test_rejected_token_says_so_without_echoing_it(merge_dir, tmp_path, monkeypatch, hub_online):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    with FakeHubServer(token=TOKEN) as hub:
        cfg = push.Config(repo_id="my-org/reasoner", dry_run=False, endpoint=hub.url)
        with pytest.raises(ValueError, match=r"rejected the token in \$HF_TOKEN \(HTTP 401\)") as err:
            push.run(cfg, out_dir=tmp_path, inputs={"merge": merge_dir}, tracker=NullTracker())
    assert "hf_wrong_token_value" not in str(err.value)
    assert hub.files == {}


def test_card_says_which_format_is_uploaded(merge_dir, tmp_path):
    manifest = json.loads((merge_dir / "manifest.json").read_text())
    manifest["output"].update(export="mxfp4", num_bytes=13_761_317_416, fits_gpu="16 GB (T4, RTX 5080, A4000)", retention={
        "retention": 0.927, "min_retention": 0.8, "probe_split": "eval", "num_probe_positions": 8192,
        "eval_loss_base": 12.8031, "eval_loss_merged": 11.9625, "eval_loss_mxfp4": 11.9638})
    write_json_atomic(merge_dir / "manifest.json", manifest)
    card = push.model_card(repo_id="my-org/m", manifests=push.upstream_manifests(merge_dir))
    assert "mxfp4" in ModelCard(card).data.tags
    assert "Format: MXFP4 experts" in card and "13.76 GB on disk; the weights fit one 16 GB (T4" in card
    assert "kept by the MXFP4 rounding: 92.7%" in card and "| this upload (MXFP4) | 11.9638 |" in card

    manifest["output"].update(export="bf16", num_bytes=41_829_561_832, fits_gpu="48 GB (L40S, RTX 6000 Ada)", retention={})
    write_json_atomic(merge_dir / "manifest.json", manifest)
    card = push.model_card(repo_id="my-org/m", manifests=push.upstream_manifests(merge_dir))
    assert "Format: unquantized" in card and "41.83 GB on disk" in card and "MXFP4" not in card


def test_real_push_without_network_names_the_host(merge_dir, tmp_path, monkeypatch, hub_online):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = push.Config(repo_id="my-org/reasoner", dry_run=False, endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(ValueError, match=rf"push.dry_run=false, but 127.0.0.1:{port} cannot be reached \(ConnectError.*"
                                         r"set push.dry_run=true"):
        push.run(cfg, out_dir=tmp_path, inputs={"merge": merge_dir}, tracker=NullTracker())


def test_refused_push_is_one_line_naming_the_repo_and_the_reason(merge_dir, tmp_path, monkeypatch, hub_online):
    import subprocess
    import sys

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHubServer(token=TOKEN, refuse_commit=True) as hub:
        cfg = push.Config(repo_id="my-org/reasoner", dry_run=False, endpoint=hub.url)
        with pytest.raises(ValueError, match=r"the Hub refused the push to my-org/reasoner while uploading \(HTTP 403: .*"
                                             r"rights to create a model.*\); the token in \$HF_TOKEN may not write to my-org"):
            push.run(cfg, out_dir=tmp_path, inputs={"merge": merge_dir}, tracker=NullTracker())
        # The same through the CLI: one line, exit code 2, no traceback.
        profile = tmp_path / "profile.yaml"
        profile.write_text(f"model: {{name: openai/gpt-oss-20b}}\npush: {{repo_id: my-org/reasoner, dry_run: false, "
                           f"endpoint: '{hub.url}'}}\n")
        r = subprocess.run([sys.executable, "-m", "flows.cli", "step", "push", "--config", str(profile), "--input",
                            f"merge={merge_dir}", "--out", str(tmp_path / "push-cli")], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1], env={**__import__("os").environ, "HF_HUB_OFFLINE": "0"})
    print("\nrefused push, as the CLI prints it:\n" + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("finetune: error: the Hub refused the push to my-org/reasoner")
    assert "Traceback" not in r.stderr and TOKEN not in r.stderr


def _tiny_chain(tmp_path) -> Path:
    """The manifests the embedded default leaves: random model, bundled data, a full fine-tune."""
    model = {"name": "random", "revision": "main", "tokenizer": "o200k-offline", "random_shape": {"preset": "tiny"}, "seed": 0}
    _manifest(tmp_path / "fetch", "fetch", config={"dataset": "bundled", "revision": "main"},
              output={"dataset": "/somewhere/steps/data/multilingual-fixture.jsonl", "revision": "sha256:" + "ab" * 32,
                      "num_train": 249, "num_eval": 0}, inputs={})
    _manifest(tmp_path / "harmony", "harmony", config={}, output={}, inputs={"fetch": tmp_path / "fetch"})
    _manifest(tmp_path / "train", "train", config={"model": model, "method": "full", "learning_rate": 0.01, "lora_r": 8,
                                                   "lora_alpha": 16, "num_epochs": 3, "save_steps": 50},
              output={"train_loss_first": 12.2, "train_loss_last": 0.41, "num_steps": 120, "tokens_per_s": 900.0},
              inputs={"harmony": tmp_path / "harmony"})
    merge = tmp_path / "merge"
    (merge / "model").mkdir(parents=True)
    (merge / "model" / "config.json").write_text("{}")
    _manifest(merge, "merge", config={"model": model}, output={"model_dir": "model", "export": "bf16", "num_bytes": 10 ** 8,
                                                              "fits_gpu": "16 GB (T4)"}, inputs={"train": tmp_path / "train"})
    return merge


def test_card_of_the_embedded_default_is_a_valid_hub_card_of_a_full_fine_tune(tmp_path):
    merge = _tiny_chain(tmp_path)
    smoke = tmp_path / "smoke"
    _manifest(smoke, "smoke", config={}, inputs={"merge": merge}, output={
        "num_checks": 22, "num_failed": 0, "tokens_per_s": 30.1, "mean_latency_s": 1.2,
        "languages": {"English": {"passed": True, "detected_language": "en"}, "French": {"passed": True, "detected_language": "fr"}},
        "metrics": {"language_adherence": 0.875, "language_adherence.English": 1.0, "language_adherence.French": 0.75,
                    "adherence_num_requests": 8}})
    (tmp_path / "push").mkdir()
    out = push.run(push.Config(repo_id="your-org/gpt-oss-tiny"), out_dir=tmp_path / "push",
                   inputs={"merge": merge, "smoke": smoke}, tracker=NullTracker())
    card_text = (tmp_path / "push" / out.model_card_path).read_text()
    print("\n" + card_text)
    card = ModelCard(card_text)
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert "full-fine-tune" in card.data.tags and "lora" not in card.data.tags
    assert card.data.base_model is None and card.data.datasets is None  # neither is a Hub repo
    assert "lora" not in card.text.lower().replace("lora on attention", "")  # no LoRA settings for a full fine-tune
    assert "/somewhere" not in card.text and "synthetic fixture bundled with gpt-oss-finetune" in card.text
    assert "| `save_steps`" not in card.text and "| `learning_rate` | 0.01 |" in card.text
    assert "22/22 checks passed" in card.text and "| French | yes | fr | 75% |" in card.text
    assert "Language adherence over 8 held-out questions: 88%" in card.text


def test_smoke_of_another_model_is_refused(tmp_path):
    merge = _tiny_chain(tmp_path)
    _manifest(tmp_path / "smoke", "smoke", config={}, inputs={"merge": tmp_path / "elsewhere"}, output={})
    with pytest.raises(ValueError, match="tested .*elsewhere, not --input merge="):
        push.run(push.Config(repo_id="your-org/gpt-oss-tiny"), out_dir=tmp_path, inputs={"merge": merge,
                 "smoke": tmp_path / "smoke"}, tracker=NullTracker())


def test_push_takes_a_plain_model_folder_fingerprinted_by_its_files(tmp_path):
    from steps.contract import execute

    folder = tmp_path / "gpt-oss-20b"
    folder.mkdir()
    for name, data in MODEL_FILES.items():
        (folder / name).write_bytes(data)
    cfg = push.Config(repo_id="my-org/checkpoint")
    manifest, skipped = execute("push", cfg, out_dir=tmp_path / "push", inputs={"merge": folder})
    assert not skipped and {f["path"] for f in manifest["output"]["files"]} == {*MODEL_FILES, "README.md"}
    card = ModelCard((tmp_path / "push" / "README.md").read_text())
    assert "the model folder this push was given" in card.text and "4 files" in card.text
    assert execute("push", cfg, out_dir=tmp_path / "push", inputs={"merge": folder})[1], "same files: skipped"
    (folder / "model.safetensors").write_bytes(b"\1" * 4096)  # same size, other bytes
    assert not execute("push", cfg, out_dir=tmp_path / "push", inputs={"merge": folder})[1], "a changed file re-runs"
    with pytest.raises(ValueError, match="is a plain model folder .* step merge needs the train step's out dir"):
        execute("merge", __import__("steps.merge", fromlist=["Config"]).Config(
            model=__import__("steps.model", fromlist=["ModelConfig"]).ModelConfig(name="x")), out_dir=tmp_path / "m",
            inputs={"train": folder})

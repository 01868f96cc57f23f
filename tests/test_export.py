"""merge.export=mxfp4 in the tiny pipeline: fetch -> harmony -> train once (a short full fine-tune with an eval
split), then merge -> push -> smoke through the step contract on the MXFP4 export, and the refusal below
merge.min_retention. The whole-pipeline run itself is tests/test_e2e.py's; this reuses its profile, not its time."""
import json
import re

import pytest

from steps import contract
from steps import profile as profiles
from tests import tiny_pipeline

pytestmark = pytest.mark.integration
# The smoke checks here are the export's (it loads and serves clean Harmony), not the reasoning language's, which
# test_e2e checks on the whole pipeline; the plumbing tests' training (tests/tiny_pipeline.py: 48 steps of 8 rows).
OVERRIDES = [*tiny_pipeline.OVERRIDES, "data.eval_fraction=0.1", "merge.export=mxfp4", "merge.min_retention=-100",
             "smoke.require_reasoning=false", "smoke.adherence_prompts=0", "smoke.languages=[English]",
             "smoke.max_tokens=64"]


def _execute(step: str, out, overrides=()):
    prof = profiles.load_profile(profiles.DEFAULT_PROFILE, [*OVERRIDES, *overrides])
    inputs = {up: out / up for up in contract.step_module(step).INPUTS}
    return contract.execute(step, profiles.step_config(prof, step), out_dir=out / step, inputs=inputs)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    for step in ("fetch", "harmony", "train"):
        _execute(step, out)
    return out


def test_mxfp4_export_is_what_push_uploads_and_smoke_serves(trained):
    merged = _execute("merge", trained)["output"]
    fig = merged["retention"]
    assert merged["export"] == "mxfp4" and fig["probe_split"] == "eval" and fig["num_loss_tokens"] > 0
    assert fig["eval_loss_merged"] < fig["eval_loss_base"]  # the fine-tune learned something the probe sees
    assert fig["retention"] is not None and fig["kl_merged_vs_base"] > fig["kl_mxfp4_vs_merged"] > 0
    config = json.loads((trained / "merge" / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"

    push = _execute("push", trained)["output"]
    uploaded = {f["path"] for f in push["files"]}
    assert "config.json" in uploaded and any(p.endswith(".safetensors") for p in uploaded)
    assert sum(f["size_bytes"] for f in push["files"] if f["path"].endswith(".safetensors")) == merged["num_bytes"]
    card = (trained / "push" / "README.md").read_text()
    assert "Format: MXFP4 experts" in card and f"{fig['retention']:.1%}" in card and merged["fits_gpu"] in card
    assert f"| this upload (MXFP4) | {fig['eval_loss_mxfp4']:.4f} |" in card

    # transformers serve on a CPU, offline (HF_HUB_OFFLINE=1): it dequantizes the experts on load, no kernels fetched.
    smoke = _execute("smoke", trained)["output"]
    report = json.loads((trained / "smoke" / "report.json").read_text())
    assert smoke["num_failed"] == 0 and report["weights_format"] == "mxfp4"
    assert "dequantize" in (trained / "smoke" / "server.log").read_text()
    print(f"tiny pipeline, MXFP4 export: {fig}")


def test_export_below_min_retention_is_refused_and_saves_nothing(trained, tmp_path):
    kept = _execute("merge", trained)["output"]["retention"]["retention"]
    threshold = round(kept + (1 - kept) / 2, 4)
    out = tmp_path / "run"
    out.mkdir()
    for step in ("fetch", "harmony", "train"):
        (out / step).symlink_to(trained / step)
    with pytest.raises(ValueError) as err:
        _execute("merge", out, [f"merge.min_retention={threshold}"])
    message = str(err.value)
    print(message)
    assert re.search(rf"keeps {kept:.1%} of the fine-tune's effect .* below merge.min_retention={threshold:.1%}", message)
    for expected in ("eval split", "eval loss base", "MXFP4", "set merge.export=bf16", "train.lora_r",
                     "quantization-aware training", "Nothing was saved"):
        assert expected in message
    assert not (out / "merge" / "model").exists() and not (out / "merge" / ".model.tmp").exists()
    assert not (out / "merge" / "manifest.json").exists()

"""The step contract: manifest written last, skip on a matching fingerprint, re-run on a changed one, inputs checked."""
import json

import pytest

from steps import contract, profile as profiles

pytestmark = pytest.mark.unit


def _fetch_cfg(*overrides):
    return profiles.step_config(profiles.load_profile(profiles.DEFAULT_PROFILE, list(overrides)), "fetch")


def test_manifest_is_written_and_a_matching_rerun_is_skipped(tmp_path, caplog):
    manifest, skipped = contract.execute("fetch", _fetch_cfg(), out_dir=tmp_path / "fetch")
    assert not skipped
    on_disk = json.loads((tmp_path / "fetch" / "manifest.json").read_text())
    assert on_disk["fingerprint"] == manifest["fingerprint"] and on_disk["output"]["num_train"] > 0
    assert {"python", "torch", "transformers"} <= set(on_disk["versions"])
    with caplog.at_level("INFO", logger="finetune"):
        again, skipped = contract.execute("fetch", _fetch_cfg(), out_dir=tmp_path / "fetch")
    assert skipped and again["fingerprint"] == manifest["fingerprint"]
    assert "skipped" in caplog.text


def test_a_changed_config_runs_again(tmp_path):
    first, _ = contract.execute("fetch", _fetch_cfg("data.seed=1"), out_dir=tmp_path / "fetch")
    second, skipped = contract.execute("fetch", _fetch_cfg("data.seed=2"), out_dir=tmp_path / "fetch")
    assert not skipped and first["fingerprint"] != second["fingerprint"]


def test_a_failed_step_leaves_no_manifest(tmp_path):
    out = tmp_path / "fetch"
    contract.execute("fetch", _fetch_cfg(), out_dir=out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"reasoning_language": "French", "developer": "", "user": "hi", "analysis": "",
                               "final": "", "messages": []}) + "\n")
    cfg = _fetch_cfg(f"data.dataset={bad}")
    with pytest.raises(ValueError):
        contract.execute("fetch", cfg, out_dir=out)
    assert not (out / "manifest.json").exists(), "a failed re-run must not leave the old manifest claiming success"


def test_downstream_fingerprint_follows_upstream(tmp_path):
    prof = profiles.load_profile(profiles.DEFAULT_PROFILE)
    contract.execute("fetch", profiles.step_config(prof, "fetch"), out_dir=tmp_path / "fetch")
    harmony_cfg = profiles.step_config(prof, "harmony")
    fp1 = contract.fingerprint("harmony", harmony_cfg, {"fetch": tmp_path / "fetch"})
    contract.execute("fetch", _fetch_cfg("data.seed=7"), out_dir=tmp_path / "fetch")
    assert contract.fingerprint("harmony", harmony_cfg, {"fetch": tmp_path / "fetch"}) != fp1


def test_inputs_are_checked(tmp_path):
    cfg = profiles.step_config(profiles.load_profile(profiles.DEFAULT_PROFILE), "harmony")
    with pytest.raises(ValueError, match="needs --input fetch=DIR"):
        contract.execute("harmony", cfg, out_dir=tmp_path / "h")
    with pytest.raises(ValueError, match="has not finished"):
        contract.execute("harmony", cfg, out_dir=tmp_path / "h", inputs={"fetch": tmp_path / "nothing"})
    with pytest.raises(ValueError, match="unknown step 'fecth'"):
        contract.step_module("fecth")


def test_fetch_runs_again_when_the_local_data_changes(tmp_path):
    from steps.fetch import BUNDLED

    data = tmp_path / "rows.jsonl"
    lines = BUNDLED.read_text().splitlines()
    data.write_text("\n".join(lines[:20]) + "\n")
    cfg = _fetch_cfg(f"data.dataset={data}")
    contract.execute("fetch", cfg, out_dir=tmp_path / "fetch")
    data.write_text("\n".join(lines[:30]) + "\n")
    manifest, skipped = contract.execute("fetch", cfg, out_dir=tmp_path / "fetch")
    assert not skipped, "same config, new data: fetch must not reuse the old rows"

"""The step contract: manifest written last, skip on a matching fingerprint, re-run on a changed one, inputs checked."""
import json
import os
from pathlib import Path

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


def test_an_upstream_folder_of_another_step_is_named(tmp_path):
    prof = profiles.load_profile(profiles.DEFAULT_PROFILE)
    contract.execute("fetch", profiles.step_config(prof, "fetch"), out_dir=tmp_path / "fetch")
    with pytest.raises(ValueError, match=r"--input harmony=.*fetch holds the output of the fetch step; step train needs "
                                         r"the harmony step's out dir there \(e.g. .*/harmony\)"):
        contract.execute("train", profiles.step_config(prof, "train"), out_dir=tmp_path / "train",
                         inputs={"harmony": tmp_path / "fetch"})


def test_out_dir_that_is_a_file_or_read_only_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--out .*file/fetch: .*file is a file, not a folder"):
        contract.execute("fetch", _fetch_cfg(), out_dir=tmp_path / "file" / "fetch")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere; the kernel's /sys still refuses new folders
        locked = Path("/sys")
    with pytest.raises(ValueError, match=r"--out .*/fetch cannot be created \((Permission denied|Operation not permitted)\)"):
        contract.execute("fetch", _fetch_cfg(), out_dir=locked / "fetch")


def test_a_step_that_starts_clears_what_an_earlier_run_left(tmp_path):
    """Nothing in a folder without a manifest may look like a result: a re-run with other inputs starts clean."""
    out = tmp_path / "fetch"
    contract.execute("fetch", _fetch_cfg("data.seed=1"), out_dir=out)
    (out / "report.md").write_text("# PASSED (from the earlier run)")
    contract.execute("fetch", _fetch_cfg("data.seed=2"), out_dir=out)
    assert not (out / "report.md").exists()
    assert not (out / contract.ATTEMPT).exists(), "a finished step leaves its manifest, not an attempt record"


def test_a_folder_that_no_step_wrote_is_not_cleared(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(ValueError, match=r"--out .* already holds files that no finetune step wrote \(notes.txt"):
        contract.execute("fetch", _fetch_cfg(), out_dir=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"

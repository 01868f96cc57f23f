"""The train step under FSDP2 for real: `torchrun --nproc-per-node 2 -m flows.cli step train …` on CPU over gloo,
full fine-tune (with a resume) and LoRA, packed, on harmony rows built by the real fetch and harmony steps; and packed
vs padded rows under FSDP2 at the model level (tests/fsdp_packing_parity.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steps import contract

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-cpu.yaml"
TORCHRUN = Path(sys.executable).parent / "torchrun"
# Small batches keep a step at a few seconds on 2 cores; 2 processes x 2 packed rows (of up to 512 tokens) x 2
# accumulation a step. Packed, padding-free, as the FSDP2 profiles train.
FAST = ["train.per_device_batch_size=2", "train.grad_accum_steps=2", "train.warmup_ratio=0", "train.lr_scheduler=constant",
        "train.packing=true"]


@pytest.fixture(scope="module")
def harmony_dir(bundled_harmony_16) -> Path:
    """Harmony rows of the bundled data, through the real fetch and harmony steps with the tiny profile (conftest)."""
    return bundled_harmony_16


def torchrun_train(harmony_dir: Path, out_dir: Path, *overrides: str) -> tuple[dict, str]:
    """Run the train step on 2 CPU processes; return its manifest's output and the combined log."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "flows.cli", "step", "train",
           "--config", str(TINY), "--input", f"harmony={harmony_dir}", "--out", str(out_dir),
           "train.fsdp=true", *FAST, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads((out_dir / contract.MANIFEST).read_text())["output"], log


def assert_recorded_once(out_dir: Path, log: str) -> None:
    # contract.execute logs "done" right after rank 0 writes manifest.json; rank 1 returns before both.
    assert log.count("step train: done in") == 1, log[-3000:]
    assert not list(out_dir.glob(".*.tmp")), list(out_dir.iterdir())


def assert_sharded_checkpoint(checkpoint: Path) -> None:
    """One DCP shard per rank for the model and for the optimizer, and the Trainer's completion marker."""
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2, list(checkpoint.iterdir())
    assert len(list((checkpoint / "optimizer_0").glob("*.distcp"))) == 2, list(checkpoint.iterdir())
    assert (checkpoint / "trainer_state.json").is_file()


@pytest.fixture(scope="module")
def full_run(harmony_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("full")
    output, log = torchrun_train(harmony_dir, out_dir, "train.max_steps=4", "train.save_steps=2")
    return output, out_dir, log


def test_full_fine_tune_loss_falls_and_manifest_is_written_once(full_run):
    output, out_dir, log = full_run
    assert output["method"] == "full" and output["num_steps"] == 4
    assert output["train_loss_last"] < output["train_loss_first"] - 0.2, output["loss_curve"]
    assert_recorded_once(out_dir, log)
    assert sorted(p.name for p in (out_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert_sharded_checkpoint(out_dir / "checkpoints" / "checkpoint-4")


def test_full_fine_tune_saves_one_loadable_model_that_differs_from_the_base(full_run):
    from transformers import AutoModelForCausalLM

    output, out_dir, _ = full_run
    model_dir = out_dir / output["model_dir"]
    config = json.loads((model_dir / "config.json").read_text())
    assert [name.removeprefix("FSDP") for name in config["architectures"]] == ["GptOssForCausalLM"]
    trained = load_file(model_dir / "model.safetensors")  # consolidated: one file, full (unsharded) shapes
    base = load_file(out_dir / output["base_model"] / "model.safetensors")
    assert set(trained) == set(base) and all(trained[k].shape == base[k].shape for k in base)
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(changed) > len(base) // 2, f"only {changed} changed"
    net = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(net.state_dict()["lm_head.weight"], trained["lm_head.weight"])


def test_full_fine_tune_resumes_from_its_sharded_checkpoint(full_run, harmony_dir):
    _, out_dir, _ = full_run
    output, log = torchrun_train(harmony_dir, out_dir, "train.max_steps=6", "train.save_steps=2", "train.resume=true")
    assert f"resuming from {out_dir / 'checkpoints' / 'checkpoint-4'}" in log
    assert output["num_steps"] == 6 and [step for step, _ in output["loss_curve"]] == [5, 6], output["loss_curve"]
    assert_recorded_once(out_dir, log)
    assert_sharded_checkpoint(out_dir / "checkpoints" / "checkpoint-6")


def test_lora_under_fsdp_trains_every_adapter_and_saves_a_loadable_one(harmony_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output, log = torchrun_train(harmony_dir, tmp_path, "train.method=lora", "train.learning_rate=1.0e-2",
                                 "train.max_steps=3", "train.save_steps=3")
    assert output["method"] == "lora" and output["num_steps"] == 3
    assert output["train_loss_last"] < output["train_loss_first"], output["loss_curve"]
    assert_recorded_once(tmp_path, log)
    adapter = load_file(tmp_path / output["model_dir"] / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    # 2 layers x (q, k, v, o + the two expert parameters): B starts at zero, so non-zero means it trained.
    assert len(lora_b) == 12 and all(v.abs().max() > 0 for v in lora_b.values()), sorted(lora_b)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / output["base_model"])
    PeftModel.from_pretrained(base, tmp_path / output["model_dir"])


def test_packed_rows_under_fsdp2_give_the_padded_loss_and_gradients(tmp_path):
    """2 processes, each its own 3 documents, the model sharded per layer: packed (positions restarting, no attention
    mask) and padded give the same loss and gradient shards; letting the packed documents see each other does not."""
    out = tmp_path / "parity.json"
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "fsdp_packing_parity.py"),
                           str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["sharded"], result
    assert result["grad_shards_nonzero"] == result["grad_shards"], result  # every shard of every parameter learns
    assert result["packed"] == pytest.approx(result["padded"], rel=1e-6), result
    assert result["grad_rel_diff_max"] < 1e-4, result
    assert abs(result["leaky"] - result["padded"]) > 1e-2, result  # the control can tell

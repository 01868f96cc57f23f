"""The train step on a tiny random gpt-oss (2 layers, hidden 64, 4 experts) with the real gpt-oss tokenizer, on CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Features, List, Value
from safetensors.torch import load_file

from steps import progress, train
from steps import contract
from steps.contract import write_json_atomic
from steps.model import ModelConfig
from steps import modeling
from steps.modeling import load_model
from steps.tokenizer import build_offline_tokenizer, offline_tokenizer_dir
from steps.tracking import NullTracker

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
QA = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Color of the sky?", "Blue"),
      ("Opposite of hot?", "Cold"), ("First letter of the alphabet?", "A"), ("Say hi", "Hi there"),
      ("Largest planet?", "Jupiter"), ("Formula of water?", "H2O")]
MODEL = {"name": "random", "tokenizer": "o200k-offline", "seed": 0}


def write_harmony_dir(path: Path, rows: list[tuple[list[int], list[int]]]) -> Path:
    """A harmony step out dir: a save_to_disk dataset (id, input_ids, assistant_masks) and the manifest naming it."""
    features = Features({"id": Value("string"), "input_ids": List(Value("int32")), "assistant_masks": List(Value("int8"))})
    Dataset.from_dict({"id": [str(i) for i in range(len(rows))], "input_ids": [r[0] for r in rows],
                       "assistant_masks": [r[1] for r in rows]}, features=features).save_to_disk(str(path / "data"))
    write_json_atomic(path / "manifest.json", {"step": "harmony", "fingerprint": f"fixture-{len(rows)}-rows",
                                               "output": {"data_dir": "data", "tokenizer_dir": str(offline_tokenizer_dir()),
                                                          "longest_row": max((len(r[0]) for r in rows), default=0)}})
    return path


def qa_rows(num_rows: int) -> list[tuple[list[int], list[int]]]:
    """Harmony-shaped rows of real gpt-oss token ids: the prompt masked out, the assistant's final answer trained."""
    tokenizer = build_offline_tokenizer()
    rows = []
    for i in range(num_rows):
        question, answer = QA[i % len(QA)]
        prompt = tokenizer.encode(f"<|start|>user<|message|>{question}<|end|><|start|>assistant", add_special_tokens=False)
        completion = tokenizer.encode(f"<|channel|>final<|message|>{answer}<|return|>", add_special_tokens=False)
        rows.append((prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    return rows


@pytest.fixture(scope="module")
def harmony_dir(tmp_path_factory):
    return write_harmony_dir(tmp_path_factory.mktemp("harmony"), qa_rows(8))


def train_kwargs(**overrides) -> dict:
    kwargs = dict(router_aux_loss_coef=0.9, device="cpu", dtype="float32", attn_implementation="eager",
                  max_steps=6, per_device_batch_size=4, grad_accum_steps=1, learning_rate=1e-2,
                  lr_scheduler="constant", lr_scheduler_kwargs={}, warmup_ratio=0.0, max_length=64, save_steps=100,
                  gradient_checkpointing=False, logging_steps=1, lora_r=4, lora_alpha=8)
    return {**kwargs, **overrides}


def train_config(**overrides) -> train.Config:
    return train.Config(model=ModelConfig(**MODEL), **train_kwargs(**overrides))


class RecordingTracker(NullTracker):
    def __init__(self):
        self.metrics: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics, *, step=None):
        self.metrics.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def lora_run(harmony_dir, tmp_path_factory):
    """One LoRA run (attention + experts of every layer); keeps the in-memory model to inspect frozen weights."""
    captured = {}

    def capture(*args, **kwargs):
        captured["net"] = load_model(*args, **kwargs)
        return captured["net"]

    out_dir = tmp_path_factory.mktemp("lora")
    tracker = RecordingTracker()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling, "load_model", capture)  # train.run imports it from steps.modeling when it runs
        output = train.run(train_config(), out_dir=out_dir, inputs={"harmony": harmony_dir}, tracker=tracker)
    return output, out_dir, captured["net"], tracker


def test_lora_loss_falls(lora_run):
    output, _, _, _ = lora_run
    assert output.num_steps == 6 and output.method == "lora"
    assert output.train_loss_last < output.train_loss_first - 0.3, output.loss_curve


def test_lora_trains_attention_and_expert_adapters_of_every_layer(lora_run):
    output, out_dir, _, _ = lora_run
    adapter = load_file(out_dir / output.model_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    for layer in (0, 1):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.experts.lora_B", "mlp.experts.base_layer.lora_B"):  # down_proj and gate_up_proj wrappers
            keys = [k for k in lora_b if f"layers.{layer}.{part}" in k]
            assert keys, f"no LoRA on layers.{layer}.{part}: {sorted(lora_b)}"
            # B starts at zero: non-zero means training changed it.
            assert all(lora_b[k].abs().max() > 0 for k in keys), keys
    config = json.loads((out_dir / output.model_dir / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj"))
    assert (out_dir / output.model_dir / "tokenizer.json").is_file()


def test_lora_leaves_frozen_weights_bit_identical(lora_run):
    output, out_dir, net, _ = lora_run
    base = load_file(out_dir / output.base_model / "model.safetensors")
    trained = {name.replace(".base_layer", ""): p.detach() for name, p in net.named_parameters() if "lora_" not in name}
    assert set(trained) == set(base) and len(base) > 20
    changed = [name for name, weight in base.items() if not torch.equal(weight, trained[name])]
    assert changed == []
    assert not any(p.requires_grad for name, p in net.named_parameters() if "lora_" not in name)


def test_lora_on_experts_held_in_mxfp4_trains_and_keeps_that_base_for_merge(harmony_dir, tmp_path):
    """train.expert_weights=mxfp4 on a random model: its experts are rounded to MXFP4 and held packed; the loss falls,
    the expert adapters train, and the base saved for merge is those packed experts in the release layout, which
    load_model (what merge calls) decodes to exactly the values training ran on."""
    from steps.mxfp4 import E2M1_VALUES, dequantize_mxfp4

    captured = {}

    def capture(*args, **kwargs):
        captured["net"] = load_model(*args, **kwargs)
        return captured["net"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling, "load_model", capture)
        output = train.run(train_config(expert_weights="mxfp4"), out_dir=tmp_path, inputs={"harmony": harmony_dir},
                           tracker=NullTracker())
    assert output.train_loss_last < output.train_loss_first - 0.3, output.loss_curve
    adapter = load_file(tmp_path / output.model_dir / "adapter_model.safetensors")
    expert_b = [k for k in adapter if "mlp.experts" in k and "lora_B" in k]
    assert len(expert_b) == 4 and all(adapter[k].abs().max() > 0 for k in expert_b)

    base_dir = tmp_path / output.base_model
    assert json.loads((base_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    stored = load_file(base_dir / "model.safetensors")
    base = load_model(ModelConfig(name=str(base_dir), tokenizer="o200k-offline"), vocab_size=stored[
        "model.embed_tokens.weight"].shape[0], dtype="float32", attn_implementation="eager", device="cpu")
    lut = torch.tensor(E2M1_VALUES)
    for layer in (0, 1):
        experts = captured["net"].model.layers[layer].mlp.experts.get_base_layer()  # under PEFT's ParamWrappers
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            blocks = getattr(experts, f"{name}_blocks")
            assert blocks.dtype == torch.uint8 and torch.equal(stored[f"{key}_blocks"], blocks)
            held = dequantize_mxfp4(blocks, getattr(experts, f"{name}_scales"), lut).transpose(1, 2)
            assert torch.equal(base.get_parameter(key), held), key
            assert getattr(experts, name).untyped_storage().nbytes() <= 4  # no full-size copy beside the blocks


def test_metrics_reach_the_tracker_every_step(lora_run):
    output, out_dir, _, tracker = lora_run
    per_step = [(step, m) for step, m in tracker.metrics if "loss" in m]
    assert [step for step, _ in per_step] == list(range(1, 7))
    for _, m in per_step:
        assert {"loss", "grad_norm", "learning_rate", "interval_tokens_per_s", "peak_mem_gib"} <= set(m)
        assert m["interval_tokens_per_s"] > 0 and m["peak_mem_gib"] > 0
    assert [s for s, _ in output.loss_curve] == list(range(1, 7))
    assert output.tokens_per_s > 0 and output.train_runtime_s > 0
    assert (out_dir / "loss_curve.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def full_run(harmony_dir, tmp_path_factory):
    cfg = train_config(method="full", router_aux_loss_coef=0.0, per_device_batch_size=8, max_steps=4, learning_rate=3e-3)
    out_dir = tmp_path_factory.mktemp("full")
    return train.run(cfg, out_dir=out_dir, inputs={"harmony": harmony_dir}, tracker=NullTracker()), out_dir


def test_full_finetune_loss_falls(full_run):
    output, out_dir = full_run
    assert output.method == "full" and output.num_steps == 4
    assert output.train_loss_last < output.train_loss_first - 1.0, output.loss_curve
    assert (out_dir / output.model_dir / "model.safetensors").is_file()


# A wide initialisation makes the initial logits far from uniform, so the loss over prompt tokens differs clearly
# from the loss over assistant tokens.
WIDE_MODEL = {**MODEL, "random_shape": {"initializer_range": 0.3}}


@pytest.fixture(scope="module")
def first_step_runs(harmony_dir, tmp_path_factory):
    """One step over all 8 rows in one batch, unpacked and packed: the logged loss is at the initial weights."""
    runs = {}
    for packing in (False, True):
        cfg = train.Config(model=ModelConfig(**WIDE_MODEL), **train_kwargs(
            method="full", router_aux_loss_coef=0.0, per_device_batch_size=8, max_steps=1, packing=packing))
        out_dir = tmp_path_factory.mktemp(f"packing-{packing}")
        runs[packing] = train.run(cfg, out_dir=out_dir, inputs={"harmony": harmony_dir}, tracker=NullTracker()), out_dir
    return runs


def test_masked_tokens_carry_no_loss(first_step_runs):
    """The first step's loss is the cross-entropy over assistant-masked tokens only, not over every token."""
    from transformers import AutoModelForCausalLM

    output, out_dir = first_step_runs[False]
    base = AutoModelForCausalLM.from_pretrained(out_dir / output.base_model, dtype=torch.float32).eval()
    masked_sum = all_sum = 0.0
    masked_count = all_count = 0
    with torch.no_grad():
        for ids, mask in qa_rows(8):
            logits = base(input_ids=torch.tensor([ids])).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            masked_sum += nll[keep].sum().item()
            masked_count += int(keep.sum())
            all_sum += nll.sum().item()
            all_count += len(nll)
    masked_loss, all_loss = masked_sum / masked_count, all_sum / all_count
    assert abs(all_loss - masked_loss) > 0.1  # the check below can tell the two apart
    assert output.train_loss_first == pytest.approx(masked_loss, abs=2e-3)


def test_packing_matches_unpacked_loss(first_step_runs):
    """Padding-free packing gives the same first-step loss as unpacked rows: packed documents don't attend to each other."""
    unpacked, packed = first_step_runs[False][0], first_step_runs[True][0]
    assert packed.train_loss_first == pytest.approx(unpacked.train_loss_first, abs=2e-3)


_RUN_IN_SUBPROCESS = """
import json, sys
from pathlib import Path
from steps import contract, train
from steps.model import ModelConfig
kwargs = json.loads(sys.argv[1])
cfg = train.Config(model=ModelConfig(**kwargs.pop("model")), **kwargs)
contract.execute("train", cfg, out_dir=Path(sys.argv[2]), inputs={"harmony": Path(sys.argv[3])})
"""


def test_rerun_after_kill_resumes_and_ends_where_an_uninterrupted_run_does(lora_run, harmony_dir, tmp_path, caplog):
    """SIGKILL a run after its first checkpoint and run the same step again (the default, train.resume=auto): it
    continues from the newest complete checkpoint, and its steps and losses are the uninterrupted run's."""
    reference, _, _, _ = lora_run
    out_dir = tmp_path / "train"
    kwargs = {"model": MODEL, **train_kwargs(save_steps=2)}
    proc = subprocess.Popen([sys.executable, "-c", _RUN_IN_SUBPROCESS, json.dumps(kwargs), str(out_dir), str(harmony_dir)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first_checkpoint = out_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json"
        deadline = time.monotonic() + 240
        while not first_checkpoint.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not (out_dir / "manifest.json").exists(), "the run finished before it could be killed"
    resumed_from = train.last_complete_checkpoint(out_dir / "checkpoints")
    resumed_step = int(resumed_from.name.rpartition("-")[2])
    assert 2 <= resumed_step < 6

    cfg = train.Config(model=ModelConfig(**MODEL), **train_kwargs(save_steps=2))
    with caplog.at_level("INFO", logger="finetune"):
        manifest, skipped = contract.execute("train", cfg, out_dir=out_dir, inputs={"harmony": harmony_dir})
    assert not skipped and f"train: resuming from {resumed_from}" in caplog.text
    output = manifest["output"]
    assert output["num_steps"] == 6
    assert [s for s, _ in output["loss_curve"]] == list(range(resumed_step + 1, 7))
    expected = dict((s, loss) for s, loss in reference.loss_curve)
    for step, loss in output["loss_curve"]:
        assert loss == pytest.approx(expected[step], abs=2e-3), (step, output["loss_curve"], reference.loss_curve)
    assert output["train_loss_last"] == pytest.approx(reference.train_loss_last, abs=2e-3)


def test_changed_inputs_after_a_kill_start_fresh(harmony_dir, tmp_path, caplog):
    """A checkpoint left by an interrupted run with another config is not resumed from: the log says why."""
    out_dir = tmp_path / "train"
    interrupted = train.Config(model=ModelConfig(**MODEL), **train_kwargs(max_steps=2, save_steps=1))
    contract._start_attempt("train", train, out_dir, contract.fingerprint("train", interrupted, {"harmony": harmony_dir}))
    (out_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (out_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (out_dir / "loss_curve.png").write_text("from the interrupted run")
    cfg = train.Config(model=ModelConfig(**MODEL), **train_kwargs(max_steps=2, save_steps=1, learning_rate=5e-3))
    with caplog.at_level("INFO", logger="finetune"):
        manifest, _ = contract.execute("train", cfg, out_dir=out_dir, inputs={"harmony": harmony_dir})
    assert "the interrupted run in" in caplog.text and "had other inputs" in caplog.text
    assert "starting fresh, deleting the old checkpoints" in caplog.text
    assert [s for s, _ in manifest["output"]["loss_curve"]] == [1, 2]


# --- Bad input: each message names the field and the fix ---

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(harmony_dir, tmp_path):
    with pytest.raises(ValueError, match="train.device=cuda.*set train.device=cpu"):
        train.run(train_config(device="cuda"), out_dir=tmp_path, inputs={"harmony": harmony_dir}, tracker=NullTracker())


def test_empty_dataset(tmp_path):
    empty = write_harmony_dir(tmp_path / "harmony", [])
    with pytest.raises(ValueError, match="has no rows"):
        train.run(train_config(), out_dir=tmp_path / "out", inputs={"harmony": empty}, tracker=NullTracker())


def test_max_length_below_longest_row(harmony_dir, tmp_path):
    with pytest.raises(ValueError, match=r"train.max_length=8 < longest harmony row \d+ tokens.*harmony.overflow"):
        train.run(train_config(max_length=8), out_dir=tmp_path, inputs={"harmony": harmony_dir}, tracker=NullTracker())


def test_max_length_is_checked_against_harmony_before_train_starts(harmony_dir, tmp_path):
    """Through the contract the harmony manifest's longest_row decides, before the out dir or a model exists."""
    with pytest.raises(ValueError, match=r"train.max_length=8 < longest harmony row \d+ tokens"):
        contract.execute("train", train_config(max_length=8), out_dir=tmp_path / "train", inputs={"harmony": harmony_dir})
    assert not (tmp_path / "train").exists()


def test_lora_target_that_matches_nothing_lists_what_exists(harmony_dir, tmp_path):
    with pytest.raises(ValueError, match=r"\['gate_proj'\] match no linear layer.*'q_proj'"):
        train.run(train_config(lora_target_modules=["q_proj", "gate_proj"]), out_dir=tmp_path,
                  inputs={"harmony": harmony_dir}, tracker=NullTracker())
    with pytest.raises(ValueError, match=r"lora_expert_layers: \[7\] do not exist; this model has layers 0..1"):
        train.run(train_config(lora_expert_layers=[0, 7]), out_dir=tmp_path,
                  inputs={"harmony": harmony_dir}, tracker=NullTracker())


@pytest.mark.parametrize("overrides, message", [
    ({"dtype": "mxfp4"}, "train.dtype='mxfp4'.*MXFP4.*set train.dtype=bfloat16"),
    ({"attn_implementation": "sdpa"}, "sinks.*flex_attention"),
    ({"attn_implementation": "flex_attention"}, "sinks on CPU; set train.attn_implementation=eager"),
    ({"lora_dropout": 0.1}, "train.lora_dropout=0.1 cannot apply to expert parameters"),
    ({"lora_target_modules": [], "lora_expert_layers": []}, "LoRA would train nothing"),
    ({"lora_expert_layers": "some"}, "use all or a list of layer indices"),
    ({"max_steps": 0}, "train.max_steps=0"),
    ({"expert_weights": "mxfp4", "method": "full"}, "train.expert_weights=mxfp4 holds the experts frozen, but "
     "train.method=full trains them; set train.expert_weights=dtype"),
    ({"expert_weights": "mxfp4", "fsdp": True}, "train.expert_weights=mxfp4 with train.fsdp=true.*set "
     "train.expert_weights=dtype"),
    ({"lr_scheduler": "cosine_wit_min_lr"}, "train.lr_scheduler='cosine_wit_min_lr' is unknown"),
    ({"learning_rate": -5}, "train.learning_rate=-5 must be positive"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rat": 0.1}},
     "train.lr_scheduler_kwargs.min_lr_rat is not an argument of the cosine_with_min_lr scheduler; it takes num_cycles, "
     "min_lr, min_lr_rate"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        train_config(**overrides)


@pytest.mark.unit
def test_out_of_memory_names_the_knobs(monkeypatch, harmony_dir, tmp_path):
    """An OOM inside training becomes a message that says which profile keys to turn."""
    import transformers

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.35 GiB")

    monkeypatch.setattr(transformers.Trainer, "train", oom)
    with pytest.raises(RuntimeError, match=r"train\.per_device_batch_size=4 x train\.max_length=64: lower either"):
        train.run(train_config(max_steps=1), out_dir=tmp_path / "train", inputs={"harmony": harmony_dir},
                  tracker=NullTracker())


def test_model_flops_per_token_counts_the_active_parameters():
    """MFU's numerator: gpt-oss-20b passes each token through 3.6 B parameters (OpenAI's model card)."""
    from transformers import GptOssConfig

    from steps.model import GPT_OSS_20B_SHAPE

    config = GptOssConfig(**GPT_OSS_20B_SHAPE, vocab_size=201088)
    assert progress.model_flops_per_token(config, "lora") / 4 == pytest.approx(3.6e9, rel=0.01)
    assert progress.model_flops_per_token(config, "full") == 1.5 * progress.model_flops_per_token(config, "lora")
    assert progress.peak_bf16_flops("cpu") is None


def test_eta_follows_the_steady_steps_not_the_compile_step(monkeypatch):
    """A first step of 140 s (compile), then 1 s steps: after step 3 of 8 the ETA is 5 s, not the 237 s that averaging
    the compile step in gave; after step 1 there is none (not 7 x 140 s)."""
    from transformers import TrainerState, TrainingArguments

    clock = iter([0.0, 140.0, 141.0, 142.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    callback = progress.Progress(NullTracker(), "cpu", flops_per_token=1.0, peak_flops=None)
    state = TrainerState(max_steps=8, global_step=0)
    callback.on_train_begin(TrainingArguments(output_dir="unused", report_to=[]), state, None)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, None)
    assert callback.eta_s(state, 142.0) == pytest.approx(5 * 1.0)
    state.global_step = 1
    assert callback.eta_s(state, 140.0) is None  # the compile step alone says nothing about the pace


def test_compile_cache_is_kept_in_the_output_root_and_keyed_by_versions_and_code(monkeypatch, tmp_path):
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, "unset")  # restored after the test
    cache = train.use_compile_cache(train_config(), tmp_path / "run" / "train")
    assert cache.parent == tmp_path / "run" / ".compile-cache" and cache.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")
    assert train.use_compile_cache(train_config(compile_cache_dir=str(tmp_path / "vol")), tmp_path).parent == tmp_path / "vol"

    key = train.compile_cache_key()
    assert train.compile_cache_key() == key
    edited = tmp_path / "modeling.py"
    edited.write_bytes(Path(modeling.__file__).read_bytes() + b"# edited\n")
    monkeypatch.setattr(modeling, "__file__", str(edited))
    assert train.compile_cache_key() != key  # a code change never loads the old kernels
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert train.compile_cache_key() != key


def test_the_written_out_schedulers_are_the_installed_transformers_ones():
    """train.Config checks lr_scheduler and its kwargs against a table (no torch import); it must match transformers."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    assert list(train.SCHEDULER_KWARGS) == [s.value for s in SchedulerType]
    fixed = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    for name, accepted in train.SCHEDULER_KWARGS.items():
        params = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters
        if accepted is None:
            assert any(p.kind is p.VAR_KEYWORD for p in params.values()), name
        else:
            assert set(accepted) == set(params) - fixed, name


def test_a_checkpoint_cut_off_mid_save_is_never_resumed_from(tmp_path):
    """trainer_state.json is the Trainer's last write: a checkpoint without it, or with it half-written, is skipped
    (and removed when a complete one precedes it)."""
    for step, state in ((2, "{}"), (4, '{"global_step": 4, "log_hi'), (6, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"\0" * 16)
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert train.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]

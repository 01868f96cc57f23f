"""The merge step on a tiny random gpt-oss: LoRA (attention + experts) folded in, logits checked, config fixed, reloaded."""
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from steps import merge
from steps.contract import write_json_atomic
from steps.model import ModelConfig
from steps.modeling import load_model
from steps.tokenizer import build_offline_tokenizer
from steps.tracking import NullTracker

pytestmark = pytest.mark.unit

MODEL = ModelConfig(name="random", tokenizer="o200k-offline")


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_tokenizer()


def _write_train_output(train_dir: Path, **output) -> Path:
    write_json_atomic(train_dir / "manifest.json", {"output": output})
    return train_dir


@pytest.fixture(scope="module")
def lora_train_dir(tmp_path_factory, tokenizer):
    """A train step out dir: random base in base/, an adapter with non-zero B on attention and every expert in model/."""
    train_dir = tmp_path_factory.mktemp("train")
    net = load_model(MODEL, vocab_size=len(tokenizer), dtype="float32", attn_implementation="eager", device="cpu")
    net.save_pretrained(train_dir / "base")
    torch.manual_seed(1)
    # init_lora_weights=False draws B at random too, so the adapter changes the logits from the first step.
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        target_parameters=[f"layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")])
    peft_model = get_peft_model(net, config)
    peft_model.save_pretrained(train_dir / "model")
    tokenizer.save_pretrained(train_dir / "model")
    return _write_train_output(train_dir, model_dir="model", base_model="base", base_revision="", method="lora")


@pytest.fixture(scope="module")
def merged_run(lora_train_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("merge")
    cfg = merge.Config(model=MODEL, dtype="float32", probe_tolerance=1e-4)
    return merge.run(cfg, out_dir=out_dir, inputs={"train": lora_train_dir}, tracker=NullTracker()), out_dir


def test_merged_logits_equal_base_plus_adapter_experts_included(merged_run, lora_train_dir, tokenizer):
    output, out_dir = merged_run
    assert output.max_abs_logit_diff <= 1e-4 and output.reload_max_abs_logit_diff <= 1e-4
    assert output.adapter_max_abs_logit_effect > 100 * 1e-4
    base = load_file(lora_train_dir / "base" / "model.safetensors")
    merged = load_file(out_dir / output.model_dir / "model.safetensors")
    assert set(merged) == set(base)  # no LoRA or base_layer names left behind
    for layer in (0, 1):
        for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "self_attn.q_proj.weight"):
            key = f"model.layers.{layer}.{name}"
            assert not torch.allclose(merged[key], base[key]), f"{key} was not merged"
    for key in ("model.embed_tokens.weight", "model.layers.0.mlp.router.weight", "model.layers.0.self_attn.sinks"):
        assert torch.equal(merged[key], base[key]), f"{key} is not a LoRA target but changed"

    # The check that passed above is sensitive: the merged model is far from the base on the probe batch.
    from transformers import AutoModelForCausalLM

    ids = merge.probe_ids(tokenizer, 64)
    base_logits = merge.logits_of(AutoModelForCausalLM.from_pretrained(lora_train_dir / "base", dtype=torch.float32), ids)
    merged_logits = merge.logits_of(AutoModelForCausalLM.from_pretrained(out_dir / output.model_dir, dtype=torch.float32), ids)
    assert (merged_logits - base_logits).abs().max() > 100 * 1e-4


@pytest.mark.parametrize("dtype, message", [
    ("float32", r"merged vs base\+adapter: max \|logit difference\| .* exceeds merge.probe_tolerance=0.0001"),
    # in bf16 the refusal also says how far the adapter itself moves the logits and what to set
    ("bfloat16", r"the adapter itself moves the logits by up to [0-9.e+-]+; .*set merge\.dtype=float32"),
])
def test_merge_refuses_to_save_when_logits_differ(lora_train_dir, tmp_path, monkeypatch, dtype, message):
    """A merge that loses the adapter (here: unload instead of merge) is caught before anything is saved."""
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.unload())
    cfg = merge.Config(model=MODEL, dtype=dtype, probe_tolerance=1e-4)
    with pytest.raises(ValueError, match=message):
        merge.run(cfg, out_dir=tmp_path, inputs={"train": lora_train_dir}, tracker=NullTracker())
    assert not (tmp_path / "model").exists()


def test_saved_folder_serves_reasoning(merged_run):
    """Tokenizer, chat template and the gpt-oss response template travel with the model; use_cache is back on."""
    from transformers import AutoTokenizer

    output, out_dir = merged_run
    model_dir = out_dir / output.model_dir
    saved = AutoTokenizer.from_pretrained(model_dir)
    assert "<|channel|>" in saved.chat_template
    prompt = saved.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    parsed = saved.parse_response(
        "<|channel|>analysis<|message|>Think first.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
        prefix=prompt)
    assert parsed["thinking"] == "Think first." and parsed["content"] == "Hello!"
    # A call as the harmony step trains it (<|constrain|>json) parses; TRL's own template would drop it silently.
    call = saved.parse_response('<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant to=functions.get_weather'
                                '<|channel|>commentary <|constrain|>json<|message|>{"city": "東京"}<|call|>', prefix=prompt)
    assert call["tool_calls"] == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["use_cache"] is True and config["architectures"] == ["GptOssForCausalLM"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [200002, 200012]


def test_architectures_keep_their_letters():
    assert merge.fixed_architectures(["FSDPGptOssForCausalLM"]) == ["GptOssForCausalLM"]
    assert merge.fixed_architectures(["GptOssForCausalLM"]) == ["GptOssForCausalLM"]
    # lstrip removes any leading F/S/D/P characters, not the prefix: it would eat the S of "Something".
    assert "FSDPSomethingForCausalLM".lstrip("FSDP") == "omethingForCausalLM"
    assert merge.fixed_architectures(["FSDPSomethingForCausalLM"]) == ["SomethingForCausalLM"]


def test_full_finetune_saved_under_fsdp_gets_its_architecture_fixed(tmp_path, tokenizer):
    """A full fine-tune whose config.json says FSDPGptOssForCausalLM is re-saved as GptOssForCausalLM and reloads."""
    train_dir = tmp_path / "train"
    net = load_model(MODEL, vocab_size=len(tokenizer), dtype="float32", attn_implementation="eager", device="cpu")
    net.save_pretrained(train_dir / "model")
    tokenizer.save_pretrained(train_dir / "model")
    config_path = train_dir / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["FSDPGptOssForCausalLM"]
    config_path.write_text(json.dumps(config))
    _write_train_output(train_dir, model_dir="model", base_model="random", base_revision="", method="full")

    output = merge.run(merge.Config(model=MODEL, dtype="float32", probe_tolerance=1e-4), out_dir=tmp_path / "merge",
                       inputs={"train": train_dir}, tracker=NullTracker())
    assert output.architectures == ["GptOssForCausalLM"]
    assert json.loads((tmp_path / "merge" / "model" / "config.json").read_text())["architectures"] == ["GptOssForCausalLM"]
    assert output.max_abs_logit_diff == 0.0 and output.reload_max_abs_logit_diff <= 1e-4
    assert output.num_params == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"dtype": "mxfp4"}, "merge.dtype='mxfp4' is not supported.*set merge.export=mxfp4"),
    ({"probe_tolerance": 0.0}, "merge.probe_tolerance=0.0 must be positive"),
    ({"export": "gguf"}, "merge.export='gguf' is unknown; choose one of bf16, mxfp4"),
    ({"keep_bf16": True}, "merge.keep_bf16=true keeps the bf16 merge beside an MXFP4 export; set merge.export=mxfp4"),
    ({"export": "mxfp4", "min_retention": 1.5}, "merge.min_retention=1.5 can never be met"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        merge.Config(model=MODEL, **overrides)


def test_mxfp4_export_has_the_release_layout_and_records_retention(lora_train_dir, tmp_path, tokenizer):
    """merge.export=mxfp4 on a LoRA fine-tune (attention + every expert): the folder holds the tensors a release
    checkpoint of this shape holds (names, dtypes, shapes), its config carries the release's quantization_config, it
    loads with transformers, and the manifest's figures say how much of the adapter's effect survived."""
    from hub_layout import RELEASE_QUANTIZATION_CONFIG, decode, write_quantized_checkpoint
    from safetensors import safe_open

    out = merge.run(merge.Config(model=MODEL, dtype="float32", probe_tolerance=1e-4, export="mxfp4", min_retention=-10,
                                 keep_bf16=True),
                    out_dir=tmp_path / "merge", inputs={"train": lora_train_dir}, tracker=NullTracker())
    model_dir = tmp_path / "merge" / out.model_dir
    # keep_bf16: the unrounded merge beside the export, as export=bf16 would have saved it
    assert out.bf16_model_dir == "model-bf16"
    kept = load_file(tmp_path / "merge" / "model-bf16" / "model.safetensors")
    assert kept["model.layers.0.mlp.experts.down_proj"].dtype == torch.float32 and not any(k.endswith("_blocks") for k in kept)

    release, _ = write_quantized_checkpoint(tmp_path / "release", RELEASE_QUANTIZATION_CONFIG, vocab_size=len(tokenizer))
    exported = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            exported.update({k: f.get_tensor(k) for k in f.keys()})
    assert {k: (v.dtype, v.shape) for k, v in exported.items()} == {k: (v.dtype, v.shape) for k, v in release.items()}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"] == RELEASE_QUANTIZATION_CONFIG and config["architectures"] == ["GptOssForCausalLM"]

    # The encoded experts are the merged float32 experts rounded to MXFP4: within one rounding step of each value.
    merged = AutoModelForCausalLM.from_pretrained(lora_train_dir / "base", dtype=torch.float32)
    assert not any(n.endswith("_blocks") for n in merged.state_dict())
    name = "model.layers.1.mlp.experts.down_proj"
    value = decode(exported[f"{name}_blocks"], exported[f"{name}_scales"])
    scale = torch.exp2(exported[f"{name}_scales"].float() - 127).repeat_interleave(32, -1)
    peft_merged = load_model(ModelConfig(name=str(model_dir)), vocab_size=len(tokenizer), dtype="float32",
                                   attn_implementation="eager", device="cpu")
    assert torch.equal(peft_merged.state_dict()[name].transpose(1, 2), value)  # transformers decodes what we encoded
    assert value.abs().sum() > 0 and scale.max() > 0

    fig = out.retention
    assert out.export == "mxfp4" and out.num_bytes == sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert fig["probe_split"] == "fixed chat" and fig["num_probe_rows"] == 1
    assert fig["retention"] < 1 and fig["kl_merged_vs_base"] > fig["kl_mxfp4_vs_merged"] > 0
    assert fig["eval_loss_base"] != fig["eval_loss_merged"] != fig["eval_loss_mxfp4"]
    print("tiny LoRA fixture, MXFP4 export:", fig)

"""finetune step merge --config configs/tiny-cpu.yaml --input train=DIR --out DIR2

Merge the trained adapter into its base (experts included), verify the logits, and save a servable model folder.
The merged model's logits must match base+adapter on a probe batch before anything is saved, and the saved folder
must reload to the same logits. The folder holds weights, config, tokenizer, chat template and the gpt-oss response
template (so an OpenAI-compatible server returns reasoning_content).
"""
from __future__ import annotations  # torch.Tensor in annotations without importing torch

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from steps.contract import read_output
from steps.model import DTYPE_NAMES, ModelConfig
from steps.tracking import Tracker
from steps.train import save_dir_atomic

# torch, transformers, TRL and PEFT are imported where they are used: reading a profile must not pay for them.

log = logging.getLogger("finetune")

INPUTS = ("train",)
PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain in two sentences why the sky is blue. Réponds aussi en français, 日本語でも。"},
]


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    """Injected from the profile's `model` section (the base is what the train step recorded)."""
    dtype: str = "bfloat16"
    """dtype of the merged weights: bfloat16 (what gpt-oss is served in) or float32."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where to merge and run the probe batch (gpt-oss-20b in bf16 needs ~42 GB of host or GPU memory)."""
    probe_tolerance: float = 0.1
    """Largest absolute logit difference allowed between base+adapter and the merged model (bf16 rounds W + BA;
    float32 merges agree to ~1e-5)."""
    num_probe_tokens: int = 64
    """Length of the probe batch (a fixed chat rendered with the model's template, repeated to this length)."""

    def __post_init__(self):
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"merge.dtype={self.dtype!r} is not supported; set merge.dtype=bfloat16 (or float32)")
        if self.probe_tolerance <= 0:
            raise ValueError(f"merge.probe_tolerance={self.probe_tolerance} must be positive, e.g. 0.1 for bfloat16")
        if self.num_probe_tokens < 2:
            raise ValueError(f"merge.num_probe_tokens={self.num_probe_tokens} must be at least 2")


@dataclass(frozen=True, kw_only=True)
class Output:
    model_dir: str
    """The merged model folder (relative to this step's out dir), ready for push and serving."""
    architectures: list
    max_abs_logit_diff: float
    """Largest |logit| difference, merged vs base+adapter (0 for a full fine-tune), on the probe batch."""
    reload_max_abs_logit_diff: float
    """Largest |logit| difference, saved-and-reloaded vs merged, on the probe batch."""
    adapter_max_abs_logit_effect: float
    """Largest |logit| change the adapter makes to the base on the probe batch (scale for the two diffs above)."""
    num_params: int


def fixed_architectures(names: list[str]) -> list[str]:
    """FSDP2 wraps classes as FSDP<Name>; strip exactly that prefix (str.lstrip("FSDP") would eat leading F/S/D/P letters)."""
    return [name.removeprefix("FSDP") for name in names]


def probe_ids(tokenizer, num_tokens: int) -> torch.Tensor:
    import torch

    ids = tokenizer.apply_chat_template(PROBE_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
    return torch.tensor([ids])


def logits_of(net, ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return net(input_ids=ids.to(net.device)).logits.float().cpu()


def check_close(a: torch.Tensor, b: torch.Tensor, *, tolerance: float, what: str, hint: str = "") -> float:
    diff = (a - b).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise ValueError(f"{what}: max |logit difference| {diff:.3g} exceeds merge.probe_tolerance={tolerance}; "
                         f"the merged weights do not reproduce the trained model, nothing was saved{hint}")
    return diff


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.chat_template_utils import add_response_schema

    from steps.modeling import DTYPES, load_model

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("merge.device=cuda but this machine has no CUDA device; set merge.device=cpu")
    trained = read_output(inputs["train"])
    trained_dir = Path(trained["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(trained_dir)
    ids = probe_ids(tokenizer, cfg.num_probe_tokens)

    if trained["method"] == "lora":
        if not trained["base_model"]:
            raise ValueError(f"{inputs['train']} trained LoRA on a random base it did not save (train.save_random_base=false); "
                             "re-run train with train.save_random_base=true to merge it")
        base_dir = Path(inputs["train"]) / trained["base_model"]
        base_name = str(base_dir) if base_dir.is_dir() else trained["base_model"]
        base = load_model(ModelConfig(name=base_name, revision=trained["base_revision"] or "main"),
                          vocab_size=len(tokenizer), dtype=cfg.dtype, attn_implementation="eager", device=cfg.device)
        peft_model = PeftModel.from_pretrained(base, trained_dir).eval()
        adapter_logits = logits_of(peft_model, ids)
        with peft_model.disable_adapter():
            adapter_effect = (adapter_logits - logits_of(peft_model, ids)).abs().max().item()
        # merge_and_unload folds LoRA into every targeted weight, the expert parameters (PEFT ParamWrapper) included.
        merged = peft_model.merge_and_unload().eval()
        merged_logits = logits_of(merged, ids)
        # In bf16, W + BA rounds away adapter deltas below the weights' resolution (~0.4% of |W|): a briefly trained
        # adapter then vanishes in the merge while it still acts on the unmerged base (bench/README.md, FSDP2 runs).
        hint = (f" (the adapter itself moves the logits by up to {adapter_effect:.3g}; when that is of the same size, "
                "the bf16 merge rounded the adapter's small deltas away: set merge.dtype=float32, or train longer)"
                if cfg.dtype == "bfloat16" else "")
        diff = check_close(merged_logits, adapter_logits, tolerance=cfg.probe_tolerance, what="merged vs base+adapter",
                           hint=hint)
        log.info("merge: adapter merged into %s; max |logit diff| vs base+adapter %.3g (the adapter itself moves "
                 "logits by up to %.3g)", base_name, diff, adapter_effect)
    else:
        merged = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=DTYPES[cfg.dtype], device_map=cfg.device).eval()
        merged_logits, diff, adapter_effect = logits_of(merged, ids), 0.0, 0.0
        log.info("merge: full fine-tune, nothing to merge; re-saving %s", trained_dir)

    merged.config.use_cache = True  # training turned the KV cache off; serving needs it
    # Generation ends on <|return|> (final answer) or <|call|> (tool call), as in openai/gpt-oss-*'s generation config.
    merged.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")]
    merged.generation_config.pad_token_id = merged.config.pad_token_id = tokenizer.pad_token_id
    merged.config.eos_token_id = tokenizer.eos_token_id
    add_response_schema(tokenizer)
    reload_diff = 0.0

    def write(tmp: Path):
        nonlocal reload_diff
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = fixed_architectures(config.get("architectures") or ["GptOssForCausalLM"])
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[cfg.dtype], device_map=cfg.device).eval()
        reload_diff = check_close(logits_of(reloaded, ids), merged_logits, tolerance=cfg.probe_tolerance,
                                  what="reloaded from disk vs merged")
        del reloaded

    save_dir_atomic(out_dir / "model", write)
    architectures = json.loads((out_dir / "model" / "config.json").read_text())["architectures"]
    output = Output(model_dir="model", architectures=architectures, max_abs_logit_diff=diff,
                    reload_max_abs_logit_diff=reload_diff, adapter_max_abs_logit_effect=adapter_effect,
                    num_params=sum(p.numel() for p in merged.parameters()))
    tracker.log_metrics({"merge_max_abs_logit_diff": diff, "merge_reload_max_abs_logit_diff": reload_diff})
    log.info("merge: saved %s (%s, %.1f M parameters, reload diff %.3g)", out_dir / "model",
             ", ".join(architectures), output.num_params / 1e6, reload_diff)
    return output

"""finetune step merge --config configs/tiny-cpu.yaml --input train=DIR --out DIR2

Merge the trained adapter into its base (experts included), verify the logits, and save a servable model folder.
The merged model's logits must match base+adapter on a probe batch before anything is saved, and the saved folder
must reload to the same logits. The folder holds weights, config, tokenizer, chat template and the gpt-oss response
template (so an OpenAI-compatible server returns reasoning_content).

merge.export=mxfp4 saves the experts back in MXFP4, in the openai/gpt-oss release layout (steps/mxfp4.py), after
measuring on the eval split (else the training rows) how much of the fine-tune's effect on the logits the rounding
kept; below merge.min_retention nothing is saved.
"""
from __future__ import annotations  # torch.Tensor in annotations without importing torch

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from steps.contract import read_manifest, read_output
from steps.model import DTYPE_NAMES, ModelConfig
from steps.tracking import Tracker
from steps.train import save_dir_atomic

# torch, transformers, TRL and PEFT are imported where they are used: reading a profile must not pay for them.

log = logging.getLogger("finetune")

INPUTS = ("train",)
EXPORTS = ("bf16", "mxfp4")
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
    export: str = "bf16"
    """What model/ holds, and so what push uploads and smoke serves: bf16 (every weight as merged, in merge.dtype)
    or mxfp4 (experts in MXFP4 as the openai/gpt-oss releases ship them, the rest bf16: ~3x smaller)."""
    keep_bf16: bool = False
    """With export=mxfp4: also keep the unrounded merge in model-bf16/ (gpt-oss-20b: ~42 GB more)."""
    min_retention: float = 0.8
    """With export=mxfp4: refuse the export when it keeps less of the fine-tune's effect on the probe logits
    (1 - ||mxfp4 - merged|| / ||merged - base||, steps/mxfp4.py says why this measure)."""
    num_probe_rows: int = 8
    """With export=mxfp4: rows of the eval split (else of the training split) that retention and eval loss use."""

    def __post_init__(self):
        if self.dtype not in DTYPE_NAMES:
            hint = "; MXFP4 is an export format: set merge.export=mxfp4" if self.dtype.lower() == "mxfp4" else ""
            raise ValueError(f"merge.dtype={self.dtype!r} is not supported; set merge.dtype=bfloat16 (or float32){hint}")
        if self.export not in EXPORTS:
            raise ValueError(f"merge.export={self.export!r} is unknown; choose one of {', '.join(EXPORTS)}")
        if self.keep_bf16 and self.export != "mxfp4":
            raise ValueError("merge.keep_bf16=true keeps the bf16 merge beside an MXFP4 export; set merge.export=mxfp4 "
                             "or remove merge.keep_bf16 (export=bf16 saves the bf16 merge in model/ anyway)")
        if not self.min_retention <= 1:
            raise ValueError(f"merge.min_retention={self.min_retention} can never be met (retention is at most 1); "
                             "use e.g. 0.8")
        if self.num_probe_rows < 1:
            raise ValueError(f"merge.num_probe_rows={self.num_probe_rows} must be at least 1")
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
    """Largest |logit| difference, saved-and-reloaded vs merged, on the probe batch (export=mxfp4: of the reloaded
    export, which rounding moves on purpose: retention, not this figure, is its check)."""
    adapter_max_abs_logit_effect: float
    """Largest |logit| change the adapter makes to the base on the probe batch (scale for the two diffs above)."""
    num_params: int
    export: str = "bf16"
    """Format of model_dir: bf16 or mxfp4 (release layout)."""
    num_bytes: int = 0
    """Bytes of model_dir's weight files on disk."""
    fits_gpu: str = ""
    """The smallest common GPU that holds model_dir's weights (steps/mxfp4.py: smallest_gpu)."""
    bf16_model_dir: str = ""
    """The unrounded merge beside an MXFP4 export (merge.keep_bf16=true); empty otherwise."""
    retention: dict = field(default_factory=dict)
    """export=mxfp4: share of the fine-tune's logit effect kept, eval loss of base / merge (merge.dtype) / MXFP4 export, mean
    KL divergences, and the probe they were measured on."""


def fixed_architectures(names: list[str]) -> list[str]:
    """FSDP2 wraps classes as FSDP<Name>; strip exactly that prefix (str.lstrip("FSDP") would eat leading F/S/D/P letters)."""
    return [name.removeprefix("FSDP") for name in names]


def probe_ids(tokenizer, num_tokens: int) -> torch.Tensor:
    import torch

    ids = tokenizer.apply_chat_template(PROBE_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
    return torch.tensor([ids])


def probe_rows(train_dir: Path, *, tokenizer, num_rows: int, num_tokens: int) -> tuple[list, str]:
    """[(input_ids, labels)] for retention and eval loss: the eval split's first rows, else the training split's
    (loss on the assistant turn, as trained), else (no harmony step upstream) the fixed chat, loss on every token."""
    import torch
    from datasets import load_from_disk

    harmony_dir = read_manifest(train_dir).get("inputs", {}).get("harmony")
    if harmony_dir:
        harmony = read_output(harmony_dir)
        split, data_dir = ("eval", harmony["eval_data_dir"]) if harmony.get("eval_data_dir") else ("train", harmony["data_dir"])
        data = load_from_disk(data_dir)
        rows = data.select(range(min(num_rows, len(data))))
        return [(torch.tensor([ids]), torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]]))
                for ids, mask in zip(rows["input_ids"], rows["assistant_masks"])], split
    ids = probe_ids(tokenizer, num_tokens)
    return [(ids, ids.clone())], "fixed chat"


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


def load_base(trained: dict, *, train_dir: Path, tokenizer, cfg: Config):
    from steps.modeling import load_model

    if not trained["base_model"]:
        raise ValueError(f"{train_dir} trained on a random base it did not save (train.save_random_base=false); "
                         "re-run train with train.save_random_base=true to merge it (or, for a full fine-tune, set "
                         "merge.export=bf16: only the MXFP4 export's retention check needs the base)")
    base_dir = Path(train_dir) / trained["base_model"]
    base_name = str(base_dir) if base_dir.is_dir() else trained["base_model"]
    return load_model(ModelConfig(name=base_name, revision=trained["base_revision"] or "main"),
                      vocab_size=len(tokenizer), dtype=cfg.dtype, attn_implementation="eager", device=cfg.device)


def fix_config(model_dir: Path) -> None:
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = fixed_architectures(config.get("architectures") or ["GptOssForCausalLM"])
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def retention_refusal(figures: dict, *, min_retention: float) -> str:
    f = figures
    return (f"merge.export=mxfp4 refused: the MXFP4 export keeps {f['retention']:.1%} of the fine-tune's effect on the "
            f"probe logits, below merge.min_retention={min_retention:.1%} ({f['probe_split']} split, "
            f"{f['num_probe_rows']} rows, {f['num_probe_positions']} tokens; eval loss base {f['eval_loss_base']:.4f}, "
            f"merge {f['eval_loss_merged']:.4f}, MXFP4 {f['eval_loss_mxfp4']:.4f}; mean KL(merge || base) "
            f"{f['kl_merged_vs_base']:.3g}, KL(merge || MXFP4) {f['kl_mxfp4_vs_merged']:.3g}). Nothing was saved. Options: "
            "set merge.export=bf16 (ships the merge unrounded, ~3x the bytes); train longer or with a higher rank "
            "(train.lora_r) so the fine-tune's weight changes stand above MXFP4's rounding step; lower "
            "merge.min_retention if this loss is acceptable; quantization-aware training (not in this pipeline yet)")


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps import mxfp4
    from steps.modeling import DTYPES, load_model
    from steps.tokenizer import add_response_template

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("merge.device=cuda but this machine has no CUDA device; set merge.device=cpu, "
                         "or run on a GPU machine (in Docker: docker run --gpus all …)")
    trained = read_output(inputs["train"])
    trained_dir = Path(trained["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(trained_dir)
    ids = probe_ids(tokenizer, cfg.num_probe_tokens)
    # Retention compares the export with the merge and the base on the same rows: base logits come first (for LoRA
    # they exist only before the merge), kept on the CPU in float32 (bf16 would round away the differences measured).
    rows, split = probe_rows(inputs["train"], tokenizer=tokenizer, num_rows=cfg.num_probe_rows,
                             num_tokens=cfg.num_probe_tokens) if cfg.export == "mxfp4" else ([], "")
    base_row_logits = []

    if trained["method"] == "lora":
        base = load_base(trained, train_dir=inputs["train"], tokenizer=tokenizer, cfg=cfg)
        peft_model = PeftModel.from_pretrained(base, trained_dir).eval()
        adapter_logits = logits_of(peft_model, ids)
        with peft_model.disable_adapter():
            adapter_effect = (adapter_logits - logits_of(peft_model, ids)).abs().max().item()
            base_row_logits = [logits_of(peft_model, row)[0] for row, _ in rows]
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
                 "logits by up to %.3g)", trained["base_model"], diff, adapter_effect)
    else:
        merged = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=DTYPES[cfg.dtype], device_map=cfg.device).eval()
        merged_logits, diff, adapter_effect = logits_of(merged, ids), 0.0, 0.0
        if rows:
            base = load_base(trained, train_dir=inputs["train"], tokenizer=tokenizer, cfg=cfg).eval()
            base_row_logits = [logits_of(base, row)[0] for row, _ in rows]
            del base
        log.info("merge: full fine-tune, nothing to merge; re-saving %s", trained_dir)

    merged.config.use_cache = True  # training turned the KV cache off; serving needs it
    # Generation ends on <|return|> (final answer) or <|call|> (tool call), as in openai/gpt-oss-*'s generation config.
    merged.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")]
    merged.generation_config.pad_token_id = merged.config.pad_token_id = tokenizer.pad_token_id
    merged.config.eos_token_id = tokenizer.eos_token_id
    add_response_template(tokenizer)
    num_params = sum(p.numel() for p in merged.parameters())

    stats = mxfp4.ProbeStats()
    merged_row_logits = []
    for (row, labels), base_logits in zip(rows, base_row_logits):
        logits = logits_of(merged, row)[0]
        stats.add_loss("base", base_logits, labels[0])
        stats.add_loss("merged", logits, labels[0])
        stats.add_pair("merged_vs_base", logits, base_logits)
        merged_row_logits.append(logits)
    del base_row_logits
    stats.num_loss_tokens = sum(int((labels[0, 1:] != -100).sum()) for _, labels in rows)
    stats.num_positions = sum(row.shape[1] for row, _ in rows)

    reload_diff, figures = 0.0, {}

    def write_bf16(tmp: Path):
        nonlocal reload_diff
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fix_config(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[cfg.dtype], device_map=cfg.device).eval()
        diff_on_reload = check_close(logits_of(reloaded, ids), merged_logits, tolerance=cfg.probe_tolerance,
                                     what="reloaded from disk vs merged")
        if cfg.export == "bf16":  # beside an MXFP4 export, the recorded reload is model/'s
            reload_diff = diff_on_reload
        del reloaded

    def write_mxfp4(tmp: Path):
        nonlocal reload_diff, figures
        mxfp4.write_checkpoint(merged, tmp)
        tokenizer.save_pretrained(tmp)
        fix_config(tmp)
        # What push uploads and a server loads: the folder itself, its experts dequantized by transformers.
        exported = load_model(ModelConfig(name=str(tmp)), vocab_size=len(tokenizer), dtype="bfloat16",
                              attn_implementation="eager", device=cfg.device).eval()
        reload_diff = (logits_of(exported, ids) - merged_logits).abs().max().item()
        for (row, labels), logits in zip(rows, merged_row_logits):
            exported_logits = logits_of(exported, row)[0]
            stats.add_loss("mxfp4", exported_logits, labels[0])
            stats.add_pair("mxfp4_vs_merged", logits, exported_logits)
        del exported
        figures = {"retention": stats.retention(kept="mxfp4_vs_merged", effect="merged_vs_base"),
                   "min_retention": cfg.min_retention, "probe_split": split, "num_probe_rows": len(rows),
                   "num_probe_positions": stats.num_positions, "num_loss_tokens": stats.num_loss_tokens,
                   **{f"eval_loss_{k}": stats.loss(k) for k in ("base", "merged", "mxfp4")},
                   "kl_merged_vs_base": stats.kl("merged_vs_base"), "kl_mxfp4_vs_merged": stats.kl("mxfp4_vs_merged")}
        if figures["retention"] is None:
            log.warning("merge: the fine-tune moved no logit on the probe; MXFP4 retention is undefined, not checked")
        elif figures["retention"] < cfg.min_retention:
            raise ValueError(retention_refusal(figures, min_retention=cfg.min_retention))

    if cfg.export == "bf16":
        save_dir_atomic(out_dir / "model", write_bf16)
    else:
        try:
            save_dir_atomic(out_dir / "model", write_mxfp4)
        finally:  # a refused export leaves no half-checked folder behind (save_dir_atomic's staging name)
            shutil.rmtree(out_dir / ".model.tmp", ignore_errors=True)
        if cfg.keep_bf16:  # after the export passed: a refusal saves nothing at all
            save_dir_atomic(out_dir / "model-bf16", write_bf16)
        log.info("merge: MXFP4 export kept %s of the fine-tune's logit effect (%s split, %d rows); eval loss base "
                 "%.4f, merge %.4f, MXFP4 %.4f", "n/a" if figures["retention"] is None else f"{figures['retention']:.1%}",
                 split, len(rows), figures["eval_loss_base"], figures["eval_loss_merged"], figures["eval_loss_mxfp4"])
    architectures = json.loads((out_dir / "model" / "config.json").read_text())["architectures"]
    num_bytes = mxfp4.weights_bytes(out_dir / "model")
    output = Output(model_dir="model", architectures=architectures, max_abs_logit_diff=diff,
                    reload_max_abs_logit_diff=reload_diff, adapter_max_abs_logit_effect=adapter_effect,
                    num_params=num_params, export=cfg.export, num_bytes=num_bytes,
                    fits_gpu=mxfp4.smallest_gpu(num_bytes), bf16_model_dir="model-bf16" if cfg.keep_bf16 else "",
                    retention=figures)
    log.info("merge: saved %s (%s, %s, %.1f M parameters, %.2f GB, fits %s, reload diff %.3g)", out_dir / "model",
             cfg.export, ", ".join(architectures), num_params / 1e6, num_bytes / 1e9, output.fits_gpu, reload_diff)
    return output

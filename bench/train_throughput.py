"""GPU training throughput: the published reference recipe vs our fast-path levers, one process, one GPU.

python bench/train_throughput.py --out DIR [--tiny] [--configs ref,flex_pad,...] [--timed-steps 6] [--deadline-s 480]

Every configuration trains the same random-weight gpt-oss model (exact gpt-oss-20b shape unless --tiny) on the same
1,000 synthetic rows (lengths like Multilingual-Thinking, ~1.1k tokens mean, loss on the latter part of each row)
through TRL's SFTTrainer + PEFT LoRA, for a fixed number of optimizer steps after warm-up, and writes DIR/summary.json
(one object per configuration, rewritten after each) and DIR/parity.json. A no-training parity check first computes the
loss of the same rows eager/padded, flex/padded and flex/packed with the same weights (the proof that packing keeps
documents apart), with a negative control that packs without resetting positions.
Configuration `step` is (b): our own train step (steps/train.py through steps.contract.execute) with the
configs/h100-lora.yaml profile, on the same rows written as a harmony step out dir, with --tokenizer-dir's tokenizer
(the offline o200k one; build it where bpe-openai is installed: steps.tokenizer.offline_tokenizer_dir()).
Not a test: it needs a GPU for the real shape; --tiny runs the same code path on a CPU to shake out bugs.
"""
import argparse
import contextlib
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
import unittest.mock
import weakref
from pathlib import Path

import numpy as np
import torch

REAL_SHAPE = dict(  # openai/gpt-oss-20b config.json; rope/yarn and layer_types are GptOssConfig's defaults, which match it
    num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880, intermediate_size=2880,
    head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128, vocab_size=201088,
    router_aux_loss_coef=0.9, output_router_logits=False, use_cache=False,
)
TINY_SHAPE = dict(
    num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2, hidden_size=64, intermediate_size=64,
    head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8, vocab_size=201088,
    router_aux_loss_coef=0.9, output_router_logits=False, use_cache=False,
    initializer_range=0.2,  # sharper attention than 0.02 at this width, so the packing negative control can tell
)
FIRST_SPECIAL_ID = 199998  # o200k: ids >= 199998 are special tokens; synthetic rows avoid them
PAD_ID, EOS_ID = 199999, 200002  # <|endoftext|>, <|return|>
GIB = 1024**3

# name -> (attn, packing, max_length, per_device_batch, grad_accum, grad_ckpt, liger)
#   grad_ckpt: True (every decoder layer), False, or an int N = checkpoint only the first N of the decoder layers
CONFIGS = {
    "ref": ("eager", False, 2048, 4, 4, True, False),  # the published recipe
    "flex_pad": ("flex_attention", False, 2048, 4, 4, True, False),
    "flex_pack8k": ("flex_attention", True, 8192, 1, 2, True, False),
    "flex_pack4k_nockpt": ("flex_attention", True, 4096, 1, 4, False, False),
    "flex_pack8k_ckpt12": ("flex_attention", True, 8192, 1, 2, 12, False),
    "flex_pack8k_ckpt6": ("flex_attention", True, 8192, 1, 2, 6, False),
    "flex_pack8k_nockpt": ("flex_attention", True, 8192, 1, 2, False, False),
    "flex_pack4k_nockpt_liger": ("flex_attention", True, 4096, 1, 4, False, True),
    "ref_all": ("eager", False, 2048, 4, 4, True, False),  # the recipe with LoRA on the experts of every layer
}
ALL_EXPERT_LAYERS = {"ref_all"}  # configurations whose LoRA targets the experts of every layer, not 7/15/23
DEFAULT_ORDER = ("ref,flex_pack8k_nockpt,flex_pack4k_nockpt,flex_pack8k_ckpt12,flex_pack8k_ckpt6,flex_pack8k,flex_pad,"
                 "flex_pack4k_nockpt_liger")  # liger last: its kernels are patched into transformers process-wide


class RecompileLimitCounter(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings: after one, that function runs uncompiled (for flex
    attention: the unfused path that materialises the full score matrix, slow and memory-hungry)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = []

    def emit(self, record):
        msg = record.getMessage()
        if "recompile_limit" in msg:
            self.hits.append(msg.splitlines()[0][:200])


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def synthetic_rows(n_rows, vocab_hi, seed, max_len, scale=1.0):
    """Rows with lengths like Multilingual-Thinking (log-normal, ~1.1k mean, capped at max_len); scale shrinks them."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=math.log(1000), sigma=0.42, size=n_rows), 256, max_len)
    lengths = np.maximum(lengths * scale, 8).astype(int)
    rows = []
    for i, n in enumerate(lengths):
        ids = rng.integers(0, vocab_hi, size=n).tolist()
        prompt = int(n * rng.uniform(0.15, 0.35))  # system/developer/user part; the rest is the assistant turn
        rows.append({"id": f"row{i:04d}", "input_ids": ids, "assistant_masks": [0] * prompt + [1] * (n - prompt)})
    return rows


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|endoftext|>": PAD_ID, "<|return|>": EOS_ID}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|return|>", unk_token="<unk>")


def round_experts_to_mxfp4(model):
    """The random experts rounded to MXFP4 values, as a release's are (openai/gpt-oss-20b ships them in MXFP4): the
    same values train.expert_weights=mxfp4 rounds a random model to (steps.mxfp4's encoder), so every configuration,
    Unsloth's included (it loads this model saved), trains the same weights."""
    from steps.mxfp4 import E2M1_VALUES, dequantize_mxfp4, quantize_mxfp4

    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=model.device)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                for expert in weight:  # (in, out); the release quantizes along `in`
                    expert.copy_(dequantize_mxfp4(*quantize_mxfp4(expert.T), lut).T)


def build_model(shape, attn, device, seed, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(seed)
    cfg = GptOssConfig(**shape)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    round_experts_to_mxfp4(model)
    sync(device)
    log(f"model built on {next(model.parameters()).device} in {time.perf_counter() - t0:.1f}s: "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, attn={model.config._attn_implementation}, "
        f"experts={getattr(model.config, '_experts_implementation', None)}")
    return model


def install_packed_mask_hook(model):
    """Make padding-free packed rows attend only within their own document.

    transformers 5.23's GptOssModel.forward builds its masks without position_ids, so the packed-sequence detection
    in masking_utils never runs and packed documents attend to each other (eager, sdpa and flex alike; only
    flash-attention's varlen path reads cu_seq_lens). This pre-hook builds the masks itself from position_ids when no
    attention_mask is given and hands them over as the dict the model accepts ("already prepared").
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is not None or pos is None or kwargs.get("past_key_values") is not None:
            return None
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        stub = torch.empty((*ids.shape, 1), dtype=module.embed_tokens.weight.dtype, device=ids.device)
        mk = dict(config=module.config, inputs_embeds=stub, attention_mask=None, past_key_values=None, position_ids=pos)
        kwargs["attention_mask"] = {"full_attention": create_causal_mask(**mk),
                                    "sliding_attention": create_sliding_window_causal_mask(**mk)}
        return args, kwargs

    return backbone.register_forward_pre_hook(hook, with_kwargs=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- parity (no training)
@torch.no_grad()
def token_nll(model, input_ids, labels, attention_mask=None, position_ids=None):
    """Per-token NLL (float32) of every position whose next-token label is set, in order; no full logits."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    h = out.last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != -100
    logits = model.lm_head(h[keep]).float()
    return torch.nn.functional.cross_entropy(logits, tgt[keep], reduction="none"), h[keep].float()


def parity(model, rows, device, group, modes):
    """NLL of the same rows computed several ways with the same weights.

    padded: batches of `group` rows, right-padded, with an attention mask (the reference layout).
    packed_stock: `group` rows concatenated into one row with position_ids restarting per document and no attention
      mask, exactly what TRL's padding-free collator feeds the model.
    packed_fixed: the same, with install_packed_mask_hook.
    Returns {mode: (mean_nll, per_token_nll, seconds, hidden_states_at_loss_positions)}.
    """
    model.train()  # dropout is 0; train mode shares flex's compiled kernels with training
    res = {}
    for mode in modes:
        t0 = time.perf_counter()
        parts = []
        for g in range(0, len(rows), group):
            chunk = rows[g:g + group]
            if mode == "padded":
                n = max(len(r["input_ids"]) for r in chunk)
                ids = torch.full((len(chunk), n), PAD_ID)
                lab = torch.full((len(chunk), n), -100)
                am = torch.zeros((len(chunk), n), dtype=torch.long)
                for i, r in enumerate(chunk):
                    k = len(r["input_ids"])
                    ids[i, :k] = torch.tensor(r["input_ids"])
                    lab[i, :k] = torch.where(torch.tensor(r["assistant_masks"]) == 1, ids[i, :k], -100)
                    am[i, :k] = 1
                # per row, so row order of tokens matches the packed layout
                parts.append(token_nll(model, ids.to(device), lab.to(device), attention_mask=am.to(device)))
            else:  # packed: one row of concatenated documents, no attention mask
                ids = torch.cat([torch.tensor(r["input_ids"]) for r in chunk])[None]
                lab = torch.cat([torch.where(torch.tensor(r["assistant_masks"]) == 1, torch.tensor(r["input_ids"]), -100)
                                 for r in chunk])[None]
                pos = torch.cat([torch.arange(len(r["input_ids"])) for r in chunk])[None]
                hook = install_packed_mask_hook(model) if mode == "packed_fixed" else None
                try:
                    parts.append(token_nll(model, ids.to(device), lab.to(device), position_ids=pos.to(device)))
                finally:
                    if hook is not None:
                        hook.remove()
        sync(device)
        nll = torch.cat([p[0] for p in parts])
        hid = torch.cat([p[1] for p in parts])
        res[mode] = (float(nll.mean()), nll, time.perf_counter() - t0, hid)
        log(f"parity {mode}: mean nll {res[mode][0]:.6f} over {nll.numel()} tokens ({res[mode][2]:.1f}s)")
    return res


# ---------------------------------------------------------------- training configurations
def run_config(name, spec, shape, rows, device, warmup_steps, timed_steps, seed, tokenizer):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    attn, packing, max_length, bsz, accum, ckpt, liger = spec
    if device != "cuda" and attn == "flex_attention":
        attn = "eager"  # flex with attention sinks needs CUDA; --tiny on CPU exercises the rest of the path
    reset_peak(device)
    model = build_model(shape, attn, device, seed)
    n_layers = shape["num_hidden_layers"]
    expert_layers = ([7, 15, 23] if n_layers == 24 else [1, n_layers - 1]) if name not in ALL_EXPERT_LAYERS else range(n_layers)
    peft_cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear",
        target_parameters=[f"{i}.mlp.experts.{p}" for i in expert_layers for p in ("gate_up_proj", "down_proj")],
    )
    stop_at = warmup_steps + timed_steps
    tmp = tempfile.mkdtemp(prefix=f"bench-{name}-")
    args = SFTConfig(
        output_dir=tmp, learning_rate=2e-4, num_train_epochs=1, logging_steps=1,
        per_device_train_batch_size=bsz, gradient_accumulation_steps=accum, max_length=max_length,
        warmup_steps=0.03, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        gradient_checkpointing=bool(ckpt) if not isinstance(ckpt, bool) else ckpt,
        bf16=(device == "cuda"), use_cpu=(device != "cuda"), report_to="none", save_strategy="no", seed=42,
        packing=packing, packing_strategy="bfd", dataloader_num_workers=0, disable_tqdm=True,
        use_liger_kernel=liger,
        # TRL 1.16 turns the router aux loss on from the config's coefficient (0.9 for gpt-oss); the recipe's TRL
        # (0.2x) trained without it (output_router_logits=False in the shipped config). Off everywhere here, so every
        # configuration optimises the same loss as the published recipe.
        router_aux_loss_coef=0.0,
    )
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]} for r in rows])

    counts = []  # (non-pad tokens, loss tokens) per micro-batch, in the order the trainer consumes them

    step_t, step_unix, losses, grad_norms = [], [], {}, {}

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            if isinstance(ckpt, int) and not isinstance(ckpt, bool):
                from transformers.modeling_layers import GradientCheckpointingLayer
                layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
                for i, layer in enumerate(layers):
                    layer.gradient_checkpointing = i < ckpt
                log(f"selective checkpointing: {sum(l.gradient_checkpointing for l in layers)}/{len(layers)} layers")
            sync(device)
            step_t.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            step_t.append(time.perf_counter())
            step_unix.append(time.time())
            if state.global_step >= stop_at:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])
            if logs and "grad_norm" in logs:
                grad_norms[state.global_step] = float(logs["grad_norm"])

    t_setup = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=peft_cfg, processing_class=tokenizer,
                         callbacks=[Meter()])
    collate = trainer.data_collator
    if packing:
        install_packed_mask_hook(trainer.model.get_base_model())

    def counting_collate(examples):
        batch = collate(examples)
        lab = batch["labels"]
        n = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        counts.append((n, int((lab != -100).sum())))
        return batch

    trainer.data_collator = counting_collate
    setup_s = time.perf_counter() - t_setup
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    steps_per_epoch = math.ceil(len(trainer.train_dataset) / (bsz * accum))
    log(f"{name}: setup {setup_s:.1f}s, {len(trainer.train_dataset)} train sequences, {steps_per_epoch} steps/epoch, "
        f"trainable {n_trainable / 1e6:.2f}M")
    error = None
    try:
        trainer.train()
    except torch.OutOfMemoryError as e:
        error = f"OutOfMemoryError: {str(e).splitlines()[0]}"
        log(f"{name}: {error}")
    peak = peak_gib(device)
    result = {"name": name, "attn": attn, "packing": packing, "max_length": max_length, "per_device_batch": bsz,
              "grad_accum": accum, "grad_ckpt": ckpt, "liger": liger, "device": device_name(device),
              "trainable_params": n_trainable, "train_sequences": len(trainer.train_dataset),
              "steps_per_epoch": steps_per_epoch, "setup_s": round(setup_s, 2), "peak_gib": peak and round(peak, 2)}
    if error is None and len(step_t) - 1 <= warmup_steps:
        error = f"only {len(step_t) - 1} optimizer steps ran (warm-up {warmup_steps}); use more rows or fewer warm-up steps"
    if error is None:
        done = len(step_t) - 1
        first_step_s = step_t[1] - step_t[0]
        timed = step_t[1 + warmup_steps - 1:]  # boundaries: end of last warm-up step .. end of last step
        n_timed = len(timed) - 1
        micro = accum
        tok = sum(c[0] for c in counts[warmup_steps * micro:(warmup_steps + n_timed) * micro])
        loss_tok = sum(c[1] for c in counts[warmup_steps * micro:(warmup_steps + n_timed) * micro])
        secs = timed[-1] - timed[0]
        result.update({
            "steps_done": done, "timed_steps": n_timed, "first_step_s": round(first_step_s, 2),
            "warmup_total_s": round(step_t[warmup_steps] - step_t[0], 2),
            "step_s": round(secs / n_timed, 3), "tokens_timed": tok, "loss_tokens_timed": loss_tok,
            "tokens_per_s": round(tok / secs, 1),
            "tokens_per_step": round(tok / n_timed, 1),
            "epoch_min_est": round(sum(len(r["input_ids"]) for r in rows) / (tok / secs) / 60, 2),
            "loss_by_step": losses, "grad_norm_by_step": grad_norms, "step_end_unix": step_unix,
        })
    else:
        result["error"] = error
    # drop every reference to the model so the next configuration gets the memory back
    alive = weakref.ref(model)
    trainer.accelerator.free_memory()
    del trainer, model, collate
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    result["model_freed"] = alive() is None
    return result


def write_harmony_dir(rows, tokenizer_dir, out):
    """The rows as a harmony step out dir (what the train step reads): data/ (id, input_ids, assistant_masks),
    manifest.json whose output names data_dir and tokenizer_dir, and a fingerprint of the rows."""
    import hashlib

    from datasets import Dataset

    out = Path(out)
    Dataset.from_dict({k: [r[k] for r in rows] for k in ("id", "input_ids", "assistant_masks")}).save_to_disk(
        str(out / "data"))
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    manifest = {"step": "harmony", "fingerprint": digest,
                "output": {"data_dir": "data", "eval_data_dir": "", "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
                           "num_rows": len(rows)}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def run_train_step(name, rows, device, warmup_steps, timed_steps, tokenizer_dir, profile, extra_overrides,
                   profile_to=None):
    """(b): steps/train.py itself, via the step contract, with `profile` (the h100-lora one) on a random model.

    Timing: a tracker records the host clock (after cuda synchronize) and TRL's cumulative num_tokens at each logged
    optimizer step; tokens/s is over the steps after the warm-up, as for the other configurations.
    profile_to: a file; one more optimizer step runs after the timed ones under torch.profiler, whose table of
    kernels by GPU time is written there (that step is not timed), and beside it the same by input shapes and the
    step's Chrome trace (.trace.json.gz; bench/trace_gaps.py reads it).
    """
    from steps import contract
    from steps.profile import load_profile, step_config

    class StepClock:  # steps.tracking.Tracker
        def __init__(self):
            self.at = {}  # step -> (seconds, num_tokens, loss, grad_norm)
            self.prof = None

        def log_params(self, params):
            pass

        def log_metrics(self, metrics, *, step=None):
            if step is not None and "loss" in metrics:
                sync(device)
                self.at[step] = (time.perf_counter(), metrics.get("num_tokens"), metrics["loss"], metrics.get("grad_norm"),
                                 metrics.get("interval_mfu"))
                if profile_to and step == warmup_steps + timed_steps:
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                                   torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True)
                    self.prof.start()
                elif self.prof is not None:
                    self.prof.stop()
                    table = self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
                    Path(profile_to).write_text(table)
                    by_shape = self.prof.key_averages(group_by_input_shape=True).table(
                        sort_by="self_cuda_time_total", row_limit=50, max_name_column_width=60, max_shapes_column_width=110)
                    Path(profile_to).with_suffix(".shapes.txt").write_text(by_shape)
                    # the timeline, for bench/trace_gaps.py: where the GPU waits on the host
                    self.prof.export_chrome_trace(str(Path(profile_to).with_suffix(".trace.json.gz")))
                    self.prof = None

        def log_artifact(self, path):
            pass

    total = warmup_steps + timed_steps + (1 if profile_to else 0)
    overrides = [
        "model.name=random", f"model.tokenizer={Path(tokenizer_dir).resolve()}", "model.seed=42",
        "model.random_shape={preset: %s}" % ("tiny" if device != "cuda" else "gpt-oss-20b"),
        f"train.max_steps={total}", f"train.save_steps={total}", "train.logging_steps=1",
        # Random weights exist nowhere else, so the step would save them (42 GB) for merge; a benchmark has no merge.
        "train.save_random_base=false",
    ]
    if device != "cuda":  # --tiny: what a CPU can run of the profile
        overrides += ["train.device=cpu", "train.dtype=float32", "train.attn_implementation=eager",
                      "train.use_liger_kernel=false", "train.lora_expert_layers=all"]  # the tiny preset has 2 layers
    overrides += list(extra_overrides)
    cfg = step_config(load_profile(profile, overrides), "train")
    root = Path(tempfile.mkdtemp(prefix="bench-step-"))
    harmony = write_harmony_dir(rows, tokenizer_dir, root / "harmony")
    clock = StepClock()
    reset_peak(device)
    log(f"step: {profile} with {' '.join(overrides)}")
    t0 = time.perf_counter()
    error = None
    try:
        manifest, _ = contract.execute("train", cfg, out_dir=root / "train", inputs={"harmony": harmony}, tracker=clock)
    except RuntimeError as e:  # the step re-raises CUDA's OutOfMemoryError as a RuntimeError naming the knobs
        if not isinstance(e.__cause__ or e, torch.OutOfMemoryError):
            raise
        error = f"OutOfMemoryError: {str(e).splitlines()[0][:300]}"
        manifest = None
    peak = peak_gib(device)
    t = cfg
    result = {"name": name, "profile": str(profile), "overrides": overrides, "attn": t.attn_implementation,
              "packing": t.packing, "max_length": t.max_length, "per_device_batch": t.per_device_batch_size,
              "grad_accum": t.grad_accum_steps, "grad_ckpt": t.gradient_checkpointing, "liger": t.use_liger_kernel,
              "device": device_name(device), "wall_incl_load_s": round(time.perf_counter() - t0, 1),
              "peak_gib": peak and round(peak, 2)}
    steps = sorted(clock.at)
    if error is None and len(steps) <= warmup_steps:
        error = f"only {len(steps)} optimizer steps logged (warm-up {warmup_steps})"
    if error is not None:
        result["error"] = error
        return result
    out = manifest["output"]
    w, last = steps[warmup_steps - 1], steps[min(len(steps), warmup_steps + timed_steps) - 1]
    secs = clock.at[last][0] - clock.at[w][0]
    tok = clock.at[last][1] - clock.at[w][1]
    n_timed = last - w
    result.update({
        "steps_done": out["num_steps"], "timed_steps": n_timed,
        # from the call (model build, data, trainer set-up) to the end of optimizer step 1 (flex/Liger compile)
        "first_step_s": round(clock.at[steps[0]][0] - t0, 2),
        "step_s": round(secs / n_timed, 3), "tokens_timed": tok,
        "tokens_per_s": round(tok / secs, 1), "tokens_per_step": round(tok / n_timed, 1),
        "epoch_min_est": round(sum(len(r["input_ids"]) for r in rows) / (tok / secs) / 60, 2),
        "loss_by_step": {s: clock.at[s][2] for s in steps}, "grad_norm_by_step": {s: clock.at[s][3] for s in steps},
        "mfu_by_step": {s: clock.at[s][4] for s in steps},
        "profile_table": profile_to and str(profile_to),
        "step_output": {k: out[k] for k in ("num_steps", "tokens_per_s", "peak_mem_gib", "train_runtime_s",
                                             "train_loss_first", "train_loss_last", "base_model")},
        "model_freed": True,  # the step returned; its trainer and model went out of scope with it
    })
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- (c) Unsloth, in a process of its own
UNSLOTH_CONFIGS = {"unsloth": "reference", "unsloth_all": "all"}  # name -> unsloth_train.py --trainable
UNSLOTH_SCRIPT = Path(__file__).resolve().parent / "unsloth_train.py"


def _param_count(shape):
    """Parameters of GptOss at `shape`, counted on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GptOssConfig(**shape))
    return sum(p.numel() for p in model.parameters())


def prepare_unsloth_inputs(shape, rows, device, tokenizer_dir, ckpt_dir):
    """Once per checkpoint folder: the random-weight model every other configuration trains (build_model, seed 42,
    the same shape) saved as bf16 safetensors with the tokenizer's files beside it; and the rows as JSON lines
    (input_ids + labels: -100 outside the assistant part, what TRL's collator makes of assistant_masks)."""
    import shutil

    ckpt = Path(ckpt_dir)
    shm_ckpt = Path("/dev/shm") / ckpt.name  # where it goes when ckpt_dir's disk is too small (below)
    if not (ckpt / ".bench-complete").is_file() and (shm_ckpt / ".bench-complete").is_file():
        ckpt = shm_ckpt
    done = ckpt / ".bench-complete"
    info = {"ckpt_dir": str(ckpt)}
    if done.is_file():
        info["ckpt"] = json.loads(done.read_text()) | {"reused": True}
        log(f"unsloth: checkpoint {ckpt} already there ({info['ckpt']})")
    else:
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        need = 2 * _param_count(shape) * 1.05  # bf16, 5 % headroom
        free = shutil.disk_usage(ckpt.parent).free
        shm = Path("/dev/shm")
        if free < need and shm.is_dir() and shutil.disk_usage(shm).free > need + 16e9:
            log(f"unsloth: {ckpt.parent} has {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f}: "
                f"writing it to {shm} (memory) instead")
            ckpt = shm_ckpt
            done = ckpt / ".bench-complete"
            info["ckpt_dir"] = str(ckpt)
            if ckpt.exists():
                shutil.rmtree(ckpt)
        elif free < need:
            raise OSError(f"{ckpt.parent}: {free / 1e9:.1f} GB free, the bf16 checkpoint needs ~{need / 1e9:.1f} GB")
        t0 = time.perf_counter()
        reset_peak(device)
        model = build_model(shape, "eager", device, seed=42)  # run_config's model: same seed, shape and dtype
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), max_shard_size="5GB")
        n_params = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name not in ("config.json",):
                shutil.copy2(f, tmp / f.name)
        nbytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        tmp.rename(ckpt)
        meta = {"seed": 42, "dtype": "bfloat16", "params": n_params, "safetensors_bytes": nbytes,
                "tokenizer_from": str(tokenizer_dir), "save_s": round(time.perf_counter() - t0, 1)}
        done.write_text(json.dumps(meta))
        info["ckpt"] = meta | {"reused": False}
        log(f"unsloth: saved the bench model to {ckpt}: {meta}")
    rows_path = ckpt.with_name(ckpt.name + "-rows.jsonl")
    with open(rows_path, "w") as fh:
        for r in rows:
            lab = [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]
            fh.write(json.dumps({"input_ids": r["input_ids"], "labels": lab}) + "\n")
    info["rows_path"] = str(rows_path)
    return info


def run_unsloth(name, rows, shape, device, warmup_steps, timed_steps, tokenizer_dir, ckpt_dir, site, work_dir,
                timeout_s, out_dir, python=sys.executable, epoch=False, env_extra=None):
    """(c): bench/unsloth_train.py in a new process with PYTHONPATH=site alone (Unsloth's wheels over the machine's
    own transformers 5.17 and torch), cwd work_dir (where Unsloth keeps unsloth_compiled_cache: the second
    configuration finds the first one's), killed after timeout_s; epoch: the whole epoch and the adapter saved
    (unsloth_train.py --epoch); env_extra: more environment for it. Its JSON result is returned; a failure returns the
    error, the return code and its last output lines, so the other configurations' results stay."""
    import collections
    import signal
    import subprocess
    import threading

    t0 = time.perf_counter()
    result = {"name": name, "tool": "unsloth", "trainable_set": UNSLOTH_CONFIGS[name], "model_freed": True}
    try:
        result["inputs"] = prepare_unsloth_inputs(shape, rows, device, tokenizer_dir, ckpt_dir)
    except Exception as e:  # noqa: BLE001  (disk full, ...): this configuration fails, the others go on
        log(f"{name}: preparing the checkpoint failed: {e!r}")
        result["error"] = f"checkpoint/rows: {type(e).__name__}: {str(e)[:500]}"
        return result
    result_json = Path(out_dir) / f"{name}.json"
    result_json.unlink(missing_ok=True)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", "HF_HUB_OFFLINE": "1"})
    env.update(env_extra or {})
    cmd = [python, str(UNSLOTH_SCRIPT), "--model-dir", result["inputs"]["ckpt_dir"],
           "--rows", result["inputs"]["rows_path"], "--trainable", UNSLOTH_CONFIGS[name], "--out", str(result_json),
           "--warmup-steps", str(warmup_steps), "--timed-steps", str(timed_steps), "--launch-unix", f"{time.time():.3f}"]
    if epoch:
        cmd.append("--epoch")
    if device != "cuda":
        cmd.append("--cpu-smoke")
    log(f"{name}: PYTHONPATH={site} cwd={work_dir} timeout {timeout_s:.0f}s: {' '.join(cmd)}")
    tail = collections.deque(maxlen=40)
    launch = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(work_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print(f"  [{name}] {line}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"{name}: still running after {timeout_s:.0f}s; stopping it (process group {proc.pid})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    reader.join(timeout=10)
    child_wall = time.perf_counter() - launch
    if result_json.is_file():
        try:
            child = json.loads(result_json.read_text())
        except ValueError as e:
            child = {"error": f"unreadable result JSON: {e}"}
        for k in ("loss_by_step", "grad_norm_by_step"):
            if isinstance(child.get(k), dict):
                child[k] = {int(s): v for s, v in child[k].items()}
        result.update(child)
    result.update({"returncode": rc, "timed_out": timed_out, "subprocess_wall_s": round(child_wall, 1),
                   "wall_incl_prepare_s": round(time.perf_counter() - t0, 1), "pythonpath": str(site),
                   "result_json": str(result_json), "model_freed": True})
    if timed_out:
        result["error"] = f"timed out after {timeout_s:.0f}s" + (f" ({result['error']})" if "error" in result else "")
    elif rc != 0 and "error" not in result:
        result["error"] = f"exit code {rc}" + ("" if result_json.is_file() else ", no result JSON")
    if "error" in result or rc != 0:
        result["log_tail"] = list(tail)
        log(f"{name} FAILED: {result['error']}; its last lines:\n" + "\n".join(f"    {x}" for x in list(tail)[-25:]))
    return result


def settings_line(r):
    """What a configuration ran, in a few words (the table's settings column)."""
    if r.get("tool") == "unsloth":
        s = r.get("settings", {})
        return (f"Unsloth {r.get('versions', {}).get('unsloth')} (transformers {r.get('versions', {}).get('transformers')},"
                f" TRL {r.get('versions', {}).get('trl')}, PEFT {r.get('versions', {}).get('peft')}); 16-bit LoRA r=8/16, "
                f"{s.get('layout', 'padded 4x4')}, max_length {s.get('max_length', 2048)}, checkpointing "
                f"{s.get('gradient_checkpointing', 'unsloth')}, {s.get('optim', '?')}, expert LoRA in layers "
                f"{r.get('expert_lora_layers_found') or ('7/15/23' if r.get('trainable_set') == 'reference' else 'all')}")
    if "profile" in r:
        return f"finetune step train {Path(r['profile']).name}: {r.get('attn')}, packed={r.get('packing')} " \
               f"{r.get('per_device_batch')}x{r.get('grad_accum')}, max_length {r.get('max_length')}, " \
               f"ckpt={r.get('grad_ckpt')}, liger={r.get('liger')}"
    if "attn" in r:
        return f"TRL SFTTrainer + PEFT: {r['attn']}, {'packed' if r.get('packing') else 'padded'} " \
               f"{r.get('per_device_batch')}x{r.get('grad_accum')}, max_length {r.get('max_length')}, " \
               f"ckpt={r.get('grad_ckpt')}, liger={r.get('liger')}"
    return ""


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU, to shake out bugs")
    ap.add_argument("--configs", default=DEFAULT_ORDER)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--timed-steps", type=int, default=6)
    ap.add_argument("--deadline-s", type=float, default=480, help="start no new configuration after this")
    ap.add_argument("--parity-rows", type=int, default=16)
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--parity-layers", type=int, default=4, help="decoder layers of the full-width parity model")
    ap.add_argument("--parity-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--recompile-limit", type=int, default=64,
                    help="torch._dynamo recompile limit (default 8 is exhausted by flex attention's mask closures)")
    ap.add_argument("--tokenizer-dir", help="tokenizer folder for configuration `step` (default: the offline o200k "
                    "one, built here if bpe-openai is installed)")
    ap.add_argument("--step-profile", default=str(Path(__file__).resolve().parents[1] / "configs" / "h100-lora.yaml"))
    ap.add_argument("--step-override", action="append", default=[], help="extra section.key=value for `step`")
    ap.add_argument("--step-variant", action="append", default=[], metavar="NAME=K=V;K=V",
                    help="a configuration NAME (usable in --configs) = `step` with these extra overrides")
    ap.add_argument("--profile", default="", help="comma-separated configurations to profile one extra step of")
    ap.add_argument("--compiled-attention", default="", help="comma-separated step configurations whose attention "
                    "blocks (projections with their LoRA, rotary, attention, output) run as one torch.compile'd "
                    "function: a lever on the host's launch overhead, tried here before it goes into steps/")
    ap.add_argument("--baseline-experts", default="", help="comma-separated step configurations to run with the "
                    "expert path of main at 53b72cc (bench/experts_53b72cc.py) instead of steps/modeling.py's")
    ap.add_argument("--peft-experts", default="", help="comma-separated step configurations to run with PEFT's own "
                    "expert LoRA (W + scale * A @ B built per forward) instead of steps.modeling.lora_experts")
    ap.add_argument("--unsloth-site", default="/tmp/site-unsloth", help="configurations unsloth/unsloth_all: the "
                    "PYTHONPATH of their process (.whl-unsloth/ installed with pip --target), alone")
    ap.add_argument("--ckpt-dir", default="/tmp/bench-ckpt", help="unsloth*: the bench model saved here as bf16 "
                    "safetensors (once; reused when complete)")
    ap.add_argument("--unsloth-work-dir", default="/tmp/bench-unsloth-work", help="unsloth*: cwd of the process "
                    "(Unsloth's unsloth_compiled_cache lands there)")
    ap.add_argument("--unsloth-timeout-s", type=float, default=300, help="unsloth*: kill the process after this")
    ap.add_argument("--stop-by-s", type=float, help="unsloth*: every Unsloth process ends by this many seconds after "
                    "the start (its timeout shrinks to fit), so a call's own limit never cuts the summary")
    ap.add_argument("--unsloth-python", default=sys.executable, help="unsloth*: the interpreter (default this one: "
                    "on the device the image's python3, whose own site-packages hold transformers 5.17)")
    a = ap.parse_args()
    variants = {}
    for v in a.step_variant:
        vname, _, spec = v.partition("=")
        variants[vname] = [o for o in spec.split(";") if o]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the steps package
    logging.basicConfig(format="[%(asctime)s] %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("finetune").setLevel(logging.INFO)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    shape = TINY_SHAPE if a.tiny else REAL_SHAPE
    import torch._dynamo as dynamo
    dynamo.config.recompile_limit = a.recompile_limit
    dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 8 * a.recompile_limit)
    recompiles = RecompileLimitCounter()
    logging.getLogger("torch._dynamo").addHandler(recompiles)

    import accelerate, datasets, peft, transformers, trl
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "peft": peft.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
                "device": device_name(device)}
    with contextlib.suppress(Exception):
        from importlib import metadata
        versions["liger_kernel"] = metadata.version("liger-kernel")
    with contextlib.suppress(Exception):
        import triton
        versions["triton"] = triton.__version__
    log(f"versions {versions}")
    rows = synthetic_rows(a.rows, FIRST_SPECIAL_ID, seed=1234, max_len=2048, scale=0.1 if a.tiny else 1.0)
    lens = np.array([len(r["input_ids"]) for r in rows])
    log(f"rows: {len(rows)}, tokens {lens.sum()}, mean {lens.mean():.0f}, max {lens.max()}")
    tokenizer = make_tokenizer()
    summary = {"versions": versions, "shape": shape, "rows": len(rows), "row_tokens_total": int(lens.sum()),
               "row_tokens_mean": round(float(lens.mean()), 1), "row_tokens_max": int(lens.max()), "configs": {}}

    if not a.no_parity:
        reset_peak(device)
        attn_fast = "flex_attention" if device == "cuda" else "eager"
        pshape = {**shape, "num_hidden_layers": a.parity_layers}
        model = build_model(pshape, "eager", device, seed=0, dtype=getattr(torch, a.parity_dtype))
        prow = rows[:a.parity_rows]
        r_eager = parity(model, prow, device, group=4, modes=["padded", "packed_stock", "packed_fixed"])
        model.set_attn_implementation(attn_fast)
        t0 = time.perf_counter()
        r_fast = parity(model, prow, device, group=4, modes=["padded", "packed_fixed", "packed_stock"])
        fast_first_s = time.perf_counter() - t0
        r_fast16 = parity(model, prow, device, group=16, modes=["packed_fixed"])
        ref_nll, ref_h = r_eager["padded"][1], r_eager["padded"][3]

        def cmp(r):
            nll, h = r[1], r[3]
            return {"hidden_rel_l2": float((h - ref_h).norm() / ref_h.norm()),"mean_nll": round(float(nll.mean()), 6),
                    "rel_diff_of_mean": float(abs(nll.mean() - ref_nll.mean()) / ref_nll.mean()),
                    "per_token_max_abs_diff": float((nll - ref_nll).abs().max()),
                    "per_token_rel_l2": float((nll - ref_nll).norm() / ref_nll.norm())}
        summary["parity"] = {
            "rows": len(prow), "loss_tokens": int(ref_nll.numel()), "reference": "eager, padded batches of 4",
            "model": f"{a.parity_layers} decoder layers of the full width, {a.parity_dtype}",
            "fast_attn": attn_fast, "fast_first_pass_s_incl_compile": round(fast_first_s, 1),
            "eager_packed4_stock": cmp(r_eager["packed_stock"]), "eager_packed4_fixed": cmp(r_eager["packed_fixed"]),
            "fast_padded4": cmp(r_fast["padded"]), "fast_packed4_fixed": cmp(r_fast["packed_fixed"]),
            "fast_packed16_fixed": cmp(r_fast16["packed_fixed"]), "fast_packed4_stock": cmp(r_fast["packed_stock"]),
            "peak_gib": peak_gib(device) and round(peak_gib(device), 2),
        }
        log("parity " + json.dumps(summary["parity"]))
        (out / "parity.json").write_text(json.dumps(summary["parity"], indent=1))
        del model, r_eager, r_fast, r_fast16, ref_nll, ref_h
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    for name in a.configs.split(","):
        if not name:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > a.deadline_s:
            log(f"skip {name}: {elapsed:.0f}s elapsed > deadline {a.deadline_s:.0f}s")
            summary["configs"][name] = {"skipped": f"deadline ({elapsed:.0f}s elapsed)"}
            continue
        if name == "step" or name in variants:
            log(f"=== {name} (our train step, {a.step_profile} {variants.get(name, [])})")
            if a.tokenizer_dir is None:
                from steps.tokenizer import offline_tokenizer_dir
                a.tokenizer_dir = str(offline_tokenizer_dir())
            profile_to = out / f"profile-{name}.txt" if name in a.profile.split(",") else None
            with contextlib.ExitStack() as patches:
                if name in a.baseline_experts.split(","):
                    import steps.modeling
                    sys.path.insert(0, str(Path(__file__).resolve().parent))
                    import experts_53b72cc
                    patches.enter_context(unittest.mock.patch.object(steps.modeling, "_experts_forward",
                                                                     experts_53b72cc._experts_forward))
                    log(f"{name}: expert path of main at 53b72cc (bench/experts_53b72cc.py)")
                if name in a.peft_experts.split(","):
                    import steps.modeling
                    patches.enter_context(unittest.mock.patch.object(steps.modeling, "lora_experts", lambda net: 0))
                    log(f"{name}: PEFT's own expert LoRA (steps.modeling.lora_experts off)")
                if name in a.compiled_attention.split(","):
                    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention
                    # one function for every layer (dynamo passes each layer's module and weights in as inputs);
                    # packed rows vary in length, hence dynamic
                    compiled = torch.compile(GptOssAttention.forward, dynamic=True)
                    patches.enter_context(unittest.mock.patch.object(GptOssAttention, "forward", compiled))
                    log(f"{name}: GptOssAttention.forward compiled (torch.compile, dynamic shapes)")
                res = run_train_step(name, rows, device, a.warmup_steps, a.timed_steps, a.tokenizer_dir, a.step_profile,
                                     a.step_override + variants.get(name, []), profile_to)
            res["expert_path"] = "main 53b72cc" if name in a.baseline_experts.split(",") else "this checkout"
            res["expert_lora"] = "PEFT (W + BA per forward)" if name in a.peft_experts.split(",") else "lora_experts"
            res["attention"] = "compiled" if name in a.compiled_attention.split(",") else "eager"
        elif name in UNSLOTH_CONFIGS:
            log(f"=== {name} (Unsloth, experts of {UNSLOTH_CONFIGS[name]} layers, own process)")
            if a.tokenizer_dir is None:
                from steps.tokenizer import offline_tokenizer_dir
                a.tokenizer_dir = str(offline_tokenizer_dir())
            timeout = a.unsloth_timeout_s
            if a.stop_by_s is not None:
                timeout = max(30.0, min(timeout, a.stop_by_s - (time.perf_counter() - t_start)))
            res = run_unsloth(name, rows, shape, device, a.warmup_steps, a.timed_steps, a.tokenizer_dir, a.ckpt_dir,
                              a.unsloth_site, a.unsloth_work_dir, timeout, out, a.unsloth_python)
            if "versions" in res:
                summary.setdefault("versions_by_tool", {})["unsloth"] = res["versions"]
        else:
            log(f"=== {name} {CONFIGS[name]}")
            res = run_config(name, CONFIGS[name], shape, rows, device, a.warmup_steps, a.timed_steps, 42, tokenizer)
        res["wall_s"] = round(time.perf_counter() - t_start - elapsed, 1)
        res["recompile_limit_hits_so_far"] = list(recompiles.hits)
        log(json.dumps({k: v for k, v in res.items() if k not in ("traceback", "log_tail")}))
        summary["configs"][name] = res
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if not res["model_freed"]:
            log("model not freed; stopping so the next configuration's numbers stay clean")
            break

    summary["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    summary["recompile_limit"] = a.recompile_limit
    summary["recompile_limit_hits"] = recompiles.hits
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    ref = summary["configs"].get("ref", {})
    print(f"\nversions (our stack and the reference): {json.dumps(versions)}")
    for tool, v in summary.get("versions_by_tool", {}).items():
        print(f"versions ({tool}, its own process): {json.dumps(v)}")
    print("\n| config | tool, settings | trainable M | tokens/s | x ref | peak GiB | step s | first step s "
          "| start -> step 1 s | loss@steps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in summary["configs"].items():
        tr = r.get("trainable_params")
        tr = f"{tr / 1e6:.2f}" if tr else ""
        if "tokens_per_s" not in r:
            print(f"| {name} | {settings_line(r)} | {tr} | {(r.get('error') or r.get('skipped') or '')[:200]} | | "
                  f"{r.get('peak_gib')} | | | | |")
            continue
        x = r["tokens_per_s"] / ref["tokens_per_s"] if ref.get("tokens_per_s") else float("nan")
        ls = ", ".join(f"{k}:{v:.4f}" for k, v in sorted(r["loss_by_step"].items())[:4])
        print(f"| {name} | {settings_line(r)} | {tr} | {r['tokens_per_s']:.0f} | {x:.2f} | {r['peak_gib']} | "
              f"{r['step_s']} | {r['first_step_s']} | {r.get('process_start_to_first_step_s', '')} | {ls} |")
    if "parity" in summary:
        p = summary["parity"]
        print("parity vs eager padded: | way | rel diff of mean NLL | per-token NLL rel L2 | hidden rel L2 |")
        for k in ("fast_padded4", "eager_packed4_fixed", "fast_packed4_fixed", "fast_packed16_fixed",
                  "eager_packed4_stock", "fast_packed4_stock"):
            print(f"| {k} | {p[k]['rel_diff_of_mean']:.2e} | {p[k]['per_token_rel_l2']:.2e} | {p[k]['hidden_rel_l2']:.2e} |")
    print(f"total wall {summary['total_wall_s']}s; dynamo recompile-limit hits: {len(recompiles.hits)}")


if __name__ == "__main__":
    main()

"""Configuration (c): Unsloth training the bench's random-weight gpt-oss checkpoint, in a process of its own.

python bench/unsloth_train.py --model-dir CKPT --rows ROWS.jsonl --trainable reference|all --out RESULT.json
    [--warmup-steps 2] [--timed-steps 6 | --epoch] [--launch-unix T]

Started by bench/train_throughput.py (configurations `unsloth`, `unsloth_all`) with PYTHONPATH=/tmp/site-unsloth: the
wheels of .whl-unsloth/ (bench/unsloth_wheels.py: unsloth 2026.10.9, unsloth_zoo, TRL 1.15, datasets 4.8, ...) over
the machine's own transformers 5.17 and torch 2.11. Never on the path of our stack (/tmp/site: transformers 5.23).

What it does, with Unsloth's own gpt-oss notebook settings where it has one:
- FastLanguageModel.from_pretrained(CKPT, 16-bit: load_in_4bit=False, load_in_16bit=True, dtype bf16,
  max_seq_length 2048, local files only); CKPT is a bf16 safetensors folder with the tokenizer's files in it.
- FastLanguageModel.get_peft_model: LoRA r=8, alpha=16, dropout 0, bias "none", use_gradient_checkpointing="unsloth"
  (its offloaded checkpointing), random_state 3407, no rsLoRA/LoftQ; the trainable set by --trainable:
    reference: q/k/v/o of every layer + the experts (gate_up_proj, down_proj) of layers 7, 15, 23 (the recipe's set;
               15.04 M with our PEFT), as explicit target_parameters;
    all:       the notebook's target_modules (q/k/v/o + gate/up/down), which Unsloth maps to the experts of all 24
               layers (92.45 M with our PEFT).
- TRL's SFTTrainer as Unsloth patches it (imported after unsloth), SFTConfig with the notebook's optimizer settings
  (adamw_8bit, weight_decay 0.001, linear schedule, warm-up 5 steps, seed 3407), lr 2e-4, bf16; padded batches 4 x
  grad-accum 4 of the parent's rows (input_ids + labels, right-padded, attention mask), max length 2048;
  max_steps = warm-up + timed optimizer steps (so the linear schedule spans those steps, not the epoch); with --epoch,
  the whole epoch (every step after the warm-up timed), then the adapter saved (PEFT's save_pretrained) to
  RESULT.adapter/, and the time from process start (and from the parent's launch) to the saved adapter recorded:
  bench/train_epoch.py's end-to-end figure for Unsloth.
- Tokens counted exactly: the collator is ours, wrapped; it counts the non-pad tokens (and loss tokens) of every
  micro-batch the trainer consumes.
- Writes one JSON (--out): settings, every package version, trainable parameters, process start -> end of step 1
  (and from the parent's launch, --launch-unix), tokens/s over the timed steps (host clock after cuda synchronize),
  peak GiB (torch.cuda.max_memory_allocated), loss per step, and every network connection Unsloth tried (refused here).
Offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE, UNSLOTH_DISABLE_STATISTICS (its Hub stats ping),
use_exact_model_name (no name mapping: the mapper update it fetches from GitHub), local_files_only; and a socket guard
that refuses (and records) any connection or DNS lookup to a host other than this one, so nothing waits on a network.
NVLink multicast off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1), forced.
--cpu-smoke: no GPU (train_throughput.py --tiny): Unsloth's GPU code path on a CPU (UNSLOTH_ALLOW_CPU, device properties
stood in, TRL's Triton LM-head kernel in plain torch), plain checkpointing, no 8-bit Adam: slow (minutes per step).
"""
import time

T0_UNIX, T0 = time.time(), time.perf_counter()  # process start, before any import

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

FORCED_ENV = {
    "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
}
os.environ.update(FORCED_ENV)

# ---------------------------------------------------------------- no network: refuse and record every attempt
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}
NETWORK_ATTEMPTS = []


def _is_local(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    return host in LOCAL_HOSTS or (isinstance(host, str) and (host.startswith("127.") or host == socket.gethostname()))


def _refuse(what):
    stack = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]]
    NETWORK_ATTEMPTS.append({"what": what, "stack": stack[-8:]})
    print(f"[unsloth_train] refused network access: {what} (from {stack[-1] if stack else '?'})", file=sys.stderr,
          flush=True)


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guard_connect(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and isinstance(address, tuple) and not _is_local(address[0]):
        _refuse(f"connect {address[:2]}")
        raise OSError(errno.ENETUNREACH, f"unsloth_train.py: no network (connect to {address[:2]} refused)")
    return _connect(self, address)


def _guard_connect_ex(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and isinstance(address, tuple) and not _is_local(address[0]):
        _refuse(f"connect_ex {address[:2]}")
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def _guard_getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        _refuse(f"getaddrinfo {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, f"unsloth_train.py: no network (lookup of {host!r} refused)")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = _guard_connect, _guard_connect_ex, _guard_getaddrinfo

GIB = 1024**3
NOTEBOOK_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def log(msg):
    print(f"[unsloth_train {time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:.1f}s] {msg}", flush=True)


def versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                 "bitsandbytes", "triton", "torchao", "cut_cross_entropy", "xformers", "huggingface_hub", "tokenizers",
                 "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def package_paths():
    """Where each stack package was imported from (proof that /tmp/site-unsloth and not /tmp/site served it)."""
    out = {}
    for name in ("unsloth", "unsloth_zoo", "transformers", "trl", "peft", "datasets", "bitsandbytes", "torch"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__file__", None) and str(Path(mod.__file__).parent)
    return out


def read_rows(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for r in rows:
        if "labels" not in r:  # input_ids + completion/assistant mask: loss on the masked-in positions
            mask = r.get("completion_mask") or r.get("assistant_masks")
            r["labels"] = [t if m else -100 for t, m in zip(r["input_ids"], mask)]
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


class PaddedCollator:
    """Right-padded batches (the reference recipe's and Unsloth's notebook layout): input_ids padded with pad_id,
    labels with -100, attention_mask 1 on real tokens; rows cut at max_length. Records (non-pad tokens, loss tokens)
    of every micro-batch it builds, in the order the trainer consumes them."""

    def __init__(self, pad_id, max_length):
        self.pad_id, self.max_length, self.counts = pad_id, max_length, []

    def __call__(self, examples):
        import torch

        ids = [list(e["input_ids"])[:self.max_length] for e in examples]
        labs = [list(e["labels"])[:self.max_length] for e in examples]
        n = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(ids), n), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labs)):
            input_ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            attention_mask[i, :len(x)] = 1
        self.counts.append((int(attention_mask.sum()), int((labels[:, 1:] != -100).sum())))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def cpu_smoke_shims(torch):
    """--cpu-smoke only: UNSLOTH_ALLOW_CPU makes Unsloth take its GPU code path on a CPU (load, gpt-oss patches, LoRA,
    trainer set-up), which asks for device properties only a GPU has; these stand-ins answer (and PlainLogProb stands
    in for TRL's Triton LM-head kernel)."""
    os.environ["UNSLOTH_ALLOW_CPU"] = "1"

    class Props:
        name, total_memory, major, minor, multi_processor_count, gcnArchName = "cpu-smoke", 24 * GIB, 9, 0, 2, ""

    torch.cuda.get_device_properties = lambda *a, **k: Props()  # noqa: E731
    torch.cuda.mem_get_info = lambda *a, **k: (20 * GIB, 24 * GIB)
    torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.cuda.memory_reserved = lambda *a, **k: 0


class PlainLogProb:
    """--cpu-smoke only: TRL 1.15's fused LM head + log-prob (a Triton kernel) in plain torch, so a CPU can train."""

    @staticmethod
    def apply(hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs):
        import torch

        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        if logit_scale is not None:
            logits = logits * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
        token = logp.gather(-1, labels[:, None]).squeeze(-1)
        with torch.no_grad():
            p = logp.exp()
            entropy, sq = -(p * logp).sum(-1), (p * p).sum(-1).log()
            top1 = logits.argmax(-1) == labels
        return token, entropy, sq, logits.mean(-1).detach(), top1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True, help="bf16 safetensors checkpoint folder, tokenizer files inside")
    ap.add_argument("--rows", required=True, help="JSON lines: input_ids + labels (or completion_mask)")
    ap.add_argument("--trainable", choices=["reference", "all"], default="reference")
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--timed-steps", type=int, default=6)
    ap.add_argument("--epoch", action="store_true", help="train the whole epoch (not --timed-steps) and save the adapter")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--optim", default="adamw_8bit", help="the notebook's; adamw_torch if bitsandbytes' CUDA library "
                    "does not load (recorded in the JSON)")
    ap.add_argument("--router-aux-loss-coef", type=float, default=0.0, help="0: the same loss as the other "
                    "configurations (TRL would take gpt-oss's 0.9 from its config)")
    ap.add_argument("--expert-layers", default="7,15,23", help="--trainable reference: the layers whose experts train")
    ap.add_argument("--launch-unix", type=float, help="the parent's clock just before it started this process")
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: Unsloth's GPU code path on a CPU up to training (tests this script)")
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"name": "unsloth" if a.trainable == "reference" else "unsloth_all", "tool": "unsloth",
              "trainable_set": a.trainable, "pid": os.getpid(), "cwd": os.getcwd(), "forced_env": FORCED_ENV,
              "pythonpath": os.environ.get("PYTHONPATH"), "process_start_unix": T0_UNIX,
              "launch_to_process_start_s": a.launch_unix and round(T0_UNIX - a.launch_unix, 2),
              "network_attempts_refused": NETWORK_ATTEMPTS, "phases_s": {}}
    compile_cache = Path.cwd() / "unsloth_compiled_cache"
    result["compile_cache"] = {"dir": str(compile_cache), "existed_at_start": compile_cache.is_dir(),
                               "files_at_start": sum(1 for _ in compile_cache.rglob("*")) if compile_cache.is_dir() else 0}

    def write():
        result["network_attempts_refused"] = NETWORK_ATTEMPTS
        out.write_text(json.dumps(result, indent=1, default=str))

    def phase(name, t):
        result["phases_s"][name] = round(time.perf_counter() - t, 2)
        log(f"{name}: {result['phases_s'][name]}s")

    try:
        t = time.perf_counter()
        import torch
        if a.cpu_smoke:
            cpu_smoke_shims(torch)

        import unsloth  # noqa: F401  (first: it patches transformers, TRL and PEFT)
        from unsloth import FastLanguageModel
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer
        if a.cpu_smoke:
            import trl.trainer.utils
            trl.trainer.utils._ChunkedLogProbFunction = PlainLogProb
        phase("imports", t)
        result["versions"] = versions()
        result["package_paths"] = package_paths()
        result["unsloth_device_type"] = getattr(unsloth, "DEVICE_TYPE", None)
        cuda = torch.cuda.is_available() and not a.cpu_smoke
        result["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
        log(f"versions {result['versions']}")
        log(f"paths {result['package_paths']}")
        write()

        optim = a.optim
        if optim.endswith("8bit"):
            try:
                import bitsandbytes.functional as bnbf
                bnb_lib = getattr(bnbf, "lib", None)
                # a failed load leaves ErrorHandlerMockBNBNativeLibrary, whose every attribute raises when called
                ok = cuda and type(bnb_lib).__name__ == "CudaBNBNativeLibrary"
            except Exception as e:  # noqa: BLE001
                ok, bnb_lib = False, repr(e)
            result["bitsandbytes_native_lib"] = f"{type(bnb_lib).__name__}: {getattr(getattr(bnb_lib, '_lib', None), '_name', bnb_lib)}"
            if not ok:
                log(f"bitsandbytes' CUDA library is not usable ({result['bitsandbytes_native_lib']}); optim adamw_torch")
                result["optim_fallback"] = f"{optim} -> adamw_torch (bitsandbytes native library not usable)"
                optim = "adamw_torch"

        # ---- model, 16-bit
        t = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dtype = torch.bfloat16 if cuda else torch.float32
        # --cpu-smoke: UNSLOTH_ALLOW_CPU walks Unsloth's GPU code path on a CPU, where pinned host memory (its
        # offloaded "unsloth" checkpointing) does not exist: plain checkpointing there.
        gc_mode = "unsloth" if cuda else True
        load_kwargs = dict(model_name=a.model_dir, max_seq_length=a.max_length, dtype=dtype, load_in_4bit=False,
                           load_in_8bit=False, load_in_16bit=True, full_finetuning=False,
                           use_gradient_checkpointing=gc_mode, local_files_only=True, use_exact_model_name=True)
        model, tokenizer = FastLanguageModel.from_pretrained(**load_kwargs)
        phase("load", t)
        cfg = model.config
        n_layers = cfg.num_hidden_layers
        result["model"] = {"class": type(model).__name__, "layers": n_layers, "experts": cfg.num_local_experts,
                           "hidden": cfg.hidden_size, "params": sum(p.numel() for p in model.parameters()),
                           "attn_implementation": getattr(cfg, "_attn_implementation", None),
                           "experts_implementation": getattr(cfg, "_experts_implementation", None),
                           "experts_class": next((type(m).__name__ for n, m in model.named_modules()
                                                  if n.endswith("mlp.experts")), None),
                           "dtype": str(next(model.parameters()).dtype)}
        result["load_peak_gib"] = cuda and round(torch.cuda.max_memory_allocated() / GIB, 2)
        log(f"model {result['model']}")
        write()

        # ---- LoRA, the notebook's settings; the trainable set by --trainable
        t = time.perf_counter()
        if a.trainable == "all":
            target_modules, target_parameters = NOTEBOOK_TARGET_MODULES, None  # Unsloth maps them to every expert
            expert_layers = list(range(n_layers))
        else:
            expert_layers = [int(x) for x in a.expert_layers.split(",") if x]
            if max(expert_layers) >= n_layers:  # a small test model: its first and last layer
                expert_layers = [1, n_layers - 1]
            target_modules = ATTENTION
            # the expert weights of those layers as the loaded model names them (3-D stacked tensors), not guessed
            target_parameters = []
            for n, p in model.named_parameters():
                if ".mlp.experts." in n and p.dim() == 3 and "layers." in n \
                        and int(n.split("layers.")[1].split(".")[0]) in expert_layers:
                    target_parameters.append("layers." + n.split("layers.", 1)[1])
            if not target_parameters:
                raise RuntimeError("no 3-D expert weights under mlp.experts in layers "
                                   f"{expert_layers}: {[n for n, _ in model.named_parameters() if '.experts.' in n][:8]}")
        peft_kwargs = dict(r=8, lora_alpha=16, lora_dropout=0, bias="none", target_modules=target_modules,
                           use_gradient_checkpointing=gc_mode, random_state=3407, use_rslora=False, loftq_config=None)
        if target_parameters is not None:
            peft_kwargs["target_parameters"] = target_parameters
        model = FastLanguageModel.get_peft_model(model, **peft_kwargs)
        phase("lora", t)
        trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        n_trainable = sum(trainable.values())
        by_kind = {}
        for n, k in trainable.items():
            kind = "experts" if ".experts." in n else "attention" if "self_attn" in n else "other"
            by_kind[kind] = by_kind.get(kind, 0) + k
        layers_with_expert_lora = sorted({int(n.split("layers.")[1].split(".")[0]) for n in trainable
                                          if ".experts." in n and "layers." in n})
        expected = {"reference": 15_040_512, "all": 92_454_912} if n_layers == 24 and cfg.hidden_size == 2880 else {}
        result.update({
            "lora": {k: v for k, v in peft_kwargs.items()}, "expert_lora_layers_requested": expert_layers,
            "expert_lora_layers_found": layers_with_expert_lora, "trainable_params": n_trainable,
            "trainable_params_by_kind": by_kind, "trainable_tensors": len(trainable),
            "trainable_params_ours_peft": expected.get(a.trainable),
            "trainable_names_sample": sorted(trainable)[:6],
        })
        if layers_with_expert_lora != sorted(expert_layers):
            result["trainable_set_mismatch"] = f"expert LoRA in layers {layers_with_expert_lora}, asked {expert_layers}"
        log(f"trainable {n_trainable / 1e6:.2f}M {by_kind} (our PEFT: {expected.get(a.trainable)}); "
            f"expert LoRA in layers {layers_with_expert_lora}")
        write()

        # ---- data and trainer
        t = time.perf_counter()
        rows = read_rows(a.rows)
        ds = Dataset.from_list(rows)
        steps_per_epoch = math.ceil(len(ds) / (a.batch * a.grad_accum))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = PaddedCollator(pad_id, a.max_length)
        stop_at = steps_per_epoch if a.epoch else a.warmup_steps + a.timed_steps
        step_t, step_unix, losses, grad_norms = [], [], {}, {}

        def sync():
            if cuda:
                torch.cuda.synchronize()

        class Meter(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                sync()
                step_t.append(time.perf_counter())
                log("train begins")

            def on_step_end(self, args, state, control, **kw):
                sync()
                step_t.append(time.perf_counter())
                step_unix.append(time.time())
                if len(step_t) == 2:
                    log(f"step 1 done, {step_t[1] - T0:.1f}s after process start")
                if state.global_step >= stop_at:
                    control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses[state.global_step] = float(logs["loss"])
                    log(f"step {state.global_step} loss {logs['loss']}")
                if logs and "grad_norm" in logs:
                    grad_norms[state.global_step] = float(logs["grad_norm"])

        sft = dict(
            output_dir=str(Path.cwd() / f"trainer-{result['name']}"), per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=a.grad_accum, num_train_epochs=1, learning_rate=a.lr,
            # max_steps too (not only the callback's stop): Unsloth runs its own rewrite of the training loop
            max_steps=stop_at,
            warmup_steps=5, lr_scheduler_type="linear", optim=optim, weight_decay=0.001, seed=3407,
            logging_steps=1, report_to="none", save_strategy="no", max_length=a.max_length, packing=False,
            padding_free=False, bf16=cuda, fp16=False, dataloader_num_workers=0, disable_tqdm=True,
            remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
            # TRL 1.15 turns gpt-oss's router aux loss on from the config (0.9); off, as in every other configuration
            router_aux_loss_coef=a.router_aux_loss_coef,
        )
        if not cuda:
            sft["use_cpu"] = True
        args = SFTConfig(**sft)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=ds, args=args,
                             data_collator=collator, callbacks=[Meter()])
        # Unsloth may swap in its own collator: count what is used, whichever it is.
        used = trainer.data_collator
        if used is not collator:
            result["collator_replaced_by_unsloth"] = type(used).__name__

            def counting(examples, _inner=used):
                batch = _inner(examples)
                am = batch.get("attention_mask")
                n = int(am.sum()) if am is not None else int((batch["input_ids"] != pad_id).sum())
                collator.counts.append((n, int((batch["labels"][:, 1:] != -100).sum())))
                return batch
            trainer.data_collator = counting
        phase("trainer_setup", t)
        result.update({
            "settings": {"load": {k: str(v) for k, v in load_kwargs.items()}, "sft": sft,
                         "optim": optim, "layout": f"padded {a.batch} x grad-accum {a.grad_accum}",
                         "max_length": a.max_length, "rows": len(ds), "steps_per_epoch": steps_per_epoch,
                         "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps, "epoch": a.epoch,
                         "trainer_class": type(trainer).__name__,
                         "gradient_checkpointing": "unsloth (offloaded)" if gc_mode == "unsloth" else str(gc_mode),
                         "model_gradient_checkpointing": getattr(model, "is_gradient_checkpointing", None)},
        })
        write()

        # ---- train
        t = time.perf_counter()
        error = None
        try:
            trainer.train()
        except torch.OutOfMemoryError as e:
            error = f"OutOfMemoryError: {str(e).splitlines()[0][:300]}"
            log(error)
        phase("train", t)
        result["peak_gib"] = cuda and round(torch.cuda.max_memory_allocated() / GIB, 2)
        result["peak_reserved_gib"] = cuda and round(torch.cuda.max_memory_reserved() / GIB, 2)
        done = len(step_t) - 1
        if error is None and done <= a.warmup_steps:
            error = f"only {done} optimizer steps ran (warm-up {a.warmup_steps})"
        if error is not None:
            result["error"] = error
        else:
            m = a.grad_accum
            timed = step_t[a.warmup_steps:]
            n_timed = len(timed) - 1
            counts = collator.counts
            tok = sum(c[0] for c in counts[a.warmup_steps * m:(a.warmup_steps + n_timed) * m])
            loss_tok = sum(c[1] for c in counts[a.warmup_steps * m:(a.warmup_steps + n_timed) * m])
            secs = timed[-1] - timed[0]
            result.update({
                "steps_done": done, "timed_steps": n_timed,
                "first_step_s": round(step_t[1] - step_t[0], 2),  # step 1 alone (compile included)
                "process_start_to_first_step_s": round(step_t[1] - T0, 2),
                "launch_to_first_step_s": a.launch_unix and round(step_unix[0] - a.launch_unix, 2),
                "warmup_total_s": round(step_t[a.warmup_steps] - step_t[0], 2),
                "step_s": round(secs / n_timed, 3), "tokens_timed": tok, "loss_tokens_timed": loss_tok,
                "tokens_per_s": round(tok / secs, 1), "tokens_per_step": round(tok / n_timed, 1),
                "micro_batches_counted": len(counts), "tokens_counted_all_steps": sum(c[0] for c in counts),
                "epoch_min_est": round(sum(len(r["input_ids"]) for r in rows) / (tok / secs) / 60, 2),
                "loss_by_step": losses, "grad_norm_by_step": grad_norms, "step_end_unix": step_unix,
            })
            log(f"{result['tokens_per_s']:.0f} tokens/s over {n_timed} steps ({result['step_s']} s/step), "
                f"peak {result['peak_gib']} GiB, step 1 {result['process_start_to_first_step_s']}s after start")
            if a.epoch:
                t = time.perf_counter()
                adapter = out.with_name(out.stem + ".adapter")
                model.save_pretrained(str(adapter))
                phase("save", t)
                result.update({
                    "adapter_dir": str(adapter), "adapter_files": sorted(f.name for f in adapter.iterdir()),
                    "process_start_to_saved_adapter_s": round(time.perf_counter() - T0, 2),
                    "launch_to_saved_adapter_s": a.launch_unix and round(time.time() - a.launch_unix, 2)})
                log(f"adapter saved to {adapter}, {result['process_start_to_saved_adapter_s']}s after process start")
    except BaseException as e:  # noqa: BLE001  the JSON says what broke, the parent prints our last lines too
        result["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        result["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
        result["wall_s"] = round(time.perf_counter() - T0, 1)
        write()
        sys.exit(1)
    if compile_cache.is_dir():
        result["compile_cache"]["files_at_end"] = sum(1 for _ in compile_cache.rglob("*"))
    result["wall_s"] = round(time.perf_counter() - T0, 1)
    write()
    log(f"wrote {out}")
    sys.exit(0 if "error" not in result else 2)


if __name__ == "__main__":
    main()

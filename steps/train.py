"""finetune step train --config configs/tiny-cpu.yaml --input harmony=DIR --out DIR2

Fine-tune gpt-oss on the harmony step's tokens: LoRA on attention + expert parameters, or a full fine-tune, with
TRL's SFTTrainer over PEFT; loss only where the harmony step's `assistant_masks` is 1. Checkpoints go to
DIR2/checkpoints/checkpoint-N (running the same command again after a crash continues from the newest complete one),
the result to DIR2/model.
"""
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from steps.contract import is_main_process, is_retry, read_output
from steps.model import DTYPE_NAMES, ModelConfig
from steps.tracking import Tracker

# torch, transformers, TRL and PEFT are imported inside run(): reading and checking a profile (`finetune check`, the
# flow before its first step) must not pay ~10 s for them.

log = logging.getLogger("finetune")

INPUTS = ("harmony",)
KEEP_ON_RESTART = ("checkpoints",)  # the contract clears the rest of the out dir when the step starts
# transformers 5.23's schedulers (transformers.trainer_utils.SchedulerType) and the keyword arguments each takes beyond
# the optimizer and step counts (TYPE_TO_SCHEDULER_FUNCTION); written out so a profile is checked without importing
# torch. tests/test_train.py holds them to the installed transformers.
SCHEDULER_KWARGS = {
    "linear": (), "cosine": ("num_cycles",), "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("lr_end", "power"), "constant": (), "constant_with_warmup": (), "inverse_sqrt": ("timescale",),
    "reduce_lr_on_plateau": None,  # None: any (passed through to torch's ReduceLROnPlateau)
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"),
    "warmup_stable_decay": ("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio",
                            "num_cycles"),
    "greedy": None,
}
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_COMPLETE_MARKER = "trainer_state.json"  # Trainer writes it last into a checkpoint folder


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    """Injected from the profile's `model` section."""
    router_aux_loss_coef: float
    """Weight of the MoE load-balancing loss added to the LM loss (gpt-oss ships 0.9); 0 turns it off and with it
    output_router_logits. The reference recipe trained without it (0), so it must be chosen explicitly."""
    method: Literal["lora", "full"] = "lora"
    """lora: train LoRA adapters on a frozen base; full: train every parameter."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; must be 0 when expert parameters are targeted (PEFT cannot apply it there)."""
    lora_target_modules: str | list[str] = "all-linear"
    """Linear layers that get LoRA: "all-linear" (attention q/k/v/o; lm_head excluded) or a list of module names
    (e.g. [q_proj, v_proj]); [] for experts only."""
    lora_expert_layers: str | list[int] = "all"
    """Layers whose expert weights (mlp.experts.gate_up_proj / down_proj) get LoRA via PEFT target_parameters:
    "all" or layer indices (the reference recipe: [7, 15, 23]); [] for none."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine_with_min_lr"
    """transformers scheduler name (linear, cosine, cosine_with_min_lr, constant, constant_with_warmup, ...)."""
    lr_scheduler_kwargs: dict = field(default_factory=lambda: {"min_lr_rate": 0.1})
    """Extra scheduler arguments (cosine_with_min_lr needs min_lr_rate or min_lr)."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    num_epochs: float = 1.0
    """Passes over the data; ignored when max_steps > 0."""
    max_steps: int = -1
    """Optimizer steps to run; -1 runs num_epochs."""
    per_device_batch_size: int = 4
    """Rows per micro-batch per device (with packing: packed rows of up to max_length tokens)."""
    grad_accum_steps: int = 4
    """Micro-batches per optimizer step."""
    max_length: int = 2048
    """Longest row in tokens (the packed row length when packing); a longer harmony row is an error, not truncated."""
    device: Literal["cpu", "cuda"] = "cuda"
    """Where to train."""
    dtype: str = "bfloat16"
    """Weight dtype: bfloat16 (with bf16 autocast) or float32. MXFP4 checkpoints are dequantized to it on load."""
    attn_implementation: str = "eager"
    """transformers attention kernel: eager (the reference recipe) or flex_attention (faster, compiles on first use);
    gpt-oss's attention sinks rule out sdpa."""
    packing: bool = False
    """Pack rows into max_length sequences, padding-free (best-fit decreasing); documents do not attend to each other."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, ~30% slower."""
    use_liger_kernel: bool = False
    """Liger's fused kernels (needs the liger-kernel package; TRL already fuses the LM head + cross-entropy)."""
    save_steps: int = 100
    """Write a checkpoint every this many optimizer steps (and always at the end)."""
    num_checkpoints_kept: int = 2
    """Older checkpoints beyond this many are deleted."""
    resume: Literal["auto", True, False] = "auto"
    """auto: a re-run of an interrupted run with the same fingerprint (config, data, code) continues from its newest
    complete checkpoint, anything else starts fresh; true: continue from the newest checkpoint even after a change
    (e.g. a raised max_steps; same data order); false: always start fresh."""
    seed: int = 42
    """Seed of data order, LoRA initialisation and dropout."""
    logging_steps: int = 1
    """Log metrics (console and tracker) every this many optimizer steps."""
    eval_steps: int = 0
    """With an eval split (data.eval_fraction > 0): also measure the eval loss every this many optimizer steps; 0
    measures it only before the first step and after the last."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over every process with FSDP2 (one unit per decoder layer);
    launch with `torchrun --nproc-per-node N -m flows.cli step train …`. Rank 0 alone loads the weights and hands
    each rank its shard; checkpoints are sharded, the final model is one consolidated folder."""
    nodes: int = 1
    """Machines the run spans. 1: this process's own launch (`torchrun --nproc-per-node N` on one host, or none);
    more: the prod flow runs the step as a Kubeflow Trainer TrainJob of this many nodes (infra/k8s/trainjob.yaml), each
    running this same step under torchrun with train.gpus_per_node processes."""
    gpus_per_node: int = 8
    """GPUs per node, one training process each, with train.nodes > 1 (world size = nodes x gpus_per_node); with
    train.device=cpu, processes per node."""
    fsdp_cpu_offload: bool = False
    """With fsdp: keep the sharded parameters, gradients and optimizer state in host memory, moving each layer to the
    GPU only while it computes (slower; for models whose shards do not fit, e.g. gpt-oss-120b on 8 x 80 GB)."""
    compile_cache_dir: str = ""
    """Where the GPU kernels compiled in the first step (torch Inductor's graphs, Triton's binaries) are kept for the
    next run of this step (the nightly retrain); "" = .compile-cache in the out dir's parent (the output root, which a
    container keeps as a volume). Entries are keyed by the torch, Triton and CUDA versions, the GPU and this code, so a
    change of any of them compiles afresh instead of loading stale kernels."""
    expert_weights: Literal["dtype", "mxfp4"] = "dtype"
    """How LoRA holds the frozen expert weights: dtype (train.dtype; an MXFP4 checkpoint is dequantized on load) or
    mxfp4 (as the openai/gpt-oss releases store them: 4.25 bits a weight, decoded inside each grouped expert GEMM;
    gpt-oss-20b's experts take 10 GB instead of 38). mxfp4 changes nothing for a checkpoint whose experts are MXFP4
    values: a release (its experts read from the files as stored, never decoded whole) or a bf16 copy of one; any
    others are refused. It rounds a random model's experts to MXFP4 (as a release's are) and needs method=lora
    without fsdp."""
    save_random_base: bool = True
    """model.name=random only: save the random base weights to DIR2/base, which merge needs to add a LoRA adapter to
    (42 GB at the gpt-oss-20b shape); false skips that for benchmarks, and leaves nothing to merge into."""

    def __post_init__(self):
        if self.expert_weights == "mxfp4" and self.method != "lora":
            raise ValueError("train.expert_weights=mxfp4 holds the experts frozen, but train.method=full trains them; "
                             "set train.expert_weights=dtype")
        if self.expert_weights == "mxfp4" and self.fsdp:
            raise ValueError("train.expert_weights=mxfp4 with train.fsdp=true: FSDP2 shards parameters, and MXFP4-held "
                             "experts are buffers it would copy whole onto every GPU; set train.expert_weights=dtype")
        if self.fsdp and self.method == "lora" and self.gradient_checkpointing:
            # PEFT 0.21.2 finds adapter weights by module name and strips FSDP's wrapper prefix but not the activation
            # checkpoint wrapper's, so it saves an empty adapter (seen on 2 x H200 and on CPU).
            raise ValueError("train.method=lora with train.fsdp=true and train.gradient_checkpointing=true saves an empty "
                             "adapter (PEFT 0.21.2); set train.gradient_checkpointing=false")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"train.dtype={self.dtype!r} cannot be trained: gpt-oss checkpoints store experts in MXFP4, "
                             "which takes no gradients, so they are dequantized on load; set train.dtype=bfloat16 (or float32)")
        if self.attn_implementation == "sdpa":
            raise ValueError("train.attn_implementation=sdpa does not support gpt-oss attention sinks; "
                             "set train.attn_implementation=flex_attention (fast) or eager")
        if self.attn_implementation == "flex_attention" and self.device == "cpu":
            raise ValueError("train.attn_implementation=flex_attention cannot run gpt-oss attention sinks on CPU; "
                             "set train.attn_implementation=eager for train.device=cpu")
        if self.lr_scheduler not in SCHEDULER_KWARGS:
            raise ValueError(f"train.lr_scheduler={self.lr_scheduler!r} is unknown; choose one of "
                             f"{', '.join(SCHEDULER_KWARGS)}")
        accepted = SCHEDULER_KWARGS[self.lr_scheduler]
        unknown = sorted(set(self.lr_scheduler_kwargs) - set(accepted)) if accepted is not None else []
        if unknown:
            raise ValueError(f"train.lr_scheduler_kwargs.{unknown[0]} is not an argument of the {self.lr_scheduler} "
                             f"scheduler; it takes {', '.join(accepted) or 'none'} (set train.lr_scheduler_kwargs={{}} "
                             "for none)")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate={self.learning_rate} must be positive, e.g. 2e-4 for LoRA")
        if self.eval_steps < 0:
            raise ValueError(f"train.eval_steps={self.eval_steps} must be 0 (before and after training only) or positive")
        for name in ("lora_r", "lora_alpha", "per_device_batch_size", "grad_accum_steps", "max_length", "save_steps",
                     "num_checkpoints_kept", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"train.max_steps={self.max_steps} must be positive, or -1 to run train.num_epochs")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise ValueError(f"train.num_epochs={self.num_epochs} must be positive (or set train.max_steps)")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"train.router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0 (0 turns it off)")
        if isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear":
            raise ValueError(f"train.lora_target_modules={self.lora_target_modules!r}: use all-linear or a list of "
                             "module names, e.g. [q_proj, k_proj, v_proj, o_proj]")
        if isinstance(self.lora_expert_layers, str) and self.lora_expert_layers != "all":
            raise ValueError(f"train.lora_expert_layers={self.lora_expert_layers!r}: use all or a list of layer "
                             "indices, e.g. [7, 15, 23]")
        if self.method == "lora" and self.lora_target_modules == [] and self.lora_expert_layers == []:
            raise ValueError("train.lora_target_modules and train.lora_expert_layers are both empty: LoRA would train "
                             "nothing; set train.lora_target_modules=all-linear")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"train.nodes={self.nodes} and train.gpus_per_node={self.gpus_per_node} must be at least 1")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ValueError("train.fsdp_cpu_offload=true needs train.fsdp=true (offload moves FSDP shards to the host)")
        if self.fsdp_cpu_offload and self.device == "cpu":
            raise ValueError("train.fsdp_cpu_offload=true with train.device=cpu: the shards already live in host memory "
                             "(and torch's offload needs a GPU); set train.fsdp_cpu_offload=false")
        if self.lora_dropout and self.lora_expert_layers != []:
            raise ValueError(f"train.lora_dropout={self.lora_dropout} cannot apply to expert parameters; set "
                             "train.lora_dropout=0 or train.lora_expert_layers=[]")


@dataclass(frozen=True, kw_only=True)
class Output:
    model_dir: str
    """The trained result with its tokenizer: a PEFT adapter folder (lora) or a full model folder (full)."""
    base_model: str
    """What merge loads as the base: a folder relative to this step's out dir (model.name=random), else model.name;
    empty when train.save_random_base=false left the random base unsaved."""
    base_revision: str
    method: str
    num_steps: int
    train_loss_first: float
    train_loss_last: float
    loss_curve: list
    """[[step, loss], ...] at every logging step."""
    tokens_per_s: float
    """Training tokens per second over the optimizer steps after the first (compile, warm-up), checkpoint writes
    excluded."""
    peak_mem_gib: float
    train_runtime_s: float
    phases_s: dict
    """Seconds per phase, in order: imports, data (read the harmony rows), load (the model), lora, pack (TRL's data
    preparation), trainer (the rest of its set-up), train_setup (optimizer, data loader), first_step (compiles on
    GPU), steps (the other steps, checkpoints included), save."""
    compile_cache: dict
    """On GPU: the cache folder and how many compiled graphs step 1 took from it (hits) or compiled (misses)."""
    eval_loss_before: float | None = None
    """Loss on the harmony step's eval split before the first optimizer step of this run (of the checkpoint it
    resumed from, when it resumed); None without an eval split (data.eval_fraction=0)."""
    eval_loss_after: float | None = None
    """Loss on the eval split after the last step: what the promotion gate compares by default."""
    num_eval_rows: int = 0
    eval_curve: list = field(default_factory=list)
    """[[step, eval loss], ...]: before, every train.eval_steps, after."""


def last_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint-N holding a readable trainer_state.json (written last, so one without it, or with it cut
    off, was interrupted mid-save)."""
    def is_complete(checkpoint: Path) -> bool:
        try:
            json.loads((checkpoint / _COMPLETE_MARKER).read_text())
        except (FileNotFoundError, ValueError):
            return False
        return True

    found = sorted(checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    complete = [p for p in found if is_complete(p)]
    for partial in found:
        if complete and partial not in complete and int(partial.name.rpartition("-")[2]) > int(complete[-1].name.rpartition("-")[2]):
            log.info("train: removing %s, a checkpoint cut off mid-save", partial)
            shutil.rmtree(partial)
    return complete[-1] if complete else None


def save_dir_atomic(out: Path, write, *, is_main: bool = True) -> None:
    """Call write(tmp_dir), then move tmp_dir to `out` so `out` is never half-written.

    Under torchrun every rank calls write (a sharded model is gathered collectively); only rank 0 touches the folders.
    """
    tmp = out.with_name(f".{out.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if not is_main:
        return
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def compile_cache_key() -> str:
    """What compiled kernels depend on beyond the traced graphs that torch's own cache keys hash: the libraries that
    generate or launch them, the GPU, and the code of this step and of its model patches (steps/modeling.py, which
    it compiles, and steps/mxfp4.py). The GPU's MXFP4 decoder is a Triton kernel that Triton's own cache keys."""
    import torch
    from importlib import metadata

    from steps import modeling, mxfp4

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    gpu = f"{torch.cuda.get_device_name()} {torch.cuda.get_device_capability()}" if torch.cuda.is_available() else "none"
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), gpu,
                 *(version(d) for d in ("triton", "transformers", "peft", "trl", "accelerate", "liger-kernel"))):
        h.update(part.encode() + b"\0")
    for module_file in (__file__, modeling.__file__, mxfp4.__file__):
        h.update(Path(module_file).read_bytes())
    return f"torch-{torch.__version__.replace('+', '-')}-{h.hexdigest()[:16]}"


def use_compile_cache(cfg: Config, out_dir: Path) -> Path:
    """Point torch Inductor's and Triton's on-disk caches (FX graphs, AOTAutograd graphs, kernel binaries) at a keyed
    folder that outlives the process; by default they live in /tmp, which a container loses."""
    root = Path(cfg.compile_cache_dir) if cfg.compile_cache_dir else Path(out_dir).resolve().parent / ".compile-cache"
    cache = root / compile_cache_key()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    return cache


def lora_config(cfg: Config, net):
    """LoRA on cfg's linear modules and expert parameters, after checking each names something in `net`."""
    import torch
    from peft import LoraConfig

    linear_names = sorted({name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)})
    if cfg.lora_target_modules != "all-linear":
        leaf_names = sorted({name.rpartition(".")[2] for name in linear_names})
        missing = [t for t in cfg.lora_target_modules if not any(n == t or n.endswith(f".{t}") for n in linear_names)]
        if missing:
            raise ValueError(f"train.lora_target_modules: {missing} match no linear layer of this model; "
                             f"it has {leaf_names} (or use all-linear)")
    num_layers = net.config.num_hidden_layers
    layers = range(num_layers) if cfg.lora_expert_layers == "all" else cfg.lora_expert_layers
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"train.lora_expert_layers: {bad} do not exist; this model has layers 0..{num_layers - 1}")
    target_parameters = [f"layers.{i}.mlp.experts.{p}" for i in layers for p in EXPERT_PARAMETERS]
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules=cfg.lora_target_modules, target_parameters=target_parameters)


def _too_short(cfg: Config, longest: int) -> ValueError:
    return ValueError(f"train.max_length={cfg.max_length} < longest harmony row {longest:,} tokens; raise "
                      f"train.max_length, or set harmony.max_length<={cfg.max_length} with harmony.overflow=drop|truncate")


def check_inputs(cfg: Config, *, inputs: Mapping[str, Path]) -> None:
    """What the harmony step's manifest already tells: run by the contract as soon as harmony has finished, before
    this step clears its out dir, imports torch or loads a model."""
    longest = read_output(inputs["harmony"]).get("longest_row", 0)  # absent in manifests older than the field
    if longest > cfg.max_length:
        raise _too_short(cfg, longest)


def run(cfg: Config, *, out_dir: Path, inputs: Mapping[str, Path], tracker: Tracker) -> Output:
    # Seconds per set-up phase, logged as each ends: the first minutes of a GPU run are mostly set-up and compiling.
    phases_s, mark = {}, [time.perf_counter()]

    def phase_done(name: str, what: str):
        now = time.perf_counter()
        phases_s[name] = round(now - mark[0], 1)
        mark[0] = now
        log.info("train: %s in %.1f s", what, phases_s[name])

    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from datasets import load_from_disk
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from steps.modeling import cpu_lm_head, fast_experts, load_model, lora_experts, mask_packed_documents
    from steps.mxfp4 import write_checkpoint
    from steps.progress import Progress, model_flops_per_token, peak_bf16_flops, peak_mem_gib

    # PEFT 0.21.2 and TRL 1.16 read model.is_gradient_checkpointing, which transformers 5.23 deprecates: a FutureWarning
    # about the libraries' own calls that no profile key can change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    phase_done("imports", "torch, transformers, TRL and PEFT imported")

    # --- Inputs: fail on bad input before loading a model ---
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but this machine has no CUDA device; set train.device=cpu "
                         "(tiny models only) or run on a GPU machine (in Docker: docker run --gpus all …)")
    # Under torchrun every rank runs this function: training is collective, files are rank 0's alone.
    is_main, local_rank = is_main_process(), int(os.environ.get("LOCAL_RANK", "0"))
    if "WORLD_SIZE" in os.environ:
        # NVLink multicast (NCCL's NVLS, torch symmetric memory, NVSHMEM) stays off: on shared hosts a program using
        # it can put every GPU of the host out of service for a day or more. Set before the process group starts.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    if cfg.nodes > 1 and int(os.environ.get("WORLD_SIZE", "1")) != cfg.nodes * cfg.gpus_per_node:
        raise ValueError(f"train.nodes={cfg.nodes} x train.gpus_per_node={cfg.gpus_per_node} = "
                         f"{cfg.nodes * cfg.gpus_per_node} processes, but this launch has WORLD_SIZE="
                         f"{os.environ.get('WORLD_SIZE', '1 (no torchrun)')}; run it as the TrainJob the prod flow creates "
                         "(torchrun reads PET_NNODES and PET_NPROC_PER_NODE), or fix the two keys")
    if cfg.fsdp:
        if "WORLD_SIZE" not in os.environ:
            raise ValueError("train.fsdp=true needs a distributed launch: run torchrun --nproc-per-node N -m flows.cli "
                             "step train … (N = GPUs), or set train.fsdp=false for one device")
        # What `accelerate launch` would set: FSDP on, and with offload a gloo group beside NCCL for the host-side
        # shards; transformers' from_pretrained then loads the weights on local rank 0 only (placeholders elsewhere).
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_OFFLOAD_PARAMS"] = str(cfg.fsdp_cpu_offload).lower()
    harmony = read_output(inputs["harmony"])
    data_dir = Path(harmony["data_dir"])
    tokenizer = AutoTokenizer.from_pretrained(harmony["tokenizer_dir"])
    # datasets saves 0 rows as 0 shards, which load_from_disk cannot read back: look before loading.
    is_empty = not json.loads((data_dir / "state.json").read_text())["_data_files"]
    dataset = None if is_empty else load_from_disk(str(data_dir))
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"the harmony dataset {data_dir} has no rows; check data.dataset and the harmony step's "
                         "dropped-row counts in its manifest")
    missing = {"input_ids", "assistant_masks"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the harmony dataset {data_dir} lacks column(s) {sorted(missing)}; re-run the harmony step")
    dataset = dataset.select_columns(["input_ids", "assistant_masks"])
    eval_dataset = (load_from_disk(harmony["eval_data_dir"]).select_columns(["input_ids", "assistant_masks"])
                    if harmony.get("eval_data_dir") else None)
    if eval_dataset is None:
        log.info("train: no eval split (data.eval_fraction=0), so no eval loss is measured")
    longest = max(len(ids) for ids in dataset["input_ids"])
    if longest > cfg.max_length:
        raise _too_short(cfg, longest)
    num_loss_tokens = sum(sum(m) for m in dataset["assistant_masks"])
    log.info("train: %d rows, %d tokens (%d with loss), longest %d", len(dataset),
             sum(len(ids) for ids in dataset["input_ids"]), num_loss_tokens, longest)
    compile_cache = use_compile_cache(cfg, out_dir) if cfg.device == "cuda" else None
    if compile_cache is not None:
        log.info("train: compile cache %s (%d files)", compile_cache, sum(1 for p in compile_cache.rglob("*") if p.is_file()))
    phase_done("data", "rows read")

    # --- Training arguments: built first, since they start the process group that loading under FSDP needs ---
    checkpoints_dir = out_dir / "checkpoints"
    args = SFTConfig(
        output_dir=str(checkpoints_dir),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        lr_scheduler_kwargs=cfg.lr_scheduler_kwargs,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        max_length=cfg.max_length,
        packing=cfg.packing,
        packing_strategy="bfd",  # padding-free: each document keeps its own positions, no cross-document attention
        # Under FSDP, FSDP's own activation checkpointing (per wrapped layer) replaces the Trainer's, which would
        # all-gather each layer's weights a second time in the backward pass.
        activation_checkpointing=cfg.gradient_checkpointing and not cfg.fsdp,
        use_liger_kernel=cfg.use_liger_kernel,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        bf16=cfg.dtype == "bfloat16",
        use_cpu=cfg.device == "cpu",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.num_checkpoints_kept,
        logging_steps=cfg.logging_steps,
        # The eval loss before the first step and (below) after the last; every eval_steps in between when asked.
        eval_on_start=eval_dataset is not None,
        eval_strategy="steps" if eval_dataset is not None and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        prediction_loss_only=True,
        seed=cfg.seed,
        report_to="none",
        fsdp=cfg.fsdp,
        fsdp_config={
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["GptOssDecoderLayer"],
            "reshard_after_forward": True,  # full shard (ZeRO-3)
            "cpu_offload": cfg.fsdp_cpu_offload,
            "activation_checkpointing": cfg.gradient_checkpointing,
            "cpu_ram_efficient_loading": True,  # rank 0 holds the loaded weights, the others get their shards
            "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints: one file per rank; the final save is gathered
        } if cfg.fsdp else None,
    )

    # --- Model ---
    if cfg.attn_implementation == "flex_attention":
        # Flex attention compiles per mask function; with dynamo's default recompile_limit (8) the limit runs out in
        # the first steps and flex then runs uncompiled, silently: ~3x slower, with full score matrices in memory
        # (out of memory on packed 8k rows; bench/README.md).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
    # Under FSDP only local rank 0 materialises the weights, in host memory, and accelerate hands each GPU its shard
    # (no GPU holds a full copy); the other ranks hold placeholders: from_pretrained makes them itself
    # (FSDP_CPU_RAM_EFFICIENT_LOADING), a random model gets empty ones.
    log.info("train: loading the model (%s)", cfg.model.name)
    net = load_model(cfg.model, vocab_size=len(tokenizer), dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                     device="cpu" if cfg.fsdp else cfg.device, empty_weights=cfg.fsdp and local_rank != 0,
                     packed_experts=cfg.expert_weights == "mxfp4")
    net.config.use_cache = False
    fast_experts(net)
    if cfg.packing:
        mask_packed_documents(net)
    phase_done("load", "model loaded")
    base_model, base_revision = cfg.model.name, cfg.model.revision
    peft_config = lora_config(cfg, net) if cfg.method == "lora" else None

    # Rank 0 tidies the out dir first; the other ranks then find it as rank 0 left it.
    with args.main_process_first(local=False, desc="train: out dir"):
        if cfg.model.name == "random" and not cfg.save_random_base:
            base_model, base_revision = "", ""
        elif cfg.model.name == "random":
            # Random weights exist nowhere else: keep the exact base so merge can add the adapter to it.
            def write_base(tmp: Path):
                if cfg.expert_weights == "mxfp4":  # as the release lays it out; merge dequantizes it on load
                    write_checkpoint(net, tmp, dtype=None)
                else:
                    net.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            if is_main:
                save_dir_atomic(out_dir / "base", write_base)
            base_model, base_revision = "base", ""
            phase_done("save_base", f"random base saved to {out_dir / 'base'}")

        # --- Checkpoints: resume from the newest complete one, or start clean ---
        # The contract says whether this run repeats an interrupted one with the same fingerprint; read inside this
        # block so that every rank sees rank 0's record.
        resume = cfg.resume is True or (cfg.resume == "auto" and is_retry(out_dir))
        resume_from = last_complete_checkpoint(checkpoints_dir) if resume else None
        if resume_from:
            log.info("train: resuming from %s", resume_from)
        elif checkpoints_dir.exists():
            why = ("resume=false" if cfg.resume is False else "resume=true but no complete checkpoint" if resume
                   else "they are from a run with other inputs (config, data or code changed)")
            log.info("train: starting fresh, deleting the old checkpoints in %s: %s", checkpoints_dir, why)
            shutil.rmtree(checkpoints_dir)

    # --- Train ---
    if cfg.fsdp and cfg.device == "cpu":
        # accelerate 1.15 turns FSDP on only for GPU-like process groups: AcceleratorState drops the FSDP plugin of
        # a MULTI_CPU run and the Trainer silently trains DDP, though torch's fully_shard runs on CPU over gloo.
        # Filing the process group as multi-device before the Trainer builds its Accelerator gives CPU runs (the
        # tiny profiles, the tests) the same sharded path as GPUs; the device stays the CPU.
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    peak_flops = peak_bf16_flops(cfg.device)
    if cfg.device == "cuda" and peak_flops is None:
        log.info("train: no peak FLOP/s known for %s (steps.train.PEAK_BF16_FLOPS); MFU is not logged",
                 torch.cuda.get_device_name())
    progress = Progress(tracker, cfg.device, model_flops_per_token(net.config, cfg.method), peak_flops)
    mark[0] = time.perf_counter()

    class Trainer(SFTTrainer):
        """SFTTrainer, timing its data preparation (packing), which runs inside its set-up after PEFT's wrapping."""

        def _prepare_dataset(self, *args, **kwargs):
            start = time.perf_counter()
            self.pack_start_s = getattr(self, "pack_start_s", start)
            prepared = super()._prepare_dataset(*args, **kwargs)
            self.pack_s = getattr(self, "pack_s", 0.0) + time.perf_counter() - start
            return prepared

    trainer = Trainer(model=net, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[progress])
    lora_s = getattr(trainer, "pack_start_s", mark[0]) - mark[0]
    phases_s["lora"], phases_s["pack"] = round(lora_s, 1), round(getattr(trainer, "pack_s", 0.0), 1)
    log.info("train: %s in %.1f s, data prepared (%s) in %.1f s", "LoRA applied" if peft_config else "model wrapped",
             phases_s["lora"], "packed" if cfg.packing else "tokenized", phases_s["pack"])
    mark[0] += lora_s + getattr(trainer, "pack_s", 0.0)
    # One console line per logging step, Progress's: the Trainer would add a tqdm bar and a printed metrics dict.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    phase_done("trainer", "trainer set up")
    if peft_config is not None:
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        fused = lora_experts(trainer.model)
        log.info("train: LoRA trains %.2f M of %.1f M parameters (the experts' of %d layers inside the grouped GEMMs)",
                 trainable / 1e6, total / 1e6, fused)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        # Under bf16 autocast PEFT's cast of every LoRA layer's input to the adapters' fp32 is undone by autocast at
        # once: two full-size copies per LoRA layer each way (~15% of a gpt-oss LoRA step on an H100). Without it
        # autocast casts only the small adapter weights; the arithmetic is the same.
        with cpu_lm_head(cfg.device), disable_input_dtype_casting(trainer.model, active=cfg.dtype == "bfloat16"):
            progress.train_called_s = time.perf_counter()
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError as e:
        raise RuntimeError(
            f"out of GPU memory at step {trainer.state.global_step} ({e}); tokens per micro-batch = "
            f"train.per_device_batch_size={cfg.per_device_batch_size} x train.max_length={cfg.max_length}: lower either "
            "(raise train.grad_accum_steps to keep the step size)"
            + ("" if cfg.gradient_checkpointing else ", or set train.gradient_checkpointing=true (44 GiB instead of 66 "
               "for gpt-oss-20b LoRA with 8k packed rows on an H100, ~28% slower)")
            + ("" if cfg.fsdp or cfg.method == "lora" else ", or shard with train.fsdp=true under torchrun")) from e
    if eval_dataset is not None and (not progress.eval_curve or progress.eval_curve[-1][0] != trainer.state.global_step):
        with cpu_lm_head(cfg.device):
            trainer.evaluate()  # Progress records it
    if not progress.loss_curve:
        raise ValueError(f"training logged no loss (train.logging_steps={cfg.logging_steps} > steps run "
                         f"{trainer.state.global_step}); lower train.logging_steps")

    # --- Save: the adapter (lora) or the whole model (full), with the tokenizer ---
    if trainer.is_fsdp_enabled:
        # Checkpoints stay sharded (fast to write, resumable on the same world size); the result is gathered
        # into one ordinary folder that merge and from_pretrained load. Gathering is collective: every rank saves.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")

    def write_model(tmp: Path):
        trainer.save_model(str(tmp))
        if is_main:
            tokenizer.save_pretrained(tmp)
    phases_s.update(progress.phases_s)
    mark[0] = time.perf_counter()
    save_dir_atomic(out_dir / "model", write_model, is_main=is_main)
    if trainer.is_fsdp_enabled:
        # Over NCCL the other ranks only queue their part of the gather, then run on and exit while rank 0 still
        # receives the weights: on 2 x H200 rank 1 exited and rank 0 stalled in the gather (bench/README.md). Gloo
        # collectives block, so the CPU runs never showed it.
        trainer.accelerator.wait_for_everyone()
    phase_done("save", f"{'adapter' if cfg.method == 'lora' else 'model'} saved")
    output = Output(
        model_dir="model",
        base_model=base_model,
        base_revision=base_revision,
        method=cfg.method,
        num_steps=trainer.state.global_step,
        train_loss_first=progress.loss_curve[0][1],
        train_loss_last=progress.loss_curve[-1][1],
        loss_curve=progress.loss_curve,
        tokens_per_s=round(progress.steady_tokens_per_s(), 1),
        peak_mem_gib=round(peak_mem_gib(cfg.device), 3),
        train_runtime_s=round(result.metrics["train_runtime"], 2),
        phases_s=phases_s,
        compile_cache={"dir": str(compile_cache), **progress.first_step_compiles} if compile_cache else {},
        eval_loss_before=progress.eval_curve[0][1] if progress.eval_curve else None,
        eval_loss_after=progress.eval_curve[-1][1] if progress.eval_curve else None,
        num_eval_rows=len(eval_dataset) if eval_dataset is not None else 0,
        eval_curve=progress.eval_curve,
    )
    if is_main:
        _plot_loss(progress, out_dir / "loss_curve.png",
                   title=f"{out_dir.resolve().parent.name}/{out_dir.name}, profile {os.environ.get('FINETUNE_PROFILE', '?')}: "
                         f"{cfg.method} fine-tune of {cfg.model.name}, lr {cfg.learning_rate:g}")
        tracker.log_artifact(out_dir / "loss_curve.png")
    log.info("train: %d steps in %.0f s, loss %.4f -> %.4f, eval loss %s, %.0f tokens/s, peak %.1f GiB; saved %s",
             output.num_steps, output.train_runtime_s, output.train_loss_first, output.train_loss_last,
             f"{output.eval_loss_before:.4f} -> {output.eval_loss_after:.4f}" if output.eval_curve else "not measured",
             output.tokens_per_s, output.peak_mem_gib, out_dir / "model")
    log.info("train: seconds by phase: %s", ", ".join(f"{k} {v:.1f}" for k, v in phases_s.items()))
    return output


def _plot_loss(progress, path: Path, *, title: str) -> None:
    """Training loss per step, the learning rate on a second axis, and the eval loss where the Trainer evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([s for s, _ in progress.loss_curve], [loss for _, loss in progress.loss_curve], color="tab:blue",
            linewidth=1.5, label="training loss")
    if progress.eval_curve:
        eval_curve = progress.eval_curve
        ax.plot([s for s, _ in eval_curve], [loss for _, loss in eval_curve], "o", color="tab:orange", markersize=8,
                linestyle=":" if len(eval_curve) > 2 else "none", label="eval loss")
        for step, loss in (eval_curve[0], eval_curve[-1]):
            ax.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(6, 6), color="tab:orange")
    ax.set_xlabel("optimizer step", fontsize=11)
    ax.set_ylabel("loss (cross-entropy, nats/token)", fontsize=11)
    ax.margins(y=0.1)  # room for the eval loss labels
    ax.grid(True, alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot([s for s, _ in progress.lr_curve], [lr for _, lr in progress.lr_curve], color="#cc6677", alpha=0.7,
               linestyle="--", label="learning rate")
    lr_ax.set_ylabel("learning rate", fontsize=11)
    lines = ax.get_legend_handles_labels(), lr_ax.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], loc="upper right", fontsize=10)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

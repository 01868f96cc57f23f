"""What the train step reports while it trains: loss, tokens/s, MFU and peak memory to the tracker, one console line
per logging step."""
import logging
import math
import resource
import time

import torch
from transformers import TrainerCallback

from steps.tracking import Tracker

log = logging.getLogger("finetune")


def compile_counts() -> dict:
    """Graphs compiled so far in this process, by whether torch's on-disk caches held them: hits load, misses compile
    (Inductor's FX graph cache, and AOTAutograd's cache of forward + backward pairs above it)."""
    from torch._dynamo.utils import counters

    return {"fx_graph_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_misses": counters["inductor"]["fxgraph_cache_miss"],
            "aot_autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
            "aot_autograd_bypasses": counters["aot_autograd"]["autograd_cache_bypass"]}


def peak_mem_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# Dense bf16 tensor-core peak per GPU (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_bf16_flops(device: str) -> float | None:
    """The GPU's peak dense bf16 FLOP/s for MFU, or None (CPU, or a GPU not in PEAK_BF16_FLOPS: MFU is not logged)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def model_flops_per_token(config, method: str) -> float:
    """Matmul FLOPs one token costs in training: forward 2N, backward 2N for the activation gradients, plus 2N for
    the weight gradients when every weight trains (full); N = the weights a token passes through (attention, router,
    its top-k experts, LM head). Attention scores are left out (~2% at gpt-oss's ~1k-token rows)."""
    h, head = config.hidden_size, config.head_dim
    attention = h * head * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    experts = config.num_experts_per_tok * 3 * h * config.intermediate_size  # gate_up (h x 2i) + down (i x h)
    n = config.num_hidden_layers * (attention + h * config.num_local_experts + experts) + h * config.vocab_size
    return (6 if method == "full" else 4) * n


class Progress(TrainerCallback):
    """Forwards every log to the tracker (loss, grad_norm, learning_rate, interval_tokens_per_s and interval_mfu since the
    previous log, peak memory so far) and the console.

    tokens/s counts the optimizer steps' own time: checkpoint writes are left out (a save restarts the clock).
    """

    def __init__(self, tracker: Tracker, device: str, flops_per_token: float, peak_flops: float | None):
        self.tracker, self.device = tracker, device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.loss_curve: list[list[float]] = []
        self.lr_curve: list[list[float]] = []  # [step, learning rate] at every logging step (loss_curve.png)
        self.eval_curve: list[list[float]] = []  # [step, eval loss]: eval_on_start, every eval_steps, the final one
        self.intervals: list[tuple[float, float]] = []  # (tokens, seconds) per log
        self.phases_s: dict[str, float] = {}  # train_setup, first_step, steps
        self.train_called_s = None  # when trainer.train() was called: its own set-up runs before on_train_begin
        self.first_step_compiles: dict = {}

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start_s = self.mark_s = time.perf_counter()
        self.start_step, self.last_tokens, self.busy_s = state.global_step, 0, 0.0  # TRL counts num_tokens from 0 in each process
        self.num_gpus = args.world_size  # num_tokens counts every process's tokens
        if self.train_called_s is not None:
            self.phases_s["train_setup"] = round(self.start_s - self.train_called_s, 1)
            log.info("train: optimizer and data loader set up in %.1f s", self.phases_s["train_setup"])
        self.compiles_before = compile_counts()
        if self.device == "cuda":
            log.info("train: step %d/%d compiles the GPU kernels (or loads them from the compile cache); the ETA "
                     "starts after it", state.global_step + 1, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        self.busy_s += now - self.mark_s
        self.mark_s = now
        if state.global_step == self.start_step + 1:
            self.first_step_end_s = now  # the ETA leaves out the first step: it holds the compile and warm-up
            self.phases_s["first_step"] = round(now - self.start_s, 1)
            after = compile_counts()
            self.first_step_compiles = {k: after[k] - self.compiles_before[k] for k in after}
            if self.device == "cuda":
                c = self.first_step_compiles
                log.info("train: step %d took %.1f s; compiled graphs: %d loaded from the cache, %d compiled "
                         "(AOTAutograd: %d loaded, %d compiled, %d not cacheable)", state.global_step,
                         self.phases_s["first_step"], c["fx_graph_hits"], c["fx_graph_misses"],
                         c["aot_autograd_hits"], c["aot_autograd_misses"], c["aot_autograd_bypasses"])
        else:
            self.phases_s["steps"] = round(now - self.first_step_end_s, 1)

    def eta_s(self, state, now: float) -> float | None:
        """Seconds left at the pace of the steps after the first (checkpoint writes included); None until there is
        such a step (the first holds the compile and warm-up, and says nothing about the pace)."""
        done = state.global_step - self.start_step
        if done < 2:
            return None
        return (now - self.first_step_end_s) / (done - 1) * (state.max_steps - state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.mark_s = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "eval_loss" in logs:
            self.eval_curve.append([state.global_step, float(logs["eval_loss"])])
            self.tracker.log_metrics({"eval_loss": float(logs["eval_loss"])}, step=state.global_step)
            log.info("train: step %d/%d eval loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])
            return
        if "loss" not in logs:  # the end-of-training summary log
            return
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "num_tokens" in logs and self.busy_s > 0:
            tokens = logs["num_tokens"] - self.last_tokens
            self.intervals.append((tokens, self.busy_s))
            metrics["interval_tokens_per_s"] = tokens / self.busy_s
            if self.peak_flops:
                metrics["interval_mfu"] = metrics["interval_tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.num_gpus)
            self.last_tokens, self.busy_s = logs["num_tokens"], 0.0
        metrics["peak_mem_gib"] = peak_mem_gib(self.device)
        self.tracker.log_metrics(metrics, step=state.global_step)
        self.loss_curve.append([state.global_step, metrics["loss"]])
        if "learning_rate" in metrics:
            self.lr_curve.append([state.global_step, metrics["learning_rate"]])
        eta_s = self.eta_s(state, time.perf_counter())
        log.info("train: step %d/%d loss %.4f grad_norm %.3f lr %.2e %.0f tokens/s%s peak %.1f GiB ETA %s",
                 state.global_step, state.max_steps, metrics["loss"], metrics.get("grad_norm", math.nan),
                 metrics.get("learning_rate", math.nan), metrics.get("interval_tokens_per_s", math.nan),
                 f" MFU {metrics['interval_mfu']:.1%}" if "interval_mfu" in metrics else "", metrics["peak_mem_gib"],
                 "after the next step" if eta_s is None else f"{eta_s:.0f} s")

    def steady_tokens_per_s(self) -> float:
        """Tokens/s over the logged intervals after the first (which holds the compile / warm-up step), or over the
        first when it is the only one."""
        steady = self.intervals[1:] or self.intervals
        return sum(t for t, _ in steady) / max(sum(s for _, s in steady), 1e-9)

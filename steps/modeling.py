"""Loading gpt-oss models for training and merging: random weights of a shape (tests, benchmarks) or a checkpoint;
the fused expert and CPU LM-head paths the train step runs on."""
import logging
import types
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.integrations.moe import _grouped_mm  # F.grouped_mm where the device and dtype allow, else a loop
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
import trl.trainer.utils as trl_utils

from steps.model import DTYPE_NAMES, SHAPE_PRESETS, ModelConfig

log = logging.getLogger("finetune")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def random_config(model: ModelConfig, *, vocab_size: int) -> GptOssConfig:
    """The GptOssConfig of a name=random model: its preset's shape, then the profile's overrides (ModelConfig has
    checked their names)."""
    overrides = {k: v for k, v in model.random_shape.items() if k != "preset"}
    shape = {**SHAPE_PRESETS[model.random_shape.get("preset", "tiny")], **overrides}
    return GptOssConfig(**shape, vocab_size=vocab_size, use_cache=False)


def load_model(model: ModelConfig, *, vocab_size: int, dtype: str, attn_implementation: str,
               device: str, empty_weights: bool = False) -> GptOssForCausalLM:
    """The model to train: random weights of `random_shape` seeded by model.seed, or a checkpoint in bf16/fp32.

    empty_weights (name=random only): uninitialised placeholders, for FSDP ranks that receive rank 0's weights.

    gpt-oss Hub checkpoints store the experts in MXFP4; they are dequantized on load because the packed 4-bit
    experts take no gradients.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} cannot be trained: training MXFP4 (or any packed format) directly is not "
                         f"supported; set train.dtype to one of {', '.join(DTYPES)} (MXFP4 checkpoints are dequantized on load)")
    torch_dtype = DTYPES[dtype]
    if model.name == "random":
        config = random_config(model, vocab_size=vocab_size)
        config._attn_implementation = attn_implementation
        torch.manual_seed(model.seed)
        if empty_weights:
            with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) are not handed over: real
                net = GptOssForCausalLM._from_config(config, dtype=torch_dtype)
            # Distinct, untouched host allocations: accelerate maps optimizer parameters by address, and the pages
            # cost no memory until rank 0's shards are written into them.
            for module in net.modules():
                for name, param in module.named_parameters(recurse=False):
                    setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device=device),
                                                             requires_grad=param.requires_grad))
            return net
        # Build on the target device: a full-size model in fp32 would not fit in host memory first.
        with torch.device(device):
            net = GptOssForCausalLM._from_config(config, dtype=torch_dtype)
        log.info("model: random gpt-oss, %d layers, hidden %d, %d experts, %.1f M parameters (seed %d)",
                 config.num_hidden_layers, config.hidden_size, config.num_local_experts,
                 sum(p.numel() for p in net.parameters()) / 1e6, model.seed)
        return net
    config = AutoConfig.from_pretrained(model.name, revision=model.revision)
    if config.model_type != "gpt_oss":
        raise ValueError(f"model.name={model.name!r} is a {config.model_type} model; this pipeline trains gpt-oss "
                         "checkpoints only (openai/gpt-oss-20b, openai/gpt-oss-120b, gpt-oss-safeguard-*)")
    if config.vocab_size < vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size:,} ids but model.name={model.name!r} only {config.vocab_size:,} "
                         "embeddings; set model.tokenizer to this model's tokenizer")
    kwargs = {}
    quant = getattr(config, "quantization_config", None)
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant_method == "mxfp4":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif quant_method is not None:
        raise ValueError(f"model.name={model.name!r} is quantized with {quant_method}; only MXFP4 (dequantized on "
                         "load) or unquantized checkpoints can be trained")
    net = AutoModelForCausalLM.from_pretrained(
        model.name, revision=model.revision, dtype=torch_dtype, attn_implementation=attn_implementation,
        device_map=device, use_cache=False, **kwargs)
    log.info("model: %s@%s loaded in %s%s", model.name, model.revision, dtype,
             " (MXFP4 experts dequantized)" if kwargs else "")
    return net


def mask_packed_documents(net: GptOssForCausalLM) -> None:
    """Keep packed documents from attending to each other under eager/flex attention.

    transformers' GptOssModel (5.23) builds its causal masks without `position_ids`, so the packed-sequence detection
    in masking_utils never runs and every token of a padding-free row attends to the documents before it
    (huggingface/transformers#39997, still open). This hook builds the masks from `position_ids` itself, the way
    the other decoders do, and hands them to the model (which accepts a prepared {layer type: mask} mapping).
    """
    decoder = net.get_decoder()

    def build_masks(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
            return None
        if kwargs.get("inputs_embeds") is None:
            kwargs["inputs_embeds"] = module.embed_tokens(kwargs.pop("input_ids"))
            kwargs["input_ids"] = None
        mask_kwargs = {"config": module.config, "inputs_embeds": kwargs["inputs_embeds"], "attention_mask": None,
                       "past_key_values": None, "position_ids": position_ids}
        kwargs["attention_mask"] = {"full_attention": create_causal_mask(**mask_kwargs),
                                    "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        return args, kwargs

    decoder.register_forward_pre_hook(build_masks, with_kwargs=True)


def _clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation (GptOssExperts._apply_gate), in fp32 or wider: gate and up interleaved in the last dim."""
    dtype = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up[..., ::2].to(dtype), gate_up[..., 1::2].to(dtype)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return ((up + 1) * gate * torch.sigmoid(gate * alpha)).to(gate_up.dtype)


def _clamped_swiglu_grad(gate_up: torch.Tensor, grad: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """d loss / d gate_up of _clamped_swiglu, recomputed from gate_up alone (clamp passes the gradient at its bounds)."""
    dtype = torch.promote_types(gate_up.dtype, torch.float32)
    gate_raw, up_raw = gate_up[..., ::2].to(dtype), gate_up[..., 1::2].to(dtype)
    gate, up = gate_raw.clamp(max=limit), up_raw.clamp(min=-limit, max=limit)
    sig, grad = torch.sigmoid(gate * alpha), grad.to(dtype)
    d_up = torch.where((up_raw >= -limit) & (up_raw <= limit), grad * gate * sig, 0.0)
    d_gate = torch.where(gate_raw <= limit, grad * (up + 1) * sig * (1 + gate * alpha * (1 - sig)), 0.0)
    return torch.stack((d_gate, d_up), dim=-1).flatten(-2).to(gate_up.dtype)


# On GPU each direction compiles to one elementwise kernel (the bias gather fused in); the row count varies (marked
# dynamic), the width does not.
def _biased_swiglu(gate_up, bias, expert_ids, alpha, limit):
    return _clamped_swiglu(gate_up + bias[expert_ids], alpha, limit)


def _biased_swiglu_grad(gate_up, bias, expert_ids, grad, alpha, limit):
    return _clamped_swiglu_grad(gate_up + bias[expert_ids], grad, alpha, limit)


_biased_swiglu_cuda = torch.compile(_biased_swiglu)
_biased_swiglu_grad_cuda = torch.compile(_biased_swiglu_grad)


def _mark_rows_dynamic(*tensors):
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


class _ClampedSwiGLU(torch.autograd.Function):
    """The expert activation of gate_up + bias[expert_ids], keeping only its inputs for the backward pass.

    Autograd through the eager activation (2 clamps, sigmoid, 3 products, an add on strided halves) keeps ~5 tensors
    per routed token; 4 routed tokens per token make that most of a gpt-oss layer's activation memory. This keeps
    gate_up alone and recomputes the rest in the backward pass, which on GPU is one fused kernel each way, the bias
    gather included (an add of a gathered [routed tokens, 2 x intermediate] bias each way otherwise).
    """

    @staticmethod
    def forward(ctx, gate_up, bias, expert_ids, alpha, limit):
        ctx.save_for_backward(gate_up, bias, expert_ids)
        ctx.alpha, ctx.limit = alpha, limit
        if not gate_up.is_cuda:
            return _biased_swiglu(gate_up, bias, expert_ids, alpha, limit)
        _mark_rows_dynamic(gate_up, expert_ids)
        return _biased_swiglu_cuda(gate_up, bias, expert_ids, alpha, limit)

    @staticmethod
    def backward(ctx, grad):
        gate_up, bias, expert_ids = ctx.saved_tensors
        grad = grad.contiguous()
        if not gate_up.is_cuda:
            d_gate_up = _biased_swiglu_grad(gate_up, bias, expert_ids, grad, ctx.alpha, ctx.limit)
        else:
            _mark_rows_dynamic(gate_up, expert_ids, grad)
            d_gate_up = _biased_swiglu_grad_cuda(gate_up, bias, expert_ids, grad, ctx.alpha, ctx.limit)
        d_bias = None
        if ctx.needs_input_grad[1]:  # a full fine-tune trains the bias; LoRA leaves it frozen
            d_bias = torch.zeros_like(bias).index_add_(0, expert_ids, d_gate_up)
        return d_gate_up, d_bias, None, None, None


def _unroute(down, bias, inverse, router_indices, weights):
    """y[t] = sum_j (down[inverse[t, j]] + bias[router_indices[t, j]]) * weights[t, j], in fp32 or wider."""
    dtype = torch.promote_types(down.dtype, torch.float32)
    rows = down[inverse].to(dtype) + bias[router_indices].to(dtype)
    return (rows * weights.to(dtype)[..., None]).sum(1).to(down.dtype)


def _unroute_grad(grad, down, bias, inverse, perm, router_indices, weights):
    """d y / d (down, weights) of _unroute: down's rows in its own (expert-sorted) order, weights per token and slot."""
    dtype = torch.promote_types(down.dtype, torch.float32)
    grad = grad.to(dtype)
    d_down = grad[perm // inverse.shape[1]] * weights.reshape(-1)[perm].to(dtype)[:, None]
    rows = down[inverse].to(dtype) + bias[router_indices].to(dtype)
    d_weights = (rows * grad[:, None]).sum(-1)
    return d_down.to(down.dtype), d_weights.to(weights.dtype)


_unroute_cuda = torch.compile(_unroute)
_unroute_grad_cuda = torch.compile(_unroute_grad)


class _Unroute(torch.autograd.Function):
    """The down projection's epilogue in one pass: its bias, the routing weights, the rows back in token order and the
    sum over each token's top-k experts. Step by step that is 5 kernels over [routed tokens, hidden] each way (bias
    gather, add, product, gather, sum); on GPU this is one kernel forward and two backward, reading `down` once.

    `down` holds the routed rows sorted by expert; for token t's j-th expert, inverse[t, j] is its row there,
    router_indices[t, j] the expert and weights[t, j] the routing weight; perm is inverse's inverse (flattened).
    """

    @staticmethod
    def forward(ctx, down, bias, inverse, perm, router_indices, weights):
        ctx.save_for_backward(down, bias, inverse, perm, router_indices, weights)
        if not down.is_cuda:
            return _unroute(down, bias, inverse, router_indices, weights)
        _mark_rows_dynamic(down, inverse, router_indices, weights)
        return _unroute_cuda(down, bias, inverse, router_indices, weights)

    @staticmethod
    def backward(ctx, grad):
        down, bias, inverse, perm, router_indices, weights = ctx.saved_tensors
        grad = grad.contiguous()
        if not down.is_cuda:
            d_down, d_weights = _unroute_grad(grad, down, bias, inverse, perm, router_indices, weights)
        else:
            _mark_rows_dynamic(grad, down, inverse, perm, router_indices, weights)
            d_down, d_weights = _unroute_grad_cuda(grad, down, bias, inverse, perm, router_indices, weights)
        d_bias = None
        if ctx.needs_input_grad[1]:  # a full fine-tune trains the bias; LoRA leaves it frozen
            per_slot = (grad[:, None].float() * weights[..., None].float()).reshape(-1, grad.shape[-1])
            d_bias = torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32)).index_add_(
                0, router_indices.reshape(-1), per_slot).to(bias.dtype)
        return d_down, d_bias, None, None, None, d_weights


class _RouteRows(torch.autograd.Function):
    """rows[index // group], for `index` a permutation of range(len(rows) * group), with `inverse` its inverse.

    Its gradient gathers by the inverse permutation and sums each group; autograd's own for rows[index] scatter-adds
    with index_put(accumulate=True), which sorts the indices first (~5% of a gpt-oss LoRA step on an H100).
    """

    @staticmethod
    def forward(ctx, rows, index, inverse, group):
        ctx.save_for_backward(inverse)
        ctx.group = group
        return rows[index // group] if group > 1 else rows[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad[inverse]
        if ctx.group > 1:
            grad = grad.view(-1, ctx.group, grad.shape[-1]).sum(1)
        return grad, None, None, None


def _experts_forward(self: GptOssExperts, hidden_states: torch.Tensor, router_indices: torch.Tensor,
                     routing_weights: torch.Tensor) -> torch.Tensor:
    """GptOssExperts.forward as transformers' grouped_mm path computes it (tokens sorted by expert, one grouped GEMM
    per projection), with the routing through _RouteRows, the activation (and gate_up's bias) through _ClampedSwiGLU
    and the down projection's epilogue through _Unroute."""
    top_k = router_indices.shape[-1]
    expert_ids, perm = torch.sort(router_indices.reshape(-1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    # histc has a fixed output size (bincount's depends on the data: a device sync); integer input only on CUDA
    counts = torch.histc(expert_ids.int() if expert_ids.is_cuda else expert_ids.float(), bins=self.num_experts,
                         min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    routed = _RouteRows.apply(hidden_states, perm, inverse, top_k)
    gate_up = _grouped_mm(routed, self.gate_up_proj, offsets)
    activated = _ClampedSwiGLU.apply(gate_up, self.gate_up_proj_bias, expert_ids, self.alpha, self.limit)
    down = _grouped_mm(activated, self.down_proj, offsets)
    out = _Unroute.apply(down, self.down_proj_bias, inverse.view(-1, top_k), perm, router_indices, routing_weights)
    return out.to(hidden_states.dtype)


def fast_experts(net: GptOssForCausalLM) -> None:
    """Run every GptOssExperts through _experts_forward: the same values (the activation computed in fp32), a
    fraction of the activation memory, fewer and cheaper kernels."""
    for module in net.modules():
        if isinstance(module, GptOssExperts):
            module.forward = types.MethodType(_experts_forward, module)


# Label positions per LM-head tile on CPU: 32 x 201k fp32 logits (26 MiB) stay under glibc's 32 MiB mmap threshold, so
# the tile and its temporaries are reused from the heap instead of being mapped, zeroed and unmapped on every use.
CPU_LM_HEAD_ROWS = 32


class _CpuLogProbs(torch.autograd.Function):
    """TRL's ChunkedLogProbFunction for the plain CPU case (no bias, softcap, logit scale or temperature), in fewer
    passes over the logits: log p(target) by logsumexp, entropy and is-top-1 (metrics only, no gradient), and a
    backward that recomputes each tile and turns it into the logits gradient in place."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, outputs):
        num_rows = hidden.shape[0]
        h, w = hidden.float(), weight.float()  # a no-op in fp32; bf16 autocast runs the head in fp32, like TRL's fp32 accumulation
        log_z = h.new_empty(num_rows)
        logprobs, entropy = torch.empty_like(log_z), torch.empty_like(log_z)
        is_top1 = torch.empty(num_rows, dtype=torch.bool)
        for start in range(0, num_rows, CPU_LM_HEAD_ROWS):
            rows = slice(start, start + CPU_LM_HEAD_ROWS)
            logits = h[rows] @ w.t()
            log_z[rows] = torch.logsumexp(logits, -1)
            logprobs[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - log_z[rows]
            if "is_top1" in outputs:  # argmax takes the first maximum, as TRL's kernel does
                is_top1[rows] = logits.argmax(-1) == targets[rows]
            if "entropy" in outputs:
                log_p = logits.sub_(log_z[rows, None])
                entropy[rows] = -(log_p.exp() * log_p).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.mark_non_differentiable(entropy, is_top1)
        return logprobs, entropy if "entropy" in outputs else None, is_top1 if "is_top1" in outputs else None

    @staticmethod
    def backward(ctx, grad_logprobs, *_):
        hidden, weight, targets, log_z = ctx.saved_tensors
        h, w = hidden.float(), weight.float()
        grad_hidden, grad_weight = torch.zeros_like(h), torch.zeros_like(w)
        for start in range(0, h.shape[0], CPU_LM_HEAD_ROWS):
            rows = slice(start, start + CPU_LM_HEAD_ROWS)
            grad = (h[rows] @ w.t()).sub_(log_z[rows, None]).exp_()  # softmax
            grad[torch.arange(grad.shape[0]), targets[rows]] -= 1
            grad.mul_(-grad_logprobs[rows, None])  # d(g * log p_target)/dz = g * (onehot - p)
            grad_hidden[rows] = grad @ w
            grad_weight.addmm_(grad.t(), h[rows])
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None


class _CpuChunkedLogProbs:
    """Stands in for trl.kernels.ChunkedLogProbFunction while training on CPU: _CpuLogProbs where it applies, TRL's
    own function otherwise (a bias, softcapping, logit scale, temperature or other requested outputs)."""

    trl_function = trl_utils._ChunkedLogProbFunction

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        if (hidden.device.type != "cpu" or bias is not None or softcap is not None or logit_scale != 1.0
                or temperature != 1.0 or not set(outputs) <= {"log_probs", "entropy", "is_top1"}):
            return cls.trl_function.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
                                          outputs)
        logprobs, entropy, is_top1 = _CpuLogProbs.apply(hidden, weight, targets, tuple(outputs))
        return logprobs, entropy, None, None, is_top1


@contextmanager
def cpu_lm_head(device: str):
    """On CPU, make TRL's fused LM head score only the label positions, with fewer passes over the logits.

    TRL 1.16's fused head (trl/trainer/utils.py add_fused_lm_head, which SFTTrainer installs) scores only the
    positions with a label where `_use_triton(device)` holds (CUDA/XPU); elsewhere it projects every position through
    the whole vocabulary, because on Neuron a varying number of positions would recompile the graph. Eager CPU has no
    graph to recompile, so the compact path is exact there too, and with gpt-oss's 201k vocabulary it skips the ~60% of
    positions without loss (prompt, padding). Its torch fallback for devices without Triton then makes ~25 passes
    over 32k-column tiles of 100+ MiB (mapped and unmapped each time: most of a CPU step was kernel time);
    _CpuLogProbs makes ~8 over small tiles. The fused forward looks both names up at call time, so they are
    patched for the duration of training only; GPU runs never enter here.
    """
    if device != "cpu":
        yield
        return
    use_triton = trl_utils._use_triton
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(trl_utils, "_use_triton", lambda dev: dev.type == "cpu" or use_triton(dev)))
        stack.enter_context(mock.patch.object(trl_utils, "_ChunkedLogProbFunction", _CpuChunkedLogProbs))
        yield

"""Loading gpt-oss models for training and merging: random weights of a shape (tests, benchmarks) or a checkpoint;
the fused expert and CPU LM-head paths the train step runs on."""
import functools
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
from steps.mxfp4 import E2M1_VALUES, dequantize_mxfp4, quantize_experts

log = logging.getLogger("finetune")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def random_config(model: ModelConfig, *, vocab_size: int) -> GptOssConfig:
    """The GptOssConfig of a name=random model: its preset's shape, then the profile's overrides (ModelConfig has
    checked their names)."""
    overrides = {k: v for k, v in model.random_shape.items() if k != "preset"}
    shape = {**SHAPE_PRESETS[model.random_shape.get("preset", "tiny")], **overrides}
    return GptOssConfig(**shape, vocab_size=vocab_size, use_cache=False)


def load_model(model: ModelConfig, *, vocab_size: int, dtype: str, attn_implementation: str,
               device: str, empty_weights: bool = False, packed_experts: bool = False) -> GptOssForCausalLM:
    """The model to train: random weights of `random_shape` seeded by model.seed, or a checkpoint in bf16/fp32.

    empty_weights (name=random only): uninitialised placeholders, for FSDP ranks that receive rank 0's weights.

    gpt-oss Hub checkpoints store the experts in MXFP4; they are dequantized on load (trainable experts), or with
    packed_experts kept as stored (pack_experts' layout, for LoRA's frozen experts): read straight from the files, never
    built in `dtype`. packed_experts on a random model rounds its experts to MXFP4; on an unquantized checkpoint it
    packs experts that are MXFP4 values already and refuses any others.
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
        if packed_experts:
            log.info("model: experts held in MXFP4 (%.2f GB), the random draw rounded to MXFP4 values",
                     pack_experts(net, exact=False) / 1e9)
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
    if quant_method == "mxfp4" and packed_experts:
        return _load_mxfp4_packed(model, config, dtype=torch_dtype, attn_implementation=attn_implementation,
                                  device=device)
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
    if packed_experts:
        log.info("model: experts held in MXFP4 (%.2f GB)", pack_experts(net, exact=True) / 1e9)
    return net


def _load_mxfp4_packed(model: ModelConfig, config: GptOssConfig, *, dtype: torch.dtype, attn_implementation: str,
                       device: str) -> GptOssForCausalLM:
    """An MXFP4 checkpoint with its experts as stored: the model built without weights, every other tensor read from
    the files onto `device` in `dtype`, the experts' `*_blocks` / `*_scales` kept as pack_experts keeps them.
    transformers' own loader would dequantize them first (its packed path needs Triton kernels fetched from the Hub)."""
    from pathlib import Path

    from accelerate.utils import set_module_tensor_to_device
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    folder = Path(model.name)
    if not folder.is_dir():
        folder = Path(snapshot_download(model.name, revision=model.revision, allow_patterns=["*.safetensors"]))
    del config.quantization_config  # what it holds is a plain model with frozen, packed experts
    config._attn_implementation = attn_implementation
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        net = GptOssForCausalLM._from_config(config, dtype=dtype)
    wanted, packed = {name for name, _ in net.named_parameters()}, {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt", device=device) as f:
            for key in f.keys():
                if key.endswith(("_blocks", "_scales")):
                    packed[key] = f.get_tensor(key)
                elif key in wanted:
                    set_module_tensor_to_device(net, key, device, value=f.get_tensor(key), dtype=dtype)
                    wanted.discard(key)
    for module_name, module in net.named_modules():
        if not isinstance(module, GptOssExperts):
            continue
        for name in ("gate_up_proj", "down_proj"):
            key = f"{module_name}.{name}"
            if f"{key}_blocks" not in packed or f"{key}_scales" not in packed:
                continue  # reported as missing below
            _hold_packed(module, name, packed.pop(f"{key}_blocks"), packed.pop(f"{key}_scales"), dtype=dtype)
            wanted.discard(key)
    if wanted or packed:
        raise ValueError(f"model.name={model.name!r}: its safetensors files lack {sorted(wanted)[:4]}"
                         f"{' and hold no model tensors ' + str(sorted(packed)[:4]) if packed else ''}; "
                         "it is not a complete gpt-oss checkpoint in the release layout (set train.expert_weights=dtype "
                         "to load it through transformers)")
    net.to(device)  # the buffers built with the model (rotary inv_freq)
    num_bytes = sum(b.numel() for name, b in net.named_buffers() if name.endswith(("_blocks", "_scales")))
    log.info("model: %s@%s loaded in %s, experts held in MXFP4 as stored (%.2f GB)", model.name, model.revision,
             str(dtype).removeprefix("torch."), num_bytes / 1e9)
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


# On GPU each direction compiles to one elementwise kernel (the forward's adds and bias gather fused in); the row
# count varies (marked dynamic), the width does not.
def _biased_swiglu(gate_up, delta, bias, expert_ids, alpha, limit):
    """The activation of gate_up (+ delta, LoRA's low-rank term) + bias[expert_ids], and that sum, which the backward
    pass starts from."""
    pre = (gate_up if delta is None else gate_up + delta) + bias[expert_ids]
    return _clamped_swiglu(pre, alpha, limit), pre


_biased_swiglu_cuda = torch.compile(_biased_swiglu)
_clamped_swiglu_grad_cuda = torch.compile(_clamped_swiglu_grad)
_clamped_swiglu_cuda = torch.compile(_clamped_swiglu)


def _mark_rows_dynamic(*tensors):
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_dynamic(t, 0)


class _ClampedSwiGLU(torch.autograd.Function):
    """The expert activation of gate_up (+ delta) + bias[expert_ids], keeping only that sum for the backward pass.

    Autograd through the eager activation (2 clamps, sigmoid, 3 products, an add on strided halves) keeps ~5 tensors
    per routed token; 4 routed tokens per token make that most of a gpt-oss layer's activation memory. This keeps
    the biased input alone and recomputes the rest in the backward pass: on GPU one fused kernel each way, the
    forward's reading gate_up, LoRA's delta and the gathered bias and writing the activation and the sum (separately
    an add of a [routed tokens, 2 x intermediate] delta and a gathered bias, or a gather again in the backward pass).
    Returns the activation and that sum (no gradient flows through the latter: it is for _LowRank to rebuild the
    activation from, in the backward pass, instead of keeping it).
    """

    @staticmethod
    def forward(ctx, gate_up, delta, bias, expert_ids, alpha, limit):
        if not gate_up.is_cuda:
            activated, pre = _biased_swiglu(gate_up, delta, bias, expert_ids, alpha, limit)
        else:
            _mark_rows_dynamic(gate_up, delta, expert_ids)
            activated, pre = _biased_swiglu_cuda(gate_up, delta, bias, expert_ids, alpha, limit)
        ctx.save_for_backward(pre, expert_ids)
        ctx.alpha, ctx.limit, ctx.bias_like = alpha, limit, (bias.shape, bias.dtype)
        ctx.mark_non_differentiable(pre)
        return activated, pre

    @staticmethod
    def backward(ctx, grad, _):
        pre, expert_ids = ctx.saved_tensors
        grad = grad.contiguous()
        if not pre.is_cuda:
            d_pre = _clamped_swiglu_grad(pre, grad, ctx.alpha, ctx.limit)
        else:
            _mark_rows_dynamic(pre, grad)
            d_pre = _clamped_swiglu_grad_cuda(pre, grad, ctx.alpha, ctx.limit)
        d_bias = None
        if ctx.needs_input_grad[2]:  # a full fine-tune trains the bias; LoRA leaves it frozen
            shape, dtype = ctx.bias_like
            d_bias = d_pre.new_zeros(shape, dtype=dtype).index_add_(0, expert_ids, d_pre.to(dtype))
        return d_pre, d_pre if ctx.needs_input_grad[1] else None, d_bias, None, None, None


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


def _route_rows(rows, index, group):
    return rows[index // group] if group > 1 else rows[index]


class _RouteRows(torch.autograd.Function):
    """rows[index // group], for `index` a permutation of range(len(rows) * group), with `inverse` its inverse.

    Its gradient gathers by the inverse permutation and sums each group; autograd's own for rows[index] scatter-adds
    with index_put(accumulate=True), which sorts the indices first (~5% of a gpt-oss LoRA step on an H100).
    """

    @staticmethod
    def forward(ctx, rows, index, inverse, group):
        ctx.save_for_backward(inverse)
        ctx.group = group
        return _route_rows(rows, index, group)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad[inverse]
        if ctx.group > 1:
            grad = grad.view(-1, ctx.group, grad.shape[-1]).sum(1)
        return grad, None, None, None


def _expert_weight(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An MXFP4-held expert projection as `dtype` values, (experts, out, in): transient, one layer at a time. The GPU
    decodes with one Triton kernel (steps/mxfp4_gpu.py), the CPU by table lookup; both give the same bits."""
    if blocks.is_cuda:
        from steps.mxfp4_gpu import dequantize_mxfp4_gpu
        return dequantize_mxfp4_gpu(blocks, scales, dtype)
    return dequantize_mxfp4(blocks, scales, torch.tensor(E2M1_VALUES, dtype=dtype))


class _Mxfp4GroupedMM(torch.autograd.Function):
    """rows @ W_e for each expert e's rows (grouped by `offsets`), W frozen and held in MXFP4 (pack_experts): decoded
    for the forward GEMM and again for the backward one, so no full-size copy lives between them (1.6 GB a gpt-oss-20b
    layer in bf16). W takes no gradient. The decodes cost ~9% of a gpt-oss-20b LoRA step's GPU time on an H200 (~0.55 ms
    for a layer's gate_up_proj each way; bench/README.md)."""

    @staticmethod
    def forward(ctx, rows, blocks, scales, offsets, dtype):
        ctx.save_for_backward(blocks, scales, offsets)
        ctx.dtype = dtype
        return _grouped_mm(rows, _expert_weight(blocks, scales, dtype).transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad):
        blocks, scales, offsets = ctx.saved_tensors
        d_rows = _grouped_mm(grad.contiguous(), _expert_weight(blocks, scales, ctx.dtype), offsets)
        return d_rows, None, None, None, None


def _project(experts: GptOssExperts, name: str, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows @ experts.<name> per expert, from the MXFP4 blocks where pack_experts left them."""
    blocks = getattr(experts, f"{name}_blocks", None)
    if blocks is None:
        return _grouped_mm(rows, getattr(experts, name), offsets)
    return _Mxfp4GroupedMM.apply(rows, blocks, getattr(experts, f"{name}_scales"), offsets, getattr(experts, name).dtype)


def is_packed(experts) -> bool:
    return hasattr(experts, "gate_up_proj_blocks")


def _hold_packed(module: GptOssExperts, name: str, blocks: torch.Tensor, scales: torch.Tensor, *,
                 dtype: torch.dtype) -> None:
    """Hold module.<name> as MXFP4 blocks and scales (release layout) beside a placeholder parameter of its shape and
    dtype backed by one element, and run the module through the one forward that reads the blocks."""
    shape = getattr(module, name).shape
    module.register_buffer(f"{name}_blocks", blocks)
    module.register_buffer(f"{name}_scales", scales)
    setattr(module, name, torch.nn.Parameter(torch.zeros((), dtype=dtype, device=blocks.device).expand(shape),
                                             requires_grad=False))
    module.forward = types.MethodType(_experts_forward, module)


def pack_experts(net: GptOssForCausalLM, *, exact: bool) -> int:
    """Hold every frozen expert projection in MXFP4, as the openai/gpt-oss releases store them: `<name>_blocks` and
    `<name>_scales` buffers in the release layout (4.25 bits a weight: 38 GB of gpt-oss-20b's bf16 experts become
    10 GB), decoded inside each grouped GEMM (_Mxfp4GroupedMM). `<name>` stays as a placeholder parameter of the
    full shape and dtype backed by one element, for PEFT's ParamWrapper (it reads shape and dtype only); anything that
    would compute with it directly goes through _lora_experts_forward, which refuses.

    exact: the values must be MXFP4 values already (a release checkpoint dequantized on load, or a bf16 copy of one):
    anything else raises, since rounding would change the model. exact=False rounds (a random model's draw).
    Returns the bytes the experts take now.
    """
    packed = 0
    for module_name, module in net.named_modules():
        if not isinstance(module, GptOssExperts):
            continue
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(module, name)
            blocks, scales = quantize_experts(weight)
            if exact:
                lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=weight.device)
                for e, expert in enumerate(weight.detach()):
                    decoded = dequantize_mxfp4(blocks[e], scales[e], lut)
                    if not torch.equal(decoded, expert.T.float()):
                        error = (decoded - expert.T.float()).abs().max().item()
                        raise ValueError(
                            f"train.expert_weights=mxfp4: {module_name}.{name} (expert {e}) holds values that are not "
                            f"MXFP4 values (rounding would move them by up to {error:.3g}), so this checkpoint's "
                            "experts are not a release's MXFP4 ones; set train.expert_weights=dtype")
            _hold_packed(module, name, blocks, scales, dtype=weight.dtype)
            packed += blocks.numel() + scales.numel()
            del weight
    if net.device.type == "cuda":
        torch.cuda.empty_cache()
    return packed


class _LowRank(torch.autograd.Function):
    """scale * (rows @ A_e) @ B_e for each expert e's rows (LoRA's update of an expert projection; `lora` is
    (A [experts, in, r], B [experts, r, out], scale)): two thin grouped GEMMs instead of a full-size W + scale * A @ B.

    A's gradient needs `rows`, a [routed tokens, in] tensor (4 rows per token) that nothing else keeps once the frozen
    projection has run: autograd would keep it from the forward pass to the backward one, 0.33 GB a gpt-oss-20b layer
    for the two projections of an 8k-token row. Here the backward pass rebuilds it, `rebuild(*sources)`, from tensors
    kept anyway: gate_up's rows from the token rows and the routing permutation (a gather), down's from the
    activation's input (the activation recomputed, one fused kernel).
    """

    @staticmethod
    def forward(ctx, rows, lhs, rhs, scale, offsets, rebuild, *sources):
        ctx.save_for_backward(lhs, rhs, offsets, *sources)
        ctx.scale, ctx.rebuild = scale, rebuild
        low_rank = _grouped_mm(rows, lhs, offsets)
        return _grouped_mm(low_rank * scale, rhs, offsets)

    @staticmethod
    def backward(ctx, grad):
        lhs, rhs, offsets, *sources = ctx.saved_tensors
        with torch.enable_grad():
            rows = ctx.rebuild(*sources).detach().requires_grad_()
            lhs_, rhs_ = lhs.detach().requires_grad_(), rhs.detach().requires_grad_()
            out = _grouped_mm(_grouped_mm(rows, lhs_, offsets) * ctx.scale, rhs_, offsets)
            d_rows, d_lhs, d_rhs = torch.autograd.grad(out, (rows, lhs_, rhs_), grad)
        return d_rows, d_lhs, d_rhs, None, None, None, *(None for _ in sources)


def _low_rank(rows: torch.Tensor, offsets: torch.Tensor, lora, rebuild, *sources) -> torch.Tensor | None:
    if lora is None:
        return None
    lhs, rhs, scale = lora
    return _LowRank.apply(rows, lhs.to(rows.dtype).contiguous(), rhs.to(rows.dtype).contiguous(), scale, offsets,
                          rebuild, *sources)


def _activation(pre: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """The expert activation of _ClampedSwiGLU's saved sum, again (one fused kernel on GPU)."""
    if not pre.is_cuda:
        return _clamped_swiglu(pre, alpha, limit)
    _mark_rows_dynamic(pre)
    return _clamped_swiglu_cuda(pre, alpha, limit)


def _experts_forward(self: GptOssExperts, hidden_states: torch.Tensor, router_indices: torch.Tensor,
                     routing_weights: torch.Tensor, lora: dict | None = None) -> torch.Tensor:
    """GptOssExperts.forward as transformers' grouped_mm path computes it (tokens sorted by expert, one grouped GEMM
    per projection), with the routing through _RouteRows, the activation (and gate_up's bias) through _ClampedSwiGLU
    and the down projection's epilogue through _Unroute. `lora`: {parameter name: (A, B, scale)} of the LoRA
    adapters on gate_up_proj / down_proj (lora_experts), applied inside the projections."""
    lora = lora or {}
    top_k = router_indices.shape[-1]
    expert_ids, perm = torch.sort(router_indices.reshape(-1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    # histc has a fixed output size (bincount's depends on the data: a device sync); integer input only on CUDA
    counts = torch.histc(expert_ids.int() if expert_ids.is_cuda else expert_ids.float(), bins=self.num_experts,
                         min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    routed = _RouteRows.apply(hidden_states, perm, inverse, top_k)
    gate_up = _project(self, "gate_up_proj", routed, offsets)
    delta = _low_rank(routed, offsets, lora.get("gate_up_proj"), functools.partial(_route_rows, group=top_k),
                      hidden_states.detach(), perm)
    activated, pre = _ClampedSwiGLU.apply(gate_up, delta, self.gate_up_proj_bias, expert_ids, self.alpha, self.limit)
    down = _project(self, "down_proj", activated, offsets)
    down_delta = _low_rank(activated, offsets, lora.get("down_proj"),
                           functools.partial(_activation, alpha=self.alpha, limit=self.limit), pre)
    if down_delta is not None:
        down = down + down_delta
    out = _Unroute.apply(down, self.down_proj_bias, inverse.view(-1, top_k), perm, router_indices, routing_weights)
    return out.to(hidden_states.dtype)


def fast_experts(net: GptOssForCausalLM) -> None:
    """Run every GptOssExperts through _experts_forward: the same values (the activation computed in fp32), a
    fraction of the activation memory, fewer and cheaper kernels."""
    for module in net.modules():
        if isinstance(module, GptOssExperts):
            module.forward = types.MethodType(_experts_forward, module)


def _expert_lora_factors(wrapper) -> dict | None:
    """{parameter name: (A, B, scale)} of a chain of PEFT ParamWrappers over one GptOssExperts, or None where the
    chain is in a state only PEFT's own forward handles (adapters merged or disabled, several active adapters, another
    weight layout)."""
    from peft.tuners.lora.layer import ParamWrapper

    factors, layer = {}, wrapper
    while isinstance(layer, ParamWrapper):
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if layer.merged or layer.disable_adapters or len(adapters) > 1 or layer._did_swap_in_out_features:
            return None
        if adapters:
            factors[layer.parameter_name] = layer.get_delta_factors(adapters[0])
        layer = layer.base_layer
    return factors


def _lora_experts_forward(self, hidden_states, router_indices=None, routing_weights=None, *args, **kwargs):
    """The outermost PEFT ParamWrapper's forward over a GptOssExperts: the fused expert path with the adapters inside
    its grouped GEMMs; PEFT's own forward where _expert_lora_factors declines."""
    factors = _expert_lora_factors(self)
    if factors is None or args or kwargs:
        if is_packed(self.get_base_layer()):
            raise RuntimeError("PEFT's own expert forward (adapters merged, disabled or several active) cannot run on "
                               "experts held in MXFP4 (train.expert_weights=mxfp4); set train.expert_weights=dtype")
        return type(self).forward(self, hidden_states, router_indices, routing_weights, *args, **kwargs)
    return _experts_forward(self.get_base_layer(), hidden_states, router_indices, routing_weights, lora=factors)


def lora_experts(net) -> int:
    """Run PEFT's LoRA on expert parameters (LoraConfig.target_parameters) inside the fused expert path; returns the
    number of expert modules it applies to.

    PEFT applies an adapter on a [experts, in, out] parameter by parametrizing it as W + scale * A @ B for the whole
    forward (peft/tuners/lora/layer.py ParamWrapper._activate_lora): a full-size copy of every targeted expert weight
    (1.6 GB a gpt-oss-20b layer in bf16), which autograd keeps until the backward pass. Here each projection computes
    x @ W_e + scale * (x @ A_e) @ B_e per expert with two thin grouped GEMMs, from the same lora_A / lora_B
    parameters in PEFT's layout (get_delta_factors), so the adapter saves, loads and merges as PEFT's own.
    """
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in net.modules() if isinstance(m, ParamWrapper) and isinstance(m.get_base_layer(), GptOssExperts)]
    inner = {id(w.base_layer) for w in wrappers}
    outer = [w for w in wrappers if id(w) not in inner]
    for wrapper in outer:
        wrapper.forward = types.MethodType(_lora_experts_forward, wrapper)
    return len(outer)


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

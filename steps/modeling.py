"""Loading gpt-oss models for training and merging: random weights of a shape (tests, benchmarks) or a checkpoint."""
import dataclasses
import logging
import types

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from steps.model import GPT_OSS_20B_SHAPE, SHAPE_PRESETS, ModelConfig

log = logging.getLogger("finetune")
_GPT_OSS_FIELDS = {f.name for f in dataclasses.fields(GptOssConfig)}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

def random_config(model: ModelConfig, *, vocab_size: int) -> GptOssConfig:
    """The GptOssConfig of a name=random model: its preset's shape, then the profile's overrides."""
    unknown = sorted(set(model.random_shape) - _GPT_OSS_FIELDS - {"preset"})
    if unknown:
        raise ValueError(f"model.random_shape.{unknown[0]} is not a GptOssConfig field; use preset or one of "
                         f"{', '.join(sorted(_GPT_OSS_FIELDS & set(GPT_OSS_20B_SHAPE)))}")
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


# On GPU each direction compiles to one elementwise kernel (sequence lengths vary: dynamic shapes, one compilation).
_clamped_swiglu_cuda = torch.compile(_clamped_swiglu, dynamic=True)
_clamped_swiglu_grad_cuda = torch.compile(_clamped_swiglu_grad, dynamic=True)


class _ClampedSwiGLU(torch.autograd.Function):
    """The expert activation keeping only its input for the backward pass.

    Autograd through the eager activation (2 clamps, sigmoid, 3 products, an add on strided halves) keeps ~5 tensors
    per routed token; 4 routed tokens per token make that most of a gpt-oss layer's activation memory. This keeps
    gate_up alone and recomputes the rest in the backward pass, which on GPU is one fused kernel each way.
    """

    @staticmethod
    def forward(ctx, gate_up, alpha, limit):
        ctx.save_for_backward(gate_up)
        ctx.alpha, ctx.limit = alpha, limit
        return (_clamped_swiglu_cuda if gate_up.is_cuda else _clamped_swiglu)(gate_up, alpha, limit)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        grad_fn = _clamped_swiglu_grad_cuda if gate_up.is_cuda else _clamped_swiglu_grad
        return grad_fn(gate_up, grad.contiguous(), ctx.alpha, ctx.limit), None, None


def fuse_expert_activation(net: GptOssForCausalLM) -> None:
    """Run every GptOssExperts' activation as _ClampedSwiGLU: same values (computed in fp32), a fraction of the
    activation memory, fewer kernels. Both of transformers' expert paths (grouped_mm, eager loop) call _apply_gate."""
    def apply_gate(self, gate_up):
        return _ClampedSwiGLU.apply(gate_up, self.alpha, self.limit)

    for module in net.modules():
        if isinstance(module, GptOssExperts):
            module._apply_gate = types.MethodType(apply_gate, module)

"""Which model and tokenizer a run uses (the profile's `model` section), and how to load them."""
import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

log = logging.getLogger("finetune")

# The exact shape of openai/gpt-oss-20b's config.json (its rope_parameters are GptOssConfig's defaults: yarn, factor 32,
# theta 150k, original context 4096; layer_types default to alternating sliding/full attention, window 128).
GPT_OSS_20B_SHAPE = {
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "swiglu_limit": 7.0,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.9,
    "initializer_range": 0.02,
}
# openai/gpt-oss-120b differs only in depth and expert count.
GPT_OSS_120B_SHAPE = {**GPT_OSS_20B_SHAPE, "num_hidden_layers": 36, "num_local_experts": 128}
# Small enough to train in seconds on a CPU, still every gpt-oss feature: sinks, sliding + full layers, top-k experts.
TINY_SHAPE = {
    **GPT_OSS_20B_SHAPE,
    "num_hidden_layers": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "hidden_size": 64,
    "intermediate_size": 64,
    "head_dim": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 16,
    "max_position_embeddings": 4096,
}
SHAPE_PRESETS = {"tiny": TINY_SHAPE, "gpt-oss-20b": GPT_OSS_20B_SHAPE, "gpt-oss-120b": GPT_OSS_120B_SHAPE}
_GPT_OSS_FIELDS = {f.name for f in dataclasses.fields(GptOssConfig)}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    """Hub id (e.g. openai/gpt-oss-20b), a local checkpoint folder, or "random" for a random-weight gpt-oss of `random_shape`."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of `name`; ignored for local folders and "random"."""
    tokenizer: str = ""
    """Hub id or local folder of the tokenizer; "o200k-offline" builds the real gpt-oss tokenizer offline; empty means `name`."""
    random_shape: dict = field(default_factory=dict)
    """Shape of the name=random model: `preset` (tiny | gpt-oss-20b | gpt-oss-120b; default tiny) plus GptOssConfig
    overrides, e.g. {preset: gpt-oss-20b, num_hidden_layers: 4}. The vocabulary size always comes from the tokenizer."""
    seed: int = 0
    """Seed of the random-weight model's initialisation."""

    def __post_init__(self):
        if self.name == "random" and not self.tokenizer:
            raise ValueError('model.tokenizer is required when model.name=random; set model.tokenizer=o200k-offline')
        if self.random_shape and self.name != "random":
            raise ValueError(f"model.random_shape only applies to model.name=random (got name={self.name!r}); remove model.random_shape")
        preset = self.random_shape.get("preset", "tiny")
        if preset not in SHAPE_PRESETS:
            raise ValueError(f"model.random_shape.preset={preset!r} is unknown; choose one of {', '.join(SHAPE_PRESETS)}")
        unknown = sorted(set(self.random_shape) - _GPT_OSS_FIELDS - {"preset"})
        if unknown:
            raise ValueError(f"model.random_shape.{unknown[0]} is not a GptOssConfig field; use preset or one of "
                             f"{', '.join(sorted(_GPT_OSS_FIELDS & set(GPT_OSS_20B_SHAPE)))}")
        if "vocab_size" in self.random_shape:
            raise ValueError("model.random_shape.vocab_size is set from the tokenizer; remove it")

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.name


def random_config(model: ModelConfig, *, vocab_size: int) -> GptOssConfig:
    """The GptOssConfig of a name=random model: its preset's shape, then the profile's overrides."""
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

"""A tiny gpt-oss checkpoint laid out as the openai/gpt-oss Hub releases ship it, and an MXFP4 decoder written from
the format's definition (independent of steps/mxfp4.py's encoder and of transformers' loader)."""
import json

import torch

from steps.model import ModelConfig
from steps.modeling import load_model

FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
RELEASE_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
# openai/gpt-oss-20b's model.safetensors.index.json + headers, for one layer's experts: name suffix -> (dtype, shape).
GPT_OSS_20B_EXPERTS = {
    "gate_up_proj_blocks": (torch.uint8, (32, 5760, 90, 16)), "gate_up_proj_scales": (torch.uint8, (32, 5760, 90)),
    "gate_up_proj_bias": (torch.bfloat16, (32, 5760)), "down_proj_blocks": (torch.uint8, (32, 2880, 90, 16)),
    "down_proj_scales": (torch.uint8, (32, 2880, 90)), "down_proj_bias": (torch.bfloat16, (32, 2880)),
}


def decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., n, 16) codes + (..., n) biased exponents -> (..., 32 n) float32: low nibble first, value x 2**(scale-127)."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()
    return (FP4_VALUES[codes] * torch.exp2(scales.float() - 127)[..., None]).flatten(-2)


def mxfp4(num_experts: int, rows: int, cols: int, gen: torch.Generator):
    """A (num_experts, rows, cols) weight in the gpt-oss Hub layout: 4-bit codes two per byte (low nibble first) in
    blocks of 32 along cols, one power-of-two scale per block (biased by 127). Returns blocks, scales and the exact value.

    Each block's largest magnitude is 4 or 6 times its scale, as an encoder that picks the smallest scale holding the
    block makes it; codes include -0 (8), which a sign-preserving encoder writes for negatives that round to zero.
    """
    codes = torch.randint(0, 16, (num_experts, rows, cols), generator=gen)
    top = torch.randint(0, 32, (num_experts, rows, cols // 32), generator=gen)  # one element per block
    top_codes = torch.tensor([6, 7, 14, 15])[torch.randint(0, 4, top.shape, generator=gen)]
    codes.view(num_experts, rows, cols // 32, 32).scatter_(-1, top[..., None], top_codes[..., None])
    exponents = torch.randint(-3, 2, (num_experts, rows, cols // 32), generator=gen)
    value = FP4_VALUES[codes] * torch.exp2(exponents.float()).repeat_interleave(32, dim=-1)
    pairs = codes.view(num_experts, rows, cols // 32, 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8), (exponents + 127).to(torch.uint8), value


def write_quantized_checkpoint(path, quantization_config: dict, *, vocab_size: int = 512) -> tuple[dict, dict]:
    """A tiny gpt-oss checkpoint laid out as openai/gpt-oss-20b ships: experts as MXFP4 blocks + scales, the rest bf16."""
    from safetensors.torch import save_file

    base = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0), vocab_size=vocab_size, dtype="bfloat16",
                      attn_implementation="eager", device="cpu")
    base.save_pretrained(path)
    for shard in path.glob("model*.safetensors*"):
        shard.unlink()
    tensors, experts = dict(base.state_dict()), {}
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        num_experts, cols, rows = tensors.pop(name).shape  # transformers keeps (experts, in, out); the Hub (out, in)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"], value = mxfp4(num_experts, rows, cols, gen)
        experts[name] = value.transpose(1, 2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return tensors, experts

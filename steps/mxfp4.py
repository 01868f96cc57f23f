"""MXFP4 export in the openai/gpt-oss release layout, and the figures that say whether the fine-tune survived it.

The release stores each expert projection as `<name>_blocks` (uint8, two E2M1 codes per byte, low nibble first, the
input dimension cut into blocks of 32) and `<name>_scales` (uint8, one E8M0 exponent biased by 127 per block), both
laid out (experts, out, in / 32, ...); everything else is bf16. transformers' own MXFP4 quantizer needs Triton kernels
fetched from the Hub at run time, so the encoder is here; tests/hub_layout.py decodes independently.
"""
import copy
import json
import math
from pathlib import Path

import torch

EXPERT_PROJECTIONS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
BLOCK_SIZE = 32
# openai/gpt-oss-20b's and -120b's config.json carry exactly this.
RELEASE_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}
# E2M1 magnitudes, by code 0-7; the sign is bit 3.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = _E2M1 + tuple(-v for v in _E2M1)  # by 4-bit code
# Memory of common GPUs (GB), smallest first, for the "fits on" figure.
GPUS_GB = ((16, "16 GB (T4, RTX 5080, A4000)"), (24, "24 GB (L4, A10, RTX 4090)"), (48, "48 GB (L40S, RTX 6000 Ada)"),
           (80, "80 GB (H100, A100 80GB)"), (141, "141 GB (H200)"), (192, "192 GB (B200)"))
# Weights take at most this share of a GPU: the rest holds the CUDA context, activations and a short context's KV
# cache (the release's own claims, 20b on 16 GB and 120b on 80 GB, fit this rule).
GPU_WEIGHT_SHARE = 0.9


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `weight` (..., cols) along its last dim: blocks (..., cols/32, 16) and scales (..., cols/32), uint8.

    Each block's scale is the smallest power of two s with max|x| <= 6 s (no value clips; the rule of triton_kernels'
    downcast_to_mxfp with ROUND_UP, which transformers' quantizer calls), then each x / s rounds to the nearest E2M1
    value, ties to the even code. An exactly representable block (a dequantized release block) comes back to the same
    codes and scale, as long as its scale was the smallest that holds it, which this rule always produces.
    """
    if weight.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the quantized dim ({weight.shape[-1]}) to be a multiple of {BLOCK_SIZE}")
    x = weight.float().contiguous().view(*weight.shape[:-1], -1, BLOCK_SIZE)
    amax = x.abs().amax(-1, keepdim=True)
    # frexp: amax / 6 = m * 2**e with m in [0.5, 1); the smallest power of two >= it is 2**(e - 1) when m is 0.5.
    mantissa, exponent = torch.frexp(amax / 6.0)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    exponent = torch.where(amax == 0, -127, exponent).clamp(-127, 127)  # all-zero block: scale byte 0, as the kernels
    q = torch.ldexp(x, -exponent).abs()
    # E2M1 steps are 0.5 below 2, 1 below 4, 2 above; torch.round rounds half to even, which here is the even code.
    step = torch.where(q < 2, 0.5, torch.where(q < 4, 1.0, 2.0))
    q = (torch.round(q / step) * step).clamp(max=6.0)
    magnitude = torch.bucketize(q, torch.tensor(_E2M1, device=q.device))  # q is on the grid: its index is its code
    codes = (magnitude | (torch.signbit(x).to(magnitude.dtype) << 3)).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], BLOCK_SIZE // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8)


def quantize_experts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert projection as transformers keeps it, (experts, in, out), encoded in the release layout: blocks
    (experts, out, in / 32, 16) and scales (experts, out, in / 32), quantized along `in`. One expert at a time: the
    float32 temporaries of a whole gpt-oss-20b projection would take ~10 GB."""
    encoded = [quantize_mxfp4(expert.T) for expert in weight.detach()]
    return torch.stack([blocks for blocks, _ in encoded]), torch.stack([scales for _, scales in encoded])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The values of quantize_mxfp4's (..., n, 16) blocks and (..., n) scales: (..., 32 n) in lut's dtype, exact in
    bf16 or wider (a 4-bit code's value times a power of two). lut: E2M1_VALUES as a tensor of the wanted dtype and
    device. The CPU's decoder; a GPU runs steps/mxfp4_gpu.py's kernel, which gives the same bits."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)
    scale = torch.exp2(scales.to(torch.float32) - 127.0).to(lut.dtype)
    return (lut[codes.to(torch.int32)] * scale[..., None]).flatten(-2)


def release_state_dict(state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype | None = torch.bfloat16
                       ) -> dict[str, torch.Tensor]:
    """The tensors of an MXFP4 checkpoint in the release layout, on the CPU: experts encoded, the rest in `dtype`
    (None: as they are).

    Experts already held in that layout (steps.modeling.pack_experts: `<name>_blocks` / `<name>_scales` beside a
    placeholder `<name>`) are written as they are.
    """
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith(EXPERT_PROJECTIONS) and f"{name}_blocks" in state_dict:
            continue  # the placeholder of packed experts
        if name.endswith(EXPERT_PROJECTIONS):
            blocks, scales = quantize_experts(tensor)
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks.cpu(), scales.cpu()
        elif name.endswith(tuple(f"{p}_{part}" for p in EXPERT_PROJECTIONS for part in ("blocks", "scales"))):
            out[name] = tensor.cpu()
        else:
            out[name] = tensor.cpu() if dtype is None else tensor.to(dtype).cpu()
    return out


def write_checkpoint(model, tmp: Path, *, dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Weights (5 GB shards with an index, as the release) and a config.json carrying the release's quantization_config;
    the tensors other than the experts in `dtype` (None: as the model holds them)."""
    from huggingface_hub import save_torch_state_dict

    tensors = release_state_dict(model.state_dict(), dtype=dtype)
    if not any(name.endswith("_blocks") for name in tensors):
        raise ValueError("the merged model has no gpt-oss expert projections to quantize; merge.export=mxfp4 needs a "
                         "GptOssForCausalLM")
    tmp.mkdir(parents=True)
    save_torch_state_dict(tensors, tmp, max_shard_size="5GB", metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.quantization_config = dict(RELEASE_QUANTIZATION_CONFIG)
    config.dtype = dtype or model.dtype
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def smallest_gpu(num_bytes: int) -> str:
    """The smallest common GPU whose memory holds these weights with GPU_WEIGHT_SHARE to spare."""
    for gb, name in GPUS_GB:
        if num_bytes <= GPU_WEIGHT_SHARE * gb * 1e9:
            return name
    return f"none single: {num_bytes / 1e9:.1f} GB needs tensor parallelism across GPUs"


def is_mxfp4_dir(model_dir: Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


class ProbeStats:
    """Per-model eval loss and per-pair logit distances, accumulated row by row over a probe batch.

    Retention = 1 - ||z_mxfp4 - z_merged|| / ||z_merged - z_base|| over every position and vocabulary entry, z the
    logits minus their mean over the vocabulary (softmax ignores a per-position shift). It is 1 when the export
    reproduces the merge, 0 when rounding moved the logits as far as the whole fine-tune did (e.g. back to the
    base), negative beyond. It counts every deviation against the fine-tune, whatever its direction, so noise cannot
    pass for kept signal; the mean KL divergences beside it say the same in probability terms.
    """

    def __init__(self):
        self.loss_sum, self.num_loss_tokens = {}, 0
        self.sq = {}
        self.kl_sum, self.num_positions = {}, 0

    def add_loss(self, key: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")
        self.loss_sum[key] = self.loss_sum.get(key, 0.0) + loss.item()

    def add_pair(self, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """||a - b||^2 of centered logits and KL(softmax a || softmax b), summed over positions."""
        a, b = a.float(), b.float()
        diff = (a - a.mean(-1, keepdim=True)) - (b - b.mean(-1, keepdim=True))
        self.sq[key] = self.sq.get(key, 0.0) + diff.pow(2).sum().item()
        # float64: between near-identical distributions a float32 sum over 201k ids rounds below zero.
        log_a, log_b = a.double().log_softmax(-1), b.double().log_softmax(-1)
        kl = (log_a.exp() * (log_a - log_b)).sum()
        self.kl_sum[key] = self.kl_sum.get(key, 0.0) + kl.item()

    def loss(self, key: str) -> float:
        return self.loss_sum[key] / max(self.num_loss_tokens, 1)

    def kl(self, key: str) -> float:
        return self.kl_sum[key] / max(self.num_positions, 1)

    def retention(self, *, kept: str, effect: str) -> float | None:
        """None when the fine-tune moved no logit on the probe: there was nothing to keep."""
        if self.sq[effect] == 0:
            return None
        return 1.0 - math.sqrt(self.sq[kept]) / math.sqrt(self.sq[effect])

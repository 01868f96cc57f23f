"""The GPU's MXFP4 decoder (train.expert_weights=mxfp4 decodes each layer's frozen experts with it, twice a step): one
Triton kernel that reads each code byte once and writes its two values side by side. It gives the bits of
steps.mxfp4.dequantize_mxfp4, the table lookup the CPU runs (tests/test_mxfp4.py compares them on a GPU), at more of
the GPU's memory bandwidth than the compiled lookup reaches (bench/mxfp4_decode.py times both).

Imported only where CUDA runs: triton comes with torch's CUDA builds, not with its CPU ones.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1(code):
    """A 4-bit E2M1 code's value (sign, 2 exponent bits, 1 mantissa bit) in float32, exactly."""
    exponent = (code >> 1) & 3
    half = (code & 1).to(tl.float32) * 0.5
    power = (1 << tl.maximum(exponent - 1, 0)).to(tl.float32)
    magnitude = tl.where(exponent == 0, half, (1.0 + half) * power)
    sign = (code & 8) << 28  # the code's sign bit as float32's: -0.0 stays a negative zero
    return (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _decode(blocks_ptr, scales_ptr, out_ptr, n_bytes, BYTES: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BYTES
    at = start + tl.arange(0, BYTES)
    inside = at < n_bytes
    byte = tl.load(blocks_ptr + at, mask=inside, other=0).to(tl.int32)
    exponent = tl.load(scales_ptr + at // 16, mask=inside, other=127).to(tl.int32)
    scale = (exponent << 23).to(tl.float32, bitcast=True)  # 2 ** (byte - 127), built from its bits: exact
    values = tl.interleave(_e2m1(byte & 15) * scale, _e2m1(byte >> 4) * scale)  # low nibble first
    out = 2 * start + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + out, values.to(out_ptr.dtype.element_ty), mask=out < 2 * n_bytes)


def dequantize_mxfp4_gpu(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, *,
                         bytes_per_program: int = 4096) -> torch.Tensor:
    """dequantize_mxfp4's (..., 32 n) values of (..., n, 16) code blocks and (..., n) scale bytes, in `dtype`."""
    if not (blocks.is_cuda and blocks.is_contiguous() and scales.is_contiguous()):
        raise ValueError("dequantize_mxfp4_gpu takes contiguous CUDA tensors; the CPU decodes with "
                         "steps.mxfp4.dequantize_mxfp4")
    out = torch.empty((*blocks.shape[:-2], blocks.shape[-2] * 32), dtype=dtype, device=blocks.device)
    n_bytes = blocks.numel()
    _decode[(triton.cdiv(n_bytes, bytes_per_program),)](blocks, scales, out, n_bytes, BYTES=bytes_per_program)
    return out

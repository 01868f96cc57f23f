"""The two MXFP4 decoders on one gpt-oss-20b layer's gate_up_proj (32 x 5,760 x 2,880) on a GPU: the table lookup of
steps/mxfp4.py compiled by torch.compile, and steps/mxfp4_gpu.py's Triton kernel (what training decodes with) at a few
tile sizes. GPU time per decode (CUDA events, median of 20 after 3 warm-ups), the bandwidth that is (bytes read +
written), and whether each gives the lookup's bits. Not a test.

python bench/mxfp4_decode.py --out DIR      # writes DIR/mxfp4_decode.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from steps.mxfp4 import E2M1_VALUES, dequantize_mxfp4  # noqa: E402
from steps.mxfp4_gpu import dequantize_mxfp4_gpu  # noqa: E402


def time_ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = torch.randint(0, 256, (32, 5760, 90, 16), dtype=torch.uint8, device="cuda", generator=gen)
    scales = torch.randint(115, 125, (32, 5760, 90), dtype=torch.uint8, device="cuda", generator=gen)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.bfloat16, device="cuda")
    lookup = torch.compile(dequantize_mxfp4, dynamic=False)
    expected = lookup(blocks, scales, lut).view(torch.int16)
    moved = blocks.numel() + scales.numel() + blocks.numel() * 2 * 2  # read codes and scales, write bf16
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(blocks.shape)}
    candidates = {"lookup_compiled": lambda: lookup(blocks, scales, lut)}
    for tile in (1024, 2048, 4096, 8192):
        candidates[f"triton_{tile}"] = lambda tile=tile: dequantize_mxfp4_gpu(blocks, scales, torch.bfloat16,
                                                                              bytes_per_program=tile)
    for name, fn in candidates.items():
        ms = time_ms(fn)
        result[name] = {"ms": round(ms, 3), "tb_per_s": round(moved / ms / 1e9, 2),
                        "same_bits": bool(torch.equal(fn().view(torch.int16), expected))}
    print(json.dumps(result, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "mxfp4_decode.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

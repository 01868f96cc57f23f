"""The load of a gpt-oss-20b checkpoint in its Hub layout (MXFP4 experts + bf16 rest), timed from disk to a first
forward/backward, through steps.modeling.load_model (what the train step calls).

python bench/load_mxfp4.py --out DIR [--ckpt-dir /tmp/gpt-oss-20b-random] [--modes dequantized,packed]

Writes a checkpoint of the exact openai/gpt-oss-20b shape and layout with random content (3 shards + index, experts
as *_blocks/*_scales uint8, everything else bf16, the release's quantization_config), drops the page cache where
allowed, then, for each of --modes, in a new process: load_model(name=that folder, device=cuda, dtype=bfloat16), which
dequantizes the experts (mode dequantized, the time and device of every expert dequantization recorded) or keeps them
as stored (mode packed: packed_experts=True, what train.expert_weights=mxfp4 loads); then one forward/backward of 2,048
tokens (eager attention, nothing compiled). Writes DIR/load_mxfp4.json. Not a test.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_checkpoint(path: Path, tokenizer_vocab: int, device: str, preset: str) -> dict:
    import torch
    from safetensors.torch import save_file

    from steps.model import ModelConfig
    from steps.modeling import load_model
    from steps.mxfp4 import RELEASE_QUANTIZATION_CONFIG

    t0 = time.perf_counter()
    net = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0, random_shape={"preset": preset}),
                     vocab_size=tokenizer_vocab, dtype="bfloat16", attn_implementation="eager", device=device)
    path.mkdir(parents=True, exist_ok=True)
    net.config.save_pretrained(path)
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, t in net.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            num_experts, cols, rows = t.shape  # transformers keeps (experts, in, out); the Hub (out, in / 32, 16)
            tensors[f"{name}_blocks"] = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8,
                                                      device=device, generator=gen).cpu()
            # scales 2**-7 .. 2**-4: with codes up to 6, |w| <= 0.375, a trained model's range
            tensors[f"{name}_scales"] = torch.randint(120, 124, (num_experts, rows, cols // 32), dtype=torch.uint8,
                                                      device=device, generator=gen).cpu()
        else:
            tensors[name] = t.cpu()
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    built_s = time.perf_counter() - t0
    # Three shards, as the release ships (~4.8 GB each).
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards, current, size = [], [], 0
    for n in names:
        current.append(n)
        size += tensors[n].numel() * tensors[n].element_size()
        if size >= total / 3 and len(shards) < 2:
            shards.append(current)
            current, size = [], 0
    shards.append(current)
    weight_map = {}
    t1 = time.perf_counter()
    for i, shard in enumerate(shards):
        file = f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, path / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": RELEASE_QUANTIZATION_CONFIG}, indent=1))
    subprocess.run(["sync"])
    return {"bytes_on_disk": sum(p.stat().st_size for p in path.glob("*.safetensors")), "tensors": len(tensors),
            "shards": len(shards), "built_on_gpu_s": round(built_s, 1), "written_s": round(time.perf_counter() - t1, 1)}


def load_and_step(path: str, vocab: int, device: str, packed: bool) -> dict:
    """In a fresh process: the timed load and a first forward/backward."""
    t_start = time.perf_counter()
    import torch
    import transformers.integrations.mxfp4 as mx

    from steps.model import ModelConfig
    from steps.modeling import fast_experts, load_model
    imported_s = time.perf_counter() - t_start

    dequant = []
    convert = mx.Mxfp4Dequantize.convert

    def timed_convert(self, input_dict, *args, **kwargs):
        blocks = next(v for k, v in input_dict.items() if k.endswith("_blocks"))
        blocks = blocks[0] if isinstance(blocks, list) else blocks
        if blocks.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = convert(self, input_dict, *args, **kwargs)
        value = next(iter(out.values()))
        if value.is_cuda:
            torch.cuda.synchronize()
        dequant.append({"blocks_device": str(blocks.device), "out_device": str(value.device),
                        "s": time.perf_counter() - t})
        return out

    mx.Mxfp4Dequantize.convert = timed_convert
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    net = load_model(ModelConfig(name=path, tokenizer="o200k-offline"), vocab_size=vocab, dtype="bfloat16",
                     attn_implementation="eager", device=device, packed_experts=packed)
    sync()
    load_s = time.perf_counter() - t0
    load_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    experts = net.model.layers[0].mlp.experts
    held = experts.gate_up_proj_blocks if packed else experts.gate_up_proj
    fast_experts(net)
    ids = torch.randint(0, min(vocab, 199998), (1, 2048 if device == "cuda" else 32), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    t1 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = net(input_ids=ids, labels=ids).loss
    loss.backward()
    sync()
    step_s = time.perf_counter() - t1
    devices = sorted({(d["blocks_device"], d["out_device"]) for d in dequant})
    return {"imports_s": round(imported_s, 1), "load_s": round(load_s, 1),
            "dequantized_tensors": len(dequant), "dequantize_s_total": round(sum(d["s"] for d in dequant), 2),
            "dequantize_devices_in_out": devices, "first_fwd_bwd_s": round(step_s, 2), "loss": loss.item(),
            "expert_dtype": str(held.dtype), "expert_device": str(held.device), "expert_shape": list(held.shape),
            "load_peak_gib": load_peak, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "process_s": round(time.perf_counter() - t_start, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default="/tmp/gpt-oss-20b-random-mxfp4")
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--tiny", action="store_true", help="the tiny preset on CPU, to shake out bugs")
    ap.add_argument("--modes", default="dequantized,packed", help="dequantized (train.expert_weights=dtype), packed "
                    "(train.expert_weights=mxfp4), each in a new process")
    ap.add_argument("--child", choices=("dequantized", "packed"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        result = load_and_step(a.ckpt_dir, a.vocab, "cpu" if a.tiny else "cuda", packed=a.child == "packed")
        print("RESULT " + json.dumps(result), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(a.ckpt_dir)
    log(f"writing {ckpt}")
    summary = {"checkpoint": write_checkpoint(ckpt, a.vocab, "cpu" if a.tiny else "cuda", "tiny" if a.tiny else "gpt-oss-20b")}
    log(json.dumps(summary["checkpoint"]))
    summary["load"] = {}
    for mode in a.modes.split(","):
        if a.tiny:  # a shared development machine: leave its page cache alone
            summary[f"page_cache_{mode}"] = "not dropped (--tiny)"
        else:  # the device machine is this run's alone
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                summary[f"page_cache_{mode}"] = "dropped before the load (cold disk)"
            except OSError as e:
                summary[f"page_cache_{mode}"] = f"not dropped ({e.strerror}): the load reads from memory"
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "--out", a.out, "--ckpt-dir", a.ckpt_dir, "--vocab", str(a.vocab),
                            "--child", mode, *(["--tiny"] if a.tiny else [])], capture_output=True, text=True, cwd=REPO)
        (out / f"load_mxfp4-child-{mode}.log").write_text(r.stdout + r.stderr)
        line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
        summary["load"][mode] = json.loads(line[7:]) if line else {"error": (r.stderr or r.stdout)[-2000:]}
        summary["load"][mode]["process_wall_s"] = round(time.time() - t, 1)
        log(f"{mode}: {json.dumps(summary['load'][mode])}")
    (out / "load_mxfp4.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

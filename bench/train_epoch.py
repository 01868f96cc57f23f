"""End to end: `finetune step train` from process start to the saved adapter, a full epoch, with a cold and then a
warm compile cache, beside the reference recipe, on one GPU.

python bench/train_epoch.py --out DIR --tokenizer-dir TOK [--rows 1000] [--ref-steps 8]
    [--runs cold,warm,ref,unsloth_cold,unsloth_warm] [--unsloth-trainable reference|all] [--from-checkpoint]

Both train the same random-weight gpt-oss-20b (exact shape) on the same 1,000 synthetic rows as
bench/train_throughput.py. Ours: `python -m flows.cli step train --config configs/h100-lora.yaml` in a new process per
run, the rows written as a harmony step out dir; run 1 with an empty compile cache (cold), run 2 in a new process with
the cache run 1 left (warm), each into a new out dir, so nothing but the cache carries over. Wall clock from launching
the process to its exit (the manifest is written after the adapter). The reference recipe: bench/train_throughput.py
--configs ref in a new process, for --ref-steps optimizer steps; its epoch is the measured time from launch to the end
of step 1 plus the remaining steps of the epoch at its measured steady pace (extrapolated: a full epoch takes ~6 min,
more than one device call holds beside ours). Unsloth (runs unsloth_cold, unsloth_warm; bench/unsloth_train.py
--epoch in its own process and packages, as train_throughput.py starts it): the whole epoch from the bench model saved
as bf16 safetensors (train_throughput.py's checkpoint, saved once, before either run), launch to saved adapter; cold
with an empty work dir (its unsloth_compiled_cache and, pointed there, its Inductor and Triton caches), warm in a new
process with what the cold run left. --from-checkpoint: ours loads that same checkpoint from disk too
(model.name=CKPT), instead of drawing the random model on the GPU. Writes DIR/epoch.json and each process's console to
DIR/*.log. Not a test.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from train_throughput import (FIRST_SPECIAL_ID, REAL_SHAPE, prepare_unsloth_inputs, run_unsloth,  # noqa: E402
                              synthetic_rows, write_harmony_dir)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_logged(cmd, log_path, timeout_s):
    """Run cmd with its console to log_path; returns (rc, wall seconds from launch to exit)."""
    start = time.time()
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - start, start


def ours(name, harmony, tokenizer_dir, cache_dir, out_root, log_dir, timeout_s, profile, overrides, checkpoint=None):
    out = out_root / name
    model = [f"model.name={checkpoint}"] if checkpoint else [
        "model.name=random", "model.seed=42", "model.random_shape={preset: gpt-oss-20b}", "train.save_random_base=false"]
    cmd = [sys.executable, "-m", "flows.cli", "step", "train", "--config", str(profile), "--input",
           f"harmony={harmony}", "--out", str(out), *model, f"model.tokenizer={tokenizer_dir}",
           f"train.compile_cache_dir={cache_dir}", *overrides]
    log(f"{name}: {' '.join(cmd)}")
    rc, wall, _ = run_logged(cmd, log_dir / f"epoch-{name}.log", timeout_s)
    result = {"name": name, "rc": rc, "wall_s": round(wall, 1), "command": cmd}
    manifest = out / "manifest.json"
    if rc == 0 and manifest.exists():
        m = json.loads(manifest.read_text())
        o = m["output"]
        result.update({k: o[k] for k in ("num_steps", "tokens_per_s", "peak_mem_gib", "train_runtime_s", "phases_s",
                                         "compile_cache", "train_loss_first", "train_loss_last")})
        result["loss_by_step"] = {s: loss for s, loss in o["loss_curve"][:8]}
        result["step_duration_s"] = m["duration_s"]
        result["adapter_files"] = sorted(p.name for p in (out / o["model_dir"]).iterdir())
    log(f"{name}: rc {rc}, {wall:.1f} s " + json.dumps({k: result.get(k) for k in ("num_steps", "tokens_per_s",
                                                                                    "peak_mem_gib", "phases_s")}))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--ref-steps", type=int, default=8)
    ap.add_argument("--runs", default="cold,warm,ref", help="which of cold, warm, ref to run, in order")
    ap.add_argument("--profile", default=str(REPO / "configs" / "h100-lora.yaml"))
    ap.add_argument("--override", action="append", default=[], help="extra section.key=value for ours")
    ap.add_argument("--timeout-s", type=float, default=400, help="per process")
    ap.add_argument("--unsloth-trainable", default="reference", choices=["reference", "all"],
                    help="unsloth_*: the trainable set (all: the experts of every layer)")
    ap.add_argument("--unsloth-site", default="/tmp/site-unsloth", help="unsloth_*: Unsloth's packages (PYTHONPATH)")
    ap.add_argument("--ckpt-dir", default="/tmp/bench-ckpt", help="the bench model as bf16 safetensors (saved once)")
    ap.add_argument("--from-checkpoint", action="store_true", help="ours loads --ckpt-dir instead of a random draw")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-epoch-"))
    rows = synthetic_rows(a.rows, FIRST_SPECIAL_ID, seed=1234, max_len=2048)
    harmony = write_harmony_dir(rows, a.tokenizer_dir, work / "harmony")
    cache_dir = work / "compile-cache"
    tokens = sum(len(r["input_ids"]) for r in rows)
    summary = {"rows": len(rows), "row_tokens_total": tokens, "profile": a.profile, "overrides": a.override, "runs": {}}
    runs = a.runs.split(",")
    checkpoint = None
    if a.from_checkpoint or any(r.startswith("unsloth_") for r in runs):
        summary["checkpoint"] = prepare_unsloth_inputs(REAL_SHAPE, rows, "cuda", a.tokenizer_dir, a.ckpt_dir)
        checkpoint = summary["checkpoint"]["ckpt_dir"] if a.from_checkpoint else None
    unsloth_work = work / "unsloth-work"
    for run in runs:
        if run in ("cold", "warm"):
            summary["runs"][run] = ours(run, harmony, Path(a.tokenizer_dir).resolve(), cache_dir, work, out,
                                        a.timeout_s, a.profile, a.override, checkpoint)
        elif run in ("unsloth_cold", "unsloth_warm"):
            caches = {"TORCHINDUCTOR_CACHE_DIR": str(unsloth_work / "inductor"),
                      "TRITON_CACHE_DIR": str(unsloth_work / "triton")}
            name = "unsloth" if a.unsloth_trainable == "reference" else "unsloth_all"
            r = run_unsloth(name, rows, REAL_SHAPE, "cuda", 2, 0, a.tokenizer_dir, a.ckpt_dir, a.unsloth_site,
                            unsloth_work, a.timeout_s, out / run, epoch=True, env_extra=caches)
            r["wall_s"] = r.get("launch_to_saved_adapter_s")
            summary["runs"][run] = r
            log(f"{run}: " + json.dumps({k: r.get(k) for k in ("launch_to_saved_adapter_s", "steps_done",
                                                                "tokens_per_s", "peak_gib", "phases_s", "error")}))
        elif run == "ref":
            ref_out = work / "ref"
            cmd = [sys.executable, str(BENCH / "train_throughput.py"), "--out", str(ref_out), "--configs", "ref",
                   "--no-parity", "--rows", str(a.rows), "--warmup-steps", "2", "--timed-steps", str(a.ref_steps - 2)]
            log(f"ref: {' '.join(cmd)}")
            rc, wall, start = run_logged(cmd, out / "epoch-ref.log", a.timeout_s)
            r = json.loads((ref_out / "summary.json").read_text())["configs"]["ref"] if rc == 0 else {}
            result = {"name": "ref", "rc": rc, "wall_s": round(wall, 1), "command": cmd}
            if "step_s" in r:
                to_step1 = r["step_end_unix"][0] - start
                left = r["steps_per_epoch"] - 1
                result.update({
                    "launch_to_step1_end_s": round(to_step1, 1), "step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"],
                    "steps_per_epoch": r["steps_per_epoch"], "peak_gib": r["peak_gib"],
                    "loss_by_step": r["loss_by_step"], "setup_s": r["setup_s"], "first_step_s": r["first_step_s"],
                    "epoch_wall_s_extrapolated": round(to_step1 + left * r["step_s"], 1),
                    "extrapolation": f"launch to end of step 1 (measured) + {left} steps x {r['step_s']} s (steps "
                                     f"3-{a.ref_steps}, measured); the adapter save (~1 s) left out"})
            log(f"ref: rc {rc}, {wall:.1f} s " + json.dumps({k: result.get(k) for k in (
                "launch_to_step1_end_s", "step_s", "epoch_wall_s_extrapolated")}))
            summary["runs"]["ref"] = result
        (out / "epoch.json").write_text(json.dumps(summary, indent=1))
    runs = summary["runs"]
    ref_wall = runs.get("ref", {}).get("epoch_wall_s_extrapolated")
    print("\n| run | wall s (launch to saved adapter) | x ref | steps | tokens/s | peak GiB | phases s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        wall = r.get("epoch_wall_s_extrapolated") if name == "ref" else r.get("wall_s")
        x = ref_wall / wall if ref_wall and wall else math.nan
        steps = r.get("num_steps", r.get("steps_done", r.get("steps_per_epoch")))
        print(f"| {name} | {wall} | {x:.2f} | {steps} | {r.get('tokens_per_s')} "
              f"| {r.get('peak_mem_gib', r.get('peak_gib'))} | {r.get('phases_s', '')} |")


if __name__ == "__main__":
    main()

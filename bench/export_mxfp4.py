"""MXFP4 vs bf16 export of a merged gpt-oss (random weights + a briefly trained LoRA), through steps/merge.py itself.

    python bench/export_mxfp4.py --out DIR --tokenizer-dir TOK                    # GPU, exact gpt-oss-20b shape
    python bench/export_mxfp4.py --out DIR --tokenizer-dir TOK --tiny --device cpu  # the same path on a CPU

The adapter is configs/h100-lora.yaml's (r=8/alpha=16, all-linear + experts of layers 7/15/23), trained for
--train-steps AdamW steps on rows of random tokens drawn from a 4,096-id subset (a pattern a LoRA learns fast: the
eval loss falls from ~ln 201,088 towards ln 4,096), so its weights have a trained adapter's size. Eval rows come from
the same distribution. The merge step then runs twice on the same base and adapter: merge.export=mxfp4 (timed,
retention, eval loss of base / merge / MXFP4, the export's tensor layout), merging in float32 (the MXFP4 rounding is
then the only one; a bf16 merge failed merge's check on this adapter in call 11's first try: off base+adapter by up to
2.43 in |logit|, tolerance 0.1), and merge.export=bf16 with merge.dtype=bfloat16 (timed, bytes; its check loosened to
--bf16-tolerance).
The random base is never written: merge.load_base is replaced by the base built here (the step would otherwise
load the 42 GB base from disk). Writes DIR/summary.json; prints a table last.
"""
import argparse
import gc
import logging
import time
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoTokenizer

from steps import merge, mxfp4, profile
from steps.contract import write_json_atomic
from steps.modeling import load_model
from steps.train import lora_config
from steps.tracking import NullTracker

log = logging.getLogger("finetune")
SUBSET = 4096


def rows_of(num_rows: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    subset = torch.randperm(199_998, generator=torch.Generator().manual_seed(0))[:SUBSET]
    return subset[torch.randint(0, SUBSET, (num_rows, length), generator=gen)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer-dir", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny preset instead of the gpt-oss-20b shape")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--row-tokens", type=int, default=1024)
    ap.add_argument("--num-eval-rows", type=int, default=8)
    ap.add_argument("--skip-bf16", action="store_true", help="only the MXFP4 export")
    ap.add_argument("--bf16-tolerance", type=float, default=10.0, help="merge.probe_tolerance of the bf16 run")
    ap.add_argument("--mxfp4-merge-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="merge.dtype of the MXFP4 run (bfloat16: the trained base cast to bf16, checked at --bf16-tolerance;"
                         " its 'merged' eval loss is then the bf16 export's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.monotonic()

    overrides = ["model.name=random", "model.tokenizer=o200k-offline",
                 f"model.random_shape={{preset: {'tiny' if args.tiny else 'gpt-oss-20b'}}}"]
    if args.tiny:
        overrides.append("train.lora_expert_layers=all")
    prof = profile.load_profile(profile.CONFIGS_DIR / "h100-lora.yaml", overrides)
    model_cfg, train_cfg = profile.model_config(prof), profile.step_config(prof, "train")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)

    def build_base(dtype: str):
        return load_model(model_cfg, vocab_size=len(tokenizer), dtype=dtype, attn_implementation="eager",
                          device=args.device)

    # --- A briefly trained adapter on the random base ---
    base = build_base("float32")
    peft_model = get_peft_model(base, lora_config(train_cfg, base))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    train_rows = rows_of(args.train_steps, args.row_tokens, seed=1).to(args.device)
    losses = []
    t = time.monotonic()
    for step in range(args.train_steps):
        ids = train_rows[step:step + 1]
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    summary["train"] = {"steps": args.train_steps, "lr": args.lr, "loss_first": losses[0], "loss_last": losses[-1],
                        "losses": losses, "s": round(time.monotonic() - t, 1),
                        "num_trainable": sum(p.numel() for p in trainable),
                        "max_abs_lora_B": max(p.abs().max().item() for n, p in peft_model.named_parameters()
                                              if "lora_B" in n)}
    log.info("bench: adapter trained, loss %.3f -> %.3f in %.1f s", losses[0], losses[-1], summary["train"]["s"])
    del opt, trainable, train_rows

    # --- The folders merge reads: a train out dir (adapter + tokenizer) whose harmony input has an eval split ---
    harmony_dir, train_dir = args.out / "harmony", args.out / "train"
    import datasets

    eval_ids = rows_of(args.num_eval_rows, args.row_tokens, seed=2).tolist()
    # Loss on the last 70% of each row, as on an assistant turn after its prompt.
    masks = [[0] * (len(r) * 3 // 10) + [1] * (len(r) - len(r) * 3 // 10) for r in eval_ids]
    ds = datasets.Dataset.from_dict({"id": list(range(len(eval_ids))), "input_ids": eval_ids, "assistant_masks": masks})
    ds.save_to_disk(str(harmony_dir / "eval_data"))
    ds.save_to_disk(str(harmony_dir / "data"))
    write_json_atomic(harmony_dir / "manifest.json", {"step": "harmony", "fingerprint": "bench", "inputs": {},
                      "output": {"data_dir": "data", "eval_data_dir": "eval_data", "tokenizer_dir": ""}})
    peft_model.save_pretrained(train_dir / "model")
    tokenizer.save_pretrained(train_dir / "model")
    write_json_atomic(train_dir / "manifest.json", {"step": "train", "fingerprint": "bench",
                      "inputs": {"harmony": str(harmony_dir)},
                      "output": {"model_dir": "model", "base_model": "in-memory", "base_revision": "", "method": "lora"}})
    base = peft_model.unload()  # the random base as built: LoRA layers removed, nothing merged
    del peft_model
    gc.collect()

    # One base per merge run, handed over and forgotten here: the merge folds the adapter into it in place.
    bases = [base.to(torch.bfloat16) if args.mxfp4_merge_dtype == "bfloat16" else base]
    del base
    merge.load_base = lambda *a, **k: bases.pop()
    write_times = []
    real_write = mxfp4.write_checkpoint

    def timed_write(model, tmp):
        t = time.monotonic()
        real_write(model, tmp)
        write_times.append(round(time.monotonic() - t, 1))
    mxfp4.write_checkpoint = timed_write

    def run_merge(export: str, dtype: str, tolerance: float) -> dict:
        out_dir = args.out / f"merge-{export}"
        cfg = merge.Config(model=model_cfg, dtype=dtype, device=args.device, export=export, probe_tolerance=tolerance,
                           min_retention=-1e9, num_probe_rows=args.num_eval_rows)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.monotonic()
        out = merge.run(cfg, out_dir=out_dir, inputs={"train": train_dir}, tracker=NullTracker())
        result = {"merge_dtype": dtype, "s": round(time.monotonic() - t, 1), "num_bytes": out.num_bytes, "fits_gpu": out.fits_gpu,
                  "num_files": len(list((out_dir / "model").glob("*.safetensors"))), "num_params": out.num_params,
                  "max_abs_logit_diff_vs_adapter": out.max_abs_logit_diff,
                  "reload_max_abs_logit_diff": out.reload_max_abs_logit_diff, **out.retention,
                  "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if args.device == "cuda" else 0}
        if export == "mxfp4":
            result["write_checkpoint_s"] = write_times[-1]
            layout, num_tensors = {}, 0
            for shard in sorted((out_dir / "model").glob("*.safetensors")):
                with safe_open(shard, "pt") as f:
                    num_tensors += len(f.keys())
                    for name in (n for n in f.keys() if n.startswith("model.layers.0.mlp.experts.")):
                        sl = f.get_slice(name)
                        layout[name.removeprefix("model.layers.0.mlp.experts.")] = [sl.get_dtype(), sl.get_shape()]
            result["layer0_experts_layout"] = dict(sorted(layout.items()))
            result["num_tensors"] = num_tensors
        return result

    summary["mxfp4"] = run_merge("mxfp4", args.mxfp4_merge_dtype, 0.1 if args.mxfp4_merge_dtype == "float32" else args.bf16_tolerance)
    log.info("bench: mxfp4 %s", summary["mxfp4"])
    write_json_atomic(args.out / "summary.json", summary)
    if not args.skip_bf16:
        import shutil

        shutil.rmtree(args.out / "merge-mxfp4" / "model")  # disk: the bf16 export alone is 42 GB
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        bases.append(build_base("bfloat16"))
        summary["bf16"] = run_merge("bf16", "bfloat16", args.bf16_tolerance)
        log.info("bench: bf16 %s", summary["bf16"])
    summary["total_s"] = round(time.monotonic() - t0, 1)
    write_json_atomic(args.out / "summary.json", summary)

    m = summary["mxfp4"]
    print("| export | merge step s | GB on disk | fits | eval loss |")
    print("|---|---|---|---|---|")
    if "bf16" in summary:
        b = summary["bf16"]
        print(f"| bf16 (bf16 merge; max logit diff vs adapter {b['max_abs_logit_diff_vs_adapter']:.3g}) | {b['s']} | "
              f"{b['num_bytes'] / 1e9:.2f} | {b['fits_gpu']} | |")
    print(f"| {m['merge_dtype']} merge (not written) | | | | {m['eval_loss_merged']:.4f} |")
    print(f"| mxfp4 | {m['s']} (write {m['write_checkpoint_s']}) | {m['num_bytes'] / 1e9:.2f} | {m['fits_gpu']} | "
          f"{m['eval_loss_mxfp4']:.4f} |")
    print(f"base eval loss {m['eval_loss_base']:.4f}; retention {m['retention']:.4f}; KL(merge||base) "
          f"{m['kl_merged_vs_base']:.4g}, KL(merge||mxfp4) {m['kl_mxfp4_vs_merged']:.4g}; train loss "
          f"{summary['train']['loss_first']} -> {summary['train']['loss_last']}")


if __name__ == "__main__":
    main()

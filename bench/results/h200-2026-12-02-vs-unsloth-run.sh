# nvidia-h200, 2026-12-02 (session 9, device call 3): (b) ours and (c) Unsloth side by side in one process, for both
# trainable sets: unsloth / step_mx = attention + the experts of layers 7/15/23 (the recipe's), unsloth_all /
# step_all_mx = attention + the experts of all 24 layers (Unsloth's notebook targets). Ours is configs/h100-lora.yaml
# with train.expert_weights=mxfp4 (all experts held in MXFP4, decoded by steps/mxfp4_gpu.py), expert LoRA inputs
# rebuilt in the backward pass. Unsloth as in h200-2026-12-01-unsloth-run.sh (own process, own packages, the bench
# model saved to /tmp/bench-ckpt). No reference recipe here (the device budget left no room for it): its figures are
# h200-2026-12-01-mxfp4-experts-summary.json's.
# From a copy of main carrying .whl/, .whl-unsloth/ and .benchdata/tokenizer.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TQDM_DISABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 UNSLOTH_DISABLE_STATISTICS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth .whl-unsloth/*.whl > /tmp/pip-unsloth.log 2>&1 || { tail -20 /tmp/pip-unsloth.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version from the installed metadata
printf "Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n" > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
tar xzf .benchdata/tokenizer.tgz -C .benchdata
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/u
timeout 575 python3 bench/train_throughput.py --out $OUT/u --configs unsloth_all,unsloth,step_all_mx,step_mx \
  --step-variant 'step_mx=train.expert_weights=mxfp4' \
  --step-variant 'step_all_mx=train.lora_expert_layers=all;train.expert_weights=mxfp4' \
  --no-parity --warmup-steps 2 --timed-steps 6 \
  --tokenizer-dir $PWD/.benchdata/tokenizer --ckpt-dir /tmp/bench-ckpt \
  --unsloth-site /tmp/site-unsloth --unsloth-work-dir /tmp/bench-unsloth-work --unsloth-timeout-s 230 \
  --stop-by-s 420 --deadline-s 520 2>&1 | tee $OUT/u/bench.log | grep -v "finetune INFO"

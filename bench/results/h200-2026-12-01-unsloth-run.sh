# nvidia-h200, one device call: (c) Unsloth 2026.10.9 on the bench's random-weight gpt-oss-20b (saved once as bf16
# safetensors to /tmp/bench-ckpt, loaded by Unsloth's FastLanguageModel in 16-bit), the same 1,000 rows, padded 4 x 4,
# 2 warm-up + 6 timed optimizer steps, for both trainable sets: `unsloth` = attention + experts of layers 7/15/23 (the
# recipe's), `unsloth_all` = attention + the experts of all 24 layers (Unsloth's notebook targets). Each in its own
# process with PYTHONPATH=/tmp/site-unsloth only (Unsloth pins transformers <= 5.17 and TRL <= 1.15: the image's own
# transformers 5.17 serves it); the parent runs on our stack (/tmp/site). Results h200-2026-12-01-unsloth*.
# From a copy of the repository carrying .whl/ (ours: transformers 5.23.0, trl 1.16.0, peft 0.21.2, datasets 5.2.0,
# dill, multiprocess, liger-kernel), .whl-unsloth/ (bench/unsloth_wheels.py: unsloth 2026.10.9 without studio/,
# unsloth_zoo 2026.10.9, bitsandbytes 0.50.2 with its cuda130 library only, trl 1.15.0, peft 0.21.2, datasets 4.8.5,
# dill, multiprocess, tyro, docstring_parser, typeguard, cut_cross_entropy, torchao 0.18.0, msgspec) and
# .benchdata/tokenizer.tgz (steps.tokenizer.offline_tokenizer_dir(), packed). Comes back: $OUT/u/{bench.log, summary.json,
# unsloth.json, unsloth_all.json}, $OUT/pip-unsloth.log.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TQDM_DISABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 UNSLOTH_DISABLE_STATISTICS=1
mkdir -p $OUT/u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth .whl-unsloth/*.whl > $OUT/pip-unsloth.log 2>&1 || { tail -20 $OUT/pip-unsloth.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version from the installed metadata
printf "Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n" > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
tar xzf .benchdata/tokenizer.tgz -C .benchdata
df -h /tmp | tail -1; free -g | head -2
export PYTHONPATH=/tmp/site:$PWD
timeout 540 python3 bench/train_throughput.py --out $OUT/u --configs unsloth_all,unsloth --no-parity \
  --warmup-steps 2 --timed-steps 6 --tokenizer-dir $PWD/.benchdata/tokenizer --ckpt-dir /tmp/bench-ckpt \
  --unsloth-site /tmp/site-unsloth --unsloth-work-dir /tmp/bench-unsloth-work --unsloth-timeout-s 260 \
  --stop-by-s 520 --deadline-s 480 2>&1 | tee $OUT/u/bench.log

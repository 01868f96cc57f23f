# nvidia-h200, 2026-12-01 (device call 9, the machine of call 8, packages installed there): in one process our train
# step (configs/h100-lora.yaml) with this branch's expert path ("step", first, cold) and with main 53b72cc's
# ("step_before", bench/experts_53b72cc.py), 8 steps + 1 profiled each; results h200-2026-12-01-ab*.
# From a copy of the branch carrying .whl/ (transformers 5.23.0, trl 1.16.0, peft 0.21.2, datasets 5.2.0, dill 0.4.1,
# multiprocess 0.70.19, liger-kernel 0.8.5; the image has torch 2.11.0+cu130, accelerate 1.15.0) and
# .benchdata/tokenizer (steps.tokenizer.offline_tokenizer_dir()).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version from the installed metadata
printf "Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n" > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
timeout 290 python3 bench/train_throughput.py --out $OUT/ab2 --configs step,step_before --step-variant 'step_before=' \
  --baseline-experts step_before --profile step,step_before --no-parity --warmup-steps 2 --timed-steps 6 \
  --tokenizer-dir $PWD/.benchdata/tokenizer --deadline-s 280

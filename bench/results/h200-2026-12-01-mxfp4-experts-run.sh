# nvidia-h200, 2026-12-01 (session 8, device call 1): LoRA with the frozen experts held in MXFP4
# (train.expert_weights=mxfp4, steps.modeling.pack_experts: decoded inside each grouped expert GEMM, forward and
# backward) against the bf16-held experts of `step`; the GPU tests first, then in one process (a) the reference recipe
# and (b) our train step: step_mx (experts of 7/15/23), step (the same, experts in bf16), step_all_mx (experts of all
# 24 layers), step_all_mx4k (that with 4,096-token packed rows x 4). Every model's random experts are MXFP4 values
# (bench/train_throughput.py round_experts_to_mxfp4; the step rounds its own draw the same way).
# From a copy of main carrying .whl/ (transformers 5.23.0, trl 1.16.0, peft 0.21.2, datasets 5.2.0, dill 0.4.1,
# multiprocess 0.70.19, liger-kernel 0.8.5; the image has torch 2.11.0+cu130, accelerate 1.15.0) and
# .benchdata/tokenizer.tgz (steps.tokenizer.offline_tokenizer_dir(), packed).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version from the installed metadata
printf "Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n" > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
tar xzf .benchdata/tokenizer.tgz -C .benchdata
export PYTHONPATH=/tmp/site:$PWD
timeout 130 python3 -m pytest -m gpu tests/test_modeling.py -k "mxfp4 or expert_lora" -q -s -p no:cacheprovider -W ignore 2>&1 | tee $OUT/gpu-tests.log
timeout 420 python3 bench/train_throughput.py --out $OUT/mx --configs ref,step_mx,step,step_all_mx,step_all_mx4k \
  --step-variant 'step_mx=train.expert_weights=mxfp4' \
  --step-variant 'step_all_mx=train.lora_expert_layers=all;train.expert_weights=mxfp4' \
  --step-variant 'step_all_mx4k=train.lora_expert_layers=all;train.expert_weights=mxfp4;train.max_length=4096;train.grad_accum_steps=4' \
  --profile step_all_mx --no-parity --warmup-steps 2 --timed-steps 6 \
  --tokenizer-dir $PWD/.benchdata/tokenizer --deadline-s 330 2>&1 | tee $OUT/bench.log

# nvidia-h200, 2026-12-01 (session 7, device call 3, right after call 2 on the same machine): LoRA on the experts inside the grouped GEMMs
# (steps.modeling.lora_experts) against PEFT's own expert LoRA (W + scale * A @ B built per forward); the GPU tests
# first, then in one process (a) the reference recipe with experts of layers 7/15/23 (ref) and of all 24 (ref_all),
# (b) our train step for both trainable sets, and step_peft_all = (b) all experts with PEFT's path.
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
timeout 150 python3 -m pytest -m gpu tests/test_modeling.py -q -s -p no:cacheprovider -W ignore 2>&1 | tee $OUT/gpu-tests.log
timeout 420 python3 bench/train_throughput.py --out $OUT/lx --configs ref,step,step_all,step_all_ckpt \
  --step-variant 'step_all=train.lora_expert_layers=all' --step-variant 'step_all_ckpt=train.lora_expert_layers=all;train.gradient_checkpointing=true' \
  --profile step_all --no-parity --warmup-steps 2 --timed-steps 6 \
  --tokenizer-dir $PWD/.benchdata/tokenizer --deadline-s 360 2>&1 | tee $OUT/bench.log

# One call on nvidia-h100-x1: (a) the reference recipe vs (b) our train step (configs/h100-lora.yaml, now with the
# fused expert activation) and two packing sizes, one GPU, one process; profile one extra step of step_8k.
# Run from the repo root with .whl and .benchdata carried.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
echo "pip done at $((SECONDS-T0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
TOK=$PWD/.benchdata/harmony/tokenizer
timeout 560 python3 bench/train_throughput.py --out $OUT/bench --configs ref,step,step_8k,step_16k --no-parity \
  --warmup-steps 2 --timed-steps 6 --tokenizer-dir $TOK --deadline-s 470 --profile step_8k \
  --step-variant 'step_8k=train.max_length=8192;train.grad_accum_steps=2' \
  --step-variant 'step_16k=train.max_length=16384;train.grad_accum_steps=1' 2>&1 | tee $OUT/bench.log | grep -v Warning
echo "bench rc=$? at $((SECONDS-T0)) s"

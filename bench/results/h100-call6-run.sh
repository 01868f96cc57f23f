# One call on nvidia-h100-x1, after the routing without scatter-adds and PEFT's input casts turned off: the GPU test
# of the fast experts, then (a) the reference recipe vs (b) our train step with configs/h100-lora.yaml (now packed
# 8k rows x grad-accum 2), and 4k / 16k packing beside it; one extra step of (b) profiled.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
echo "pip done at $((SECONDS-T0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 120 python3 -m pytest -m gpu tests/test_modeling.py -q -p no:cacheprovider 2>&1 | tail -5 | tee $OUT/gpu-tests.log
echo "gpu tests done at $((SECONDS-T0)) s"
TOK=$PWD/.benchdata/harmony/tokenizer
timeout $((560 - (SECONDS-T0))) python3 bench/train_throughput.py --out $OUT/bench --configs ref,step,step_4k,step_16k \
  --no-parity --warmup-steps 2 --timed-steps 6 --tokenizer-dir $TOK --deadline-s 420 --profile step \
  --step-variant 'step_4k=train.max_length=4096;train.grad_accum_steps=4' \
  --step-variant 'step_16k=train.max_length=16384;train.grad_accum_steps=1' 2>&1 | tee $OUT/bench.log | grep -v Warning
echo "bench rc=$? at $((SECONDS-T0)) s"

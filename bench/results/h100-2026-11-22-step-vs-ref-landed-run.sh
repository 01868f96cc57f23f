# One call on nvidia-h100-x1, on the landed code (after the review commit 34b0fe4): the GPU test of the fast experts,
# then (b) our train step with configs/h100-lora.yaml and (a) the reference recipe, nothing profiled.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
echo "pip done at $((SECONDS-T0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 150 python3 -m pytest -m gpu tests/test_modeling.py -q -s -p no:cacheprovider -W ignore > $OUT/gpu-tests.log 2>&1
echo "gpu tests rc=$? at $((SECONDS-T0)) s"; grep -E "loss fp32|passed|failed|Error|^E " $OUT/gpu-tests.log | head -20
TOK=$PWD/.benchdata/harmony/tokenizer
timeout $((570 - (SECONDS-T0))) python3 bench/train_throughput.py --out $OUT/bench --configs step,ref \
  --no-parity --warmup-steps 2 --timed-steps 6 --tokenizer-dir $TOK --deadline-s 400 > $OUT/bench.log 2>&1
echo "bench rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $OUT/bench.log

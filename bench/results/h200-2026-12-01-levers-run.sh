# One call on nvidia-h200: the GPU test of the fused expert path, then in one process (a) the reference recipe and our
# train step (configs/h100-lora.yaml) with the expert path of main 53b72cc ("step_before", the first run: cold, its
# set-up sampled every 5 s) and with this branch's ("step"), one extra step of each profiled.
# From a copy of the branch with .whl/ and .benchdata/tokenizer: bash bench/results/h200-2026-12-01-levers-run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, triton, pyarrow, fsspec, datasets, transformers, trl, peft, accelerate, liger_kernel; print('versions', torch.__version__, triton.__version__, 'pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__, 'datasets', datasets.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" || exit 4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "pip done at $((SECONDS-T0)) s"
timeout 110 python3 -m pytest -m gpu tests/test_modeling.py -q -s -p no:cacheprovider -W ignore > $OUT/gpu-tests.log 2>&1
echo "gpu tests rc=$? at $((SECONDS-T0)) s"; grep -E "loss fp32|passed|failed|Error|^E " $OUT/gpu-tests.log | head -20
timeout $((580 - (SECONDS-T0))) python3 bench/train_throughput.py --out $OUT/bench --configs step_before,step,ref \
  --step-variant 'step_before=' --baseline-experts step_before --profile step_before,step --stack-samples-s 5 \
  --no-parity --warmup-steps 2 --timed-steps 6 --tokenizer-dir $PWD/.benchdata/tokenizer --deadline-s 450 > $OUT/bench.log 2>&1
echo "bench rc=$? at $((SECONDS-T0)) s"; grep -E "^\||total wall" $OUT/bench.log
grep -E "finetune INFO train: (rows|model|LoRA|trainer|optimizer|step 1|seconds|compile)" $OUT/bench.log | cut -c1-260

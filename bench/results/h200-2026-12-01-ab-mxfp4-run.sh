# One call on nvidia-h200: (1) in one process, our train step (configs/h100-lora.yaml, 8 steps + 1 profiled) with the
# expert path of main 53b72cc ("step_before", bench/experts_53b72cc.py) and with this branch's ("step"); (2) the load
# of a random-content gpt-oss-20b checkpoint in the Hub's MXFP4 layout (bench/load_mxfp4.py).
# From a copy of the branch with .whl/ and .benchdata/tokenizer: bash bench/results/h200-2026-12-01-ab-mxfp4-run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version
printf 'Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n' > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
echo "pip done at $((SECONDS-T0)) s"
timeout 215 python3 bench/train_throughput.py --out $OUT/ab --configs step_before,step --step-variant 'step_before=' \
  --baseline-experts step_before --profile step_before,step --no-parity --warmup-steps 2 --timed-steps 6 \
  --tokenizer-dir $PWD/.benchdata/tokenizer --deadline-s 160 > $OUT/ab.log 2>&1
echo "ab rc=$? at $((SECONDS-T0)) s"; grep -E "^\||total wall" $OUT/ab.log
timeout 175 python3 bench/load_mxfp4.py --out $OUT/mx > /tmp/mx.log 2>&1
echo "mxfp4 rc=$? at $((SECONDS-T0)) s"; tail -40 /tmp/mx.log

# nvidia-h200, 2026-12-02 (session 9, device call 1), after h200-2026-12-01-mxfp4-experts-*: the expert LoRA's
# inputs rebuilt in the backward pass instead of kept (steps.modeling._LowRank) and the bit-assembled bf16 MXFP4
# decoder (steps.mxfp4.dequantize_mxfp4_bf16). The GPU tests; the two decoders timed on one gpt-oss-20b layer
# (bench/mxfp4_decode.py); then in one process step_mx (experts of 7/15/23 held in MXFP4), step_all_mx (all 24),
# step_all (all 24, experts in bf16), with a profile of one step_all_mx step; last, the load of a Hub-layout MXFP4
# gpt-oss-20b (random content), experts dequantized vs kept as stored (bench/load_mxfp4.py).
# Ran from 2614fa5 (branch mxfp4-recompute) without step_all. Outcome: the bit-assembled decoder was slower than the
# compiled lookup (0.942 vs 0.776 ms a layer) and was dropped; step_all_mx peaked at 38.1 GiB (15.1k tokens/s; the
# bench's 240 s timeout stopped it just after, before its summary: the numbers are its log lines); the packed load
# did not finish inside its 140 s timeout.
# From a copy of main carrying .whl/ and .benchdata/tokenizer.tgz, as h200-2026-12-01-mxfp4-experts-run.sh.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version from the installed metadata
printf "Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n" > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
tar xzf .benchdata/tokenizer.tgz -C .benchdata
export PYTHONPATH=/tmp/site:$PWD
timeout 100 python3 -m pytest -m gpu tests/test_modeling.py -q -s -p no:cacheprovider -W ignore 2>&1 | tee $OUT/gpu-tests.log
timeout 40 python3 bench/mxfp4_decode.py --out $OUT 2>&1 | tail -20
timeout 240 python3 bench/train_throughput.py --out $OUT/mx --configs step_mx,step_all_mx \
  --step-variant 'step_mx=train.expert_weights=mxfp4' \
  --step-variant 'step_all_mx=train.lora_expert_layers=all;train.expert_weights=mxfp4' \
  --profile step_all_mx --no-parity --warmup-steps 2 --timed-steps 6 \
  --tokenizer-dir $PWD/.benchdata/tokenizer --deadline-s 200 2>&1 | tee $OUT/bench.log | grep -v "finetune INFO"
timeout 140 python3 bench/load_mxfp4.py --out $OUT/load --modes dequantized,packed 2>&1 | tail -5

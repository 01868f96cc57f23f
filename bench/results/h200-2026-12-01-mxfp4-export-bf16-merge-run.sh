# Call 12 on nvidia-h200: call 11 again with the MXFP4 run merged in bf16 (--mxfp4-merge-dtype bfloat16, merge check at
# --bf16-tolerance): the eval loss of the bf16 merge (what the bf16 export holds) and the retention of MXFP4 rounded from it.
# Call 11: bench/export_mxfp4.py at the exact gpt-oss-20b shape (random base + a LoRA trained 60 steps),
# merge.export=mxfp4 then merge.export=bf16 through steps/merge.py. Run from a bundle of this branch (steps/, configs/,
# bench/, the carried wheels in whl/, the offline-built tokenizer gzipped in tokenizer/) copied to build/wt15 and carried.
# A first try (11a) stopped at the bf16 merge check (2.43 vs the adapter's 6.67); the MXFP4 run now merges in float32.
set -o pipefail
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/tok && cp tokenizer/* /tmp/tok/ && gunzip -f /tmp/tok/tokenizer.json.gz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; df -h . /tmp | tail -2; free -g | sed -n 2p
python3 -c "import torch, transformers, peft, datasets, pyarrow, huggingface_hub as h; print(torch.__version__, transformers.__version__, peft.__version__, datasets.__version__, pyarrow.__version__, h.__version__)"
# The larger of the working tree's disk and /tmp holds the exports (bf16 alone is 42 GB; skipped under 50 GB free).
free_here=$(df --output=avail -BG . | tail -1 | tr -dc 0-9); free_tmp=$(df --output=avail -BG /tmp | tail -1 | tr -dc 0-9)
D=/tmp/bench; FREE=$free_tmp; [ "$free_here" -gt "$free_tmp" ] && { D=$PWD/benchout; FREE=$free_here; }
EXTRA=""; [ "$FREE" -lt 50 ] && EXTRA="--skip-bf16"
echo "setup done at $((SECONDS-T0)) s; exports in $D ($FREE GB free) $EXTRA"
timeout $((585 - (SECONDS-T0))) python3 bench/export_mxfp4.py --out $D --tokenizer-dir /tmp/tok --train-steps 60 --lr 2e-4 --mxfp4-merge-dtype bfloat16 --skip-bf16 > $OUT/export.log 2>&1
echo "bench rc=$? at $((SECONDS-T0)) s"; cp $D/summary.json $OUT/ 2>/dev/null; grep -E "^\||^base eval|Error|error:" $OUT/export.log | tail -12

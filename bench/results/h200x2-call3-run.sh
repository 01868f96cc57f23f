# One call on nvidia-h200-x2: (1) FSDP2 full fine-tune on 2 GPUs, (2) bench ref vs our train step on GPU 0,
# (3) if time is left, LoRA under FSDP2. Run from the repo root: bash .benchdata/run_x2.sh
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
echo "pip done at $((SECONDS-T0)) s"
nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu --format=csv > $OUT/nvsmi.csv
nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader -l 3 >> $OUT/nvsmi.csv &
SMI=$!
R=/tmp/r
H=$PWD/.benchdata/harmony
TOK=$H/tokenizer
fsdp2() {  # name timeout overrides...
  local name=$1 limit=$2; shift 2
  echo "=== fsdp2 $name at $((SECONDS-T0)) s"
  timeout $limit python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m flows.cli step train \
    --config configs/8xh100-fsdp2.yaml --input harmony=$H --out $R/$name model.name=random model.tokenizer=$TOK \
    'model.random_shape={preset: gpt-oss-20b, num_hidden_layers: 2}' train.num_checkpoints_kept=1 "$@" \
    2>&1 | tee $OUT/fsdp2-$name.log
  echo "fsdp2 $name rc=$? at $((SECONDS-T0)) s" | tee -a $OUT/fsdp2-$name.log
  { echo "## find $R/$name -maxdepth 4"; find $R/$name -maxdepth 4 -printf '%s %p\n'; echo "## df"; df -h $R;
    echo "## manifest.json"; cat $R/$name/manifest.json; echo "## model/config.json"; cat $R/$name/model/config.json
    echo "## model/adapter_config.json"; cat $R/$name/model/adapter_config.json; } > $OUT/fsdp2-$name-files.txt 2>&1
}
fsdp2 full 220 train.max_steps=6 train.save_steps=6
rm -rf $R/full
echo "=== bench at $((SECONDS-T0)) s"
BL=$((545 - (SECONDS-T0))); [ $BL -gt 320 ] && BL=320
CUDA_VISIBLE_DEVICES=0 timeout $BL python3 bench/train_throughput.py --out $OUT/bench --configs ref,step --no-parity \
  --warmup-steps 2 --timed-steps 6 --tokenizer-dir $TOK 2>&1 | tee $OUT/bench.log
echo "bench rc=$? at $((SECONDS-T0)) s"
LEFT=$((540 - (SECONDS-T0)))
if [ $LEFT -gt 80 ]; then
  fsdp2 lora $LEFT train.method=lora train.learning_rate=2.0e-4 train.lora_expert_layers=all train.max_steps=4 train.save_steps=4
else
  echo "no time for the LoRA FSDP2 run ($LEFT s left)"
fi
kill $SMI
echo "=== summary at $((SECONDS-T0)) s"
grep -h -E "train: [0-9]+ steps in|rc=|Error" $OUT/fsdp2-*.log | grep -v Warning
python3 - <<'EOF'
import json, os
s = json.load(open(os.environ["OUT"] + "/bench/summary.json"))
for n, r in s["configs"].items():
    print(n, {k: r.get(k) for k in ("tokens_per_s", "peak_gib", "step_s", "first_step_s", "error")})
EOF

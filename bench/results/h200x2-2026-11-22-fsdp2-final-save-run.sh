# nvidia-h200-x2: FSDP2 full fine-tune, 2 layers at full gpt-oss-20b width, to confirm the final consolidated save.
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/r; H=$PWD/.benchdata/harmony
timeout 330 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m flows.cli step train \
  --config configs/8xh100-fsdp2.yaml --input harmony=$H --out $R/full model.name=random model.tokenizer=$H/tokenizer \
  'model.random_shape={preset: gpt-oss-20b, num_hidden_layers: 2}' train.num_checkpoints_kept=1 \
  train.max_steps=4 train.save_steps=4 2>&1 | grep -v -i warn | tee $OUT/fsdp2-full.log
echo "rc=$? at $((SECONDS-T0)) s" | tee -a $OUT/fsdp2-full.log
{ find $R/full -maxdepth 4 -printf '%s %p\n'; echo "## manifest.json"; cat $R/full/manifest.json; echo "## model/config.json"; cat $R/full/model/config.json; } > $OUT/fsdp2-full-files.txt 2>&1
python3 -c "
import json; m=json.load(open('$R/full/manifest.json'))['output']; print({k: m[k] for k in ('num_steps','train_loss_first','train_loss_last','tokens_per_s','peak_mem_gib','train_runtime_s')})" 2>&1
grep -E "^[0-9]+ .*(model/|checkpoint-4/[^/]+$)" $OUT/fsdp2-full-files.txt | head -20

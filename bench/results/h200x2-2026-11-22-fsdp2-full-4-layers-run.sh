# nvidia-h200-x2: configs/8xh100-fsdp2.yaml full fine-tune at gpt-oss-20b width with 4 layers (a second point for the
# per-layer memory slope; 2 layers was call 4), 3 steps, consolidated save, then the merge step on it (full: re-save
# in bf16, architectures fix, reload check).
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/r; H=$PWD/.benchdata/harmony
(while true; do echo "$(date +%T) $(free -m | awk '/Mem:/{print $3}') $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')"; sleep 2; done) > $OUT/mem.txt &
MEM=$!
timeout 360 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m flows.cli step train \
  --config configs/8xh100-fsdp2.yaml --input harmony=$H --out $R/full model.name=random model.tokenizer=$H/tokenizer \
  'model.random_shape={preset: gpt-oss-20b, num_hidden_layers: 4}' train.max_steps=3 train.save_steps=100 \
  2>&1 | grep -v -i warn | grep -v "^\s*$" > $OUT/fsdp2-full4.log
echo "train rc=$? at $((SECONDS-T0)) s"; grep -E "finetune INFO (train|step|model)|rror" $OUT/fsdp2-full4.log | sort -u | tail -8
timeout $((560 - (SECONDS-T0))) python3 -m flows.cli step merge --config configs/8xh100-fsdp2.yaml --input train=$R/full \
  --out $R/merged model.name=random model.tokenizer=$H/tokenizer merge.device=cuda 2>&1 | grep -v -i warn > $OUT/merge.log
echo "merge rc=$? at $((SECONDS-T0)) s"; grep -E "merge|rror" $OUT/merge.log | tail -5
kill $MEM
{ find $R -maxdepth 3 -printf '%s %p\n'; cat $R/merged/manifest.json; echo; cat $R/merged/model/config.json; } > $OUT/files.txt 2>&1
awk '{print $2}' $OUT/mem.txt | sort -n | tail -1 | sed 's/^/host MiB used, max: /'

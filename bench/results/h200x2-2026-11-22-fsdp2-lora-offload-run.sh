# nvidia-h200-x2 (2 x H200), after the fast-experts change:
#  A. LoRA under FSDP2 on 2 GPUs (no activation checkpointing), gpt-oss-20b width at 2 layers, then the merge step on
#     its adapter + saved random base (logit check, architectures fix, reload).
#  B. configs/120b-8xh100-fsdp2-offload.yaml: gpt-oss-120b width (128 experts) at 1 layer, full fine-tune with FSDP2
#     CPU offload, 2 steps; GPU peak per rank and host memory sampled every 2 s.
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -20 $OUT/pip.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/r; H=$PWD/.benchdata/harmony
(while true; do echo "$(date +%T) $(free -m | awk '/Mem:/{print $3}') $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')"; sleep 2; done) > $OUT/mem.txt &
MEM=$!
echo "=== A lora at $((SECONDS-T0)) s"
timeout 230 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m flows.cli step train \
  --config configs/8xh100-fsdp2.yaml --input harmony=$H --out $R/lora model.name=random model.tokenizer=$H/tokenizer \
  'model.random_shape={preset: gpt-oss-20b, num_hidden_layers: 2}' train.method=lora train.learning_rate=2.0e-4 \
  train.gradient_checkpointing=false train.max_steps=3 train.save_steps=3 train.num_checkpoints_kept=1 \
  2>&1 | grep -v -i warn | grep -v "^\s*$" > $OUT/fsdp2-lora.log
echo "A train rc=$? at $((SECONDS-T0)) s"; grep -E "finetune INFO (train|step)" $OUT/fsdp2-lora.log | sort -u | tail -8
timeout 120 python3 -m flows.cli step merge --config configs/8xh100-fsdp2.yaml --input train=$R/lora --out $R/lora-merged \
  model.name=random model.tokenizer=$H/tokenizer merge.device=cuda 2>&1 | grep -v -i warn | grep -E "merge|rror" | tail -6
echo "A merge rc=$? at $((SECONDS-T0)) s"
{ find $R/lora $R/lora-merged -maxdepth 3 -printf '%s %p\n'; cat $R/lora-merged/manifest.json; } > $OUT/fsdp2-lora-files.txt 2>&1
rm -rf $R/lora $R/lora-merged
echo "=== B 120b offload at $((SECONDS-T0)) s"
timeout $((575 - (SECONDS-T0))) python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m flows.cli step train \
  --config configs/120b-8xh100-fsdp2-offload.yaml --input harmony=$H --out $R/offload model.name=random \
  model.tokenizer=$H/tokenizer 'model.random_shape={preset: gpt-oss-120b, num_hidden_layers: 1}' \
  train.max_steps=2 train.save_steps=2 train.num_checkpoints_kept=1 \
  2>&1 | grep -v -i warn | grep -v "^\s*$" > $OUT/fsdp2-offload.log
echo "B rc=$? at $((SECONDS-T0)) s"; grep -E "finetune INFO (train|step|model)|rror" $OUT/fsdp2-offload.log | sort -u | tail -8
kill $MEM
{ find $R/offload -maxdepth 3 -printf '%s %p\n'; cat $R/offload/manifest.json; } > $OUT/fsdp2-offload-files.txt 2>&1
sort -k2 -n $OUT/mem.txt | tail -1 | sed 's/^/host MiB used (max), GPU MiB at that time: /'

# nvidia-h200, 2026-12-02 (session 9, device call 2): the expert LoRA's inputs rebuilt in the backward pass
# (steps.modeling._LowRank) and the Triton MXFP4 decoder (steps/mxfp4_gpu.py). The GPU tests; the compiled lookup and
# the Triton decoder timed on one gpt-oss-20b layer (bench/mxfp4_decode.py); then in one process step_mx (experts
# of 7/15/23 LoRA-trained, all held in MXFP4, with a profile of one step), step_all_mx (LoRA on the experts of all
# 24), and (c) Unsloth on the recipe's trainable set (h200-2026-12-01-unsloth-run.sh says how it is set up).
# Outcome: tests 4 passed; Triton decoder 0.545 ms a layer at 4096 bytes a program (0.570 at 2048, the default this
# ran with; the compiled lookup 0.756), the default then set to 4096; step_mx 17,954 tokens/s 35.82 GiB (one step
# profiled), step_all_mx 15,964 tokens/s 38.07 GiB; Unsloth was cut by the 430 s timeout (its save of the bench
# model took 63 s, its imports 44 s), so h200-2026-12-02-vs-unsloth-run.sh ran the comparison.
# From a copy of main carrying .whl/, .whl-unsloth/ and .benchdata/tokenizer.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TQDM_DISABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 UNSLOTH_DISABLE_STATISTICS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth .whl-unsloth/*.whl > /tmp/pip-unsloth.log 2>&1 || { tail -20 /tmp/pip-unsloth.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version from the installed metadata
printf "Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n" > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
tar xzf .benchdata/tokenizer.tgz -C .benchdata
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/b
timeout 90 python3 -m pytest -m gpu tests/test_mxfp4.py tests/test_modeling.py -q -s -p no:cacheprovider -W ignore 2>&1 | tee $OUT/gpu-tests.log
timeout 40 python3 bench/mxfp4_decode.py --out $OUT 2>&1 | tail -30
timeout 430 python3 bench/train_throughput.py --out $OUT/b --configs step_mx,step_all_mx,unsloth \
  --step-variant 'step_mx=train.expert_weights=mxfp4' \
  --step-variant 'step_all_mx=train.lora_expert_layers=all;train.expert_weights=mxfp4' \
  --profile step_mx --no-parity --warmup-steps 2 --timed-steps 6 \
  --tokenizer-dir $PWD/.benchdata/tokenizer --ckpt-dir /tmp/bench-ckpt \
  --unsloth-site /tmp/site-unsloth --unsloth-work-dir /tmp/bench-unsloth-work --unsloth-timeout-s 200 \
  --stop-by-s 420 --deadline-s 300 2>&1 | tee $OUT/b/bench.log | grep -v "finetune INFO"

# nvidia-h200, 2026-12-01 (device call 4): the GPU test of the expert path, result h200-2026-12-01-gpu-tests.log.
# (The call went on to a benchmark that sampled Python stacks with faulthandler.dump_traceback_later; the process
# segfaulted inside dynamo's frame evaluation in the first step, so that option was removed.)
# From a copy of the branch carrying .whl/ (transformers 5.23.0, trl 1.16.0, peft 0.21.2, datasets 5.2.0, dill 0.4.1,
# multiprocess 0.70.19, liger-kernel 0.8.5; the image has torch 2.11.0+cu130, accelerate 1.15.0) and
# .benchdata/tokenizer (steps.tokenizer.offline_tokenizer_dir()).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 3; }
mkdir -p /tmp/site/gpt_oss_finetune-0.1.0.dist-info  # flows.cli reads its own version from the installed metadata
printf "Metadata-Version: 2.1\nName: gpt-oss-finetune\nVersion: 0.1.0\n" > /tmp/site/gpt_oss_finetune-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
timeout 110 python3 -m pytest -m gpu tests/test_modeling.py -q -s -p no:cacheprovider -W ignore

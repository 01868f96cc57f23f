#!/usr/bin/env bash
# Creates or updates what prefect.yaml's deployments need on a Prefect API (PREFECT_API_URL, or the default profile's):
# the work pools of infra/prefect/pools.yaml, the variable finetune_image_tag and the failure automation of
# infra/prefect/automation-prod-failed.yaml. Safe to run again: everything is updated in place, nothing duplicated.
#   infra/prefect/setup.sh                       (defaults: infra/prefect/setup.env; the environment wins)
#   FINETUNE_RUNS_DIR=/data/runs FINETUNE_IMAGE_TAG=3f2a1c9e0b7d infra/prefect/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
while IFS= read -r line; do
    [[ "$line" =~ ^([A-Z_]+)=(.*)$ ]] || continue
    name=${BASH_REMATCH[1]}
    [ -n "${!name+set}" ] || eval "export $name=\"${BASH_REMATCH[2]}\""
done < infra/prefect/setup.env
if [ -z "$FINETUNE_IMAGE_TAG" ]; then
    FINETUNE_IMAGE_TAG=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
fi
export FINETUNE_IMAGE_TAG
exec "${PYTHON:-python}" infra/prefect/setup.py

# The train runtime: train and merge (pyproject extras `train` + `cuda` + `orchestration`). One file, two flavours:
#   images/build.sh train                  CUDA: FROM the PyTorch CUDA runtime image, keeping its torch
#   images/build.sh --local-base train     CPU: FROM a local Debian base, torch from the lock (the embedded default, CI)
#   docker run --rm --gpus all --shm-size 16g --user "$(id -u):$(id -g)" -v "$PWD/runs:/runs" finetune-train:0.1.0 \
#       finetune step train --config configs/h100-lora.yaml --input harmony=/runs/x/harmony --out /runs/x/train
# Production base by exact tag; production pins its digest at build time: BASE_IMAGE_TRAIN=name:tag@sha256:… images/build.sh
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG PIP_EXTRA_INDEX_URL=
# Everything down to the shared dependency layer is the same in the three Dockerfiles, so images built on one base
# share it and build it once; what differs comes after.
ENV PATH=/opt/venv/bin:$PATH HOME=/tmp XDG_CACHE_HOME=/cache HF_HOME=/cache/huggingface PYTHONUNBUFFERED=1
WORKDIR /opt/finetune
COPY images/install.sh /usr/local/bin/finetune-install
RUN finetune-install prepare
VOLUME ["/runs", "/cache/huggingface"]
USER finetune
COPY --chown=1000:1000 pyproject.toml requirements.lock /tmp/build/
# Prefect (a docker worker runs `prefect flow-run execute` in here) and the MLflow client.
RUN finetune-install deps orchestration
ARG EXTRAS=train,cuda
RUN finetune-install deps ${EXTRAS}
ENV FINETUNE_RUNTIME=train
CMD ["finetune", "--help"]
# The build context holds only the code, the profiles and the lock (.dockerignore): one layer, rebuilt on a change.
# Labels (version, git sha) come from `docker build --label` (images/build.sh).
COPY . /opt/finetune/

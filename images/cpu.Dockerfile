# The cpu runtime: fetch, harmony and push (pyproject extras `cpu` + `orchestration`).
#   images/build.sh cpu
#   docker run --rm --user "$(id -u):$(id -g)" --network host -v "$PWD/runs:/runs" finetune-cpu:0.1.0 \
#       finetune step fetch --config configs/tiny-cpu.yaml --out /runs/x/fetch
# Production base by exact tag; production pins its digest at build time: BASE_IMAGE_CPU=name:tag@sha256:… images/build.sh
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}
# torch is CPU-only here (the lock's torch==X+cpu lives on this index); --local-base bases carry the wheel instead.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
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
ARG EXTRAS=cpu
RUN finetune-install deps ${EXTRAS}
ENV FINETUNE_RUNTIME=cpu
CMD ["finetune", "--help"]
# The build context holds only the code, the profiles and the lock (.dockerignore): one layer, rebuilt on a change.
# Labels (version, git sha) come from `docker build --label` (images/build.sh).
COPY . /opt/finetune/

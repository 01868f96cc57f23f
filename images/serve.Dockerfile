# The serve runtime: smoke (pyproject extras `serve` + `orchestration`). One file, two flavours:
#   images/build.sh serve                  GPU: FROM the SGLang release image; SGLang runs on the image's own Python
#                                          (FINETUNE_SERVER_PYTHON), our CLI in /opt/venv beside it
#   images/build.sh --local-base serve     CPU: FROM a local Debian base; `transformers serve` (smoke.backend=transformers)
#                                          in /opt/venv (EXTRAS=serve,transformers-serve)
#   docker run --rm --gpus all --shm-size 16g --user "$(id -u):$(id -g)" -v "$PWD/runs:/runs" finetune-serve:0.1.0 \
#       finetune step smoke --config configs/h100-lora.yaml --input merge=/runs/x/merge --out /runs/x/smoke
# Production base by exact tag (SGLang 0.5.23, the pinned server); production pins its digest at build time:
# BASE_IMAGE_SERVE=lmsysorg/sglang:v0.5.23-cu129@sha256:… images/build.sh serve
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.23-cu129
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
ARG EXTRAS=serve
ARG SERVER_PYTHON=/usr/bin/python3
RUN finetune-install deps ${EXTRAS}
ENV FINETUNE_RUNTIME=serve FINETUNE_SERVER_PYTHON=${SERVER_PYTHON}
CMD ["finetune", "--help"]
# The build context holds only the code, the profiles and the lock (.dockerignore): one layer, rebuilt on a change.
# Labels (version, git sha) come from `docker build --label` (images/build.sh).
COPY . /opt/finetune/

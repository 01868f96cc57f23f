#!/bin/sh
# Run by the Dockerfiles, not by hand.
#   install.sh prepare          (as root) the user, the venv's folder and the folders any uid may write
#   install.sh deps EXTRAS      (as that user) pyproject extras at requirements.lock's versions, and `finetune`
# A base image that has torch (the CUDA PyTorch image, the SGLang image) keeps it: the lock pins the CPU build, so its
# torch line is dropped and pyproject's `torch==X.Y.Z` (which a `+cuXXX` build satisfies) decides.
set -eu
case "$1" in
prepare)
    useradd --uid 1000 --create-home --shell /bin/sh finetune
    mkdir -p /opt/venv /opt/finetune /runs /cache/huggingface/hub
    chown finetune /opt/venv
    # The container runs as the calling user (docker run --user "$(id -u):$(id -g)"), so any uid must write these.
    chmod 1777 /runs /cache /cache/huggingface /cache/huggingface/hub
    ;;
deps)
    extras=$2
    ctx=/tmp/build
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL  # an empty build arg means "no extra index"
    constraints=$ctx/requirements.lock
    if python3 -c 'import torch' 2>/dev/null; then
        grep -v '^torch==' "$ctx/requirements.lock" > /tmp/constraints.txt
        constraints=/tmp/constraints.txt
        venv_flags=--system-site-packages
    fi
    if [ ! -x /opt/venv/bin/python ]; then
        python3 -m venv ${venv_flags:-} /opt/venv
        /opt/venv/bin/pip install --no-cache-dir --quiet --upgrade pip==26.3
    fi
    # pyproject.toml alone (no code yet): pip installs the extras' dependencies and the `finetune` script; the code
    # arrives in the image's last layer and is found through finetune.pth, so a code change rebuilds one layer.
    /opt/venv/bin/pip install --no-cache-dir --quiet -c "$constraints" "$ctx[$extras]"
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo /opt/finetune > "$site/finetune.pth"
    rm -f /tmp/constraints.txt  # /tmp/build stays: each runtime layer installs from it again
    ;;
*)
    echo "install.sh: use 'prepare' or 'deps EXTRAS'" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Builds the step images, one per runtime, tagged finetune-<runtime>:<version> and finetune-<runtime>:<git sha>.
#   images/build.sh [--local-base] [cpu] [train] [serve]     (no names: all three)
# Without --local-base each image builds FROM its Dockerfile's pinned production base (a registry must be reachable):
# CUDA PyTorch for train, the SGLang release for serve, a slim Python for cpu.
# --local-base is for a machine with no image registry (CI, an offline laptop): it first builds a Debian base with
# debootstrap (python3, the host's CA bundle, the host's local pip wheels) and builds the CPU flavour of every image
# FROM it. Where no Docker engine answers and this runs as root, it starts one (overlay2 storage, vfs where overlay2
# cannot start; no bridge network: containers use --network host) and says how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."

local_base=0
runtimes=()
for arg in "$@"; do
    case "$arg" in
        --local-base) local_base=1 ;;
        cpu|train|serve) runtimes+=("$arg") ;;
        *) echo "images/build.sh: unknown argument '$arg'; use [--local-base] [cpu] [train] [serve]" >&2; exit 2 ;;
    esac
done
[ ${#runtimes[@]} -gt 0 ] || runtimes=(cpu train serve)

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
sha=$(git rev-parse --short=12 HEAD)
code=(steps flows configs images pyproject.toml requirements.lock)
[ -z "$(git status --porcelain -- "${code[@]}")" ] || sha="$sha-dirty-$(git diff HEAD -- "${code[@]}" | sha256sum | cut -c1-8)"

ENGINE_PID_FILE=/run/finetune-dockerd.pid
start_engine() {
    docker info >/dev/null 2>&1 && return
    if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null; then
        echo "images/build.sh: no Docker engine answers; start one (or install docker.io and run this as root)" >&2
        exit 1
    fi
    # vfs copies every layer whole (minutes per instruction for a 2 GB image): only where overlay2 cannot run.
    local driver
    for driver in overlay2 vfs; do
        nohup dockerd --storage-driver=$driver --iptables=false --bridge=none >/var/log/finetune-dockerd.log 2>&1 &
        echo $! > "$ENGINE_PID_FILE"
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && break 2
            kill -0 "$(cat $ENGINE_PID_FILE)" 2>/dev/null || break
            sleep 1
        done
        kill "$(cat $ENGINE_PID_FILE)" 2>/dev/null || true
        wait "$(cat $ENGINE_PID_FILE)" 2>/dev/null || true
    done
    docker info >/dev/null 2>&1 || { echo "images/build.sh: dockerd did not start; see /var/log/finetune-dockerd.log" >&2; exit 1; }
    echo "images/build.sh: started a Docker engine (pid $(cat $ENGINE_PID_FILE), $driver storage, no bridge network); stop it with: kill \$(cat $ENGINE_PID_FILE)"
}

# The local base: Debian bookworm (Python 3.11), tagged by a hash of this recipe so a changed recipe rebuilds it.
build_local_base() {
    local wheels=${PIP_FIND_LINKS:-}
    local recipe_hash
    recipe_hash=$(sed -n '/^build_local_base()/,/^}/p' "$0" | cat - <(ls "$wheels" 2>/dev/null) | sha256sum | cut -c1-12)
    LOCAL_BASE=finetune-base:bookworm-$recipe_hash
    if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        echo "images/build.sh: local base $LOCAL_BASE already built"
        return
    fi
    command -v debootstrap >/dev/null || { echo "images/build.sh: --local-base needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    local root
    root=$(mktemp -d)
    chmod 755 "$root"  # it becomes the image's /, which mktemp made private to root
    trap 'rm -rf "$root"' RETURN
    local started=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    # The host's CA bundle (it may carry a proxy's CA) and its local wheels (the CPU torch build) make pip work as here.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    local changes=(--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'ENV PIP_DEFAULT_TIMEOUT=180'
                   --change 'ENV PIP_DISABLE_PIP_VERSION_CHECK=1' --change 'CMD ["/bin/bash"]')
    if [ -n "$wheels" ] && [ -d "$wheels" ]; then
        mkdir -p "$root/opt/wheels" && cp "$wheels"/*.whl "$root/opt/wheels/"
        changes+=(--change 'ENV PIP_FIND_LINKS=/opt/wheels')
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import "${changes[@]}" - "$LOCAL_BASE" >/dev/null
    echo "images/build.sh: local base $LOCAL_BASE built in $((SECONDS - started)) s"
}

start_engine
build_args=()
if [ "$local_base" = 1 ]; then
    build_local_base
    build_args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE" --build-arg PIP_EXTRA_INDEX_URL=)
fi

mkdir -p build/images
for runtime in "${runtimes[@]}"; do
    args=("${build_args[@]}" --label "org.opencontainers.image.title=finetune-$runtime"
          --label "org.opencontainers.image.version=$version" --label "org.opencontainers.image.revision=$sha")
    pinned_base="BASE_IMAGE_${runtime^^}"
    [ -z "${!pinned_base:-}" ] || args+=(--build-arg "BASE_IMAGE=${!pinned_base}")
    if [ "$local_base" = 1 ]; then
        case "$runtime" in
            train) args+=(--build-arg EXTRAS=train) ;;
            serve) args+=(--build-arg EXTRAS=serve,transformers-serve --build-arg SERVER_PYTHON=/opt/venv/bin/python) ;;
        esac
    fi
    started=$SECONDS
    log=build/images/$runtime.log
    echo "images/build.sh: building finetune-$runtime (log: $log)"
    DOCKER_BUILDKIT=0 docker build --network host "${args[@]}" -f "images/$runtime.Dockerfile" \
        -t "finetune-$runtime:$version" -t "finetune-$runtime:$sha" . >"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; echo "images/build.sh: finetune-$runtime failed; the whole log is $log" >&2; exit 1; }
    size=$(docker image inspect "finetune-$runtime:$version" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}')
    echo "images/build.sh: finetune-$runtime:$version (= :$sha) built in $((SECONDS - started)) s, $size"
done

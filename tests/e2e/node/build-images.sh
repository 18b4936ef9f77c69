#!/usr/bin/env bash
# Builds the images the e2e tier's real node runs, with no container registry:
#
#   localhost/offload-base:bookworm  a root filesystem from Debian's packages (mmdebstrap):
#                                    python3, its venv module and the CA certificates
#   localhost/offload:<version>      the product image: the top-level Dockerfile on that base
#   localhost/offload-e2e-model:1    the CPU-burning model server (images/model), on that base
#   localhost/pause:<tag>            the pod sandbox's pause, a static binary compiled here
#                                    from build/pause/linux/pause.c of the Kubernetes module
#
# with buildah (daemonless), and exports each as an OCI archive under
#   ${OFFLOAD_E2E_CACHE:-$HOME/.cache/offload-e2e}/images/<name>-<image id>.tar
# for `ctr images import`. Layers are cached by buildah: a run with nothing changed takes
# seconds, a source change rebuilds the product's last layers only.
#
# Prints one line per image on stdout: "<image reference> <OCI archive>".
# Needs: buildah, mmdebstrap, gcc and libc6-dev (static pause), Go (to locate the Kubernetes
# module), PyPI (the image's Python dependencies), Debian's package mirror (the base).
#
# BASE_IMAGE=<ref> builds the product and model images on that base instead (e.g.
# docker.io/library/python:3.11-slim-bookworm, where a registry is reachable).
set -euo pipefail

# The CA bundle pip trusts in the build (this machine's, as pip here uses it).
PIP_CERT_HOST="${PIP_CERT:-$([[ -f /etc/ssl/certs/ca-certificates.crt ]] && echo /etc/ssl/certs/ca-certificates.crt)}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
CACHE="${OFFLOAD_E2E_CACHE:-$HOME/.cache/offload-e2e}"
OUT="$CACHE/images"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

KUBE_VERSION=v1.34.4
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
LOCAL_BASE="localhost/offload-base:$SUITE"
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml")"
PRODUCT="localhost/offload:$VERSION"
MODEL="localhost/offload-e2e-model:1"

log() { printf '[build-images.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in buildah mmdebstrap gcc flock; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y buildah mmdebstrap gcc libc6-dev"
done
[[ $(id -u) == 0 ]] || die "must run as root (buildah's storage, mmdebstrap)"

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

WORK="$(mktemp -d "$OUT/.work-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# The Debian root filesystem, made once per package list (about 40 s).
build_base() {
    local label="offload.e2e/packages=$SUITE:$BASE_PACKAGES"
    if image_exists "$LOCAL_BASE" &&
        [[ "$(buildah inspect --type image --format '{{index .ImageAnnotations "offload.e2e/packages"}}' "$LOCAL_BASE" 2>/dev/null)" == "$SUITE:$BASE_PACKAGES" ]]; then
        log "$LOCAL_BASE: cached"; return
    fi
    log "$LOCAL_BASE: mmdebstrap $SUITE with $BASE_PACKAGES"
    # The host's own apt sources (its mirror and the security suite).
    local sources="${OFFLOAD_APT_SOURCES:-}"
    if [[ -z "$sources" ]]; then
        if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then sources=/etc/apt/sources.list.d/debian.sources
        else sources=/etc/apt/sources.list; fi
    fi
    mmdebstrap --quiet --variant=essential --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
        "$SUITE" "$WORK/rootfs.tar" "$sources" >&2
    local ctr; ctr="$(buildah from scratch)"
    buildah add --quiet "$ctr" "$WORK/rootfs.tar" / >/dev/null
    buildah config --cmd '["python3"]' --env PATH=/usr/local/bin:/usr/bin:/bin \
        --annotation "$label" \
        --label org.opencontainers.image.title=offload-base \
        --label "org.opencontainers.image.description=Debian $SUITE with $BASE_PACKAGES, made by mmdebstrap" \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
}

build_product() {
    log "$PRODUCT: buildah build (base $BASE_IMAGE)"
    local revision created
    revision="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    created="$(git -C "$REPO" log -1 --format=%cI 2>/dev/null || echo 1970-01-01T00:00:00Z)"
    # --network host: pip reaches PyPI from the build container, trusting this machine's CAs
    # (mounted for the RUN steps only, never stored in a layer).
    local ca=/etc/ssl/certs/ca-certificates.crt
    buildah build --quiet --layers --network host -f "$REPO/Dockerfile" \
        ${PIP_CERT_HOST:+--volume "$PIP_CERT_HOST:$ca:ro"} \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION" \
        --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
        -t "$PRODUCT" "$REPO" >/dev/null
}

build_model() {
    log "$MODEL: buildah build"
    buildah build --quiet --layers --network none -f "$HERE/images/model/Containerfile" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$MODEL" "$HERE/images/model" >/dev/null
}

# pause: the tag and the C source come from the Kubernetes module the node is built from.
build_pause() {
    local src tag
    src="$("$GO" mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -f "$src/build/pause/linux/pause.c" ]] || die "no build/pause/linux/pause.c in k8s.io/kubernetes@$KUBE_VERSION"
    tag="$(sed -n 's/^TAG ?= //p' "$src/build/pause/Makefile")"
    PAUSE="localhost/pause:$tag"
    if image_exists "$PAUSE"; then log "$PAUSE: cached"; return; fi
    log "$PAUSE: gcc -static build/pause/linux/pause.c"
    gcc -Os -Wall -Werror -static -DVERSION="v$tag-$KUBE_VERSION" -o "$WORK/pause" "$src/build/pause/linux/pause.c"
    strip "$WORK/pause"
    local ctr; ctr="$(buildah from scratch)"
    buildah copy --quiet "$ctr" "$WORK/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 \
        --label org.opencontainers.image.title=pause \
        --label "org.opencontainers.image.description=Kubernetes $KUBE_VERSION build/pause, compiled here" "$ctr"
    buildah commit --quiet --rm "$ctr" "$PAUSE" >/dev/null
}

# One OCI archive per image id: an unchanged image is not exported again.
export_archive() {
    local ref="$1" id name archive
    id="$(buildah inspect --type image --format '{{.FromImageID}}' "$ref")"
    name="${ref#localhost/}"; name="${name%%:*}"
    archive="$OUT/$name-${id:0:16}.tar"
    if [[ ! -s "$archive" ]]; then
        find "$OUT" -maxdepth 1 -regextype egrep -regex ".*/$name-[0-9a-f]{16}\.tar" -delete
        buildah push --quiet "$ref" "oci-archive:$archive.partial:$ref" >/dev/null
        mv "$archive.partial" "$archive"
        log "$ref: exported to $archive"
    fi
    echo "$ref $archive"
}

start=$SECONDS
[[ "$BASE_IMAGE" != "$LOCAL_BASE" ]] || build_base
build_product
build_model
build_pause
log "product image $PRODUCT: $(buildah images --format '{{.Size}}' "$PRODUCT")"
for ref in "$PRODUCT" "$MODEL" "$PAUSE"; do export_archive "$ref"; done
log "images ready in $((SECONDS - start))s"

#!/usr/bin/env bash
# Builds the Kubernetes control plane used by the e2e tier from pinned Go modules.
#
# Every component is built in a small wrapper Go module (tests/e2e/controlplane/<name>/go.mod.in)
# into a cache outside the repository, keyed by name and version:
#     ${OFFLOAD_E2E_CACHE:-$HOME/.cache/offload-e2e}/<name>-<version>/bin/<binary>
# A binary that is already there is not rebuilt, so a second run takes seconds.
# The Go module and build caches are the default ones, so they are shared with other builds.
#
# Components: kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), etcd,
# kwok, helm, and for the real node kubernetes-node (kubelet, kube-proxy) and metrics-server.
# OFFLOAD_E2E_COMPONENTS="etcd kubernetes" builds only those (the default is all of them).
#
# Usage: build.sh            build whatever is missing, then print every binary's version
#        build.sh --print-bin-dirs   only print "<name> <bin dir>" lines (no build)
set -euo pipefail

KUBE_VERSION=v1.34.4    # native sidecars (restartable init containers) are GA since 1.33
ETCD_VERSION=v3.6.4     # the etcd that Kubernetes v1.34 pins (cluster/images/etcd LATEST_ETCD_VERSION)
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.19.5    # a Helm v3 built against the Kubernetes v1.34 client libraries
METRICS_SERVER_VERSION=v0.8.0  # the real node's metrics.k8s.io (kubelet /metrics/resource)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${OFFLOAD_E2E_CACHE:-$HOME/.cache/offload-e2e}"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
# Wrapper modules have no go.sum: let go resolve and record it (-mod=mod), whatever else GOFLAGS holds.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
export CGO_ENABLED="${CGO_ENABLED:-0}"

log() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bin_dir() { echo "$CACHE/$1-$2/bin"; }

require_go() {
    [[ -x "$GO" ]] || die "Go toolchain not found (looked for 'go' on PATH and /usr/local/go/bin/go); install Go >= 1.24"
    log "using $("$GO" version)"
}

# Module file of $1@$2, downloaded through the module proxy into the shared module cache.
module_gomod() {
    "$GO" mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p'
}
module_dir() {
    "$GO" mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

WORK_DIRS=()
cleanup() { [[ ${#WORK_DIRS[@]} -eq 0 ]] || rm -rf "${WORK_DIRS[@]}"; }
trap cleanup EXIT

# Writes a wrapper module in a fresh work dir from the template $HERE/<template>/go.mod.in,
# substituting @VERSION@ and @EXTRA@, and prints the work dir.
wrapper_module() {
    local template="$1" version="$2" extra="$3" work
    work="$(mktemp -d "$CACHE/.work-$template-XXXXXX")"
    sed -e "s|@VERSION@|$version|g" "$HERE/$template/go.mod.in" >"$work/go.mod"
    printf '%s\n' "$extra" >>"$work/go.mod"
    echo "$work"
}

# go build in wrapper module $1, binaries into $2, extra ldflags $3, packages after that.
go_build() {
    local work="$1" out="$2" ldflags="$3"; shift 3
    local tmp_out="$out.partial"
    rm -rf "$tmp_out" && mkdir -p "$tmp_out"
    (cd "$work" && "$GO" build -trimpath -ldflags "-s -w $ldflags" -o "$tmp_out/" "$@")
    mkdir -p "$out" && mv "$tmp_out"/* "$out"/ && rmdir "$tmp_out"
}

# ---- Kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl ----------

KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

kube_built() {
    local b
    for b in "${KUBE_BINARIES[@]}"; do [[ -x "$1/$b" ]] || return 1; done
}

# One "replace k8s.io/<staging> => k8s.io/<staging> v0.<minor>.<patch>" per staging module that
# the Kubernetes go.mod requires as v0.0.0 (it resolves them to ./staging in its own tree).
staging_replaces() {
    local gomod="$1" published="v0${KUBE_VERSION#v1}"
    echo "replace ("
    awk '/^require \(/{r=1; next} r && /^\)/{r=0} r && $2=="v0.0.0" {print $1}' "$gomod" |
        while read -r mod; do printf '\t%s => %s %s\n' "$mod" "$mod" "$published"; done
    echo ")"
}

# The etcd the Kubernetes release builds its etcd image with must be the one we build.
check_etcd_pin() {
    local src="$1" pinned
    pinned="$(sed -n 's/^LATEST_ETCD_VERSION?=//p' "$src/cluster/images/etcd/Makefile")"
    [[ "v$pinned" == "$ETCD_VERSION" ]] ||
        die "Kubernetes $KUBE_VERSION pins etcd v$pinned but ETCD_VERSION=$ETCD_VERSION: update build.sh"
}

kube_ldflags() {
    local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
    local pkg flags=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    echo "$flags"
}

build_kubernetes() {
    local out; out="$(bin_dir kubernetes "$KUBE_VERSION")"
    if kube_built "$out"; then
        log "kubernetes $KUBE_VERSION: cached in $out"; return
    fi
    log "kubernetes $KUBE_VERSION: building ${KUBE_BINARIES[*]} (the slow one: minutes on 2 cores)"
    local gomod src work godebug
    gomod="$(module_gomod k8s.io/kubernetes "$KUBE_VERSION")"
    src="$(module_dir k8s.io/kubernetes "$KUBE_VERSION")"
    check_etcd_pin "$src"
    godebug="$(grep '^godebug ' "$gomod" || true)"
    work="$(wrapper_module kubernetes "$KUBE_VERSION" "$godebug
$(staging_replaces "$gomod")")"
    WORK_DIRS+=("$work")
    go_build "$work" "$out" "$(kube_ldflags)" "${KUBE_BINARIES[@]/#/k8s.io/kubernetes/cmd/}"
}

# ---- the real node: kubelet and kube-proxy, same module, pins and ldflags as the control plane ----

KUBE_NODE_BINARIES=(kubelet kube-proxy)

kube_node_built() {
    local b
    for b in "${KUBE_NODE_BINARIES[@]}"; do [[ -x "$1/$b" ]] || return 1; done
}

build_kubernetes-node() {
    local out; out="$(bin_dir kubernetes-node "$KUBE_VERSION")"
    if kube_node_built "$out"; then
        log "kubernetes-node $KUBE_VERSION: cached in $out"; return
    fi
    log "kubernetes-node $KUBE_VERSION: building ${KUBE_NODE_BINARIES[*]} (minutes on 2 cores when cold)"
    local gomod work godebug
    gomod="$(module_gomod k8s.io/kubernetes "$KUBE_VERSION")"
    godebug="$(grep '^godebug ' "$gomod" || true)"
    work="$(wrapper_module kubernetes "$KUBE_VERSION" "$godebug
$(staging_replaces "$gomod")")"
    WORK_DIRS+=("$work")
    go_build "$work" "$out" "$(kube_ldflags)" "${KUBE_NODE_BINARIES[@]/#/k8s.io/kubernetes/cmd/}"
}

# ---- metrics-server ------------------------------------------------------------------------

build_metrics-server() {
    local out; out="$(bin_dir metrics-server "$METRICS_SERVER_VERSION")"
    if [[ -x "$out/metrics-server" ]]; then log "metrics-server $METRICS_SERVER_VERSION: cached in $out"; return; fi
    log "metrics-server $METRICS_SERVER_VERSION: building"
    local work; work="$(wrapper_module metrics-server "$METRICS_SERVER_VERSION" "")"
    WORK_DIRS+=("$work")
    local pkg=k8s.io/client-go/pkg/version  # where metrics-server's Makefile sets its version
    go_build "$work" "$out" "-X $pkg.gitVersion=$METRICS_SERVER_VERSION -X $pkg.buildDate=1970-01-01T00:00:00Z" \
        sigs.k8s.io/metrics-server/cmd/metrics-server
}

# ---- etcd --------------------------------------------------------------------------------

build_etcd() {
    local out; out="$(bin_dir etcd "$ETCD_VERSION")"
    if [[ -x "$out/etcd" ]]; then log "etcd $ETCD_VERSION: cached in $out"; return; fi
    log "etcd $ETCD_VERSION: building"
    local work; work="$(wrapper_module etcd "$ETCD_VERSION" "")"
    WORK_DIRS+=("$work")
    # The main package is the module root, so go names the binary "server".
    go_build "$work" "$out" "" go.etcd.io/etcd/server/v3
    mv "$out/server" "$out/etcd"
}

# ---- kwok ----------------------------------------------------------------------------------

build_kwok() {
    local out; out="$(bin_dir kwok "$KWOK_VERSION")"
    if [[ -x "$out/kwok" ]]; then log "kwok $KWOK_VERSION: cached in $out"; return; fi
    log "kwok $KWOK_VERSION: building"
    local work; work="$(wrapper_module kwok "$KWOK_VERSION" "")"
    WORK_DIRS+=("$work")
    go_build "$work" "$out" "" sigs.k8s.io/kwok/cmd/kwok
}

# ---- helm ----------------------------------------------------------------------------------

build_helm() {
    local out; out="$(bin_dir helm "$HELM_VERSION")"
    if [[ -x "$out/helm" ]]; then log "helm $HELM_VERSION: cached in $out"; return; fi
    log "helm $HELM_VERSION: building"
    local work; work="$(wrapper_module helm "$HELM_VERSION" "")"
    WORK_DIRS+=("$work")
    go_build "$work" "$out" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
        helm.sh/helm/v3/cmd/helm
}

print_bin_dirs() {
    echo "kubernetes $(bin_dir kubernetes "$KUBE_VERSION")"
    echo "etcd $(bin_dir etcd "$ETCD_VERSION")"
    echo "kwok $(bin_dir kwok "$KWOK_VERSION")"
    echo "helm $(bin_dir helm "$HELM_VERSION")"
    echo "kubernetes-node $(bin_dir kubernetes-node "$KUBE_VERSION")"
    echo "metrics-server $(bin_dir metrics-server "$METRICS_SERVER_VERSION")"
}

print_versions() {
    local k e w h
    k="$(bin_dir kubernetes "$KUBE_VERSION")"; e="$(bin_dir etcd "$ETCD_VERSION")"
    w="$(bin_dir kwok "$KWOK_VERSION")"; h="$(bin_dir helm "$HELM_VERSION")"
    echo "kube-apiserver:          $("$k/kube-apiserver" --version)"
    echo "kube-controller-manager: $("$k/kube-controller-manager" --version)"
    echo "kube-scheduler:          $("$k/kube-scheduler" --version)"
    echo "kubectl:                 $("$k/kubectl" version --client 2>/dev/null | head -1)"
    echo "etcd:                    $("$e/etcd" --version | head -1)"
    echo "kwok:                    $("$w/kwok" --version 2>&1 | head -1)"
    echo "helm:                    $("$h/helm" version --short)"
    local n m
    n="$(bin_dir kubernetes-node "$KUBE_VERSION")"; m="$(bin_dir metrics-server "$METRICS_SERVER_VERSION")"
    echo "kubelet:                 $("$n/kubelet" --version)"
    echo "kube-proxy:              $("$n/kube-proxy" --version)"
    echo "metrics-server:          $("$m/metrics-server" --version 2>&1 | head -1)"
}

main() {
    if [[ "${1:-}" == "--print-bin-dirs" ]]; then print_bin_dirs; return; fi
    mkdir -p "$CACHE"
    # One build at a time per cache (a developer's and a CI run may overlap).
    exec 9>"$CACHE/.lock"
    flock 9
    local start=$SECONDS components="${OFFLOAD_E2E_COMPONENTS:-kubernetes etcd kwok helm kubernetes-node metrics-server}" c
    local need_go=0
    for c in $components; do
        case "$c" in
            kubernetes) kube_built "$(bin_dir kubernetes "$KUBE_VERSION")" || need_go=1 ;;
            etcd) [[ -x "$(bin_dir etcd "$ETCD_VERSION")/etcd" ]] || need_go=1 ;;
            kwok) [[ -x "$(bin_dir kwok "$KWOK_VERSION")/kwok" ]] || need_go=1 ;;
            helm) [[ -x "$(bin_dir helm "$HELM_VERSION")/helm" ]] || need_go=1 ;;
            kubernetes-node) kube_node_built "$(bin_dir kubernetes-node "$KUBE_VERSION")" || need_go=1 ;;
            metrics-server) [[ -x "$(bin_dir metrics-server "$METRICS_SERVER_VERSION")/metrics-server" ]] || need_go=1 ;;
            *) die "unknown component $c" ;;
        esac
    done
    [[ $need_go == 0 ]] || require_go
    for c in $components; do "build_$c"; done
    log "all components ready in $((SECONDS - start))s under $CACHE"
    [[ -n "${OFFLOAD_E2E_COMPONENTS:-}" ]] || print_versions
}

main "$@"

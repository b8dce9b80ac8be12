#!/usr/bin/env bash
# The Sluice demo: a stable and a canary upstream, Envoy running Sluice with
# envoy/examples/sluice.yaml, and simulated users whose routing is shown live.
#
#   bash scripts/demo.sh                 # ~18 s of traffic
#   DEMO_SECONDS=30 DEMO_RPS=500 bash scripts/demo.sh
#
# Ports (fixed by the example config): Envoy 127.0.0.1:10000, admin :9901,
# upstreams shop_v1 (stable) :9001 and shop_v2 (canary) :9002.
# Every process it starts is stopped when it exits, however it exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEMO_SECONDS="${DEMO_SECONDS:-18}"
DEMO_RPS="${DEMO_RPS:-300}"
DEMO_USERS="${DEMO_USERS:-1500}"
RUN="$ROOT/envoy/.run/demo"

say() { printf '\033[1mdemo:\033[0m %s\n' "$*"; }

# Tools and builds.
bash scripts/setup.sh
say "building sluice.wasm (release) and the demo binaries"
cargo build --quiet --release --target wasm32-wasip1 -p sluice
cargo build --quiet -p sluice-envoy --bins
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET" in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac
WASM="$TARGET/wasm32-wasip1/release/sluice.wasm"
BIN="$TARGET/debug"
ENVOY="$(ls "$ROOT"/.venv/lib/python3*/site-packages/envoy/_bin/envoy | head -n1)"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in 10000 9901 9001 9002; do
    if port_busy "$p"; then
        echo "demo: port $p on 127.0.0.1 is in use (another demo running?); stop it first" >&2
        exit 1
    fi
done

PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ "$rc" = 0 ] || say "logs: $RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$RUN" && mkdir -p "$RUN"
# The example loads the wasm by a path relative to the repo root; use the
# absolute path of the one just built.
sed "s#filename: target/wasm32-wasip1/release/sluice.wasm#filename: $WASM#" \
    envoy/examples/sluice.yaml >"$RUN/sluice.yaml"

say "starting upstreams: stable on :9001, canary on :9002"
"$BIN/sluice-upstream" --name stable --port 9001 >"$RUN/stable.log" 2>&1 &
PIDS+=($!)
"$BIN/sluice-upstream" --name canary --port 9002 >"$RUN/canary.log" 2>&1 &
PIDS+=($!)

say "starting Envoy 1.40 with envoy/examples/sluice.yaml (2 workers), log in $RUN/envoy.log"
"$ENVOY" -c "$RUN/sluice.yaml" --concurrency 2 --disable-hot-restart \
    >"$RUN/envoy.log" 2>&1 &
PIDS+=($!)

say "sending ${DEMO_SECONDS}s of traffic from ${DEMO_USERS} users at ~${DEMO_RPS} req/s to shop.local"
echo
if ! "$BIN/sluice-demo" --addr 127.0.0.1:10000 --admin 127.0.0.1:9901 --host shop.local \
    --seconds "$DEMO_SECONDS" --rps "$DEMO_RPS" --users "$DEMO_USERS" --wait-ready 30; then
    echo
    say "the demo saw problems; last Envoy log lines:"
    tail -n 15 "$RUN/envoy.log" >&2
    exit 1
fi

#!/usr/bin/env bash
# The Sluice demo, in two acts (about 50 s of traffic in all):
#
#   act 1  the live split: a stable and a canary upstream, Envoy running Sluice
#          with envoy/examples/sluice.yaml, and simulated users whose routing
#          is shown live (~18 s).
#   act 2  zero-downtime changes: Envoy takes its listener, and with it Sluice's
#          config, from a watched file (file-based LDS,
#          envoy/examples/sluice-lds-bootstrap.yaml + sluice-lds-listener.yaml).
#          While users send steady traffic, the demo switches blue→green,
#          promotes a canary 5 → 25 → 50 → 100 %, and pushes a config with a
#          typo that Envoy refuses while the previous one keeps serving; each
#          change is a new file renamed over the watched one. It ends with the
#          count of failed requests, which must be 0 (~28 s).
#
#   bash scripts/demo.sh                                  # both acts
#   DEMO_SECONDS=30 DEMO_RPS=500 bash scripts/demo.sh     # act 1 longer, more traffic (both acts)
#   DEMO_ACTS=2 bash scripts/demo.sh                      # only act 2 (or DEMO_ACTS=1)
#   DEMO_STEP_SECONDS=6 bash scripts/demo.sh              # act 2: time between pushes (3.5)
#   DEMO_PROMOTION=rollout bash scripts/demo.sh           # act 2: one push of a `rollout`
#                                                         # block that Sluice steps by itself
#
# Ports (fixed by the example configs), all on 127.0.0.1:
#   act 1: Envoy :10000, admin :9901, upstreams shop_v1 (stable) :9001, shop_v2 (canary) :9002
#   act 2: Envoy :10100, admin :9911, upstreams shop_v1 (blue) :9101, shop_v2 (green) :9102,
#          shop_v3 (the next version) :9103
# Every process it starts is stopped when it exits, however it exits
# (including Ctrl-C); without a terminal it prints a line a second instead of
# the live tables. Exit status: 0 when both acts saw no problem.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEMO_SECONDS="${DEMO_SECONDS:-18}"
DEMO_RPS="${DEMO_RPS:-300}"
DEMO_USERS="${DEMO_USERS:-1500}"
DEMO_ACTS="${DEMO_ACTS:-1 2}"
DEMO_STEP_SECONDS="${DEMO_STEP_SECONDS:-3.5}"
DEMO_PROMOTION="${DEMO_PROMOTION:-manual}"
DEMO_DRAIN_SECONDS="${DEMO_DRAIN_SECONDS:-2}"
RUN="$ROOT/envoy/.run/demo"

say() { printf '\033[1mdemo:\033[0m %s\n' "$*"; }
act() { case " $DEMO_ACTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
case "$DEMO_PROMOTION" in manual | rollout) ;; *)
    echo "demo: DEMO_PROMOTION must be manual or rollout" >&2
    exit 2
    ;;
esac

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
PORTS=()
act 1 && PORTS+=(10000 9901 9001 9002)
act 2 && PORTS+=(10100 9911 9101 9102 9103)
for p in "${PORTS[@]}"; do
    if port_busy "$p"; then
        echo "demo: port $p on 127.0.0.1 is in use (another demo running?); stop it first" >&2
        exit 1
    fi
done

PIDS=()
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    local rc=$?
    stop_all
    [ "$rc" = 0 ] || say "logs: $RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Runs a command to completion, but in the background: `wait` lets the INT and
# TERM traps (and so the cleanup) run at once, where a foreground command
# would first have to finish.
run() {
    "$@" &
    local pid=$!
    PIDS+=("$pid")
    wait "$pid"
}

rm -rf "$RUN" && mkdir -p "$RUN"

# ---- act 1: the live split ------------------------------------------------
if act 1; then
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
    if ! run "$BIN/sluice-demo" --addr 127.0.0.1:10000 --admin 127.0.0.1:9901 --host shop.local \
        --seconds "$DEMO_SECONDS" --rps "$DEMO_RPS" --users "$DEMO_USERS" --wait-ready 30; then
        echo
        say "the demo saw problems; last Envoy log lines:"
        tail -n 15 "$RUN/envoy.log" >&2
        exit 1
    fi
    stop_all
fi

# ---- act 2: zero-downtime changes over file-based LDS ---------------------
if act 2; then
    LDS_DIR="$RUN/lds"
    mkdir -p "$LDS_DIR"
    # The watched file lives in a directory of its own: each push writes a
    # temp file there and renames it over listener.yaml (an atomic replace,
    # which is what Envoy's watch reacts to). The copies differ from the
    # examples only in two paths: the wasm (absolute) and the watched file.
    sed "s#filename: target/wasm32-wasip1/release/sluice.wasm#filename: $WASM#" \
        envoy/examples/sluice-lds-listener.yaml >"$LDS_DIR/listener.yaml"
    sed "s#path: envoy/examples/sluice-lds-listener.yaml#path: $LDS_DIR/listener.yaml#" \
        envoy/examples/sluice-lds-bootstrap.yaml >"$RUN/lds-bootstrap.yaml"

    echo
    say "act 2: zero-downtime changes. Envoy takes its listener (and Sluice's config) from"
    say "  $LDS_DIR/listener.yaml, a watched file (file-based LDS); each change below is"
    say "  written to a temp file in that directory and renamed over it, while users keep sending."
    # `envoy --mode validate` does not read an LDS file; sluice-lds-check
    # validates the bootstrap with the listener file as a static listener.
    "$BIN/sluice-lds-check" "$RUN/lds-bootstrap.yaml" | sed 's/^/  /'

    say "starting upstreams: shop_v1 (blue) :9101, shop_v2 (green) :9102, shop_v3 (next) :9103"
    for v in 1 2 3; do
        "$BIN/sluice-upstream" --name "shop_v$v" --port "910$v" >"$RUN/shop_v$v.log" 2>&1 &
        PIDS+=($!)
    done

    # --drain-time-s: after a push, keep-alive connections opened earlier stay
    # on the previous filter chain (and the previous Sluice config) until
    # Envoy drains them: during the drain time it asks HTTP/1.1 clients to
    # close (`connection: close`) and closes what is left at its end. The
    # default, 600 s, would mix old and new configs for minutes; 2 s lets each
    # shift show within a second or two. Draining never fails a request: the
    # requests on an old connection complete, new ones go to the new chain.
    say "starting Envoy 1.40 with envoy/examples/sluice-lds-bootstrap.yaml (--drain-time-s $DEMO_DRAIN_SECONDS), log in $RUN/envoy-lds.log"
    "$ENVOY" -c "$RUN/lds-bootstrap.yaml" --concurrency 2 --disable-hot-restart \
        --drain-time-s "$DEMO_DRAIN_SECONDS" >"$RUN/envoy-lds.log" 2>&1 &
    PIDS+=($!)

    say "users: ${DEMO_USERS} at ~${DEMO_RPS} req/s to shop.local, sticky by x-user-id; a push every ${DEMO_STEP_SECONDS}s ($DEMO_PROMOTION promotion)"
    echo
    if ! run "$BIN/sluice-demo-lds" --lds "$LDS_DIR/listener.yaml" --envoy-log "$RUN/envoy-lds.log" \
        --addr 127.0.0.1:10100 --admin 127.0.0.1:9911 --host shop.local \
        --promotion "$DEMO_PROMOTION" --step-seconds "$DEMO_STEP_SECONDS" \
        --drain-seconds "$DEMO_DRAIN_SECONDS" --rps "$DEMO_RPS" --users "$DEMO_USERS" \
        --wait-ready 30; then
        echo
        say "act 2 saw problems; last Envoy log lines:"
        tail -n 15 "$RUN/envoy-lds.log" >&2
        exit 1
    fi
    stop_all
fi

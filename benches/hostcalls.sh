#!/usr/bin/env bash
# What each kind of proxy-wasm host call costs in Envoy (V8), on this
# machine: a probe module (benches/hostcall-probe) makes N calls of one kind
# per request, and Envoy's CPU per request is compared with the probe making
# none. Writes benches/results/hostcalls.md.
#
#   bash benches/hostcalls.sh              # 2 rounds of 8 s per kind (~4 min)
#   bash benches/hostcalls.sh 5 1          # seconds per run, rounds
#
# One Envoy worker on CPU 1; wrk (16 connections) and a direct_response
# upstream on CPU 0. CPU per request is Envoy's user+system time over the
# requests served, so it does not depend on how the scheduler shares the
# machine; it still varies by several percent between runs on a shared host:
# read the per-call costs as a few tenths of a microsecond, not exactly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_PER_RUN="${1:-8}"
ROUNDS="${2:-2}"

bash scripts/setup.sh >/dev/null
command -v wrk >/dev/null || { echo "hostcalls.sh: wrk is missing (apt-get install wrk)" >&2; exit 1; }
cargo build --quiet --release --target wasm32-wasip1 -p sluice-hostcall-probe
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET" in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac
PROBE="$TARGET/wasm32-wasip1/release/sluice_hostcall_probe.wasm"
ENVOY="$ROOT/.venv/bin/envoy"
WORK="$TARGET/sluice-hostcalls"
rm -rf "$WORK" && mkdir -p "$WORK"

read -r UP_PORT PROXY_PORT UP_ADMIN PROXY_ADMIN < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

HCM='"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager'
ROUTER='- name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router'
# One Envoy bootstrap: admin on $1, a listener named $2 on $3 whose HTTP
# connection manager runs the filters $4 (YAML lines, may be empty) before the
# router and answers every path with the route action $5; then $6 (clusters).
bootstrap() {
    cat <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $1 } }
static_resources:
  listeners:
  - name: $2
    address: { socket_address: { address: 127.0.0.1, port_value: $3 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          $HCM
          stat_prefix: $2
          http_filters:
$4          $ROUTER
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                $5
EOF
    printf '%s' "$6"
}

bootstrap "$UP_ADMIN" upstream "$UP_PORT" "" \
    'direct_response: { status: 200, body: { inline_string: "ok\n" } }' "" >"$WORK/upstream.yaml"

proxy_yaml() { # $1: the probe's configuration, "<kind>:<n>"
    bootstrap "$PROXY_ADMIN" proxy "$PROXY_PORT" "          - name: envoy.filters.http.wasm
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: probe
                root_id: probe
                configuration:
                  \"@type\": type.googleapis.com/google.protobuf.StringValue
                  value: \"$1\"
                vm_config:
                  vm_id: probe
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: \"$PROBE\" } }
" 'route: { cluster: upstream, timeout: 5s }' "  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UP_PORT } } }
"
}

# The same request as benches/load.sh sends: 8 headers, a cookie, a user id.
cat >"$WORK/request.lua" <<'EOF'
wrk.method = "GET"
wrk.path = "/api/items?page=2"
wrk.headers["Host"] = "shop.local"
wrk.headers["user-agent"] = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
wrk.headers["accept"] = "application/json"
wrk.headers["cookie"] = "session=3f2a9c; theme=dark"
wrk.headers["x-user-id"] = "user-42"
EOF

envoy_pid() { # the Envoy process started with config $1
    for pid in $(pgrep -f -- "$1"); do
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = envoy ]; then echo "$pid"; return; fi
    done
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

wait_ready() { # port
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$1/" && return
        sleep 0.1
    done
    echo "hostcalls.sh: nothing answers on port $1" >&2
    exit 1
}

taskset -c 0 "$ENVOY" -c "$WORK/upstream.yaml" --concurrency 1 --base-id 31 -l error \
    >"$WORK/upstream.log" 2>&1 &
UPSTREAM_WRAPPER=$!
trap 'kill $UPSTREAM_WRAPPER $(envoy_pid "$WORK/upstream.yaml") 2>/dev/null || true' EXIT
wait_ready "$UP_PORT"

KINDS="${SLUICE_HOSTCALL_KINDS:-none:0 clock:20 metric:20 replace:20 hvalue:20 pairs:10 setpairs:10 sget:20 sset:20 prop:20 propflags:20 plainheaders:1 retryheaders:1}"
HZ="$(getconf CLK_TCK)"
: >"$WORK/runs.txt"
for round in $(seq "$ROUNDS"); do
    for plan in $KINDS; do
        config="$WORK/proxy-${plan%%:*}.yaml"
        proxy_yaml "$plan" >"$config"
        taskset -c 1 "$ENVOY" -c "$config" --concurrency 1 --base-id 32 -l error \
            >"$WORK/proxy-${plan%%:*}.log" 2>&1 &
        wrapper=$!
        wait_ready "$PROXY_PORT"
        pid="$(envoy_pid "$config")"
        taskset -c 0 wrk -t1 -c16 -d2s -s "$WORK/request.lua" "http://127.0.0.1:$PROXY_PORT" >/dev/null
        before="$(cpu_ticks "$pid")"
        out="$(taskset -c 0 wrk -t1 -c16 -d"${SECONDS_PER_RUN}s" -s "$WORK/request.lua" \
            "http://127.0.0.1:$PROXY_PORT")"
        after="$(cpu_ticks "$pid")"
        requests="$(echo "$out" | awk '/requests in/ { print $1 }')"
        echo "$round $plan $requests $((after - before))" | tee -a "$WORK/runs.txt"
        kill "$pid" 2>/dev/null || true
        wait "$wrapper" 2>/dev/null || true
    done
done

OUT=benches/results/hostcalls.md
python3 - "$WORK/runs.txt" "$HZ" "$OUT" "$SECONDS_PER_RUN" "$ROUNDS" <<'EOF'
import statistics, sys, datetime
runs, hz, out, seconds, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
per_req = {}
for line in open(runs):
    _, plan, requests, ticks = line.split()
    per_req.setdefault(plan, []).append(int(ticks) * 1e6 / hz / int(requests))
base = statistics.median(per_req["none:0"])
lines = [
    "# What a host call costs in Envoy",
    "",
    f"Generated by `bash benches/hostcalls.sh {seconds} {rounds}` on "
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: Envoy 1.40 (V8), one worker; "
    "the probe module (`benches/hostcall-probe`) makes N calls of one kind per request. "
    "Per call = (CPU per request − the probe making none) ÷ N. A call that returns a buffer "
    "includes the host's `malloc` callback into the module. Median over rounds; expect a few "
    "tenths of a microsecond of noise.",
    "",
    "| call | N per request | Envoy CPU µs/request | per call, µs |",
    "|---|---:|---:|---:|",
]
names = {
    "none": "(none: the probe's own floor)",
    "clock": "`proxy_get_current_time_nanoseconds`",
    "metric": "`proxy_increment_metric`",
    "replace": "`proxy_replace_header_map_value` (one request header)",
    "hvalue": "`proxy_get_header_map_value` (`:path`)",
    "pairs": "`proxy_get_header_map_pairs` (all request headers)",
    "setpairs": "`get_header_map_pairs` + `proxy_set_header_map_pairs` (the whole map back)",
    "sget": "`proxy_get_shared_data` (200 bytes)",
    "sset": "`proxy_set_shared_data` (200 bytes)",
    "prop": "`proxy_get_property` `upstream.request_attempt_count`",
    "propflags": "`proxy_get_property` `response.flags`",
    "plainheaders": "four header replaces Envoy ignores (per set of four)",
    "retryheaders": "Sluice's four retry headers: Envoy then arms retries and a per-try timeout (per set)",
    "clearroute": "`proxy_call_foreign_function` `clear_route_cache`",
}
for plan, values in per_req.items():
    kind, n = plan.split(":")
    median = statistics.median(values)
    cost = "" if int(n) == 0 else f"{(median - base) / int(n):.2f}"
    lines.append(f"| {names.get(kind, kind)} | {n} | {median:.1f} | {cost} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "hostcalls.sh: wrote $OUT"

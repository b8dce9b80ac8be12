"""A real gRPC client (grpcio) for Sluice's Envoy tests: N unary calls of
/echo.Echo/Say over ONE channel (one HTTP/2 connection to Envoy), then one
machine-readable line:

    SUMMARY {"calls": N, "ok": .., "codes": {"UNAVAILABLE": ..}, "servers": {..}, ...}

    python client.py --target 127.0.0.1:10000 --calls 200
        [--parallel 1] [--timeout-ms 0] [--interval-ms 0]
        [--users 0] [--metadata k=v ...] [--authority host]
        [--cancel-after-ms 0]

--parallel K keeps K calls in flight on the one connection (K HTTP/2
streams); --users U sends `x-user-id: u<i % U>` with call i; --timeout-ms
sets a deadline (grpc-timeout) on every call. The summary lists, in order,
each call's result (`codes_in_order`: the status name, or the answering
server for OK), and for failures a sample of details and trailing metadata.
"""

import argparse
import json
import sys
import threading
import time

import grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--timeout-ms", type=int, default=0)
    parser.add_argument("--interval-ms", type=int, default=0)
    parser.add_argument("--users", type=int, default=0)
    parser.add_argument("--metadata", action="append", default=[])
    parser.add_argument("--authority", default="")
    parser.add_argument("--cancel-after-ms", type=int, default=0)
    args = parser.parse_args()

    extra = [tuple(item.split("=", 1)) for item in args.metadata]
    identity = lambda data: data  # noqa: E731
    # No retries of the client's own (no service config), so what it sees is
    # what Envoy and Sluice answered.
    options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    channel = grpc.insecure_channel(args.target, options=options)
    grpc.channel_ready_future(channel).result(timeout=10)
    say = channel.unary_unary(
        "/echo.Echo/Say", request_serializer=identity, response_deserializer=identity
    )

    results = [None] * args.calls
    lock = threading.Lock()
    next_call = [0]

    def one(index):
        metadata = list(extra)
        if args.users:
            metadata.append(("x-user-id", f"u{index % args.users}"))
        timeout = args.timeout_ms / 1000.0 if args.timeout_ms else None
        started = time.monotonic()
        try:
            if args.cancel_after_ms:
                # The client gives up by itself (no deadline sent).
                future = say.future(b"hello", metadata=metadata, timeout=timeout)
                time.sleep(args.cancel_after_ms / 1000.0)
                future.cancel()
                body = future.result()
            else:
                body, call = say.with_call(b"hello", metadata=metadata, timeout=timeout)
            result = {"code": "OK", "server": body.decode()}
        except grpc.FutureCancelledError:
            result = {"code": "CANCELLED", "details": "cancelled by the client", "trailing": {}}
        except grpc.RpcError as err:
            result = {
                "code": err.code().name,
                "details": err.details(),
                "trailing": dict(err.trailing_metadata() or ()),
            }
        result["ms"] = round((time.monotonic() - started) * 1000.0, 1)
        if args.users:
            result["user"] = f"u{index % args.users}"
        results[index] = result

    def worker():
        while True:
            with lock:
                index = next_call[0]
                next_call[0] += 1
            if index >= args.calls:
                return
            one(index)
            if args.interval_ms:
                time.sleep(args.interval_ms / 1000.0)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(max(1, args.parallel))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    codes = {}
    servers = {}
    users = {}
    failures = []
    for result in results:
        codes[result["code"]] = codes.get(result["code"], 0) + 1
        if result["code"] == "OK":
            servers[result["server"]] = servers.get(result["server"], 0) + 1
            if "user" in result:
                users.setdefault(result["user"], set()).add(result["server"])
        elif len(failures) < 5:
            failures.append(result)
    summary = {
        "calls": args.calls,
        "ok": codes.get("OK", 0),
        "codes": codes,
        "servers": servers,
        "users": {user: sorted(names) for user, names in users.items()},
        "codes_in_order": [r["server"] if r["code"] == "OK" else r["code"] for r in results],
        "ms": [r["ms"] for r in results],
        "failures": failures,
        "elapsed_ms": round(elapsed * 1000.0, 1),
    }
    sys.stdout.write("SUMMARY " + json.dumps(summary) + "\n")
    sys.stdout.flush()
    channel.close()


if __name__ == "__main__":
    main()

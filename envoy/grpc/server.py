"""A real gRPC server (grpcio) for Sluice's Envoy tests, with a generic
service: any method, raw bytes in and out, so no .proto or protoc is needed.

    python server.py --name echo_v2 [--fail-rate 1.0] [--code UNAVAILABLE]
                     [--shape trailers-only|trailers] [--delay-ms 0] [--seed 1]
                     [--headers-first]

It binds 127.0.0.1 on a free port and prints `READY <port>`, then one line
`CALL <code>` per call it answered (flushed), which the Rust test counts.
An answer's body is the server's name. A failing call ends with `--code`:
`trailers-only` aborts before anything is sent (grpc-status in the only
header block), `trailers` sends the response headers first, then the status
in trailers. `--headers-first` sends the response headers before the
delay (as a streaming call does).
"""

import argparse
import random
import sys
import threading
import time
from concurrent import futures

import grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--code", default="UNAVAILABLE")
    parser.add_argument("--shape", choices=["trailers-only", "trailers"], default="trailers-only")
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--headers-first", action="store_true")
    args = parser.parse_args()

    code = getattr(grpc.StatusCode, args.code)
    rng = random.Random(args.seed)
    lock = threading.Lock()

    def report(status):
        with lock:
            sys.stdout.write(f"CALL {status}\n")
            sys.stdout.flush()

    def handle(request, context):
        if args.headers_first:
            # Response headers now, the rest (message and status) later.
            context.send_initial_metadata((("x-server", args.name),))
        if args.delay_ms:
            # Stop early when the caller gives up (deadline, reset).
            deadline = time.monotonic() + args.delay_ms / 1000.0
            while time.monotonic() < deadline and context.is_active():
                time.sleep(0.005)
        with lock:
            fail = rng.random() < args.fail_rate
        if fail:
            report(code.name)
            if args.shape == "trailers" and not args.headers_first:
                context.send_initial_metadata((("x-server", args.name),))
            context.abort(code, f"{args.name} says {code.name}")
        report("OK")
        context.set_trailing_metadata((("x-server", args.name),))
        return args.name.encode()

    identity = lambda data: data  # noqa: E731
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(
                handle, request_deserializer=identity, response_serializer=identity
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    try:
        # Until the test closes our stdin (or kills us).
        sys.stdin.read()
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()

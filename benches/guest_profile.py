#!/usr/bin/env python3
"""Where a Wasm module's own instructions go, by function, in wasmtime.

    CARGO_PROFILE_RELEASE_STRIP=false CARGO_TARGET_DIR=/tmp/named \\
        cargo build --release --target wasm32-wasip1 -p sluice    # keeps the name section
    SLUICE_WASM_PERFMAP=1 SLUICE_WASM=/tmp/named/wasm32-wasip1/release/sluice.wasm \\
        valgrind --tool=callgrind --dump-instr=yes --dump-line=no \\
        --callgrind-out-file=/tmp/cg.%p target/release/deps/lifecycle-<hash> \\
        --bench --profile-time 3 'wasm/sluice$'
    python3 benches/guest_profile.py /tmp/cg.<pid> /tmp/perf-<pid>.map \\
        /tmp/named/wasm32-wasip1/release/sluice.wasm

wasmtime names the code it compiles in /tmp/perf-<pid>.map (`wasm[0]::function[N]`,
N counting imports); callgrind counts the instructions executed at each address
of that code. This joins the two and names each function from the module's
`name` section. Instruction counts, unlike CPU time on this machine, repeat
exactly, so two builds compare by their shares and by the ratio to a function
both run once per request (`--unit`, default `proxy_on_response_headers`).
"""
import argparse
import bisect
import collections
import re
import subprocess


def leb(data, at):
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def function_names(wasm_path):
    """Function index -> name, from the `name` custom section."""
    data = open(wasm_path, "rb").read()
    names = {}
    at = 8
    while at < len(data):
        section = data[at]
        size, at = leb(data, at + 1)
        end = at + size
        if section == 0:
            length, inner = leb(data, at)
            if data[inner : inner + length] == b"name":
                inner += length
                while inner < end:
                    kind = data[inner]
                    sub_size, inner = leb(data, inner + 1)
                    sub_end = inner + sub_size
                    if kind == 1:
                        count, pos = leb(data, inner)
                        for _ in range(count):
                            index, pos = leb(data, pos)
                            length, pos = leb(data, pos)
                            names[index] = data[pos : pos + length].decode("utf8", "replace")
                            pos += length
                    inner = sub_end
        at = end
    return names


def code_ranges(perf_map, names):
    ranges = []
    for line in open(perf_map):
        parts = line.rstrip("\n").split(" ", 2)
        if len(parts) < 3:
            continue
        name = parts[2]
        index = re.search(r"function\[(\d+)\]", name)
        if index and int(index.group(1)) in names:
            name = names[int(index.group(1))]
        ranges.append((int(parts[0], 16), int(parts[1], 16), name))
    ranges.sort()
    return ranges


def self_costs(dump, ranges):
    """Self Ir per named range (callgrind format, positions `instr`)."""
    starts = [start for start, _, _ in ranges]
    costs = collections.Counter()
    last = 0
    after_calls = False
    for line in open(dump, errors="replace"):
        if line.startswith("calls="):
            after_calls = True
            continue
        if not line[:1] or not (line[0].isdigit() or line[0] in "+-*"):
            continue
        fields = line.split()
        token = fields[0]
        if token.startswith("0x"):
            address = int(token, 16)
        elif token[0] == "+":
            address = last + int(token[1:])
        elif token[0] == "-":
            address = last - int(token[1:])
        elif token == "*":
            address = last
        else:
            address = int(token)
        last = address
        if after_calls:
            after_calls = False
            continue
        at = bisect.bisect_right(starts, address) - 1
        if at >= 0 and address < ranges[at][0] + ranges[at][1] and len(fields) > 1:
            costs[ranges[at][2]] += int(fields[1])
    return costs


def demangle(names):
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return names
    return [re.sub(r"::h[0-9a-f]{16}$", "", name) for name in out[: len(names)]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dump")
    parser.add_argument("perf_map")
    parser.add_argument("wasm")
    parser.add_argument("--unit", default="proxy_on_response_headers")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    costs = self_costs(args.dump, code_ranges(args.perf_map, function_names(args.wasm)))
    by_name = collections.Counter()
    raw = list(costs)
    for name, pretty in zip(raw, demangle(raw)):
        by_name[pretty] += costs[name]
    total = sum(by_name.values())
    unit = by_name.get(args.unit, 0) or 1
    print(f"guest instructions: {total:,} ({total / unit:.2f} x {args.unit})")
    print(f"{'x unit':>8} {'share':>6}  function")
    for name, cost in by_name.most_common(args.top):
        print(f"{cost / unit:8.2f} {cost / total:6.1%}  {name}")


if __name__ == "__main__":
    main()

"""One MLLP connection of the HL7 benchmark, in its own process so the client is never the
bottleneck: send a message, wait for its ACK, send the next.

    python bench/_mllp_client.py --port P --count N --tag T

Sends at most --count messages, stopping after --max-seconds. Generates its messages,
connects, prints READY, waits for a line on stdin (so that all
connections start together), runs, and prints one JSON line: start/end on CLOCK_MONOTONIC
(shared by all processes), per-message ACK latencies in seconds, and ACK codes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from _mllp import END, ack_code, connect, frame
from _synthetic import orm_messages


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="stop sending after this long (the run stays bounded)",
    )
    args = parser.parse_args()

    frames = [frame(m) for m in orm_messages(args.count, args.tag)]
    sock = connect(args.port)
    print("READY", flush=True)
    sys.stdin.readline()

    latencies = []
    codes: Counter = Counter()
    errors = []
    recv = sock.recv
    start = now()
    stop_at = start + args.max_seconds
    for data in frames:
        if now() > stop_at:
            break
        t0 = now()
        sock.sendall(data)
        buf = b""
        while not buf.endswith(END):
            chunk = recv(65536)
            if not chunk:
                errors.append("connection closed by server")
                break
            buf += chunk
        if errors:
            break
        latencies.append(now() - t0)
        codes[ack_code(buf)] += 1
    end = now()
    sock.close()
    print(
        json.dumps(
            {"start": start, "end": end, "latencies": latencies, "codes": codes, "errors": errors}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

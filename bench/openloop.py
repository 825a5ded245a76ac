#!/usr/bin/env python3
"""Open-loop HTTP load: POST one image at a fixed rate and report latency.

wrk is closed-loop (a connection waits for its answer before sending again),
so it measures saturation but cannot hold a rate below it. Here requests are
sent on a fixed schedule whatever the server does, and each latency is
counted from the moment the request was due, so time spent waiting for a
free client worker counts too (no coordinated omission).

    bench/openloop.py --url http://127.0.0.1:8080/v1/inspect --image part.jpg \
        --rate 20 --duration 20

Prints one JSON object: offered and achieved rate, p50/p90/p99/max latency
in ms, and the count of non-2xx answers and transport errors. Standard
library only.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    p.add_argument("--workers", type=int, default=64, help="most requests in flight")
    p.add_argument("--content-type", default="image/jpeg")
    return p.parse_args()


def main():
    args = parse_args()
    url = urllib.parse.urlsplit(args.url)
    body = open(args.image, "rb").read()
    local = threading.local()
    lock = threading.Lock()
    latencies, statuses, errors = [], [], []

    def send(due):
        try:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            conn.request("POST", url.path, body=body, headers={"Content-Type": args.content_type})
            resp = conn.getresponse()
            resp.read()
            done = time.perf_counter()
            with lock:
                latencies.append((done - due) * 1000)
                statuses.append(resp.status)
        except Exception as e:  # a transport error is a result, not a crash
            local.conn = None
            with lock:
                errors.append(repr(e))

    n = int(args.rate * args.duration)
    start = time.perf_counter() + 0.1
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for i in range(n):
            due = start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, due)
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q / 100 * len(lat)))] if lat else float("nan")
    print(json.dumps({
        "offered_rps": args.rate,
        "achieved_rps": round(len(lat) / elapsed, 2),
        "requests": n,
        "p50_ms": round(pct(50), 1),
        "p90_ms": round(pct(90), 1),
        "p99_ms": round(pct(99), 1),
        "max_ms": round(lat[-1], 1) if lat else None,
        "mean_ms": round(statistics.fmean(lat), 1) if lat else None,
        "non_2xx": sum(1 for s in statuses if not 200 <= s < 300),
        "errors": len(errors),
    }))


if __name__ == "__main__":
    main()

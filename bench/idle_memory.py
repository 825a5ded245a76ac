"""Times a pass over 80 MB of memory, warm and after the process has slept.

On some virtual machines memory is slow for a while after the guest has
been idle (most likely the hypervisor's doing: the process takes no page
faults), which
makes the first request after a pause slow for any engine
(docs/performance.md, Method). Needs numpy (bench/requirements-peers.txt).

    python bench/idle_memory.py [--gaps 1,3,12]
"""

import argparse
import time

import numpy as np


def sum_ms(a):
    start = time.perf_counter()
    a.sum()
    return (time.perf_counter() - start) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gaps", default="1,3,12", help="seconds asleep before each measurement")
    args = ap.parse_args()
    a = np.ones(20_000_000, dtype=np.float32)
    print("warm:", ", ".join(f"{sum_ms(a):.1f}" for _ in range(3)), "ms")
    for gap in (float(g) for g in args.gaps.split(",")):
        time.sleep(gap)
        passes = [sum_ms(a) for _ in range(3)]
        print(f"after {gap:g} s asleep:", ", ".join(f"{t:.1f}" for t in passes), "ms")


if __name__ == "__main__":
    main()

"""Wall time of ``inrscrecon demo`` on an idle and on a loaded machine, and what threads do to it.

    python benchmarks/bench_demo.py                       # load 0 and 2 busy processes; threads 1 (default) and 2
    python benchmarks/bench_demo.py --load 0,2,4 --threads 1,2 --repeats 2

Each run is a fresh subprocess. ``threads 1`` is the command users run (``inrscrecon demo``, whose thread policy is
one torch / BLAS thread); other thread counts run the same demo with ``DemoConfig(threads=N)``. "Load" adds N
processes that spin on a core for the whole run (on top of whatever else the machine is doing: the 1-minute load
average before each run is printed beside it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

SPIN = "while True: pass"


def demo_command(threads: int, out: str) -> list[str]:
    """The demo with ``threads`` threads: the CLI for the default policy (1), else the same run in Python."""
    if threads == 1:
        return ["inrscrecon", "demo", "--quiet", "--out", out]
    code = (
        "from inrscrecon.demo import DemoConfig, run_demo; "
        f"run_demo({out!r}, DemoConfig(progress=False, threads={threads}))"
    )
    return [sys.executable, "-c", code]


def timed(cmd: list[str], load: int, limit_s: float) -> tuple[float | None, float]:
    """(wall seconds or None past ``limit_s``, 1-minute load average before) of ``cmd`` beside ``load`` spinners."""
    before = os.getloadavg()[0]
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
    try:
        t0 = time.time()
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            return None, before
        return time.time() - t0, before
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", default="0,2", help="busy processes beside the demo, comma-separated")
    ap.add_argument("--threads", default="1,2", help="torch / BLAS threads of the demo, comma-separated")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit", type=float, default=600.0, help="seconds before a run is stopped and reported")
    args = ap.parse_args()
    print(f"# bench_demo: {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| busy processes added | threads | load average before | wall s |")
    print("|---|---|---|---|")
    for load in (int(x) for x in args.load.split(",")):
        for threads in (int(x) for x in args.threads.split(",")):
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    wall, before = timed(demo_command(threads, tmp), load, args.limit)
                shown = f"{wall:.1f}" if wall is not None else f"> {args.limit:.0f} (stopped)"
                print(f"| {load} | {threads} | {before:.1f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()

"""Start-up time of ``inrscrecon --help`` and ``inrscrecon CMD --help``: the live tree, and optionally the
package as it was at a git revision (``--before REV``), each in a fresh interpreter, median of N runs.

    OMP_NUM_THREADS=1 python benchmarks/bench_cli_startup.py --before 52ed8ee --repeat 5

``--help`` builds the parser only: it must not import torch, anndata or the stage modules. The revision is
exported with ``git archive`` into a temporary folder (the checkout is not touched) and put first on
``PYTHONPATH``; each run prints which copy it imported, so a mix-up shows.

Measured 2026-12-01 on the 2-core CPU dev machine while other jobs ran, median of 3: ``--help`` 0.27 s,
``fit --help`` 0.25 s (torch not imported) against 10.2 s / 10.3 s at 52ed8ee (torch imported through the
align stage and the bench command's default device); 4.1 s for ``--help`` before on the same machine idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["fit", "--help"], ["align", "--help"], ["render", "--help"])


def time_help(argv: list[str], pythonpath: str | None, repeat: int) -> tuple[float, str, bool]:
    """(median seconds of ``python -m inrscrecon argv``, the package file imported, torch imported?)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cwd = pythonpath or str(REPO)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "inrscrecon", *argv], env=env, cwd=cwd, check=True, capture_output=True
        )
        times.append(time.perf_counter() - t0)
    code = (
        "import sys\nfrom inrscrecon.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "import inrscrecon\nprint(inrscrecon.__file__, 'torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=cwd, capture_output=True, text=True)
    where, torch = r.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return statistics.median(times), where, torch == "True"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="git revision to compare against (e.g. the commit before the change)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees: list[tuple[str, str | None]] = [("live tree", None)]
        if args.before:
            git = ["git", "-C", str(REPO), "archive", args.before, "inrscrecon"]
            archive = subprocess.run(git, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            for so in (REPO / "inrscrecon").glob("_C*.so"):  # the compiled extension is not in git
                (Path(tmp) / "inrscrecon" / so.name).symlink_to(so)
            trees.append((args.before, tmp))
        for label, path in trees:
            for argv in COMMANDS:
                seconds, where, torch = time_help(argv, path, args.repeat)
                rows.append((label, " ".join(argv), seconds, torch, where))
    print(f"{'tree':<12} {'command':<16} {'median s':>9}  torch imported  package")
    for label, cmd, seconds, torch, where in rows:
        print(f"{label:<12} {cmd:<16} {seconds:>9.3f}  {str(torch):<14}  {where}")


if __name__ == "__main__":
    main()

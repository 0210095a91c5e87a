"""Run `launch.py` command lines, as `--print_commands` prints them, one after another in this one process.

    python launch.py tune RECIPE --print_commands | python scripts/run_commands.py [--threads 1]

Each line must read `accelerate launch launch.py ARGS` or `python launch.py ARGS`; its ARGS run as
`python launch.py ARGS` would, without starting Python and importing torch again for every run (about 7 s
of a 2-core machine's time per run). A sequential sweep does the same, so the runs are the ones separate
processes would make. A line that fails is reported and the rest go on; the exit status is 1 if any failed.
Nothing on a line is executed but launch.py's own arguments.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cli.main import main as launch  # noqa: E402

PREFIXES = (["accelerate", "launch", "launch.py"], ["python", "launch.py"])


def arguments(line: str) -> list[str]:
    """launch.py's arguments on one command line; ValueError for any other line."""
    words = shlex.split(line)
    for prefix in PREFIXES:
        if words[: len(prefix)] == prefix:
            return words[len(prefix) :]
    raise ValueError(f"not a launch.py command line: {line.strip()!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, help="each run's torch threads (--threads N on every line)")
    args = p.parse_args()
    lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
    try:
        runs = [arguments(line) + (["--threads", str(args.threads)] if args.threads else []) for line in lines]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed, start = 0, time.time()
    for i, argv in enumerate(runs, 1):
        try:
            code = launch(argv)
        except Exception as err:  # noqa: BLE001 (one failed run must not stop the others)
            code = f"{type(err).__name__}: {err}"
        if code != 0:
            failed += 1
            print(f"run_commands: line {i} failed ({code}): {shlex.join(argv)}", file=sys.stderr, flush=True)
    print(f"run_commands: {len(runs) - failed} of {len(runs)} runs done in {time.time() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

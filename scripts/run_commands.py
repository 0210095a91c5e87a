"""Run `launch.py` command lines, as `--print_commands` prints them, in one process or in lanes side by side.

    python launch.py tune RECIPE --print_commands | python scripts/run_commands.py [--threads 1] [--lanes 2]

Each line must read `accelerate launch launch.py ARGS` or `python launch.py ARGS`; its ARGS run as
`python launch.py ARGS` would, without starting Python and importing torch again for every run (about 7 s
of a 2-core machine's time per run). A sequential sweep does the same, so the runs are the ones separate
processes would make. With ``--lanes N``, N such processes take the lines from one shared queue, in order,
each the next line as soon as its last run ends (lanes finish together however long each run takes).
A line that fails is reported and the rest go on; the exit status is 1 if any failed. Nothing on a line
is executed but launch.py's own arguments.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIXES = (["accelerate", "launch", "launch.py"], ["python", "launch.py"])


def arguments(line: str) -> list[str]:
    """launch.py's arguments on one command line; ValueError for any other line."""
    words = shlex.split(line)
    for prefix in PREFIXES:
        if words[: len(prefix)] == prefix:
            return words[len(prefix) :]
    raise ValueError(f"not a launch.py command line: {line.strip()!r}")


def take(queue: Path) -> int | None:
    """The next line's index from the lanes' shared queue (a folder holding ``lines``, ``count`` and ``next``), or None
    when every line is taken: the counter is read and moved on under an exclusive lock."""
    with open(queue / "next", "r+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)
        taken = int(counter.read() or 0)
        if taken >= int((queue / "count").read_text()):
            return None
        counter.seek(0)
        counter.write(f"{taken + 1}")
        counter.truncate()
        return taken


def run_lines(runs: list[list[str]], order) -> int:
    """Run ``runs[i]`` for each i that ``order`` yields; returns how many failed. Imports the harness (and torch)
    here: a process that only hands lines to its lanes never does."""
    from bench.cli.main import main as launch

    failed = 0
    for i in order:
        argv = runs[i]
        try:
            code = launch(argv)
        except SystemExit as err:  # a line argparse refused, say: that run fails, the others go on
            code = err.code if isinstance(err.code, int) else 1
        except Exception as err:  # noqa: BLE001 (one failed run must not stop the others)
            code = f"{type(err).__name__}: {err}"
        if code != 0:
            failed += 1
            print(f"run_commands: line {i + 1} failed ({code}): {shlex.join(argv)}", file=sys.stderr, flush=True)
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, help="each run's torch threads (--threads N on every line)")
    p.add_argument("--lanes", type=int, default=1, help="processes side by side, taking lines from one queue")
    p.add_argument("--queue", type=Path, help=argparse.SUPPRESS)  # a lane of --lanes: its shared queue
    args = p.parse_args()
    if args.lanes < 1:
        print(f"error: --lanes must be at least 1, got {args.lanes}", file=sys.stderr)
        return 2
    if args.queue is not None:  # one lane
        runs = [json.loads(line) for line in (args.queue / "lines").read_text().splitlines()]
        failed = run_lines(runs, iter(lambda: take(args.queue), None))
        (args.queue / f"failed.{os.getpid()}").write_text(str(failed))
        return 1 if failed else 0
    lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
    try:
        runs = [arguments(line) + (["--threads", str(args.threads)] if args.threads else []) for line in lines]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.time()
    if args.lanes == 1:
        failed = run_lines(runs, range(len(runs)))
    else:
        with tempfile.TemporaryDirectory() as queue:
            queue = Path(queue)
            (queue / "lines").write_text("".join(json.dumps(argv) + "\n" for argv in runs))
            (queue / "count").write_text(str(len(runs)))
            (queue / "next").write_text("0")
            lanes = [subprocess.Popen([sys.executable, __file__, "--queue", str(queue)]) for _ in range(args.lanes)]
            codes = [lane.wait() for lane in lanes]
            counts = [queue / f"failed.{lane.pid}" for lane in lanes]
            failed = sum(int(path.read_text()) for path in counts if path.is_file())
            if not all(path.is_file() for path in counts):  # a lane killed mid-run: not everything ran
                print(f"run_commands: a lane ended abnormally (exits {codes})", file=sys.stderr, flush=True)
                failed = max(failed, 1)
    print(f"run_commands: {len(runs) - failed} of {len(runs)} runs done in {time.time() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Running launch.py in a subprocess for the tests."""

#: launch.py, with the process killing itself (SIGKILL) after the N-th training step.
KILLED_AFTER = """
import os, signal, sys
import bench.loop.epoch
from bench.cli import main

steps, one_step = 0, bench.loop.epoch.one_step

def counted(*args, **kwargs):
    global steps
    skipped = one_step(*args, **kwargs)
    steps += 1
    if steps == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return skipped

bench.loop.epoch.one_step = counted
sys.exit(main(sys.argv[1:]))
"""

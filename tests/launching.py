"""Running launch.py in a subprocess for the tests."""

#: launch.py, with the process killing itself (SIGKILL) after the N-th training step.
KILLED_AFTER = """
import os, signal, sys
import bench.loop.epoch
from bench.cli.main import exit_with, main

steps, one_step = 0, bench.loop.epoch.one_step

def counted(*args, **kwargs):
    global steps
    skipped = one_step(*args, **kwargs)
    steps += 1
    if steps == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return skipped

bench.loop.epoch.one_step = counted
exit_with(main(sys.argv[1:]))
"""

#: launch.py, with process 0 unable to write a checkpoint's state (a full disk).
FULL_DISK_ON_RANK_0 = """
import errno, os, sys
import torch
import bench.loop.checkpoint
from bench.cli.main import exit_with, main

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

if os.environ.get("RANK") == "0":
    bench.loop.checkpoint.torch = type("torch", (), {**vars(torch), "save": staticmethod(full)})
exit_with(main(sys.argv[1:]))
"""

#: a script (the first argument) run as ``__main__`` with the rest of the arguments, then left at once
#: (``os._exit``): the process of a multi-process job skips the interpreter's teardown, where a gloo worker thread
#: still freeing a finished collective's tensors can abort it, even after ``destroy_process_group``.
AS_MAIN = """
import os, runpy, sys

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

"""Command line: ``python launch.py`` (or ``sam-bench``).

    python launch.py                         the default suite: ``sweep digits``
    python launch.py --suite NAME            the same as ``sweep NAME``
    python launch.py sweep RECIPE [--set k=v] every run of a recipe (resumable), then its tables and plots
    python launch.py tune RECIPE [--set k=v]  tune every optimizer on a validation split (equal budget), then run the choice
    python launch.py --recipe RECIPE [--set k=v]   one run of a recipe
    python launch.py [run flags]             one run (the seed project's flags work verbatim)
    python launch.py table [RUN_DIRS...]     aggregate finished runs into a results table
    python launch.py reproduction            reported against measured, for every recipe
    python launch.py sharpness RUN_DIRS...   measure the sharpness of finished runs
    python launch.py perf                    time one training step of every optimizer
    python launch.py claims NAME=RUNS ...    published claims (SAM beats SGD, ...) against finished runs
    python launch.py variants                every optimizer, its settings and their flags

The variant flags (``--rho``, ``--k``, ...) and their help are generated from the variants'
declared settings (``optimizers.settings.Setting``), spelled ``--NAME`` unless
``variant_flags.toml`` says otherwise: a new variant's flags appear here without a change to this file.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from importlib import import_module
from typing import NoReturn

from bench.cli.flags import run_parser
from bench.errors import RunStopped, UserError

#: subcommand -> "module:function", imported only when asked for (``--help`` imports neither torch nor accelerate)
COMMANDS = {
    "sweep": "bench.cli.studies:cmd_sweep",
    "tune": "bench.cli.studies:cmd_tune",
    "table": "bench.cli.reports:cmd_table",
    "reproduction": "bench.cli.reports:cmd_reproduction",
    "sharpness": "bench.cli.studies:cmd_sharpness",
    "perf": "bench.studies.perf:main",
    "variants": "bench.cli.reports:cmd_variants",
    "claims": "bench.report.claims_report:main",
}


def _command(spec: str):
    module, function = spec.split(":")
    return getattr(import_module(module), function)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _follow_the_launcher() -> None:
    """A process started by a launcher (``accelerate launch``, ``torchrun``: ``LOCAL_RANK`` is set) ends when
    the launcher does, on Linux: killing the launcher never leaves its workers training on their own."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent exits
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _is_main_process() -> bool:
    """Process 0 of a launched job, or a process not started by a launcher: the one that reports."""
    return os.environ.get("RANK", "0") == "0"


#: Seconds another process of a torchrun job waits, after refusing, for the launcher to stop it.
REFUSAL_WAIT_S = 60


def _say(message: str) -> None:
    """Process 0 says why the job stops; every process stops alike, so one says so. Another process of a job under
    torchrun's agent (``TORCHELASTIC_RUN_ID``) waits first: were it to leave at once, the agent would stop process
    0 before it had said why, and the job would fail without a word. Once process 0 has left, the agent stops the
    waiting ones; a process still running after :data:`REFUSAL_WAIT_S` (a refusal of its own) says why itself."""
    if _is_main_process():
        print(message, file=sys.stderr)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(REFUSAL_WAIT_S)
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _one_line_warning
    _follow_the_launcher()
    try:
        if not argv:
            return _command(COMMANDS["sweep"])(["digits"])
        if argv[0] in COMMANDS:
            return _command(COMMANDS[argv[0]])(argv[1:])
        if "-h" in argv or "--help" in argv:  # answered from the flag table alone, before any heavy import
            run_parser().parse_args(argv)
        return _command("bench.cli.run:cmd_run")(argv)
    except UserError as err:
        _say(f"error: {err}")
        return 2
    except RunStopped as err:
        _say(f"error: {err}")
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: a run continues from its newest checkpoint with the same command and --resume auto "
            "(a sweep or tune: the same command)",
            file=sys.stderr,
        )
        return 130


def exit_with(code: int) -> NoReturn:
    """Leave the program with exit status ``code``. A process of a multi-process job (its process group up)
    leaves at once, without the interpreter's teardown: by then its results are written and every process has
    passed the run's last barrier, but a gloo worker thread may still be freeing that barrier's work, whose
    tensors need the interpreter's lock; finding the interpreter finalising, the thread was ended mid-destructor
    and the process aborted (SIGABRT, "terminate called without an active exception"), now and then, in a
    finished run. A refusal before the group is up leaves normally (so process 0 has time to say why)."""
    dist = sys.modules.get("torch.distributed")  # imported by any run; a --help or a refusal imports no torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def run() -> NoReturn:
    """``python launch.py`` and ``sam-bench``: :func:`main` on the command line's arguments, then :func:`exit_with`."""
    exit_with(main())


if __name__ == "__main__":
    run()

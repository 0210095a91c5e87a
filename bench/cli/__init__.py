"""The command line: ``python launch.py`` (or ``sam-bench``); see :mod:`bench.cli.main`."""

from bench.cli.main import main

__all__ = ["main"]

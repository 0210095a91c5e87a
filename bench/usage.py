"""Command-line errors: one line, exit code 2."""

from __future__ import annotations

import argparse

from bench.errors import UserError


class UsageError(UserError):
    """Reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`UsageError` (the CLI prints them as one line)."""

    def error(self, message):
        raise UsageError(message)

"""``@without_grad``: what ``@torch.no_grad()`` does, for the methods a step calls several times.

torch's decorator makes, enters and leaves a context object on every call, a few microseconds each:
more than a small model's per-step bookkeeping costs. Inside a step gradients are off already, so
most calls find nothing to switch; this decorator only checks the mode then, and otherwise switches
gradients off for the call and back after it, as torch's does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_T = TypeVar("_T")


def without_grad(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn`` run with gradient recording off (``@torch.no_grad()``), at the cost of one check where it is off."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return run

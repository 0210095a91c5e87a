"""Small float64 problems shared by the optimizer tests."""

import importlib.util

import pytest
import torch
from torch import nn

#: Tests that compare against pytorch_optimizer (the oracle) skip without it; the others run.
requires_oracle = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_optimizer") is None, reason="needs pytorch_optimizer (the oracle): pip install -e .[test]"
)


def tiny_mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def batches(n: int, batch_size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (batch_size,), generator=g))
        for _ in range(n)
    ]


def two_groups(model: nn.Module, rho=(0.05, 0.1), **extra):
    """First layer and the rest, with different rho and weight decay."""
    first, *rest = list(model.children())
    other = [p for m in rest for p in m.parameters()]
    return [
        {"params": list(first.parameters()), "rho": rho[0], "weight_decay": 5e-4, **extra},
        {"params": other, "rho": rho[1], "weight_decay": 1e-3, **extra},
    ]


def plain_closure(model, x, y, opt=None):
    def closure():
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    return closure


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6):
    err = ((a - b).norm() / b.norm()).item()
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


def with_loss_term(opt, model: nn.Module | None = None, num_train: int = 64, num_classes: int = 3):
    """``opt`` with the loss term its class declares attached (SAF's and MESA's; a no-op for the others), as a loop
    that supports loss terms does (``optimizers.regularizer.build_regularizer``). The tests that use it exercise
    the optimizer's protocol; the term's own arithmetic is tested in test_regularizers.py."""
    from optimizers.regularizer import build_regularizer

    build_regularizer(opt, model if model is not None else nn.Module(), num_train, num_classes, "cpu")
    return opt


def free_port() -> str:
    """A TCP port nobody listens on now, for a launched job's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def loss_infinite_at(call: int, loss_fn=None):
    """Per-sample losses (``loss_fn``, by default cross-entropy) that are infinite at the ``call``-th call: the
    pass making that call is non-finite."""
    loss_fn = loss_fn or (lambda outputs, targets: nn.functional.cross_entropy(outputs, targets, reduction="none"))
    calls = 0

    def losses(outputs, targets):
        nonlocal calls
        calls += 1
        value = loss_fn(outputs, targets)
        return value * float("inf") if calls == call else value

    return losses

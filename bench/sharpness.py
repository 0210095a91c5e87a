"""Sharpness of a trained model, measured on a fixed set of batches.

L(w) is the mean loss over the union of the batches, with the model in eval mode
(BatchNorm uses its running statistics), so L is a deterministic function of w.

- ``hessian_max_eigenvalue``: power iteration on Hessian-vector products (double
  backward) from a seeded random start; the Rayleigh quotient of the last vector.
  Power iteration converges to the eigenvalue largest in magnitude, which for a
  trained network is the top (positive) one.
- ``hessian_trace``: Hutchinson's estimate, the mean of v^T H v over Rademacher v.
- ``sam_sharpness``: max_{||e|| <= rho} L(w + e) - L(w), approximated by one
  normalised gradient-ascent step e = rho g / ||g||.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def _weighted_batches(batches):
    total = sum(len(y) for _, y in batches)
    return [(x, y, len(y) / total) for x, y in batches]


def _loss(model, loss_fn, batches) -> Tensor:
    return sum(w * loss_fn(model(x), y) for x, y, w in batches)


def _hvp(model, loss_fn, batches, params, v: list[Tensor]) -> list[Tensor]:
    out = [torch.zeros_like(p) for p in params]
    for x, y, w in batches:  # one graph per batch keeps memory at one batch's
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        for o, h in zip(out, hv):
            o.add_(h, alpha=w)
    return out


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def measure_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: list[tuple[Tensor, Tensor]],
    *,
    rho: float = 0.05,
    power_iterations: int = 20,
    hutchinson_samples: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """``loss_fn(outputs, targets)`` returns a batch's mean loss. The weights and the
    train/eval mode are restored afterwards, bit for bit."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    weighted = _weighted_batches(batches)
    generator = torch.Generator().manual_seed(seed)

    def draw(kind: str) -> list[Tensor]:
        if kind == "normal":
            return [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
        return [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in params]

    try:
        with torch.enable_grad():
            loss = _loss(model, loss_fn, weighted)
            g = torch.autograd.grad(loss, params)

            v = draw("normal")
            eigenvalue = torch.zeros(())
            for _ in range(power_iterations):
                norm = _dot(v, v).sqrt()
                v = [t / norm for t in v]
                hv = _hvp(model, loss_fn, weighted, params, v)
                eigenvalue = _dot(v, hv)
                v = [t.detach() for t in hv]

            traces = [_dot(z, _hvp(model, loss_fn, weighted, params, z)) for z in (draw("rademacher") for _ in range(hutchinson_samples))]
            trace = torch.stack(traces).mean() if traces else torch.tensor(float("nan"))

        with torch.no_grad():
            g_norm = _dot(g, g).sqrt()
            for p, gi in zip(params, g):
                p.add_(gi, alpha=rho / (g_norm.item() + 1e-12))
            perturbed = _loss(model, loss_fn, weighted)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        model.train(was_training)
    return {
        "loss": loss.item(),
        "hessian_max_eigenvalue": eigenvalue.item(),
        "hessian_trace": trace.item(),
        "sam_sharpness": (perturbed - loss).item(),
    }

"""Sharpness of a trained model, measured on a fixed set of batches.

L(w) is the mean loss over the union of the batches (each batch's mean loss weighted
by its size), with the model in eval mode (BatchNorm uses its running statistics,
dropout is off), so L is a deterministic function of the parameters w that require
grad. Every quantity is accumulated batch by batch, so memory stays at one batch's
graph (a double-backward graph for the Hessian-vector products; a single batch's gradient
graph is kept for all of them).

- ``hessian_max_eigenvalue``: power iteration on Hessian-vector products (double
  backward) from a seeded Gaussian start; the Rayleigh quotient v^T H v of the last
  normalised vector. Power iteration converges to the eigenvalue largest in
  *magnitude*; for a trained network that is the top (positive) one. Where it is
  negative (near a saddle), a second power iteration on H - lambda I (lambda that
  negative estimate) finds the largest eigenvalue. A fixed number of iterations is not
  a convergence test: where the top two magnitudes are close (lambda_max about
  -lambda_min) the estimate converges slowly. NaN when ``power_iterations`` is 0.
- ``hessian_eigenvalue_residual``: how far that estimate is from converged, ||H v - lambda v|| / |lambda|
  for the last normalised vector v (0 for an exact eigenvector). H being symmetric, some eigenvalue
  of H lies within that fraction of lambda; a large value says the iterations did not converge. NaN
  where lambda is 0 or not estimated.
- ``hessian_trace``: Hutchinson's estimate, the mean of v^T H v over Rademacher v
  (unbiased; exact for a diagonal Hessian). NaN when ``hutchinson_samples`` is 0.
- ``sam_sharpness``: max_{||e|| <= rho} L(w + e) - L(w), approximated by one
  normalised gradient-ascent step e = rho g / ||g|| (0 where g = 0).
- ``loss``: L(w).

Random vectors come from a CPU ``torch.Generator`` seeded by ``seed`` (first the
power-iteration start, then the Rademacher vectors), so the result does not depend
on the device or on the global RNG, which is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from architectures import create_model
from bench.config import ConfigError, RunConfig
from bench.data.augment import normalize
from bench.data.datasets import ImageDataset
from bench.data.loader import fixed_samples, prepared_train_set, run_splits
from bench.io import write_json
from bench.loop.checkpoint import MODEL_FILE

LossFn = Callable[[Tensor, Tensor], Tensor]


def _weighted(batches: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor, float]]:
    sizes = [y.shape[0] for _, y in batches]
    total = sum(sizes)
    if total == 0:
        raise ValueError("measure_sharpness needs at least one non-empty batch")
    return [(x, y, n / total) for (x, y), n in zip(batches, sizes) if n > 0]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _loss_and_grad(model, loss_fn, batches, params) -> tuple[Tensor, list[Tensor]]:
    """L(w) and grad L(w), one batch's graph at a time."""
    loss: Tensor | float = 0.0
    grad = [torch.zeros_like(p) for p in params]
    for x, y, weight in batches:
        batch_loss = loss_fn(model(x), y)
        for acc, g in zip(grad, torch.autograd.grad(batch_loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g, alpha=weight)
        loss = loss + weight * batch_loss.detach()
    return loss, grad


def _loss(model, loss_fn, batches) -> Tensor:
    with torch.no_grad():
        return sum(weight * loss_fn(model(x), y) for x, y, weight in batches)


def _gradient_graph(model, loss_fn, x, y, params) -> tuple[Tensor | None, ...]:
    return torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True, allow_unused=True)


def _add_hv(out: list[Tensor], grads, params, v: Sequence[Tensor], weight: float, keep: bool) -> None:
    """out += weight * (the gradient of <grads, v>); ``keep``: the graph of ``grads`` serves again."""
    # A gradient that is None or constant in w contributes nothing to H v.
    terms = [(g * vi).sum() for g, vi in zip(grads, v) if g is not None and g.requires_grad]
    if not terms:
        return
    hv = torch.autograd.grad(sum(terms), params, allow_unused=True, retain_graph=keep)
    for acc, h in zip(out, hv):
        if h is not None:
            acc.add_(h, alpha=weight)


def _hvp_function(model, loss_fn, batches, params) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """v -> H v for the Hessian of L: per batch, the gradient of <grad loss_b, v>, weighted. With one batch its
    gradient's graph is built once and kept for every product (the very values a graph built anew gives, a
    forward and a backward fewer each); with several, each product builds them one at a time."""
    kept = None
    if len(batches) == 1:
        ((x, y, weight),) = batches
        kept = _gradient_graph(model, loss_fn, x, y, params), weight

    def hvp(v: Sequence[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in params]
        if kept is not None:
            grads, weight = kept
            _add_hv(out, grads, params, v, weight, keep=True)
            return out
        for x, y, weight in batches:
            _add_hv(out, _gradient_graph(model, loss_fn, x, y, params), params, v, weight, keep=False)
        return out

    return hvp


def _power_iteration(hvp, params, iterations: int, generator) -> tuple[Tensor, Tensor]:
    """The Rayleigh quotient of the last normalised vector v of power iteration from a seeded Gaussian start, and
    the residual ||H v - quotient v|| (iterations >= 1)."""
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    for _ in range(iterations):
        norm = _dot(v, v).sqrt()
        # H v = 0 (H = 0 for a random start) leaves v = 0 and the quotient 0, not NaN.
        inverse = torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))
        v = [t * inverse.to(t.device, t.dtype) for t in v]
        hv = hvp(v)
        eigenvalue = _dot(v, hv)  # Rayleigh quotient of the normalised v
        v, last = hv, v
    residual = [h - eigenvalue.to(t.device, t.dtype) * t for h, t in zip(hv, last)]
    return eigenvalue, _dot(residual, residual).sqrt()


def _top_eigenvalue(hvp, params, iterations: int, generator) -> tuple[Tensor | float, Tensor | float]:
    """The largest eigenvalue and its residual (NaN for 0 iterations; see :func:`_power_iteration`). Power iteration
    finds the largest in magnitude; where that is negative (lambda_min, near a saddle), a second power iteration on
    H - lambda_min I, whose eigenvalues are >= 0 and largest at lambda_max - lambda_min, finds lambda_max (the
    shift leaves a vector's residual as it is)."""
    if iterations <= 0:
        return float("nan"), float("nan")
    dominant, residual = _power_iteration(hvp, params, iterations, generator)
    if _value(dominant) >= 0:
        return dominant, residual

    def shifted(v: Sequence[Tensor]) -> list[Tensor]:
        return [h - dominant.to(t.device, t.dtype) * t for h, t in zip(hvp(v), v)]

    top, residual = _power_iteration(shifted, params, iterations, generator)
    return top + dominant, residual


def _hutchinson_trace(hvp, params, samples: int, generator) -> Tensor | float:
    """Mean of z^T H z over Rademacher z (NaN for 0 samples)."""
    if samples <= 0:
        return float("nan")
    total = 0.0
    for _ in range(samples):
        z = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in params]
        total = total + _dot(z, hvp(z))
    return total / samples


def _ascent_loss(model, loss_fn, weighted, params, grad, rho: float) -> Tensor:
    """L(w + rho g / ||g||) (L(w) where g = 0); the caller restores w."""
    with torch.no_grad():
        grad_norm = _dot(grad, grad).sqrt()
        scale = torch.where(grad_norm > 0, rho / grad_norm, torch.zeros_like(grad_norm))
        for p, g in zip(params, grad):
            p.add_(g * scale.to(g.device, g.dtype))
    return _loss(model, loss_fn, weighted)


def _value(t: Tensor | float) -> float:
    return float(t.item()) if isinstance(t, Tensor) else float(t)


def measure_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[tuple[Tensor, Tensor]],
    *,
    rho: float = 0.05,
    power_iterations: int = 20,
    hutchinson_samples: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Returns {"hessian_max_eigenvalue", "hessian_eigenvalue_residual", "hessian_trace", "sam_sharpness", "loss"}.

    ``loss_fn(outputs, targets)`` returns a batch's mean loss. The model is measured in
    eval mode; its train/eval mode and its weights are restored afterwards, bit for bit
    (``.grad`` fields are never touched).
    """
    weighted = _weighted(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("measure_sharpness: the model has no parameter that requires grad")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    saved = [p.detach().clone() for p in params]
    model.eval()
    try:
        with torch.enable_grad():
            loss, grad = _loss_and_grad(model, loss_fn, weighted, params)
            hvp = _hvp_function(model, loss_fn, weighted, params) if power_iterations > 0 or hutchinson_samples > 0 else None
            eigenvalue, residual = _top_eigenvalue(hvp, params, power_iterations, generator)
            trace = _hutchinson_trace(hvp, params, hutchinson_samples, generator)
            del hvp  # the kept graph
        perturbed = _ascent_loss(model, loss_fn, weighted, params, grad, rho)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        model.train(was_training)
    top = _value(eigenvalue)
    return {
        "hessian_max_eigenvalue": top,
        "hessian_eigenvalue_residual": _value(residual) / abs(top) if top != 0 else float("nan"),
        "hessian_trace": _value(trace),
        "sam_sharpness": _value(perturbed - loss),
        "loss": _value(loss),
    }


# -- sharpness of a trained model in the harness ----------------------------------------------

#: One radius for every optimizer, so the SAM sharpness of their models is comparable.
SHARPNESS_RHO = 0.05


def final_sharpness(
    model: nn.Module, train_set, device, samples: int = 1024, iterations: int = 20, probes: int = 10
) -> dict[str, float]:
    """Sharpness of a trained model on a fixed subset of its (possibly noisy) training set, unaugmented
    (for a dataset read by loader workers: in the evaluation view, see ``bench.data.loader.fixed_samples``)."""
    if isinstance(train_set, ImageDataset):
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:samples]
        x = normalize(train_set.images[keep].to(device), train_set.mean, train_set.std)
        y = train_set.labels[keep].to(device)
    else:
        x, y = fixed_samples(train_set, samples, device)
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
    result = measure_sharpness(
        model,
        nn.functional.cross_entropy,
        batches,
        rho=SHARPNESS_RHO,
        seed=0,
        power_iterations=iterations,
        hutchinson_samples=probes,
    )
    return {**result, "samples": len(y), "rho": SHARPNESS_RHO, "power_iterations": iterations, "hutchinson_samples": probes}


def measure_run_sharpness(run, samples: int | None = None) -> dict[str, float]:
    """Sharpness of a finished run's exported model; writes sharpness.json next to it."""
    run = Path(run)
    config = RunConfig.read(run)
    if not (run / MODEL_FILE).is_file():
        raise ConfigError(f"{run} has no {MODEL_FILE} (no model was exported: see its summary.json); nothing to measure")
    train_set = prepared_train_set(run_splits(config)[0], config).train
    model = create_model(config.arch, num_classes=train_set.num_classes, in_channels=train_set.channels)
    try:
        model.load_state_dict(load_file(run / MODEL_FILE))
    except (OSError, RuntimeError, SafetensorError) as err:  # a damaged file, a state dict of another model
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"{run / MODEL_FILE} cannot be loaded into {config.arch} ({reason})") from None
    result = final_sharpness(
        model,
        train_set,
        torch.device("cpu"),
        samples or config.sharpness_samples,
        config.sharpness_iterations,
        config.sharpness_probes,
    )
    write_json(run / "sharpness.json", result)
    return result

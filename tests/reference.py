"""Functional re-derivations of the variants' update rules, written from the papers'
formulas (not from the implementations), for the parity tests."""

import torch
from torch import nn
from torch.func import functional_call


def per_sample_losses(model: nn.Module, weights: list[torch.Tensor], x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    outputs = functional_call(model, dict(zip(names, weights)), (x,))
    return nn.functional.cross_entropy(outputs, y, reduction="none")


def loss_and_grads(model, weights, x, y, wrt=None):
    """Mean loss at ``weights`` and its gradient (None for tensors not in ``wrt``)."""
    wrt = wrt if wrt is not None else [True] * len(weights)
    leaves = [w.detach().clone().requires_grad_(keep) for w, keep in zip(weights, wrt)]
    loss = per_sample_losses(model, leaves, x, y).mean()
    grads = torch.autograd.grad(loss, [w for w, keep in zip(leaves, wrt) if keep])
    it = iter(grads)
    return loss.detach(), [next(it) if keep else None for keep in wrt]


def norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in tensors if t is not None))


def dot(a, b) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


class SGDRef:
    """torch.optim.SGD's update (momentum, weight decay, dampening 0), by hand."""

    def __init__(self, lr, momentum=0.0, weight_decay=0.0):
        self.lr, self.momentum, self.weight_decay, self.buffers = lr, momentum, weight_decay, None

    def __call__(self, weights, grads):
        d = [g + self.weight_decay * w for w, g in zip(weights, grads)]
        if self.momentum:
            self.buffers = d if self.buffers is None else [self.momentum * b + di for b, di in zip(self.buffers, d)]
            d = self.buffers
        return [w - self.lr * di for w, di in zip(weights, d)]

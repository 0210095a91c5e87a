"""LookSAM and Look-LayerSAM (Liu et al., CVPR'22).

Every k-th step (the first included) is a SAM step that also keeps the component of
g_s orthogonal to g,
    g_v = g_s - (<g, g_s> / ||g||^2) g        (= g_s - ||g_s|| cos(theta) g / ||g||),
in persistent state (1x parameters). The steps in between take one forward-backward
pass and reuse it:
    descent gradient = g + alpha * (||g|| / ||g_v||) * g_v        (global norms).
Look-LayerSAM perturbs each parameter tensor i with its own trust ratio,
    e_i = rho * (||w_i|| / ||g_i||) * g_i / ||g_i||,
for very large batches (LAMB-style).
"""

import torch

from .base import SharpnessAwareOptimizer, global_dot, global_norm

EPS = 1e-12


class LookSAM(SharpnessAwareOptimizer):
    ascent_may_be_local = False
    hyperparameters = {"rho": 0.1, "alpha": 0.7}

    def __init__(self, params, base_optimizer="sgd", *, k: int = 5, **kwargs):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        super().__init__(params, base_optimizer, **kwargs)
        self.k = k
        self.state["step"] = 0
        self._params = []

    def validate(self, group):
        super().validate(group)
        self.require(group["alpha"] >= 0, f"alpha must be >= 0, got {group['alpha']}")

    @property
    def perturbs_this_step(self) -> bool:
        return self.state["step"] % self.k == 0

    def _direction(self, groups):
        return [self.grads(params) for _, params in groups]

    def perturbation(self, groups):
        for _, params in groups:
            for p in params:  # g is needed for g_v after the second pass: keep it where g_v will live
                self.state[p].setdefault("g_v", torch.empty_like(p)).copy_(p.grad)
        self._params = [p for _, params in groups for p in params]
        return self._scaled_gradients(groups)

    def _scaled_gradients(self, groups):
        grads = self._direction(groups)
        norm = global_norm([g for gs in grads for g in gs])
        for (group, _), g in zip(groups, grads):
            if g:
                torch._foreach_mul_(g, group["rho"] / (norm + EPS))
        return grads

    def adjust_gradient(self):
        if self._params:  # a SAM step: turn the kept g into g_v, descend with g_s
            g = [self.state[p]["g_v"] for p in self._params]
            g_s = self.grads(self._params)
            projection = global_dot(g, g_s) / (global_dot(g, g) + EPS)
            torch._foreach_mul_(g, -projection)
            torch._foreach_add_(g, g_s)
            self._params = []
        else:
            groups = [
                (group, [p for p in params if "g_v" in self.state[p]]) for group, params in self.params_with_grad()
            ]
            g = [self.grads(params) for _, params in groups]
            g_v = [[self.state[p]["g_v"] for p in params] for _, params in groups]
            ratio = global_norm([t for ts in g for t in ts]) / (global_norm([t for ts in g_v for t in ts]) + EPS)
            for (group, params), gi, vi in zip(groups, g, g_v):
                if params:
                    torch._foreach_add_(gi, torch._foreach_mul(vi, group["alpha"] * ratio))
        self.state["step"] += 1


class LookLayerSAM(LookSAM):
    def _scaled_gradients(self, groups):
        grads = self._direction(groups)
        for (group, params), g in zip(groups, grads):
            if not g:
                continue
            w_norms = torch.stack(torch._foreach_norm(params))
            g_norms = torch.stack(torch._foreach_norm(g))
            for gi, scale in zip(g, group["rho"] * w_norms / (g_norms * g_norms + EPS)):
                gi.mul_(scale)
        return grads

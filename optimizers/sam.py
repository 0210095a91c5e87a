"""SAM (Foret et al., ICLR'21): e = rho * g / ||g||.

``adaptive=True`` gives the "adaptive SAM" of davda54/sam and pytorch-optimizer:
e = rho * w^2 * g / || |w| * g || on every parameter (use rho around 2.0). It is not
the official ASAM operator, which is :class:`optimizers.asam.ASAM`.
"""

import torch

from .base import SharpnessAwareOptimizer, global_norm

EPS = 1e-12


class SAM(SharpnessAwareOptimizer):
    hyperparameters = {"rho": 0.05, "adaptive": False}

    def perturbation(self, groups):
        grads = [self.grads(params) for _, params in groups]
        weighted = [
            torch._foreach_mul(g, torch._foreach_abs(params)) if group["adaptive"] else g
            for (group, params), g in zip(groups, grads)
        ]
        norm = global_norm([t for ts in weighted for t in ts])
        for (group, params), g in zip(groups, grads):
            if group["adaptive"]:
                torch._foreach_mul_(g, torch._foreach_mul(params, params))
            torch._foreach_mul_(g, self.radius(group) / (norm + EPS))
        return grads

    def radius(self, group) -> float:
        """The perturbation radius for this step (GSAM's follows the learning rate)."""
        return group["rho"]

"""Fisher SAM (Kim et al., ICML'22).

The neighbourhood is an ellipsoid shaped by the diagonal Fisher estimate
f = 1 + eta * g^2 from the batch gradient:
    e = rho * f^-1 g / sqrt(g^T f^-1 g)
(rho is the paper's gamma). Scale-sensitive: it must see unscaled gradients.
"""

import torch

from .base import SharpnessAwareOptimizer, global_dot

EPS = 1e-12


class FisherSAM(SharpnessAwareOptimizer):
    hyperparameters = {"rho": 0.1, "eta": 1.0}

    def validate(self, group):
        super().validate(group)
        self.require(group["eta"] >= 0, f"eta must be >= 0, got {group['eta']}")

    def perturbation(self, groups):
        grads, directions = [], []
        for group, params in groups:
            g = self.grads(params)
            f = torch._foreach_mul(g, g)
            torch._foreach_mul_(f, group["eta"])
            torch._foreach_add_(f, 1.0)
            directions.append(list(torch._foreach_div(g, f)))  # f^-1 g
            grads.append(g)
        flat_g = [t for ts in grads for t in ts]
        flat_d = [t for ts in directions for t in ts]
        denominator = global_dot(flat_g, flat_d).sqrt() + EPS
        for (group, _), d in zip(groups, directions):
            if d:
                torch._foreach_mul_(d, group["rho"] / denominator)
        return directions

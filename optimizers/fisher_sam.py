"""Fisher SAM (Kim et al., ICML'22).

The neighbourhood is an ellipsoid shaped by the diagonal Fisher estimate
f = 1 + eta * g^2 from the batch gradient:
    e = rho * f^-1 g / sqrt(g^T f^-1 g)
(rho is the paper's gamma). Scale-sensitive: it must see unscaled gradients.
"""

import torch

from .base import SharpnessAwareOptimizer
from .settings import Setting
from .tensors import global_dot

EPS = 1e-12


class FisherSAM(SharpnessAwareOptimizer):
    settings = (
        Setting(
            "rho",
            0.1,
            range="[0, inf)",
            symbol="gamma",
            source="paper's CIFAR setting; no public code",
            help="radius of the Fisher ellipsoid (the paper's gamma)",
        ),
        Setting(
            "eta",
            1.0,
            range="[0, inf)",
            source="paper's CIFAR setting; no public code",
            help="weight of g^2 in the Fisher estimate f = 1 + eta g^2",
        ),
    )
    paper = "Kim et al., ICML'22"
    rule = "f = 1 + eta g²; e = rho f⁻¹g / sqrt(gᵀf⁻¹g) (rho is the paper's gamma)"
    undone_by_restore = True  # e is a function of this step's gradient alone

    def perturbation(self, groups):
        grads, directions = [], []
        for group, params in groups:
            g = self.grads(params)
            if not g:
                grads.append(g)
                directions.append([])
                continue
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

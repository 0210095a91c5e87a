"""Friendly SAM, F-SAM (Li et al., CVPR'24), as in the authors' code.

The full-batch gradient component, estimated by an exponential moving average m of
past gradients, is removed before perturbing:
    first step: m = g, d = g;   later: d = g - sigma * m,  m <- lmbda * m + (1 - lmbda) * g;
then plain SAM with d: e = rho * d / ||d||. m is per-parameter state (1x parameters).
"""

import torch

from .sam import SAM


class FriendlySAM(SAM):
    hyperparameters = {"rho": 0.2, "sigma": 1.0, "lmbda": 0.6, "adaptive": False}

    def validate(self, group):
        super().validate(group)
        self.require(group["sigma"] >= 0, f"sigma must be >= 0, got {group['sigma']}")
        self.require(0 <= group["lmbda"] < 1, f"lmbda must be in [0, 1), got {group['lmbda']}")

    def perturbation(self, groups):
        for group, params in groups:
            known = [p for p in params if "momentum" in self.state[p]]
            for p in params:
                if "momentum" not in self.state[p]:
                    self.state[p]["momentum"] = p.grad.clone()
            if not known:
                continue
            g, m = self.grads(known), [self.state[p]["momentum"] for p in known]
            raw = torch._foreach_mul(g, 1.0)
            torch._foreach_sub_(g, m, alpha=group["sigma"])
            torch._foreach_lerp_(m, raw, 1.0 - group["lmbda"])
        return super().perturbation(groups)

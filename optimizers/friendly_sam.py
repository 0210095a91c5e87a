"""Friendly SAM, F-SAM (Li et al., CVPR'24), as in the authors' code.

The full-batch gradient component, estimated by an exponential moving average m of
past gradients, is removed before perturbing:
    first step: m = g, d = g;   later: d = g - sigma * m,  m <- lmbda * m + (1 - lmbda) * g;
then plain SAM with d: e = rho * d / ||d||. m is per-parameter state (1x parameters).
"""

import torch

from .sam import SAM
from .settings import Setting


class FriendlySAM(SAM):
    settings = (
        Setting("rho", 0.2, range="[0, inf)", source="official run script", help="perturbation radius"),
        Setting(
            "sigma",
            1.0,
            range="[0, inf)",
            source="official run script",
            help="how much of the gradient's moving average is removed before perturbing",
        ),
        Setting(
            "lmbda",
            0.6,
            range="[0, 1)",
            source="official run script; train.py's default is 0.95",
            help="decay of the gradient's moving average m",
        ),
        Setting("adaptive", False, kind=bool, help="davda54-style w-weighted perturbation"),
    )
    state_from_ascent = True
    paper = "Li et al., CVPR'24"
    rule = "d = g - sigma m, m <- lmbda m + (1 - lmbda) g; SAM with d"
    undone_by_restore = False  # its perturbation moves the gradient's running mean
    extra_memory = 2
    memory_note = "weight backup, m"

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

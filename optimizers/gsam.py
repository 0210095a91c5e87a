"""GSAM (Zhuang et al., ICLR'22): surrogate-gap guided SAM.

e = rho_t * g / ||g|| (adaptive: rho_t * w^2 * g / || |w| * g ||). After the second
pass, the component of g orthogonal to g_s,
    g_v = g - cos(g, g_s) ||g|| g_s / ||g_s||,
is removed from the descent: g_s - alpha * g_v.

rho_t follows the group's learning rate, so the lr scheduler drives it:
    rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min),
with lr_max the group's initial lr (``initial_lr``, set by torch schedulers) unless
given, and rho_min = rho unless given: a constant radius, GSAM's schedule-free form. The
paper's runs set it (ImageNet ResNet-50: rho 0.04 to rho_min 0.02); claims about GSAM
require it (``a_sets`` in bench/report/claims.toml).
"""

import torch

from .sam import SAM
from .settings import Setting
from .tensors import global_dot, global_norm

EPS = 1e-12


class GSAM(SAM):
    settings = (
        Setting(
            "rho",
            0.05,
            range="[0, inf)",
            source="SAM's CIFAR-10 radius",
            help="radius at the group's initial lr (rho_max)",
        ),
        Setting(
            "rho_min",
            None,
            range="[0, inf)",
            optional=True,
            source="rho: a constant radius, the schedule-free form; the paper's schedule sets it (ResNet-50: rho / 2)",
            help="radius at lr_min (<= rho); unset: rho, a constant radius (GSAM without its schedule)",
        ),
        Setting(
            "alpha",
            0.4,
            range="[0, 1]",
            source="official PyTorch CIFAR example",
            help="weight of the removed component g_v",
        ),
        Setting("adaptive", False, kind=bool, help="davda54-style w-weighted perturbation"),
        Setting(
            "lr_max",
            None,
            range="(0, inf)",
            optional=True,
            source="the group's initial lr",
            help="lr at which the radius is rho",
        ),
        Setting("lr_min", 0.0, range="[0, inf)", help="lr at which the radius is rho_min"),
    )
    paper = "Zhuang et al., ICLR'22"
    rule = "descent g_s - alpha g_v, g_v = part of g orthogonal to g_s; rho_t follows the lr from rho to rho_min"
    undone_by_restore = False  # its perturbation sets the groups' radius rho_t
    ascent_sync = "global"

    def validate(self, group):
        super().validate(group)
        rho_min = group["rho"] if group["rho_min"] is None else group["rho_min"]
        self.require(rho_min <= group["rho"], f"rho_min must be in [0, rho={group['rho']}], got {rho_min}")

    @staticmethod
    def rho_t(group) -> float:
        rho_max = group["rho"]
        rho_min = rho_max if group["rho_min"] is None else group["rho_min"]
        lr_max = group["lr_max"] if group["lr_max"] is not None else group.get("initial_lr", group["lr"])
        lr_min = group["lr_min"]
        if lr_max <= lr_min:
            return rho_max
        return rho_min + (rho_max - rho_min) * (group["lr"] - lr_min) / (lr_max - lr_min)

    def radius(self, group) -> float:
        return group["rho_t"]

    def logged_values(self) -> dict[str, float]:
        """The radius of the first group at the current learning rate (rho_t)."""
        return {"rho": float(self.rho_t(self.param_groups[0]))} if self.param_groups else {}

    def perturbation(self, groups):
        for group, _ in groups:  # every group, so the logged radius is current even for a group without gradients
            group["rho_t"] = self.rho_t(group)
        self._g = [[p.grad.clone() for p in params] for _, params in groups]  # g, for g_v after the second pass
        self._groups = [group for group, _ in groups]
        self._params = [params for _, params in groups]
        return super().perturbation(groups)

    def adjust_gradient(self):
        # a parameter without a second-pass gradient has no descent gradient to adjust
        pairs = [[(p, g) for p, g in zip(ps, gs) if p.grad is not None] for ps, gs in zip(self._params, self._g)]
        self._params, self._g = [[p for p, _ in ps] for ps in pairs], [[g for _, g in ps] for ps in pairs]
        g_all = [t for ts in self._g for t in ts]
        g_s_all = [p.grad for ps in self._params for p in ps]
        norm_g, norm_s = global_norm(g_all), global_norm(g_s_all)
        cosine = global_dot(g_all, g_s_all) / (norm_g * norm_s + EPS)
        for group, params, g in zip(self._groups, self._params, self._g):
            if not params:
                continue
            g_s = self.grads(params)
            torch._foreach_add_(g, torch._foreach_mul(g_s, -cosine * norm_g / (norm_s + EPS)))  # g is now g_v
            torch._foreach_add_(g_s, g, alpha=-group["alpha"])
        self._g, self._groups, self._params = [], [], []

"""WSAM (Yue et al., KDD'23): sharpness as a weighted regularisation term.

Paper: "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization
Term", arXiv 2305.15817. Official code: intelligent-machine-learning/dlrover,
``atorch/atorch/optimizers/wsam.py`` (``WeightedSAM``); pytorch_optimizer 4.1.0's
``WSAM`` computes the same and is this project's oracle (tests/test_variants_next.py).

The loss is L + gamma/(1-gamma) (L_SAM - L). With alpha = gamma / (1 - gamma):

- perturbation as SAM: e = rho g / ||g|| (``adaptive``: rho w² g / || |w| g ||);
- g_adv at w + e, then restore w;
- ``decouple=True`` (the default): the base optimizer steps with g, then
  w <- w - lr alpha (g_adv - g): the sharpness term bypasses momentum and weight decay;
- ``decouple=False``: the base optimizer steps with alpha g_adv + (1 - alpha) g
  (gamma = 0.5 is SAM).

``max_norm`` clips g_adv only (global norm, as ``torch.nn.utils.clip_grad_norm_``), as
pytorch_optimizer does. The official code's clipping changed over time: the version read
here clips g too, before keeping it; a later commit removed that and the last dlrover
version restored it. With ``max_norm=None`` (the default) all of them agree.

Defaults: gamma 0.9 (the official default since May 2023, per this project's reference
notes; the copy read here is older: gamma 0.88, max_norm 1.0; pytorch_optimizer: 0.9).
rho 0.2 is the official demo's (``train_wsam_entry.sh``: CIFAR-10, ResNet-18, SGD 0.1,
momentum 0.9, wd 5e-4, decoupled), the project's convention being the authors' CIFAR
setting; the class default of both the official code and pytorch_optimizer is 0.05.
The paper's own grid was not consulted.

g reaches the update, so a data-parallel loop must all-reduce the ascent gradient
("global"). BatchNorm statistics come from the first pass, as in the official step
(which zeroes BN momentum for the second). g is kept only within a step.
The coupled form has no command-line flag (a store-true flag cannot switch a true
default off): set ``decouple = false`` in a recipe or through the Python API.
"""

import torch

from .grad_mode import without_grad
from .sam import SAM
from .settings import Setting

WSAM_DEMO = "official CIFAR-10 demo; class default 0.05"


class WSAM(SAM):
    settings = (
        Setting("rho", 0.2, range="[0, inf)", source=WSAM_DEMO, help="perturbation radius"),
        Setting(
            "gamma",
            0.9,
            range="[0, 1)",
            source="official default",
            help="weight of the sharpness term: alpha = gamma/(1-gamma) multiplies g_adv - g",
        ),
        Setting("adaptive", False, kind=bool, help="davda54-style w-weighted perturbation"),
        Setting(
            "decouple",
            True,
            kind=bool,
            per_group=False,
            source="official default",
            help="step with g, then subtract lr alpha (g_adv - g) outside the base optimizer",
        ),
        Setting(
            "max_norm",
            None,
            range="(0, inf)",
            optional=True,
            per_group=False,
            source="no clipping (official default since May 2023)",
            help="clip g_adv to this global norm",
        ),
    )
    paper = "Yue et al., KDD'23"
    rule = "alpha = gamma/(1-gamma); step with g, then w -= lr alpha (g_adv - g) (coupled: alpha g_adv + (1-alpha) g)"
    ascent_sync = "global"

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self._g, self._sharpness = [], []

    def perturbation(self, groups):
        self._g = [(group, params, [p.grad.clone() for p in params]) for group, params in groups]
        return super().perturbation(groups)

    def adjust_gradient(self):
        # only parameters with both gradients take part (one without g_adv has nothing to descend with)
        kept = [(group, [(p, g) for p, g in zip(params, gs) if p.grad is not None]) for group, params, gs in self._g]
        self._g = []
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, pairs in kept for p, _ in pairs], self.max_norm)
        for group, pairs in kept:
            if not pairs:
                continue
            params, g = [p for p, _ in pairs], [g for _, g in pairs]
            g_adv = self.grads(params)
            alpha = group["gamma"] / (1.0 - group["gamma"])
            if self.decouple:
                torch._foreach_sub_(g_adv, g)  # g_adv is now the sharpness gradient g_adv - g
                self._sharpness.append((group, params, g_adv))
                for p, gi in zip(params, g):
                    p.grad = gi
            else:
                torch._foreach_mul_(g_adv, alpha)
                torch._foreach_add_(g_adv, g, alpha=1.0 - alpha)

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        super().descend(zero_grad=False)
        for group, params, sharpness in self._sharpness:
            alpha = group["gamma"] / (1.0 - group["gamma"])
            torch._foreach_add_(params, sharpness, alpha=-group["lr"] * alpha)
        self._sharpness = []
        if zero_grad:
            self.zero_grad()

"""SAM-ON and ASAM-ON (Mueller et al., NeurIPS'23): perturb only the normalisation layers.

Paper: "Normalization Layers Are All That Sharpness-Aware Minimization Needs", arXiv
2306.04226. Official code: mueller-mp/SAM-ON, ``sam_on.py`` (``SAM_ON``, ``ASAM_ON``
with ``only_norm=True``), run by its ``train.py``.

N = the affine parameters of the normalisation layers that have a gradient:

- SAM-ON:  e = rho g / ||g_N||                            on N, e = 0 elsewhere;
- ASAM-ON: e = rho T² g / ||T g_N||,  T = |w| + eta       on N (the official
  ``elementwise`` operator; with ``normalize_bias=False`` T = 1 on the biases);

both norms taken over N only (+1e-16, as the official code). The second pass gives every
parameter its gradient at w + e, the norm layers are restored, and the base optimizer
steps with that gradient on all parameters.

Choosing N. The official code goes by name: a parameter is in N when its name contains
"norm" or "bn" (its README asks users to name every norm layer so). Here the module type
decides when the model is known (passed as ``params`` or ``model=``): the parameters of
BatchNorm (any ``_BatchNorm``, SyncBatchNorm included), LayerNorm, GroupNorm,
InstanceNorm and RMSNorm modules. The two rules differ on, e.g., a ResNet shortcut
``downsample.1`` / ``shortcut.1`` that is a BatchNorm (in N here, missed by the name
rule) and on a non-norm layer whose name contains "bn" or "norm" (``norm_head``: not
in N here, in N by name). Given named parameters without a model, the name rule is
used; given neither, N is empty (warned) and the step is the base optimizer's at w,
with two passes.

The weight backup covers every parameter with a gradient, as the official code's copy
(only N needs one; the project counts extra memory in whole multiples of the parameters).

BatchNorm: the official code does not freeze the running statistics in the second pass,
and neither does this one (``freezes_batchnorm = False``): BN layers see both passes.

Defaults: ``train.py``'s, for both (it runs either class): rho 0.5, eta 0.0 (the classes'
own default is 0.01), ``normalize_bias`` off; the paper's table of radii was not consulted.
The README's one command (ASAM-ON, WRN-28-10, CIFAR-100) sets ``--normalize_bias --rho=10``
(and ``--elementwise``, the T above; without it the code takes T = w, the same T² and
||T g|| when eta = 0): a radius that large suits a wide network, whose thousands of norm
parameters share it; on the digits CNN (a few hundred) rho 10 barely trains in 4 epochs,
rho 0.5 does. Not implemented: the official ``layerwise`` and ``p='infinity'`` operators
and ``no_norm`` (perturb everything but N).
"""

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .base import SharpnessAwareOptimizer, split_params_and_model
from .grad_mode import without_grad
from .settings import Setting
from .tensors import global_norm

EPS = 1e-16
NORM_LAYERS = tuple(t for t in (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t)


def norm_layer_parameters(model: nn.Module) -> dict[int, bool]:
    """id(parameter) -> whether it is its norm layer's ``weight``, for every norm-layer parameter."""
    return {
        id(p): p is module.weight
        for module in model.modules()
        if isinstance(module, NORM_LAYERS)
        for p in module.parameters(recurse=False)
    }


def by_name(name: str) -> bool:
    """The official rule: a normalisation parameter's name contains "norm" or "bn"."""
    return "norm" in name or "bn" in name


class SAMON(SharpnessAwareOptimizer):
    settings = (Setting("rho", 0.5, range="[0, inf)", source="official train.py", help="perturbation radius (norm layers only)"),)
    paper = "Mueller et al., NeurIPS'23"
    rule = "e = rho g / ||g_N|| on the normalisation layers N only; descent at w + e on every parameter"
    freezes_batchnorm = False
    undone_by_restore = True  # e is a function of this step's gradient (and weights) alone

    def __init__(self, params, base_optimizer="sgd", *, model: nn.Module | None = None, **kwargs):
        params, model = split_params_and_model(params, model)
        self._norm = norm_layer_parameters(model) if model is not None else None
        super().__init__(params, base_optimizer, model=model, **kwargs)

    def norm_parameters(self, group, params) -> list[tuple[torch.Tensor, bool]]:
        """(parameter, is a weight) for the parameters of ``params`` in N."""
        if self._norm is not None:
            return [(p, self._norm[id(p)]) for p in params if id(p) in self._norm]
        names = group.get("param_names")
        if names is None:
            self.warn_once(
                "no-names",
                f"{type(self).__name__} got neither the model nor parameter names: "
                "nothing is perturbed (pass the model, or model.named_parameters())",
            )
            return []
        name_of = dict(zip(map(id, group["params"]), names))
        return [(p, "weight" in name_of[id(p)]) for p in params if by_name(name_of[id(p)])]

    @without_grad
    def perturb(self, zero_grad: bool = True) -> None:
        """Move only N to w + e; back up every parameter with a gradient (as the official code)."""
        self.refuse_second_perturb()
        groups = self.params_with_grad()
        self.save_weights([p for _, params in groups for p in params])
        chosen = [(group, self.norm_parameters(group, params)) for group, params in groups]
        if not any(pairs for _, pairs in chosen):
            self.warn_once(
                "empty", f"{type(self).__name__}: no normalisation-layer parameter has a gradient; nothing is perturbed"
            )
        for (_, pairs), e in zip(chosen, self.perturbation(chosen)):
            if pairs:
                torch._foreach_add_([p for p, _ in pairs], e)
        self.enter_perturbed_pass(zero_grad)

    def perturbation(self, groups):
        return self.scale_to_radius(groups, [[p.grad for p, _ in pairs] for _, pairs in groups], EPS)


class ASAMON(SAMON):
    settings = (
        Setting(
            "rho",
            0.5,
            range="[0, inf)",
            source="official train.py; its README's WRN-28-10 command: 10",
            help="perturbation radius (norm layers only)",
        ),
        Setting(
            "eta",
            0.0,
            range="[0, inf)",
            source="official train.py; the class default is 0.01",
            help="added to |w| in T_w, so that zero weights are perturbed too",
        ),
        Setting(
            "normalize_bias",
            False,
            kind=bool,
            source="official train.py; its README's command sets it",
            help="T = |w| + eta on the norm layers' biases too (else T = 1 there)",
        ),
    )
    rule = "T = |w| + eta; e = rho T² g / ||T g_N|| on the normalisation layers N only"

    def perturbation(self, groups):
        scaled = []  # per group: T (None where T = 1) and T g, for each parameter in N
        for group, pairs in groups:
            t = [p.abs().add_(group["eta"]) if is_weight or group["normalize_bias"] else None for p, is_weight in pairs]
            scaled.append((t, [p.grad if ti is None else p.grad.mul_(ti) for (p, _), ti in zip(pairs, t)]))
        norm = global_norm([tg for _, tgs in scaled for tg in tgs])
        for (group, _), (t, tg) in zip(groups, scaled):
            for ti, tgi in zip(t, tg):
                if ti is not None:
                    tgi.mul_(ti)
                tgi.mul_(group["rho"] / (norm + EPS))
        return [tg for _, tg in scaled]

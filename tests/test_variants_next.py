"""WSAM, SAM-ON / ASAM-ON, VaSSO, SAGM, GAM, SS-SAM and AE-SAM: the oracle where there is
one (pytorch_optimizer's WSAM), and reference steps re-deriving each official arithmetic
functionally in float64 (two param groups, momentum, weight decay); plus what is
special to each (which tensors SAM-ON perturbs, GAM's four passes, the random and
adaptive step choices)."""


import pytest
import torch
from helpers import assert_close, batches, flat, plain_closure, requires_oracle, tiny_mlp, two_groups
from reference import loss_and_grads, norm
from torch import nn

from optimizers import create_optimizer

SGD = dict(lr=0.1, momentum=0.9)
ce = nn.CrossEntropyLoss(reduction="none")


class SGDPerTensor:
    """torch.optim.SGD's update (momentum, dampening 0) with each tensor's own weight decay."""

    def __init__(self, lr, momentum, weight_decays):
        self.lr, self.momentum, self.weight_decays, self.buffers = lr, momentum, weight_decays, None

    def __call__(self, weights, grads):
        d = [g + wd * w for w, g, wd in zip(weights, grads, self.weight_decays)]
        self.buffers = d if self.buffers is None else [self.momentum * b + di for b, di in zip(self.buffers, d)]
        return [w - self.lr * b for w, b in zip(weights, self.buffers)]


def grouped(model, first: int, rho=(0.05, 0.1), weight_decay=(5e-4, 1e-3), extra=({}, {})):
    """Two param groups (the first ``first`` tensors, the rest) and, per tensor, each group's settings."""
    params = list(model.parameters())
    groups = [
        {"params": params[:first], "rho": rho[0], "weight_decay": weight_decay[0], **extra[0]},
        {"params": params[first:], "rho": rho[1], "weight_decay": weight_decay[1], **extra[1]},
    ]
    per_tensor = [dict(groups[0], params=None)] * first + [dict(groups[1], params=None)] * (len(params) - first)
    return groups, per_tensor


def weights_of(model):
    return [p.detach().clone() for p in model.parameters()]


def as_flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def plus(w, e):
    return [wi + ei for wi, ei in zip(w, e)]


def sam_e(g, rhos, eps=1e-12):
    n = norm(g)
    return [rho * gi / (n + eps) for gi, rho in zip(g, rhos)]


def applied_perturbation(opt, model, x, y):
    """The e that perturb() really adds to the weights (w + e - w), and the weights restored after."""
    before = weights_of(model)
    plain_closure(model, x, y)()
    opt.perturb()
    e = [p.detach() - b for p, b in zip(model.parameters(), before)]
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return e


class Counting:
    """A plain closure that counts its calls."""

    def __init__(self, model, x, y):
        self.closure, self.calls = plain_closure(model, x, y), 0

    def __call__(self):
        self.calls += 1
        return self.closure()


# -- WSAM ----------------------------------------------------------------------------------------------

WSAM_CASES = [
    dict(decouple=True), dict(decouple=False),
    dict(decouple=True, max_norm=0.05), dict(decouple=False, max_norm=0.05),
    dict(decouple=True, adaptive=True),
]
WSAM_IDS = ["decoupled", "coupled", "decoupled-clipped", "coupled-clipped", "decoupled-adaptive"]


@requires_oracle
@pytest.mark.parametrize("case", WSAM_CASES, ids=WSAM_IDS)
def test_wsam_matches_pytorch_optimizer(case):
    """pytorch_optimizer computes ||g|| in float32: agreement to ~1e-9, not to the last bit."""
    import pytorch_optimizer

    rho = (0.5, 1.0) if case.get("adaptive") else (0.05, 0.1)
    ours_model, ref_model = tiny_mlp(), tiny_mlp()  # no BatchNorm: the oracle zeroes BN momentum instead of freezing
    ours = create_optimizer("wsam", two_groups(ours_model, rho), gamma=0.8, **case, **SGD)
    ref = pytorch_optimizer.WSAM(ref_model, two_groups(ref_model, rho, adaptive=case.get("adaptive", False)),
                                 torch.optim.SGD, gamma=0.8, **case, **SGD)
    for x, y in batches(6):
        ours.step(plain_closure(ours_model, x, y))
        ref.step(plain_closure(ref_model, x, y))
        assert_close(flat(ours_model), flat(ref_model), 1e-7)
    assert (flat(ours_model) - flat(tiny_mlp())).norm() > 1e-2


@pytest.mark.parametrize("case", WSAM_CASES[:4], ids=WSAM_IDS[:4])
def test_wsam_matches_reference(case):
    gamma, steps = 0.8, 5
    alpha = gamma / (1 - gamma)
    model, ref_model = tiny_mlp(), tiny_mlp()
    groups, per_tensor = grouped(model, 2)
    opt = create_optimizer("wsam", groups, gamma=gamma, **case, **SGD)
    sgd = SGDPerTensor(SGD["lr"], SGD["momentum"], [t["weight_decay"] for t in per_tensor])
    w = weights_of(ref_model)
    clipped = False
    for x, y in batches(steps):
        opt.step(plain_closure(model, x, y))
        _, g = loss_and_grads(ref_model, w, x, y)
        _, g_adv = loss_and_grads(ref_model, plus(w, sam_e(g, [t["rho"] for t in per_tensor])), x, y)
        if case.get("max_norm"):  # g_adv only, as torch.nn.utils.clip_grad_norm_
            scale = min(case["max_norm"] / (norm(g_adv).item() + 1e-6), 1.0)
            clipped |= scale < 1
            g_adv = [scale * t for t in g_adv]
        if case["decouple"]:
            w = [wi - SGD["lr"] * alpha * (a - gi) for wi, a, gi in zip(sgd(w, g), g_adv, g)]
        else:
            w = sgd(w, [alpha * a + (1 - alpha) * gi for a, gi in zip(g_adv, g)])
        assert_close(flat(model), as_flat(w), 1e-10)
    assert clipped or not case.get("max_norm")


def test_wsam_with_gamma_one_half_is_sam():
    model, sam_model = tiny_mlp(), tiny_mlp()
    opt = create_optimizer("wsam", model, rho=0.05, gamma=0.5, decouple=False, **SGD)
    sam = create_optimizer("sam", sam_model, rho=0.05, **SGD)
    for x, y in batches(4):
        opt.step(plain_closure(model, x, y))
        sam.step(plain_closure(sam_model, x, y))
    assert_close(flat(model), flat(sam_model), 1e-12)

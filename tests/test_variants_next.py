"""WSAM, SAM-ON / ASAM-ON, VaSSO, SAGM, GAM, SS-SAM and AE-SAM: the oracle where there is
one (pytorch_optimizer's WSAM), and reference steps re-deriving each official arithmetic
functionally in float64 (two param groups, momentum, weight decay); plus what is
special to each (which tensors SAM-ON perturbs, GAM's four passes, the random and
adaptive step choices)."""

import warnings

import pytest
import torch
from helpers import assert_close, batches, flat, plain_closure, requires_oracle, tiny_mlp, two_groups
from reference import dot, loss_and_grads, norm
from torch import nn

from optimizers import BatchClosure, create_optimizer

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
    dict(decouple=True),
    dict(decouple=False),
    dict(decouple=True, max_norm=0.05),
    dict(decouple=False, max_norm=0.05),
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
    ref = pytorch_optimizer.WSAM(
        ref_model, two_groups(ref_model, rho, adaptive=case.get("adaptive", False)), torch.optim.SGD, gamma=0.8, **case, **SGD
    )
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


# -- SAM-ON and ASAM-ON ------------------------------------------------------------------------------------


class NormNet(nn.Module):
    """Norm layers the name rule misses (``downsample.1``, ``ln``) and a Linear it takes (``norm_head``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        self.downsample = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.bn1 = nn.BatchNorm1d(8)
        self.norm_head = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # away from the initial 1 / 0, so that T = |w| + eta differs between tensors
            for m in (self.downsample[1], self.bn1, self.ln):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.bn1(self.stem(x)) + self.downsample(x))
        return self.head(self.ln(torch.tanh(self.norm_head(h))))


BY_TYPE = {"downsample.1.weight", "downsample.1.bias", "bn1.weight", "bn1.bias", "ln.weight", "ln.bias"}
BY_NAME = {"bn1.weight", "bn1.bias", "norm_head.weight", "norm_head.bias"}


@pytest.mark.parametrize("given, expected", [("model", BY_TYPE), ("names", BY_NAME)])
def test_sam_on_perturbs_exactly_the_normalisation_layers(given, expected):
    """By module type when the model is known, by the official name rule otherwise: nothing else moves, bit for bit."""
    model = NormNet()
    x, y = batches(1)[0]
    params = model if given == "model" else list(model.named_parameters())
    opt = create_optimizer("sam_on", params, rho=0.5, lr=0.1)
    e = dict(zip([n for n, _ in model.named_parameters()], applied_perturbation(opt, model, x, y)))
    assert {n for n, t in e.items() if t.abs().sum() > 0} == expected
    assert all(torch.equal(t, torch.zeros_like(t)) for n, t in e.items() if n not in expected)
    assert abs(norm(list(e.values())).item() - 0.5) < 1e-12  # ||e|| = rho: the norm is over N only


def test_sam_on_without_model_or_names_perturbs_nothing_and_says_so():
    model = NormNet()
    x, y = batches(1)[0]
    opt = create_optimizer("sam_on", list(model.parameters()), lr=0.1)
    with pytest.warns(UserWarning, match="neither the model nor parameter names"):
        e = applied_perturbation(opt, model, x, y)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in e)


def on_reference(name, model, per_tensor, steps, x_y, eta=0.0, normalize_bias=True):
    """SAM-ON / ASAM-ON as the official code computes them (N by module type), with SGD per tensor."""
    names = [n for n, _ in model.named_parameters()]
    in_n = [n in BY_TYPE for n in names]
    scaled = [n in BY_TYPE and (n.endswith("weight") or normalize_bias) for n in names]
    sgd = SGDPerTensor(SGD["lr"], SGD["momentum"], [t["weight_decay"] for t in per_tensor])
    w, out = weights_of(model), []
    for x, y in x_y[:steps]:
        _, g = loss_and_grads(model, w, x, y)
        t = [wi.abs() + eta if s and name == "asam_on" else torch.ones_like(wi) for wi, s in zip(w, scaled)]
        tg_norm = norm([ti * gi for ti, gi, n in zip(t, g, in_n) if n])
        e = [
            rt["rho"] * ti**2 * gi / (tg_norm + 1e-16) if n else torch.zeros_like(gi)
            for ti, gi, n, rt in zip(t, g, in_n, per_tensor)
        ]
        _, g_s = loss_and_grads(model, plus(w, e), x, y)
        w = sgd(w, g_s)
        out.append(as_flat(w))
    return out


@pytest.mark.parametrize(
    "name, settings",
    [("sam_on", {}), ("asam_on", {"eta": 0.01, "normalize_bias": True}), ("asam_on", {"eta": 0.01, "normalize_bias": False})],
    ids=["sam_on", "asam_on", "asam_on-weights-only"],
)
def test_sam_on_matches_reference(name, settings):
    model = NormNet()
    groups, per_tensor = grouped(model, 6, rho=(0.3, 0.6) if name == "sam_on" else (2.0, 4.0))
    opt = create_optimizer(name, groups, model=model, **settings, **SGD)
    data = batches(4)
    expected = on_reference(name, NormNet(), per_tensor, 4, data, **settings)
    for (x, y), w in zip(data, expected):
        opt.step(plain_closure(model, x, y))
        assert_close(flat(model), w, 1e-10)


def test_sam_on_updates_batchnorm_in_both_passes_like_the_official_code():
    model = NormNet()
    opt = create_optimizer("sam_on", model, lr=0.1)
    x, y = batches(1)[0]
    opt.step(BatchClosure(model, ce, x, y))
    assert model.bn1.num_batches_tracked.item() == 2 and model.downsample[1].num_batches_tracked.item() == 2


# -- VaSSO --------------------------------------------------------------------------------------------------


def test_vasso_matches_reference():
    steps = 5
    model, ref_model = tiny_mlp(), tiny_mlp()
    groups, per_tensor = grouped(model, 2, rho=(0.05, 0.1), extra=({"theta": 0.9}, {"theta": 0.6}))
    opt = create_optimizer("vasso", groups, **SGD)
    sgd = SGDPerTensor(SGD["lr"], SGD["momentum"], [t["weight_decay"] for t in per_tensor])
    w, d = weights_of(ref_model), None
    for x, y in batches(steps):
        opt.step(plain_closure(model, x, y))
        _, g = loss_and_grads(ref_model, w, x, y)
        d = g if d is None else [(1 - t["theta"]) * di + t["theta"] * gi for di, gi, t in zip(d, g, per_tensor)]
        e = [t["rho"] * di / (norm(d) + 1e-7) for di, t in zip(d, per_tensor)]
        _, g_s = loss_and_grads(ref_model, plus(w, e), x, y)
        w = sgd(w, g_s)
        assert_close(flat(model), as_flat(w), 1e-10)
    assert_close(as_flat([opt.state[p]["d"] for p in model.parameters()]), as_flat(d), 1e-12)


def test_vasso_updates_batchnorm_in_both_passes_like_the_official_code():
    model = tiny_mlp(batchnorm=True)
    opt = create_optimizer("vasso", model, lr=0.1)
    x, y = batches(1)[0]
    opt.step(BatchClosure(model, ce, x, y))
    assert model[1].num_batches_tracked.item() == 2


# -- SAGM ---------------------------------------------------------------------------------------------------


def test_sagm_matches_reference():
    steps, alpha = 5, 0.05  # a larger alpha than the default 0.001, so that the -alpha g term shows
    model, ref_model = tiny_mlp(), tiny_mlp()
    groups, per_tensor = grouped(model, 2, rho=(0.05, 0.1), extra=({"alpha": alpha}, {"alpha": 2 * alpha}))
    opt = create_optimizer("sagm", groups, **SGD)
    sgd = SGDPerTensor(SGD["lr"], SGD["momentum"], [t["weight_decay"] for t in per_tensor])
    w = weights_of(ref_model)
    for x, y in batches(steps):
        opt.step(plain_closure(model, x, y))
        _, g = loss_and_grads(ref_model, w, x, y)
        e = [(t["rho"] / (norm(g) + 1e-12) - t["alpha"]) * gi for gi, t in zip(g, per_tensor)]
        _, g_adv = loss_and_grads(ref_model, plus(w, e), x, y)
        w = sgd(w, [(gi + a) / 2 for gi, a in zip(g, g_adv)])
        assert_close(flat(model), as_flat(w), 1e-10)


# -- GAM ----------------------------------------------------------------------------------------------------


def gam_direction(ref_model, w, x, y, per_tensor, eps=1e-12):
    """The released code's four passes and decomposition."""

    def unit(v):
        n = norm(v)
        return [vi / (n + eps) for vi in v]

    _, g0 = loss_and_grads(ref_model, w, x, y)
    _, g1 = loss_and_grads(ref_model, [wi + t["rho_prime"] * u for wi, u, t in zip(w, unit(g0), per_tensor)], x, y)
    w2 = [wi + t["rho"] * u for wi, u, t in zip(w, unit([a - b for a, b in zip(g1, g0)]), per_tensor)]
    _, g2 = loss_and_grads(ref_model, w2, x, y)
    _, g3 = loss_and_grads(ref_model, [wi + t["rho_prime"] * u for wi, u, t in zip(w2, unit(g2), per_tensor)], x, y)
    d = [t["alpha"] * a + (1 - t["alpha"]) * b for a, b, t in zip(g1, g3, per_tensor)]
    pm = [a + abs(1 - t["beta"]) * b for a, b, t in zip(g0, g2, per_tensor)]
    cosine = dot(pm, d) / (norm(d) * norm(pm) + eps)
    vertical = [p - cosine * norm(pm) * di / (norm(d) + eps) for p, di in zip(pm, d)]
    return [di - t["gamma"] * v for di, v, t in zip(d, vertical, per_tensor)]


def gam_groups(model):
    return grouped(
        model,
        2,
        rho=(0.2, 0.3),
        extra=(
            {"rho_prime": 0.03, "alpha": 0.1, "beta": 0.1, "gamma": 0.05},
            {"rho_prime": 0.05, "alpha": 0.6, "beta": 0.5, "gamma": 0.2},
        ),
    )


def test_gam_matches_reference():
    model, ref_model = tiny_mlp(), tiny_mlp()
    groups, per_tensor = gam_groups(model)
    opt = create_optimizer("gam", groups, **SGD)
    sgd = SGDPerTensor(SGD["lr"], SGD["momentum"], [t["weight_decay"] for t in per_tensor])
    w = weights_of(ref_model)
    for x, y in batches(4):
        closure = Counting(model, x, y)
        opt.step(closure)
        assert closure.calls == 4
        w = sgd(w, gam_direction(ref_model, w, x, y, per_tensor))
        assert_close(flat(model), as_flat(w), 1e-10)
    assert opt.extra_state_bytes() == sum(p.numel() * p.element_size() for p in model.parameters())  # the backup only


def test_gam_two_phase_form_takes_four_passes_or_warns():
    x_y = batches(3)
    full_model, step_model, short_model, sam_model = tiny_mlp(), tiny_mlp(), tiny_mlp(), tiny_mlp()
    full, by_step = create_optimizer("gam", full_model, **SGD), create_optimizer("gam", step_model, **SGD)
    short = create_optimizer("gam", short_model, **SGD)
    sam = create_optimizer("sam", sam_model, rho=0.03, **SGD)  # GAM's rho' is 0.03
    for x, y in x_y:
        plain_closure(full_model, x, y)()
        for _ in range(3):
            full.perturb()
            plain_closure(full_model, x, y)()
        full.descend()
        by_step.step(plain_closure(step_model, x, y))
        plain_closure(short_model, x, y)()
        short.perturb()
        plain_closure(short_model, x, y)()
        with pytest.warns(UserWarning, match="2 of its four passes"):
            warnings.simplefilter("always")
            short._warned.clear()
            short.descend()
        sam.step(plain_closure(sam_model, x, y))
    assert torch.equal(flat(full_model), flat(step_model))
    assert_close(flat(short_model), flat(sam_model), 1e-12)


def test_gam_batchnorm_statistics_come_from_the_first_pass():
    torch.manual_seed(0)
    model = tiny_mlp(batchnorm=True)
    opt = create_optimizer("gam", model, lr=0.1)
    x, y = batches(1)[0]
    opt.step(BatchClosure(model, ce, x, y))
    assert model[1].num_batches_tracked.item() == 1 and model[1].track_running_stats


# -- SS-SAM -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [{"p": 0.5}, {"p": 1.0, "p_end": 0.0, "total_steps": 6}], ids=["constant", "linear"])
def test_ss_sam_matches_reference(schedule):
    seed, steps = 11, 8
    model, ref_model = tiny_mlp(), tiny_mlp()
    groups, per_tensor = grouped(model, 2)
    opt = create_optimizer("ss_sam", groups, seed=seed, **schedule, **SGD)
    draws = torch.Generator().manual_seed(seed)
    sgd = SGDPerTensor(SGD["lr"], SGD["momentum"], [t["weight_decay"] for t in per_tensor])
    w, kinds = weights_of(ref_model), []
    for t, (x, y) in enumerate(batches(steps)):
        closure = Counting(model, x, y)
        assert opt.perturbs_this_step == opt.perturbs_this_step  # one draw per step, whatever the queries
        opt.step(closure)
        p = schedule["p"] + (schedule.get("p_end", schedule["p"]) - schedule["p"]) * min(t / schedule.get("total_steps", 1), 1)
        sam = torch.rand((), generator=draws).item() < p
        kinds.append(sam)
        assert closure.calls == 1 + sam
        _, g = loss_and_grads(ref_model, w, x, y)
        if sam:
            _, g = loss_and_grads(ref_model, plus(w, sam_e(g, [r["rho"] for r in per_tensor])), x, y)
        w = sgd(w, g)
        assert_close(flat(model), as_flat(w), 1e-10)
    assert any(kinds) and not all(kinds)
    if "p_end" in schedule:
        assert kinds[0] and not any(kinds[6:])  # p = 1 at the start, 0 from total_steps on
    assert opt.logged_values()["sam_fraction"] == pytest.approx(sum(kinds) / steps)


def test_ss_sam_abandoned_step_forgets_its_draw_but_not_the_stream():
    opt = create_optimizer("ss_sam", tiny_mlp(), seed=2, lr=0.1)
    reference = torch.Generator().manual_seed(2)
    first = opt.perturbs_this_step
    opt.restore()  # what the harness does when a pass is non-finite
    second = opt.perturbs_this_step
    assert [first, second] == [torch.rand((), generator=reference).item() < 0.5 for _ in range(2)]
    assert opt.state["ss_sam"]["step"] == 0


# -- AE-SAM -------------------------------------------------------------------------------------------------


def test_ae_sam_matches_reference():
    steps, delta, lambda1, lambda2 = 10, 0.9, -1.0, 1.0
    model, ref_model = tiny_mlp(), tiny_mlp()
    groups, per_tensor = grouped(model, 2)
    opt = create_optimizer("ae_sam", groups, total_steps=steps, **SGD)
    sgd = SGDPerTensor(SGD["lr"], SGD["momentum"], [t["weight_decay"] for t in per_tensor])
    w, mu, var, kinds = weights_of(ref_model), 0.0, 0.0, []
    for t, (x, y) in enumerate(batches(steps, seed=4)):
        closure = Counting(model, x, y)
        opt.step(closure)
        _, g = loss_and_grads(ref_model, w, x, y)
        n = norm(g).item() ** 2
        mu = delta * mu + (1 - delta) * n
        var = delta * var + (1 - delta) * (n - mu) ** 2
        c = t / steps * lambda1 + (1 - t / steps) * lambda2
        sam = n >= mu + c * var**0.5
        kinds.append(sam)
        assert closure.calls == 1 + sam
        if sam:
            _, g = loss_and_grads(ref_model, plus(w, sam_e(g, [r["rho"] for r in per_tensor])), x, y)
        w = sgd(w, g)
        assert_close(flat(model), as_flat(w), 1e-10)
        state = opt.state_dict()["state"]["ae_sam"]
        assert state["step"] == t + 1 and state["mu"] == pytest.approx(mu, rel=1e-12)
        assert state["var"] == pytest.approx(var, rel=1e-9)
    assert any(kinds) and not all(kinds)


def test_ae_sam_two_phase_form_decides_after_the_first_pass():
    model, other = tiny_mlp(), tiny_mlp()
    opt, by_step = (
        create_optimizer("ae_sam", model, total_steps=6, **SGD),
        create_optimizer("ae_sam", other, total_steps=6, **SGD),
    )
    for x, y in batches(6, seed=4):
        plain_closure(model, x, y)()
        if opt.perturbs_this_step:
            opt.perturb()
            plain_closure(model, x, y)()
        opt.descend()
        by_step.step(plain_closure(other, x, y))
    assert torch.equal(flat(model), flat(other))
    assert opt.state["ae_sam"] == by_step.state["ae_sam"]


def test_ae_sam_abandoned_step_changes_nothing():
    model = tiny_mlp()
    opt = create_optimizer("ae_sam", model, total_steps=4, lr=0.1)
    x, y = batches(1)[0]
    plain_closure(model, x, y)()
    assert opt.perturbs_this_step  # mu = var = 0 at the start: the first step is a SAM step
    opt.perturb()
    opt.restore()  # a non-finite second pass: the harness restores and moves on
    assert opt.state["ae_sam"] == {"mu": 0.0, "var": 0.0, "step": 0, "sam_steps": 0}

"""MSAM, Lookbehind-SAM and ARWP against reference steps derived from their update rules
(float64, several steps, momentum and weight decay); the weights each evaluates and exports;
and MSAM through the harness, whose exported model must hold the unperturbed weights."""

import math

import pytest
import torch
from helpers import assert_close, batches, flat, plain_closure, tiny_mlp, two_groups
from reference import loss_and_grads, norm
from safetensors.torch import load_file
from torch import nn

from optimizers import BatchClosure, create_optimizer

ce = nn.CrossEntropyLoss(reduction="none")


def weights_of(model):
    return [p.detach().clone() for p in model.parameters()]


def cat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def group_of(model):
    """The group index of each parameter under helpers.two_groups: first layer, then the rest."""
    n_first = len(list(next(iter(model.children())).parameters()))
    return [0 if i < n_first else 1 for i, _ in enumerate(model.parameters())]


# -- MSAM ----------------------------------------------------------------------------------------


MSAM_HP = dict(lr=0.1, momentum=0.9)
MSAM_RHO = (0.3, 0.6)  # per group
MSAM_WD = (5e-4, 1e-3)  # per group, as helpers.two_groups sets them


class MSAMRef:
    """MSAM from its update rule: the stored weights are w~ = w - rho_g v / ||v|| (0 before the first step)."""

    def __init__(self, w, groups):
        self.w, self.groups, self.v = w, groups, None

    def perturbed(self):
        if self.v is None:
            return list(self.w)
        n = norm(self.v)
        return [wi - MSAM_RHO[g] * vi / (n + 1e-12) for wi, vi, g in zip(self.w, self.v, self.groups)]

    def step(self, model, x, y):
        w_tilde = self.perturbed()
        _, g = loss_and_grads(model, w_tilde, x, y)
        d = [gi + MSAM_WD[k] * wt for gi, wt, k in zip(g, w_tilde, self.groups)]  # weight decay at w~
        self.v = d if self.v is None else [MSAM_HP["momentum"] * vi + di for vi, di in zip(self.v, d)]
        self.w = [wi - MSAM_HP["lr"] * vi for wi, vi in zip(self.w, self.v)]


def msam_pair():
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = create_optimizer("msam", two_groups(model, MSAM_RHO), **MSAM_HP)
    return model, opt, ref_model, MSAMRef(weights_of(ref_model), group_of(ref_model))


@pytest.mark.parametrize("form", ["step", "two-phase"])
def test_msam_matches_reference(form):
    model, opt, ref_model, ref = msam_pair()
    assert opt.param_groups[1]["weight_decay"] == MSAM_WD[1] and opt.param_groups[1]["rho"] == MSAM_RHO[1]
    for x, y in batches(5):
        if form == "step":
            opt.step(plain_closure(model, x, y))
        else:  # the two-phase loop: one pass, no perturb()
            plain_closure(model, x, y)()
            assert not opt.perturbs_this_step
            opt.descend()
        ref.step(ref_model, x, y)
        assert_close(flat(model), cat(ref.perturbed()), 1e-10)  # the model holds w~ between steps
        with opt.evaluation_weights():
            assert_close(flat(model), cat(ref.w), 1e-10)
    assert not torch.allclose(cat(ref.w), cat(ref.perturbed()))


def test_msam_first_step_is_unperturbed():
    model, opt, ref_model, _ = msam_pair()
    x, y = batches(1)[0]
    w0 = flat(model)
    with opt.evaluation_weights():  # nothing to swap before the first step
        assert torch.equal(flat(model), w0)
    _, g = loss_and_grads(ref_model, weights_of(ref_model), x, y)
    opt.step(plain_closure(model, x, y))
    with opt.evaluation_weights():  # w1 = w0 - lr (g + wd w0): the gradient was taken at w0
        expected = [w - 0.1 * (gi + MSAM_WD[k] * w) for w, gi, k in zip(weights_of(ref_model), g, group_of(model))]
        assert_close(flat(model), cat(expected), 1e-12)


def test_msam_evaluation_weights_restore_the_perturbed_weights_bit_for_bit():
    model, opt, *_ = msam_pair()
    for x, y in batches(3):
        opt.step(plain_closure(model, x, y))
    stored = flat(model)
    c = opt.state["inverse_norm"]
    expected = []
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:  # exactly what the next step computes when it undoes the perturbation
                expected.append(p + opt.state[p]["momentum_buffer"] * (c * group["rho"]))
    with opt.evaluation_weights():
        inside = flat(model)
    assert torch.equal(inside, cat(expected))
    assert not torch.equal(inside, stored)
    assert torch.equal(flat(model), stored)
    with pytest.raises(RuntimeError), opt.evaluation_weights():  # restored on the way out of an error too
        raise RuntimeError("evaluation failed")
    assert torch.equal(flat(model), stored)


def test_msam_has_its_own_rule():
    with pytest.raises(ValueError, match="base optimizer"):
        create_optimizer("msam", tiny_mlp(), base="adamw")
    with pytest.raises(ValueError, match="nesterov"):
        create_optimizer("msam", tiny_mlp(), nesterov=True)
    with pytest.raises(NotImplementedError):
        create_optimizer("msam", tiny_mlp()).perturb()


def test_msam_through_the_harness_exports_the_unperturbed_weights(tmp_path):
    """The checkpoint holds w~ and (v, c); model.safetensors must hold w = w~ + rho c v, bit for bit."""
    from bench.config import RunConfig
    from bench.loop.checkpoint import checkpoints
    from bench.loop.train import train

    result = train(RunConfig(optimizer="msam", epochs=1, max_steps=4, batch_size=64, cpu=True, output_dir=str(tmp_path)))
    assert result.summary["steps"] == 4 and result.summary["model_exported"]
    exported = load_file(result.run_dir / "model.safetensors")
    last = checkpoints(result.run_dir)[-1]
    stored = load_file(last / "model.safetensors")  # the perturbed weights w~
    saved_opt = torch.load(last / "trainer_state.pt", weights_only=True)["optimizer"]
    names = saved_opt["param_groups"][0]["param_names"]
    params = [(n, stored[n].clone().requires_grad_()) for n in names]
    opt = create_optimizer("msam", params)
    opt.load_state_dict(saved_opt)
    with opt.evaluation_weights():
        for n, p in params:
            assert torch.equal(p.detach(), exported[n]), n
    assert all(torch.equal(p.detach(), stored[n]) for n, p in params)
    moved = sum(not torch.equal(stored[n], exported[n]) for n in names)
    assert moved == len(names)  # every trained tensor differs by the perturbation
    assert all(torch.equal(stored[k], exported[k]) for k in stored if k not in names)  # buffers: the same


# -- Lookbehind-SAM --------------------------------------------------------------------------------


LB_SGD = dict(lr=0.1, momentum=0.9)
LB_RHO = (0.05, 0.1)  # per group
LB_WD = (5e-4, 1e-3)  # per group, as helpers.two_groups sets them


def sgd_per_group(w, d, buffers, groups):
    """torch SGD (momentum, per-group weight decay, dampening 0) by hand; ``buffers`` persist across calls."""
    d = [di + LB_WD[k] * wi for wi, di, k in zip(w, d, groups)]
    for i, di in enumerate(d):
        buffers[i] = di if buffers[i] is None else LB_SGD["momentum"] * buffers[i] + di
    return [wi - LB_SGD["lr"] * b for wi, b in zip(w, buffers)]


def cosine(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


def lookbehind_reference(model, w, data, k, alpha, per_tensor=True):
    """The slow weights after each batch: k SAM steps on it, ascents accumulating from the slow
    weights, fast weights phi stepped by SGD whose momentum persists; then the lookbehind step."""
    groups, buffers, out = group_of(model), [None] * len(w), []
    for x, y in data:
        slow, u, phi = list(w), list(w), list(w)
        for j in range(k):
            _, g = loss_and_grads(model, u, x, y)
            n = norm(g)
            u = [ui + LB_RHO[grp] * gi / (n + 1e-16) for ui, gi, grp in zip(u, g, groups)]
            _, g_adv = loss_and_grads(model, u, x, y)
            phi = sgd_per_group(phi, g_adv, buffers, groups)
            if j == 0:
                phi_1 = phi
        if alpha == -1 and per_tensor:
            alphas = [(cosine(p1 - s, pk - s) + 1) / 2 for p1, pk, s in zip(phi_1, phi, slow)]
        elif alpha == -1:
            alphas = [(cosine(cat(phi_1) - cat(slow), cat(phi) - cat(slow)) + 1) / 2] * len(w)
        else:
            alphas = [alpha] * len(w)
        w = [a * pk + (1 - a) * s for a, pk, s in zip(alphas, phi, slow)]
        out.append(w)
    return out


def lookbehind_pair(k, alpha):
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = create_optimizer("lookbehind_sam", two_groups(model, LB_RHO), k_steps=k, alpha=alpha, **LB_SGD)
    return model, opt, ref_model


@pytest.mark.parametrize("alpha", [-1.0, 0.5], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("k", [2, 3])
def test_lookbehind_matches_reference(k, alpha):
    model, opt, ref_model = lookbehind_pair(k, alpha)
    data = batches(3)
    expected = lookbehind_reference(ref_model, weights_of(ref_model), data, k, alpha)
    for (x, y), w in zip(data, expected):
        calls = []

        def closure(x=x, y=y, calls=calls):
            calls.append(1)
            return plain_closure(model, x, y)()

        opt.step(closure)
        assert len(calls) == 2 * k  # the closure is called 2k times: one batch, k inner SAM steps
        assert_close(flat(model), cat(w), 1e-10)  # between steps the model holds the slow weights
        with opt.evaluation_weights():  # so evaluation changes nothing
            assert_close(flat(model), cat(w), 1e-10)
    assert opt.extra_state_bytes() == (4 if alpha == -1 and k >= 3 else 3) * flat(model).numel() * 8


def test_lookbehind_adaptive_alpha_is_per_tensor():
    """One cosine per tensor, as the official code: one global cosine gives measurably different weights."""
    model, opt, ref_model = lookbehind_pair(3, -1.0)
    data = batches(2)
    per_tensor = lookbehind_reference(ref_model, weights_of(ref_model), data, 3, -1.0)[-1]
    one_global = lookbehind_reference(ref_model, weights_of(ref_model), data, 3, -1.0, per_tensor=False)[-1]
    for x, y in data:
        opt.step(plain_closure(model, x, y))
    assert_close(flat(model), cat(per_tensor), 1e-10)
    err = ((flat(model) - cat(one_global)).norm() / cat(one_global).norm()).item()
    assert err > 1e-8, err


def test_lookbehind_two_phase_form_repeating_the_batch_is_step():
    """perturb()/descend() take one inner step; the same batch k times is step(closure), bit for bit."""
    k = 3
    model_a, opt_a, _ = lookbehind_pair(k, -1.0)
    model_b, opt_b, _ = lookbehind_pair(k, -1.0)
    for x, y in batches(2):
        opt_a.step(plain_closure(model_a, x, y))
        for _ in range(k):
            plain_closure(model_b, x, y)()
            assert opt_b.perturbs_this_step
            opt_b.perturb()
            plain_closure(model_b, x, y)()
            opt_b.descend()
        assert torch.equal(flat(model_a), flat(model_b))


def test_lookbehind_mid_cycle_evaluation_and_resume():
    """In the middle of a two-phase cycle the model holds the perturbed point: evaluation swaps the
    slow weights in and out bit for bit, and a state_dict taken there resumes bit for bit."""
    import copy

    k = 3
    (x, y), (x2, y2) = batches(2)

    def inner_step(model, opt, x, y):
        plain_closure(model, x, y)()
        opt.perturb()
        plain_closure(model, x, y)()
        opt.descend()

    model, opt, _ = lookbehind_pair(k, -1.0)
    slow = flat(model)
    inner_step(model, opt, x, y)
    assert opt.state["inner"] == 1
    point = flat(model)
    assert not torch.equal(point, slow)
    with opt.evaluation_weights():
        assert torch.equal(flat(model), slow)
    assert torch.equal(flat(model), point)

    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(k - 1):
        inner_step(model, opt, x, y)
    opt.step(plain_closure(model, x2, y2))

    resumed, opt_r, _ = lookbehind_pair(k, -1.0)
    resumed.load_state_dict(saved_model)
    opt_r.load_state_dict(saved_opt)
    for _ in range(k - 1):
        inner_step(resumed, opt_r, x, y)
    opt_r.step(plain_closure(resumed, x2, y2))
    assert torch.equal(flat(resumed), flat(model))
    assert not any(
        key in s for s in opt.state_dict()["state"].values() if isinstance(s, dict) for key in ("slow", "fast", "point", "first")
    )  # between cycles nothing of them is saved


def test_lookbehind_failed_pass_restores_the_slow_weights():
    """The harness's skip rule: restore() after a failed pass puts the slow weights back and ends the cycle."""
    model, opt, _ = lookbehind_pair(2, -1.0)
    (x, y), (x2, y2) = batches(2)
    opt.step(plain_closure(model, x, y))
    slow = flat(model)
    passes = []

    def failing(x=x2, y=y2):
        passes.append(1)
        loss = plain_closure(model, x, y)()
        if len(passes) == 3:  # the ascent pass of the second inner step
            raise FloatingPointError("non-finite")
        return loss

    with pytest.raises(FloatingPointError):
        opt.step(failing)
    opt.restore()
    opt.zero_grad()
    assert torch.equal(flat(model), slow) and opt.state["inner"] == 0
    opt.step(plain_closure(model, x2, y2))  # a fresh cycle from the slow weights
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), slow)


def test_lookbehind_zero_gradients_take_k_weight_decay_steps():
    """Zero gradients: k SGD steps of weight decay on the fast weights; both displacements are parallel,
    so the adaptive alpha is 1 and the slow weights follow the fast ones."""
    lr, wd, k = 0.1, 1e-2, 2
    model = tiny_mlp()
    opt = create_optimizer("lookbehind_sam", model, lr=lr, weight_decay=wd, k_steps=k)
    w = flat(model)
    for x, y in batches(3):
        opt.step(BatchClosure(model, lambda out, t: (out * 0).sum(dim=1), x, y))
        w = w * (1 - lr * wd) ** k
        assert_close(flat(model), w, 1e-12)


def test_lookbehind_alpha_values():
    with pytest.raises(ValueError, match=r"^alpha must be -1 \(adaptive\) or in \(0, 1\]"):
        create_optimizer("lookbehind_sam", tiny_mlp(), alpha=-0.5)
    with pytest.raises(ValueError, match="alpha"):
        create_optimizer("lookbehind_sam", tiny_mlp(), alpha=0.0)
    assert create_optimizer("lookbehind_sam", tiny_mlp(), alpha=1).alpha == 1.0
    assert create_optimizer("lookbehind_sam", tiny_mlp(), k_steps=1).k_steps == 1


# -- ARWP ------------------------------------------------------------------------------------------


ARWP_HP = dict(lr=0.1, momentum=0.9, eta=0.5, beta=0.9, inc=10.0, seed=11)
ARWP_STD = (0.01, 0.02)  # per group
ARWP_WD = (5e-4, 1e-3)


def arwp_groups(model):
    first, *rest = list(model.children())
    return [
        {"params": list(first.parameters()), "std": ARWP_STD[0], "weight_decay": ARWP_WD[0]},
        {"params": [p for m in rest for p in m.parameters()], "std": ARWP_STD[1], "weight_decay": ARWP_WD[1]},
    ]


def arwp_reference(model, w, data, total_steps):
    """ARWP from its rule: filter-wise noise from the seeded stream, scaled by 1/sqrt(1 + eta F_filter)."""
    gen = torch.Generator().manual_seed(ARWP_HP["seed"])
    groups, fisher, buffers, out = group_of(model), [None] * len(w), [None] * len(w), []
    for t, (x, y) in enumerate(data):
        noisy = []
        for i, (wi, grp) in enumerate(zip(w, groups)):
            s = ARWP_STD[grp] * (1 + ARWP_HP["inc"] * (1 - math.cos(math.pi * t / total_steps)) / 2)
            z = torch.randn(wi.shape, generator=gen, dtype=wi.dtype)
            if wi.dim() > 1:
                e = z * ((s + 1e-16) * wi.reshape(wi.shape[0], -1).norm(dim=1))[:, None]
            else:
                e = z * s * (wi.norm() + 1e-16)
            if fisher[i] is not None:
                f = fisher[i].reshape(wi.shape[0], -1).sum(dim=1)
                e = e / torch.sqrt(1 + ARWP_HP["eta"] * (f[:, None] if wi.dim() > 1 else f))
            noisy.append(wi + e)
        _, g = loss_and_grads(model, noisy, x, y)
        fisher = [gi**2 if f is None else ARWP_HP["beta"] * f + gi**2 for f, gi in zip(fisher, g)]
        d = [gi + ARWP_WD[grp] * wi for gi, wi, grp in zip(g, w, groups)]
        buffers = [di if b is None else ARWP_HP["momentum"] * b + di for b, di in zip(buffers, d)]
        w = [wi - ARWP_HP["lr"] * b for wi, b in zip(w, buffers)]
        out.append(w)
    return out


@pytest.mark.parametrize("form", ["step", "two-phase"])
def test_arwp_matches_reference(form):
    steps = 6
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = create_optimizer("arwp", arwp_groups(model), total_steps=steps - 1, **ARWP_HP)
    data = batches(steps)
    for (x, y), w in zip(data, arwp_reference(ref_model, weights_of(ref_model), data, steps - 1)):
        if form == "step":
            opt.step(plain_closure(model, x, y))
        else:  # a wasted first pass, then the same arithmetic
            plain_closure(model, x, y)()
            assert opt.perturbs_this_step
            opt.perturb()
            plain_closure(model, x, y)()
            opt.descend()
        assert_close(flat(model), cat(w), 1e-10)
    assert opt.state["step"] == steps


def test_arwp_two_phase_form_equals_step_bit_for_bit():
    model_a, model_b = tiny_mlp(), tiny_mlp()
    opt_a = create_optimizer("arwp", model_a, **ARWP_HP)
    opt_b = create_optimizer("arwp", model_b, **ARWP_HP)
    for x, y in batches(3):
        opt_a.step(plain_closure(model_a, x, y))
        plain_closure(model_b, x, y)()
        opt_b.perturb()
        plain_closure(model_b, x, y)()
        opt_b.descend()
        assert torch.equal(flat(model_a), flat(model_b))


def test_arwp_restores_the_weights_bit_for_bit():
    """With nothing to learn from (lr 0) the weights after any number of noisy passes are the same bits."""
    model = tiny_mlp()
    opt = create_optimizer("arwp", model, lr=0.0, std=0.5, seed=1)
    w = flat(model)
    seen = []
    for x, y in batches(3):
        opt.step(lambda x=x, y=y: seen.append(flat(model)) or plain_closure(model, x, y)())
    assert torch.equal(flat(model), w)
    assert all(not torch.equal(s, w) for s in seen)  # each pass was at perturbed weights


def test_arwp_noise_std_per_filter():
    """Statistically: e[f] has std s ||w[f]|| per output filter (1-D: s ||w||), divided by sqrt(1 + eta F_f)."""
    torch.manual_seed(0)
    conv = torch.randn(8, 16, 16, 16, dtype=torch.float64) * torch.linspace(0.1, 2.0, 8, dtype=torch.float64)[:, None, None, None]
    bias = torch.randn(4096, dtype=torch.float64)
    conv.requires_grad_(), bias.requires_grad_()
    s, eta = 0.01, 0.5
    opt = create_optimizer("arwp", [conv, bias], std=s, eta=eta, seed=4)
    group = opt.param_groups[0]
    e_conv, e_bias = opt.perturbation([(group, [conv, bias])])[0]
    expected = s * conv.detach().reshape(8, -1).norm(dim=1)
    measured = e_conv.reshape(8, -1).std(dim=1)
    assert ((measured / expected - 1).abs() < 0.05).all(), measured / expected  # 4096 draws per filter
    assert abs(e_bias.std().item() / (s * bias.detach().norm().item()) - 1) < 0.05

    opt.state[conv]["fisher"] = torch.arange(8, dtype=torch.float64).reshape(8, 1, 1, 1).expand(8, 16, 16, 16) / 4096
    opt.state[bias]["fisher"] = torch.full_like(bias, 3.0)
    e_conv, e_bias = opt.perturbation([(group, [conv, bias])])[0]
    scaled = expected / torch.sqrt(1 + eta * torch.arange(8, dtype=torch.float64))  # F_f = f: the filter's sum
    assert ((e_conv.reshape(8, -1).std(dim=1) / scaled - 1).abs() < 0.05).all()
    assert abs(e_bias.std().item() / (s * bias.detach().norm().item() / math.sqrt(1 + eta * 3.0)) - 1) < 0.05


def test_arwp_std_schedule():
    model = tiny_mlp()
    opt = create_optimizer("arwp", model, std=0.001, inc=10.0, total_steps=4, lr=0.1)
    assert opt.logged_values() == {"noise_std": pytest.approx(0.001)}
    stds = []
    for x, y in batches(4):
        opt.step(plain_closure(model, x, y))
        stds.append(opt.logged_values()["noise_std"])
    assert stds[1] == pytest.approx(0.001 * (1 + 10 / 2))  # half way: std (1 + inc / 2)
    assert stds[-1] == pytest.approx(0.001 * 11)  # the end: std (1 + inc)
    plain_model = tiny_mlp()
    constant = create_optimizer("arwp", plain_model, std=0.001, inc=10.0, lr=0.1)  # no total_steps: no schedule
    for x, y in batches(2):
        constant.step(plain_closure(plain_model, x, y))
    assert constant.total_steps is None and constant.logged_values() == {"noise_std": 0.001}


# -- BatchNorm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, updates", [("msam", 1), ("arwp", 1), ("lookbehind_sam", 1)])
def test_batchnorm_statistics_per_step(name, updates):
    """MSAM and ARWP: the one pass updates them (at the perturbed weights, as the official code);
    Lookbehind-SAM: only the first of its 2k passes, at the slow weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = create_optimizer(name, model, lr=0.1, **({"k_steps": 3} if name == "lookbehind_sam" else {}))
    for i, (x, y) in enumerate(batches(2)):
        opt.step(BatchClosure(model, ce, x, y))
        assert model[1].num_batches_tracked.item() == (i + 1) * updates
        assert model[1].track_running_stats

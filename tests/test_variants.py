"""ESAM, GSAM, Fisher SAM, bSAM, F-SAM, LookSAM and Look-LayerSAM against oracles and
reference steps derived from the formulas; compute accounting; BatchNorm; memory."""

import pytest
import torch
from helpers import assert_close, batches, flat, plain_closure, requires_oracle, tiny_mlp, two_groups, with_loss_term
from reference import SGDRef, dot, loss_and_grads, norm, per_sample_losses
from torch import nn

from optimizers import BatchClosure, SharpnessAwareOptimizer, available_optimizers, create_optimizer, optimizer_class

VARIANTS = [n for n in available_optimizers() if issubclass(optimizer_class(n), SharpnessAwareOptimizer)]
ce = nn.CrossEntropyLoss(reduction="none")
SGD = dict(lr=0.1, momentum=0.9)


def weights_of(model):
    return [p.detach().clone() for p in model.parameters()]


def batch_closure(model, x, y):
    return BatchClosure(model, ce, x, y)


# -- oracle parity -------------------------------------------------------------------------------


@requires_oracle
@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_matches_pytorch_optimizer(adaptive):
    import pytorch_optimizer

    steps, rho, rho_min, alpha = 6, (1.0 if adaptive else 0.1), (0.2 if adaptive else 0.02), 0.3
    ours_model, ref_model = tiny_mlp(), tiny_mlp()
    ours = create_optimizer(
        "gsam", two_groups(ours_model, (rho, rho)), rho=rho, rho_min=rho_min, alpha=alpha, adaptive=adaptive, **SGD
    )
    ours_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=steps)

    base = torch.optim.SGD(two_groups(ref_model, (rho, rho)), **SGD)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps)
    rho_sched = pytorch_optimizer.ProportionScheduler(ref_sched, max_lr=0.1, min_lr=0.0, max_value=rho, min_value=rho_min)
    ref = pytorch_optimizer.GSAM(ref_model.parameters(), base, ref_model, rho_sched, alpha=alpha, adaptive=adaptive)

    rhos = []
    for x, y in batches(steps):
        ours.step(plain_closure(ours_model, x, y))
        rhos.append(ours.param_groups[0]["rho_t"])
        ref.set_closure(nn.functional.cross_entropy, x, y)
        ref.step()
        ours_sched.step()
        ref_sched.step()
        ref.update_rho_t()
        assert_close(flat(ours_model), flat(ref_model))
    assert rhos[0] == pytest.approx(rho) and rho_min < rhos[-1] < rhos[1] < rho  # rho follows the lr


@requires_oracle
@pytest.mark.parametrize(
    "groups",
    [
        [{}, {}],  # the defaults: sigma 1, lmbda 0.6 (the oracle's fused branch)
        [{"sigma": 0.5, "lmbda": 0.9}, {"sigma": 0.5, "lmbda": 0.9}],
        [{"sigma": 0.5, "lmbda": 0.9}, {"sigma": 0.8, "lmbda": 0.3}],  # different per group
    ],
    ids=["defaults", "sigma0.5", "per-group"],
)
def test_friendly_sam_matches_pytorch_optimizer(groups):
    """Non-default sigma and lmbda take the oracle's general branch: using m after updating it would fail here."""
    import pytorch_optimizer

    def param_groups(model):
        return [{**g, **extra} for g, extra in zip(two_groups(model, (0.1, 0.2)), groups)]

    ours_model, ref_model = tiny_mlp(), tiny_mlp()
    ours = create_optimizer("friendly_sam", param_groups(ours_model), **SGD)
    ref = pytorch_optimizer.FriendlySAM(param_groups(ref_model), torch.optim.SGD, sigma=1.0, lmbda=0.6, **SGD)
    for x, y in batches(6):
        ours.step(plain_closure(ours_model, x, y))
        closure = plain_closure(ref_model, x, y)
        closure()
        ref.step(closure)
        assert_close(flat(ours_model), flat(ref_model))
    saved = ours.state_dict()
    for saved_group, extra in zip(saved["param_groups"], groups):
        assert saved_group["sigma"] == extra.get("sigma", 1.0) and saved_group["lmbda"] == extra.get("lmbda", 0.6)
    assert all("momentum" in s for s in saved["state"].values())


# -- reference steps -----------------------------------------------------------------------------


def test_fisher_sam_matches_reference():
    rho, eta = 0.1, 0.5
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = create_optimizer("fisher_sam", model, rho=rho, eta=eta, **SGD)
    sgd, w = SGDRef(**SGD), weights_of(ref_model)
    for x, y in batches(4):
        opt.step(plain_closure(model, x, y))
        _, g = loss_and_grads(ref_model, w, x, y)
        f_inv_g = [gi / (1 + eta * gi**2) for gi in g]
        e = [rho * d / (dot(g, f_inv_g).sqrt() + 1e-12) for d in f_inv_g]
        _, g_s = loss_and_grads(ref_model, [wi + ei for wi, ei in zip(w, e)], x, y)
        w = sgd(w, g_s)
        assert_close(flat(model), torch.cat([t.reshape(-1) for t in w]), 1e-10)


def look_layer_e(w, g, rho):
    """Look-LayerSAM's normalised layer-wise perturbation: rho Xi g / ||Xi g||, Xi = diag(||w_i|| / ||g_i||)."""
    xi_g = [wi.norm() / gi.norm() * gi for wi, gi in zip(w, g)]
    return [rho * t / norm(xi_g) for t in xi_g]


@pytest.mark.parametrize("form", ["looksam", "layer", "layer-unnormalized"])
def test_looksam_matches_reference(form):
    rho, alpha, k, steps = 0.1, 0.7, 2, 5
    model, ref_model = tiny_mlp(), tiny_mlp()
    if form == "looksam":
        opt = create_optimizer("looksam", model, rho=rho, alpha=alpha, k=k, **SGD)
    else:
        normalized = form == "layer"
        opt = create_optimizer("look_layer_sam", model, rho=rho, alpha=alpha, k=k, normalized=normalized, **SGD)
    sgd, w, g_v = SGDRef(**SGD), weights_of(ref_model), None
    for t, (x, y) in enumerate(batches(steps)):
        opt.step(plain_closure(model, x, y))
        _, g = loss_and_grads(ref_model, w, x, y)
        if t % k == 0:
            if form == "layer":
                e = look_layer_e(w, g, rho)
            elif form == "layer-unnormalized":
                e = [rho * wi.norm() / gi.norm() * gi / gi.norm() for wi, gi in zip(w, g)]
            else:
                e = [rho * gi / norm(g) for gi in g]
            _, g_s = loss_and_grads(ref_model, [wi + ei for wi, ei in zip(w, e)], x, y)
            cos = dot(g, g_s) / (norm(g) * norm(g_s))
            g_v = [gsi - norm(g_s) * cos * gi / norm(g) for gi, gsi in zip(g, g_s)]
            d = g_s
        else:
            d = [gi + alpha * norm(g) / norm(g_v) * vi for gi, vi in zip(g, g_v)]
        w = sgd(w, d)
        assert_close(flat(model), torch.cat([t.reshape(-1) for t in w]), 1e-10)


def applied_perturbation(opt, model, x, y):
    """The e that perturb() really adds to the weights (w + e - w)."""
    before = [p.detach().clone() for p in model.parameters()]
    plain_closure(model, x, y)()
    opt.perturb()
    e = [p.detach() - b for p, b in zip(model.parameters(), before)]
    opt.restore()
    return e


def test_look_layer_sam_radius_is_rho():
    """||e|| = rho with the default (normalised) form, also with tiny gradients where the seed's form explodes."""
    rho = 0.1
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = create_optimizer("look_layer_sam", model, rho=rho, lr=0.1)
    e = applied_perturbation(opt, model, x, y)
    assert abs(norm(e).item() - rho) < 1e-10
    assert_close(
        torch.cat([t.reshape(-1) for t in e]),
        torch.cat(
            [
                t.reshape(-1)
                for t in look_layer_e(
                    [p.detach() for p in model.parameters()], loss_and_grads(model, weights_of(model), x, y)[1], rho
                )
            ]
        ),
        1e-10,
    )

    tiny = (x * 1e-6, y)  # small inputs, small gradients
    e = applied_perturbation(opt, model, *tiny)
    assert abs(norm(e).item() - rho) < 1e-10
    seed_form = create_optimizer("look_layer_sam", model, rho=rho, lr=0.1, normalized=False)
    assert norm(applied_perturbation(seed_form, model, *tiny)).item() > 100 * rho


def test_look_layer_sam_radius_spans_groups_with_their_own_rho():
    """One normalisation over every group; a group's tensors scale with that group's rho."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    e = applied_perturbation(create_optimizer("look_layer_sam", two_groups(model, (0.2, 0.2)), lr=0.1), model, x, y)
    assert abs(norm(e).item() - 0.2) < 1e-10
    e_mixed = applied_perturbation(create_optimizer("look_layer_sam", two_groups(model, (0.2, 0.1)), lr=0.1), model, x, y)
    n_first = len(list(model[0].parameters()))
    assert_close(torch.cat([t.reshape(-1) for t in e_mixed[:n_first]]), torch.cat([t.reshape(-1) for t in e[:n_first]]), 1e-12)
    assert_close(
        torch.cat([t.reshape(-1) for t in e_mixed[n_first:]]), torch.cat([0.5 * t.reshape(-1) for t in e[n_first:]]), 1e-12
    )


def test_esam_matches_reference():
    rho, beta, gamma, seed, steps = 0.05, 0.5, 0.5, 7, 4
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = create_optimizer("esam", model, rho=rho, beta=beta, gamma=gamma, seed=seed, **SGD)
    draws = torch.Generator().manual_seed(seed)
    sgd, w = SGDRef(**SGD), weights_of(ref_model)
    keep = [True] * len(w)  # the first step keeps every tensor
    dropped_somewhere = False
    for x, y in batches(steps, batch_size=16):
        opt.step(batch_closure(model, x, y))
        l_before = per_sample_losses(ref_model, w, x, y).detach()
        _, g = loss_and_grads(ref_model, w, x, y, wrt=keep)
        scale = rho / (norm(g) + 1e-7) / beta
        w_e = [wi + scale * gi if gi is not None else wi for wi, gi in zip(w, g)]
        with torch.no_grad():
            rise = per_sample_losses(ref_model, w_e, x, y) - l_before
        chosen = torch.argsort(rise, descending=True)[: int(16 * gamma)]
        _, g_s = loss_and_grads(ref_model, w_e, x[chosen], y[chosen])
        w = sgd(w, g_s)
        assert_close(flat(model), torch.cat([t.reshape(-1) for t in w]), 1e-10)
        keep = (torch.rand(len(w), generator=draws) < beta).tolist()
        dropped_somewhere |= not all(keep)
    assert dropped_somewhere


def test_bsam_matches_reference():
    m, seed, steps = 2, 3, 3
    hp = dict(lr=0.5, betas=(0.9, 0.999), rho=0.01, prior_precision=40.0, damping=0.1, num_data=100, augmentation_factor=4)
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = create_optimizer("bsam", model, msharpness=m, seed=seed, **hp)
    noise = torch.Generator().manual_seed(seed)
    w = weights_of(ref_model)
    gm = [torch.zeros_like(t) for t in w]
    s = [torch.ones_like(t) for t in w]
    n_eff = hp["num_data"] * hp["augmentation_factor"]
    wd = hp["prior_precision"] / n_eff
    b1, b2 = hp["betas"]
    for x, y in batches(steps, batch_size=8):
        opt.step(batch_closure(model, x, y))
        g_e_mean = [torch.zeros_like(t) for t in w]
        gs_mean = [torch.zeros_like(t) for t in w]
        for j in range(m):
            xs, ys = x[4 * j : 4 * j + 4], y[4 * j : 4 * j + 4]
            eps = [torch.empty_like(t).normal_(generator=noise) for t in w]
            noisy = [wi + ni / torch.sqrt(n_eff * si) for wi, ni, si in zip(w, eps, s)]
            _, g = loss_and_grads(ref_model, noisy, xs, ys)
            _, g_e = loss_and_grads(ref_model, [wi + hp["rho"] * gi / si for wi, gi, si in zip(w, g, s)], xs, ys)
            g_e_mean = [a + b / m for a, b in zip(g_e_mean, g_e)]
            gs_mean = [a + torch.sqrt(si) * gi.abs() / m for a, si, gi in zip(gs_mean, s, g)]
        gm = [b1 * gmi + (1 - b1) * (gei + wd * wi) for gmi, gei, wi in zip(gm, g_e_mean, w)]
        w = [wi - hp["lr"] * gmi / si for wi, gmi, si in zip(w, gm, s)]
        s = [b2 * si + (1 - b2) * (gsi + hp["damping"] + wd) for si, gsi in zip(s, gs_mean)]
        assert_close(flat(model), torch.cat([t.reshape(-1) for t in w]), 1e-10)


# -- compute accounting --------------------------------------------------------------------------


class SpyClosure(BatchClosure):
    """Records, per backward pass, the batch size used and which parameters got a gradient."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log = []

    def __call__(self, subset=None, *, per_sample=False, backward=True, phase="descent"):
        out = super().__call__(subset, per_sample=per_sample, backward=backward, phase=phase)
        size = self.batch_size if subset is None else len(self.targets[subset])
        got_grad = [p.grad is not None for p in self.model.parameters()]
        self.log.append((phase, backward, size, got_grad))
        return out


def test_looksam_calls_the_closure_once_between_sam_steps():
    model = tiny_mlp()
    opt = create_optimizer("looksam", model, k=5, **SGD)
    calls = 0
    for x, y in batches(5):
        closure = plain_closure(model, x, y)

        def counted(closure=closure):
            nonlocal calls
            calls += 1
            return closure()

        opt.step(counted)
    assert calls == 6


def test_esam_backward_passes_do_what_they_save():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(6)], nn.Linear(6, 3)).double()
    opt = create_optimizer("esam", model, beta=0.5, gamma=0.5, seed=1, **SGD)
    n_params = len(list(model.parameters()))
    for step, (x, y) in enumerate(batches(4, batch_size=16)):
        kept = [p.requires_grad for p in model.parameters()]
        closure = SpyClosure(model, ce, x, y)
        opt.step(closure)
        (a_phase, _, a_size, a_grads), (s_phase, s_back, s_size, _), (d_phase, _, d_size, d_grads) = closure.log
        assert (a_phase, a_size) == ("ascent", 16) and a_grads == kept  # dropped tensors: no gradient computed
        assert (s_phase, s_back, s_size) == ("select", False, 16)
        assert (d_phase, d_size) == ("descent", 8) and all(d_grads)  # gamma x batch, every tensor
        if step > 0:
            assert 0 < sum(kept) < n_params


def test_bsam_takes_two_passes_per_sub_batch():
    model = tiny_mlp()
    opt = create_optimizer("bsam", model, msharpness=4)
    x, y = batches(1, batch_size=16)[0]
    closure = SpyClosure(model, ce, x, y)
    opt.step(closure)
    assert [(phase, size) for phase, _, size, _ in closure.log] == [("ascent", 4), ("descent", 4)] * 4


# -- BatchNorm -----------------------------------------------------------------------------------


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("name", [n for n in VARIANTS if optimizer_class(n).freezes_batchnorm])
def test_batchnorm_statistics_come_from_the_first_pass(name):
    model = bn_model()
    x, y = batches(1, batch_size=16)[0]
    expected_mean = model[0](x).mean(0).detach()
    opt = with_loss_term(create_optimizer(name, model, lr=0.1), model)
    opt.step(batch_closure(model, x, y))
    bn = model[1]
    assert bn.num_batches_tracked.item() == 1
    assert_close(bn.running_mean, expected_mean, 1e-12)
    assert bn.track_running_stats


def test_bsam_updates_batchnorm_in_every_pass_like_the_official_code():
    assert not optimizer_class("bsam").freezes_batchnorm
    model = bn_model()
    opt = create_optimizer("bsam", model, msharpness=2)
    x, y = batches(1, batch_size=16)[0]
    opt.step(batch_closure(model, x, y))
    assert model[1].num_batches_tracked.item() == 4


# -- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_persistent_extra_memory(name):
    """What the class declares (and docs/variants.md's table shows) is what it keeps."""
    model = tiny_mlp()
    opt = create_optimizer(name, model, lr=0.1, momentum=0.9) if name != "bsam" else create_optimizer(name, model)
    with_loss_term(opt, model)
    for x, y in batches(3):
        opt.step(batch_closure(model, x, y))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert opt.extra_state_bytes() == type(opt).extra_memory * param_bytes

"""SAM, adaptive SAM and official ASAM: parity with oracles and hand-derived steps."""

import pytest
import torch
from helpers import assert_close, batches, flat, plain_closure, requires_oracle, tiny_mlp, two_groups
from torch import nn

from optimizers import create_optimizer

STEPS = 6
SGD = dict(lr=0.1, momentum=0.9)


@requires_oracle
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_pytorch_optimizer(adaptive):
    import pytorch_optimizer

    rho = (0.5, 1.0) if adaptive else (0.05, 0.1)
    ours_model, ref_model = tiny_mlp(), tiny_mlp()
    ours = create_optimizer("adaptive_sam" if adaptive else "sam", two_groups(ours_model, rho), **SGD)
    ref = pytorch_optimizer.SAM(two_groups(ref_model, rho, adaptive=adaptive), torch.optim.SGD, adaptive=adaptive, **SGD)
    for x, y in batches(STEPS):
        loss = ours.step(plain_closure(ours_model, x, y))
        ref_closure = plain_closure(ref_model, x, y)
        ref_loss = ref_closure()
        ref.step(ref_closure)
        assert_close(loss, ref_loss)
        assert_close(flat(ours_model), flat(ref_model))
    assert (flat(ours_model) - flat(tiny_mlp())).norm() > 1e-2  # it really trained


@requires_oracle
def test_sam_matches_pytorch_optimizer_with_settings_per_group():
    """One group plain, one adaptive, each with its own radius: one norm over both."""
    import pytorch_optimizer

    ours_model, ref_model = tiny_mlp(), tiny_mlp()

    def groups(model):
        first, second = two_groups(model, (0.05, 0.8))
        return [{**first, "adaptive": False}, {**second, "adaptive": True}]

    ours = create_optimizer("sam", groups(ours_model), **SGD)
    ref = pytorch_optimizer.SAM(groups(ref_model), torch.optim.SGD, **SGD)
    for x, y in batches(STEPS):
        ours.step(plain_closure(ours_model, x, y))
        ref_closure = plain_closure(ref_model, x, y)
        ref_closure()
        ref.step(ref_closure)
        assert_close(flat(ours_model), flat(ref_model))


def test_zero_gradient_moves_weights_by_weight_decay_and_momentum_only():
    """SAM's epsilon: ||g|| = 0 gives e = 0, not 0/0; the step is SGD's with a zero gradient."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = create_optimizer("sam", model, rho=0.05, lr=0.1, momentum=0.9, weight_decay=0.01)
    w, buf = flat(model), None

    def closure():
        model.zero_grad()
        loss = (model(x) * 0).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        d = 0.01 * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - 0.1 * buf
        assert torch.isfinite(flat(model)).all()
        assert_close(flat(model), w, 1e-12)


def test_sam_step_by_hand():
    """One SAM step with plain SGD (no momentum), derived from the formula."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    w = [p.detach().clone() for p in model.parameters()]

    def grad_at(weights):
        m = tiny_mlp()
        with torch.no_grad():
            for p, v in zip(m.parameters(), weights):
                p.copy_(v)
        nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad for p in m.parameters()]

    g = grad_at(w)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    g_s = grad_at([wi + 0.05 * gi / norm for wi, gi in zip(w, g)])
    expected = torch.cat([(wi - 0.1 * gi).reshape(-1) for wi, gi in zip(w, g_s)])

    opt = create_optimizer("sam", model, rho=0.05, lr=0.1)
    opt.step(plain_closure(model, x, y))
    assert_close(flat(model), expected, 1e-12)


def test_official_asam_step_by_hand():
    """T_w = |w| + eta on tensors named *weight* (BatchNorm weight included), 1 on biases."""
    model = tiny_mlp(batchnorm=True)
    x, y = batches(1)[0]
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    rho, eta, lr = 0.5, 0.01, 0.1

    def grad_at(weights):
        m = tiny_mlp(batchnorm=True)
        with torch.no_grad():
            for p, v in zip(m.parameters(), weights):
                p.copy_(v)
        nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad for p in m.parameters()]

    w = [v for _, v in named]
    g = grad_at(w)
    t = [v.abs() + eta if "weight" in n else torch.ones_like(v) for n, v in named]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    e = [rho * ti**2 * gi / (norm + 1e-16) for ti, gi in zip(t, g)]
    g_s = grad_at([wi + ei for wi, ei in zip(w, e)])
    expected = torch.cat([(wi - lr * gi).reshape(-1) for wi, gi in zip(w, g_s)])

    opt = create_optimizer("asam", model, rho=rho, eta=eta, lr=lr)
    opt.step(plain_closure(model, x, y))
    assert_close(flat(model), expected, 1e-12)


def test_restore_is_bit_exact():
    model = tiny_mlp()
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt = create_optimizer("sam", model, rho=0.3, lr=0.1)
    plain_closure(model, x, y)()
    opt.perturb()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_second_pass_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    model(x)  # materialise the lazy layer
    reference = nn.Sequential(*[m for m in model])  # same modules: record what one forward does
    bn = model[1]
    bn.reset_running_stats()
    opt = create_optimizer("sam", model, rho=0.5, lr=0.1)

    def closure():
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    state_before = {k: v.clone() for k, v in bn.state_dict().items()}
    with torch.no_grad():
        expected_mean = x.new_zeros(4)
        model.train()
        feats = model[0](x)
        expected_mean = feats.mean(dim=(0, 2, 3))
    opt.step(closure)
    assert bn.num_batches_tracked.item() == 1
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)
    assert not torch.equal(bn.running_mean, state_before["running_mean"])
    assert bn.track_running_stats  # resumed after the step
    del reference


@pytest.mark.parametrize("name", ["sam", "asam", "adaptive_sam"])
def test_state_dict_round_trip_continues_identically(name):
    data = batches(6)
    model_a = tiny_mlp()
    opt_a = create_optimizer(name, model_a, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in data:
        opt_a.step(plain_closure(model_a, x, y))

    model_b = tiny_mlp()
    opt_b = create_optimizer(name, model_b, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in data[:3]:
        opt_b.step(plain_closure(model_b, x, y))
    saved_model, saved_opt = model_b.state_dict(), opt_b.state_dict()
    assert saved_opt["base_state"], "momentum buffers must be in the state dict"

    model_c = tiny_mlp(seed=5)
    model_c.load_state_dict(saved_model)
    opt_c = create_optimizer(name, model_c, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_c.load_state_dict(saved_opt)
    assert opt_c.param_groups is opt_c.base_optimizer.param_groups
    for x, y in data[3:]:
        opt_c.step(plain_closure(model_c, x, y))
    assert torch.equal(flat(model_c), flat(model_a))


def test_scheduler_drives_shared_param_groups():
    model = tiny_mlp()
    opt = create_optimizer("sam", model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    opt.step(plain_closure(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: create_optimizer("sam", m, rho=-1), "rho must be >= 0"),
        (lambda m: create_optimizer("nope", m), "unknown optimizer 'nope'; choose one of: sgd"),
        (lambda m: create_optimizer("sam", m, base="lion"), "unknown base optimizer 'lion'; choose one of: sgd"),
        (lambda m: create_optimizer("asam", m, eta=-0.1), "eta must be >= 0"),
        (lambda m: create_optimizer("sam", m, lr=0.1, bogus=1), "SGD:"),
    ],
)
def test_invalid_settings_raise_one_line(call, message):
    with pytest.raises(ValueError) as info:
        call(tiny_mlp())
    text = str(info.value)
    assert message in text and "\n" not in text


def test_names_are_case_insensitive_and_baselines_are_plain():
    model = tiny_mlp()
    assert type(create_optimizer("SAM", model)).__name__ == "SAM"
    assert type(create_optimizer("AdamW", model, lr=1e-3)) is torch.optim.AdamW
    assert type(create_optimizer("sgd", model, lr=0.1)) is torch.optim.SGD

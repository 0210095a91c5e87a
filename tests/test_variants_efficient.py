"""MSAM, Lookbehind-SAM and ARWP against reference steps derived from their update rules
(float64, several steps, momentum and weight decay); the weights each evaluates and exports;
and MSAM through the harness, whose exported model must hold the unperturbed weights."""


import pytest
import torch
from helpers import assert_close, batches, flat, plain_closure, tiny_mlp, two_groups
from reference import loss_and_grads, norm
from safetensors.torch import load_file
from torch import nn

from optimizers import create_optimizer

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
    from bench.checkpoint import checkpoints
    from bench.config import RunConfig
    from bench.train import train

    result = train(RunConfig(optimizer="msam", epochs=1, max_steps=4, batch_size=64, cpu=True, output_dir=str(tmp_path)))
    assert result.summary["steps"] == 4 and result.summary["model_exported"]
    exported = load_file(result.run_dir / "model.safetensors")
    last = checkpoints(result.run_dir)[-1]
    stored = load_file(last / "model.safetensors")  # the perturbed weights w~
    saved_opt = torch.load(last / "custom_checkpoint_0.pkl", weights_only=False)  # the optimizer, registered first
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

"""Every optimizer under torch.amp.GradScaler (optimizers.amp.ScaledStep): a scaled step equals the
unscaled one, and an overflow in any pass skips the whole step, the weights and the optimizer's state
left as they were and the scale backed off."""

import warnings

import pytest
import torch
from helpers import batches, flat, tiny_mlp, with_loss_term
from torch import nn

from optimizers import available_optimizers, create_optimizer
from optimizers.amp import ScaledStep
from optimizers.registry import is_sharpness_aware

NAMES = available_optimizers()
SCALE = 2.0**10  # a power of two: scaling and unscaling are exact


def setup(name: str):
    model = tiny_mlp(batchnorm=True)  # SAM-ON and ASAM-ON perturb the normalisation layers only
    settings = {"lr": 0.01 if name.startswith("adam") else 0.1}
    if is_sharpness_aware(name):
        settings.update(momentum=0.9, weight_decay=5e-4, seed=3) if name != "bsam" else settings.update(num_data=64, seed=3)
        if name in ("looksam", "look_layer_sam"):
            settings["k"] = 2
    return model, with_loss_term(create_optimizer(name, model, **settings), model)


def loss_of(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


def state_tensors(opt) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(opt.state_dict())
    return [t.clone() for t in leaves if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", NAMES)
def test_a_scaled_step_equals_the_unscaled_step(name):
    reference, ref_opt = setup(name)
    model, opt = setup(name)
    amp = ScaledStep(opt, torch.amp.GradScaler("cpu", init_scale=SCALE), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ESAM and bSAM with a plain closure: expected
        for x, y in batches(4):

            def closure(x=x, y=y):
                ref_opt.zero_grad()
                loss = nn.functional.cross_entropy(reference(x), y)
                loss.backward()
                return loss.detach()

            expected = ref_opt.step(closure)
            got = amp.step(loss_of(model, x, y))
            assert got is not None and torch.equal(got, expected)
    assert torch.allclose(flat(model), flat(reference), rtol=1e-12, atol=1e-14)
    assert amp.scaler.get_scale() == SCALE  # no overflow: the scale is kept (it grows after 2000 clean steps)


@pytest.mark.parametrize("bad_pass", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_an_overflow_in_any_pass_skips_the_whole_step(name, bad_pass):
    model, opt = setup(name)
    amp = ScaledStep(opt, torch.amp.GradScaler("cpu", init_scale=SCALE), model)
    (x, y), (x2, y2) = batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amp.step(loss_of(model, x, y))  # a clean step first: momentum and the variant's state are not empty
        weights, state = flat(model).clone(), state_tensors(opt)
        buffers = [b.clone() for b in model.buffers()]
        calls = 0

        def overflowing():
            nonlocal calls
            calls += 1
            loss = nn.functional.cross_entropy(model(x2), y2)
            return loss * float("inf") if calls == bad_pass + 1 else loss

        result = amp.step(overflowing)
    if calls <= bad_pass:  # this step had no such pass (LookSAM's reuse steps take one): nothing overflowed
        assert result is not None and amp.scaler.get_scale() == SCALE
        return
    assert result is None
    assert torch.equal(flat(model), weights)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    after = state_tensors(opt)
    assert len(after) == len(state) and all(torch.equal(a, b) for a, b in zip(after, state))
    assert amp.scaler.get_scale() == SCALE / 2  # backed off once, whatever the number of passes


@pytest.mark.parametrize("name", ["sgd", "sam", "asam", "looksam", "gsam"])
def test_the_two_phase_form_equals_the_closure_form_and_skips_alike(name):
    a, opt_a = setup(name)
    b, opt_b = setup(name)
    closure_form = ScaledStep(opt_a, torch.amp.GradScaler("cpu", init_scale=SCALE), a)
    two_phase = ScaledStep(opt_b, torch.amp.GradScaler("cpu", init_scale=SCALE), b)
    data = batches(4)
    for i, (x, y) in enumerate(data):
        overflow = i == 2  # the third step overflows in its last pass
        closure_form.step(lambda x=x, y=y, o=overflow: nn.functional.cross_entropy(a(x), y) * (float("inf") if o else 1.0))
        two_phase.begin()
        loss = nn.functional.cross_entropy(b(x), y)
        if getattr(opt_b, "perturbs_this_step", False):
            two_phase.backward(loss)
            opt_b.perturb()
            loss = nn.functional.cross_entropy(b(x), y)
        two_phase.backward(loss * (float("inf") if overflow else 1.0))
        assert two_phase.descend() == overflow
        assert torch.equal(flat(a), flat(b)), i
    assert two_phase.scaler.get_scale() == closure_form.scaler.get_scale() == SCALE / 2


@pytest.mark.parametrize("name", NAMES)
def test_an_overflow_on_the_first_step_leaves_a_fresh_optimizer(name):
    """A skipped first step leaves nothing behind, not even what only a first step makes (a random stream, ESAM's
    draw of the tensors its next ascent leaves out): the next step is a fresh optimizer's first, bit for bit."""
    model, opt = setup(name)
    fresh_model, fresh_opt = setup(name)
    amp = ScaledStep(opt, torch.amp.GradScaler("cpu", init_scale=SCALE), model)
    fresh = ScaledStep(fresh_opt, torch.amp.GradScaler("cpu", init_scale=SCALE / 2), fresh_model)  # the scale left
    (x, y), (x2, y2) = batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert amp.step(lambda: nn.functional.cross_entropy(model(x), y) * float("inf")) is None
        assert all(p.requires_grad for p in model.parameters())
        assert opt.state_dict().keys() == fresh_opt.state_dict().keys()
        for m, scaled in ((model, amp), (fresh_model, fresh)):
            scaled.step(loss_of(m, x2, y2))
    assert torch.equal(flat(model), flat(fresh_model))

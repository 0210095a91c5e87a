"""The contract every registered optimizer keeps, checked on each of them by number:
both closure forms train, a state_dict round trip resumes bit for bit, all-zero
gradients stay finite, every declared setting rejects bad values in one line, frozen
and gradient-less parameters are never touched, empty groups do not crash; and the
self-descriptions the harness and docs/variants.md are generated from."""

import io
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_close, batches, flat, plain_closure, tiny_mlp, with_loss_term
from torch import nn

from optimizers import BatchClosure, available_optimizers, optimizer_class, variants_markdown
from optimizers import create_optimizer as create_bare
from optimizers.registry import canonical_name, is_sharpness_aware

NAMES = available_optimizers()
VARIANTS = [n for n in NAMES if is_sharpness_aware(n)]
ce = nn.CrossEntropyLoss(reduction="none")


def create_optimizer(name, params, **settings):
    """The optimizer, with the loss term its class declares attached (the protocol tests step every name)."""
    return with_loss_term(create_bare(name, params, **settings), params if isinstance(params, nn.Module) else None)


def settings_for(name: str, **extra) -> dict:
    """Settings that train the tiny problem, exercising each variant's special paths
    (LookSAM's reuse steps, bSAM's sub-batches, seeded random streams)."""
    if not is_sharpness_aware(name):
        return {"lr": 0.01 if name.startswith("adam") else 0.1, **extra}
    if name == "bsam":
        return {"msharpness": 2, "num_data": 64, "lr": 0.1, "seed": 3, **extra}
    settings = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "seed": 3, **extra}
    if name in ("looksam", "look_layer_sam"):
        settings["k"] = 2
    return settings


def batch_closure(model, x, y, loss_fn=ce):
    return BatchClosure(model, loss_fn, x, y)


def quietly(fn, *args):
    """Plain closures make ESAM and bSAM warn (no data selection, one sub-batch): expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# -- (a) both closure forms train ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["batch", "plain"])
@pytest.mark.parametrize("name", NAMES)
def test_step_with_either_closure_lowers_the_loss(name, form):
    model = tiny_mlp()
    x, y = batches(1, batch_size=32)[0]
    opt = create_optimizer(name, model, **settings_for(name))
    make = batch_closure if form == "batch" else plain_closure
    before = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(15):
        loss = quietly(opt.step, make(model, x, y))
        assert torch.isfinite(loss)
    after = nn.functional.cross_entropy(model(x), y).item()
    assert after < before - 0.05, f"{name}: loss {before:.4f} -> {after:.4f}"


# -- (b) state_dict round trip -----------------------------------------------------------------------


def serialised(state: dict) -> dict:
    """Through torch.save / torch.load, as a checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    """Including the random streams: ESAM's tensor dropping (and its kept mask) and bSAM's noise."""
    data = batches(6)
    model_a = tiny_mlp()
    opt_a = create_optimizer(name, model_a, **settings_for(name))
    for x, y in data:
        opt_a.step(batch_closure(model_a, x, y))

    model_b = tiny_mlp()
    opt_b = create_optimizer(name, model_b, **settings_for(name))
    for x, y in data[:3]:
        opt_b.step(batch_closure(model_b, x, y))
    saved_model, saved_opt = serialised(model_b.state_dict()), serialised(opt_b.state_dict())

    model_c = tiny_mlp(seed=5)
    model_c.load_state_dict(saved_model)
    # a different seed: what continues the run must come from the state dict
    opt_c = create_optimizer(name, model_c, **settings_for(name, **({"seed": 99} if is_sharpness_aware(name) else {})))
    opt_c.load_state_dict(saved_opt)
    assert [p.requires_grad for p in model_c.parameters()] == [p.requires_grad for p in model_b.parameters()]
    for x, y in data[3:]:
        opt_c.step(batch_closure(model_c, x, y))
    assert torch.equal(flat(model_c), flat(model_a))
    assert not torch.equal(flat(model_c), flat(model_b))  # it did continue


# -- (c) all-zero gradients ------------------------------------------------------------------------


def zero_loss(outputs, targets):
    return (outputs * 0).sum(dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_gradients_stay_finite(name):
    """Every ratio of norms meets 0 / 0 here; a variant with a base optimizer moves by weight decay only."""
    model = tiny_mlp()
    lr, wd = 0.1, 1e-2
    settings = settings_for(name, lr=lr) if name == "bsam" else settings_for(name, lr=lr, weight_decay=wd, momentum=0.0)
    if name.startswith("adam"):
        settings = {"lr": lr, "weight_decay": wd}
    opt = create_optimizer(name, model, **settings)
    w = flat(model)
    sgd_like = name == "sgd" or (is_sharpness_aware(name) and optimizer_class(name).uses_base_optimizer)
    base_steps = getattr(opt, "k_steps", 1)  # Lookbehind-SAM takes k base steps per step
    for x, y in batches(3):  # LookSAM (k=2): a SAM step, a reuse step, a SAM step
        loss = opt.step(batch_closure(model, x, y, zero_loss))
        assert torch.isfinite(loss)
        assert torch.isfinite(flat(model)).all()
        if sgd_like:
            w = w * (1 - lr * wd) ** base_steps
            assert_close(flat(model), w, 1e-12)


# -- (d) bad settings --------------------------------------------------------------------------------


def out_of_range(range_text: str) -> list:
    left, low, high, right = re.match(r"([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])", range_text).groups()
    values = []
    if low != "-inf":
        values.append(float(low) - 1 if left == "[" else float(low))
    if high != "inf":
        values.append(float(high) + 1 if right == "]" else float(high))
    return values


def bad_values(setting) -> list:
    if setting.kind is bool:
        return ["yes", 1]
    bad = ["0.05", math.nan, math.inf, *(out_of_range(setting.range) if setting.range else [])]
    if setting.kind is int:
        bad = [int(v) if isinstance(v, float) and math.isfinite(v) else v for v in bad] + [2.0]
    if setting.kind is tuple:
        bad = [(v, *setting.default[1:]) for v in bad] + ["0.9"]
    return bad


CASES = [
    (name, setting, value) for name in VARIANTS for setting in optimizer_class(name).settings for value in bad_values(setting)
]


@pytest.mark.parametrize("name, setting, value", CASES, ids=[f"{n}-{s.name}-{v!r}" for n, s, v in CASES])
def test_bad_settings_raise_one_line_naming_them(name, setting, value):
    for build in (
        lambda: create_optimizer(name, tiny_mlp(), **{setting.name: value}),
        lambda: create_optimizer(name, [{"params": list(tiny_mlp().parameters()), setting.name: value}]),
    ):
        if build is not None:
            with pytest.raises(ValueError) as info:
                build()
            text = str(info.value)
            assert setting.name in text and "\n" not in text, text
        if not setting.per_group:
            break


def test_bad_setting_message():
    with pytest.raises(ValueError, match=r"^rho must be a number .*0.*got '0\.05'$"):
        create_optimizer("sam", tiny_mlp(), rho="0.05")
    with pytest.raises(ValueError, match="rho_min"):
        create_optimizer("gsam", tiny_mlp(), rho=0.05, rho_min=0.1)


def test_a_rejected_param_group_is_not_added():
    model = tiny_mlp()
    opt = create_optimizer("sam", list(model[0].parameters()), lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": list(model[2].parameters()), "rho": -1.0})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


def test_settings_are_stored_checked():
    opt = create_optimizer("bsam", tiny_mlp(), rho=1, betas=[0.5, 0.6])
    assert opt.param_groups[0]["rho"] == 1.0 and isinstance(opt.param_groups[0]["rho"], float)
    assert opt.param_groups[0]["betas"] == (0.5, 0.6)
    assert create_optimizer("looksam", tiny_mlp(), k=3).k == 3
    assert create_optimizer("esam", tiny_mlp(), gamma=1).gamma == 1.0


# -- (e) frozen, gradient-less and empty -----------------------------------------------------------


class Net(nn.Module):
    """tiny_mlp plus a layer the forward never uses (its parameters never get a gradient)."""

    def __init__(self):
        super().__init__()
        self.body = tiny_mlp()
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("name", NAMES)
def test_frozen_unused_and_empty_are_left_alone(name):
    model = Net()
    frozen = model.body[0].bias
    frozen.requires_grad_(False)
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if n.startswith("body")]},
        {"params": [], "param_names": []},
        {"params": [(n, p) for n, p in named if n.startswith("unused")]},  # never a gradient
    ]
    opt = create_optimizer(name, groups, **settings_for(name))
    untouched = [frozen, *model.unused.parameters()]
    before = [p.detach().clone() for p in untouched]
    trained = model.body[2].weight.detach().clone()
    for x, y in batches(4):
        quietly(opt.step, batch_closure(model, x, y))
        quietly(opt.step, plain_closure(model, x, y))
        assert not frozen.requires_grad
    assert all(torch.equal(a, p) for a, p in zip(before, untouched))
    assert not torch.equal(trained, model.body[2].weight)


TWO_PHASE = [n for n in VARIANTS if optimizer_class(n).uses_base_optimizer]  # bSAM: step(closure) only


WHOLE_STEP = [n for n in TWO_PHASE if optimizer_class(n).loss_regularizer is None]


@pytest.mark.parametrize(
    "name, extra",
    [*((n, {}) for n in WHOLE_STEP), ("lookbehind_sam", {"k_steps": 3}), ("lookbehind_sam", {"k_steps": 3, "alpha": 0.5})],
)
def test_the_whole_two_phase_step_is_the_closure_step(name, extra):
    """A pass, then ``perturbations`` perturb-and-pass pairs, repeated while ``descents_left`` > 1 (descend()
    between), then ``step()`` with no closure, the caller zeroing no gradient but after the step (a Trainer's
    loop): what step(closure) does on one batch, bit for bit (GAM's four passes, Lookbehind-SAM's k inner steps)."""
    a, b = tiny_mlp(batchnorm=True), tiny_mlp(batchnorm=True)
    opt_a, opt_b = (create_optimizer(name, m, **settings_for(name, **extra)) for m in (a, b))
    for x, y in batches(4):
        quietly(opt_a.step, plain_closure(a, x, y))

        def passes(x=x, y=y):
            nn.functional.cross_entropy(b(x), y).backward()
            if opt_b.perturbs_this_step:
                for _ in range(opt_b.perturbations):
                    opt_b.perturb()
                    nn.functional.cross_entropy(b(x), y).backward()

        quietly(passes)
        while opt_b.descents_left > 1:
            opt_b.descend()
            quietly(passes)
        opt_b.step()
        opt_b.zero_grad()
        assert torch.equal(flat(a), flat(b)), name
        if name != "arwp":  # its two-phase form adds a pass at w, which BatchNorm sees (documented)
            assert all(torch.equal(u, v) for u, v in zip(a.buffers(), b.buffers())), name


@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_form_with_groups_without_gradients(name):
    model = Net()
    opt = create_optimizer(
        name,
        [
            {"params": [], "param_names": []},
            {"params": list(model.unused.named_parameters())},
            {"params": list(model.body.named_parameters())},
        ],
        model=model,
        **settings_for(name),
    )
    before, trained = flat(model.unused), flat(model.body)
    for x, y in batches(3):
        plain_closure(model, x, y)()
        if opt.perturbs_this_step:
            opt.perturb()
            plain_closure(model, x, y)()
        opt.descend()
    assert torch.equal(before, flat(model.unused)) and not torch.equal(trained, flat(model.body))


@pytest.mark.parametrize(
    "name", [n for n in VARIANTS if optimizer_class(n).uses_base_optimizer and optimizer_class(n).passes != "4"]
)
def test_a_second_perturb_in_one_step_is_refused_and_moves_nothing(name):
    """perturb() twice before descend() would save the perturbed weights as the step's own (GAM, whose step
    perturbs three times, counts its passes itself)."""
    model = tiny_mlp(batchnorm=True)
    opt = create_optimizer(name, model, **settings_for(name))
    for x, y in batches(10):
        plain_closure(model, x, y)()
        if not opt.perturbs_this_step:
            opt.descend()
            continue
        opt.perturb()
        perturbed = flat(model).clone()
        plain_closure(model, x, y)()
        with pytest.raises(RuntimeError, match=rf"^{type(opt).__name__}\.perturb\(\) called twice in one step: "):
            opt.perturb()
        assert torch.equal(flat(model), perturbed)
        opt.restore()  # the step abandoned (a skipped step): the next perturb() is a new step's
        plain_closure(model, x, y)()
        opt.perturb()
        plain_closure(model, x, y)()
        opt.descend()
        return
    assert name in ("saf", "mesa")  # one pass per step: they never perturb


def test_a_setting_of_the_whole_optimizer_is_refused_in_a_param_group():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="^LookSAM: k is a setting of the whole optimizer, not of a param group; "):
        create_optimizer("looksam", [{"params": model.parameters(), "k": 0}], lr=0.1)
    opt = create_optimizer("esam", list(model[0].parameters()), lr=0.1)
    with pytest.raises(ValueError, match="^ESAM: gamma is a setting of the whole optimizer"):
        opt.add_param_group({"params": list(model[2].parameters()), "gamma": 0.5})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", ["esam", "bsam", "arwp"])
def test_loading_a_state_draws_nothing_from_the_global_stream(name):
    """An unseeded optimizer's saved random stream is set as saved: torch's global stream, which a resumed run
    restores for its data order, is left where it was."""
    model = tiny_mlp(batchnorm=True)
    settings = {k: v for k, v in settings_for(name).items() if k != "seed"}
    opt = create_optimizer(name, model, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in batches(2):
            opt.step(plain_closure(model, x, y))
    saved = opt.state_dict()
    assert saved["generators"]
    again = create_optimizer(name, model, **settings)
    before = torch.get_rng_state()
    again.load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(again.generator().get_state(), opt.generator().get_state())


# -- self-description --------------------------------------------------------------------------------

#: The seed project's flags per variant and the setting each sets (the harness spells them per bench/cli/variant_flags.toml).
SEED_FLAGS = {
    "sam": {"rho": "rho"},
    "adaptive_sam": {"rho": "rho"},
    "asam": {"rho": "rho", "eta": "eta"},
    "esam": {"rho": "rho", "beta": "beta", "gamma": "gamma"},
    "gsam": {"rho": "rho", "rho_max": "rho", "rho_min": "rho_min", "gsam_alpha": "alpha", "adaptive": "adaptive"},
    "fisher_sam": {"rho": "rho", "eta": "eta"},
    "bsam": {"rho": "rho", "msharpness": "msharpness", "gamma": "damping", "delta": "prior_precision"},
    "friendly_sam": {"rho": "rho", "sigma": "sigma", "lmbda": "lmbda", "adaptive": "adaptive"},
    "looksam": {"rho": "rho", "k": "k", "alpha": "alpha"},
    "look_layer_sam": {"rho": "rho", "k": "k", "alpha": "alpha"},
}


@pytest.mark.parametrize("name", sorted(SEED_FLAGS))
def test_the_seed_projects_variants_take_its_flags(name):
    """A flag that selects another variant (sam's --adaptive runs adaptive_sam) sets nothing here."""
    from bench.variant_flags import selects, setting_flags

    sets = {flag: s.name for flag, s in setting_flags(name).items() if selects(name, s.name) is None}
    assert sets == SEED_FLAGS[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_every_declared_flag_sets_its_setting_through_the_command_line(name):
    """Each flag a variant declares reaches that setting (and a selecting flag switches variant)."""
    from bench.cli.flags import run_parser
    from bench.cli.run import config_from_args
    from bench.variant_flags import selects, setting_flags

    for flag, setting in setting_flags(name).items():
        if setting.kind is bool:
            argv, expected = [f"--{flag}"], True
        elif setting.kind is int:  # an unset optional count (total_steps, kl_end): a large one
            value = setting.default if setting.default is not None else 1000
            argv, expected = [f"--{flag}", str(value)], value
        else:  # an unset optional number (GSAM's rho_min): a small one
            value = setting.default if isinstance(setting.default, float) else 0.01
            argv, expected = [f"--{flag}", repr(value)], value
        config, _ = config_from_args(run_parser().parse_args(["--sam_type", name, *argv]))
        if selects(name, setting.name):
            assert config.optimizer == selects(name, setting.name)
        else:
            assert config.optimizer == name and config.hyperparameters[setting.name] == expected, flag


@pytest.mark.parametrize("name", VARIANTS)
def test_declared_defaults_are_what_the_optimizer_uses(name):
    cls = optimizer_class(name)
    opt = create_optimizer(name, tiny_mlp())
    for setting in cls.settings:
        value = opt.param_groups[0][setting.name] if setting.per_group else getattr(opt, setting.name)
        assert value == setting.default and cls.setting(setting.name) is setting
    assert cls.group_defaults() == {s.name: s.default for s in cls.settings if s.per_group}
    # a method that is only a loss term (SAF, MESA) keeps nothing in the optimizer: its regulariser does
    assert cls.paper and cls.rule and cls.passes and cls.extra_memory >= (0 if cls.loss_regularizer else 1)
    assert all(s.range for s in cls.settings if s.kind is not bool), "every numeric setting declares its range"
    assert cls.ascent_sync in ("any", "global", "local")


def test_every_name_describes_itself():
    """No presets: each name has its own class, so the table and the flags cannot mix two variants up."""
    classes = [optimizer_class(n) for n in VARIANTS]
    assert len(set(classes)) == len(classes)
    assert canonical_name("Adaptive-SAM") == "adaptive_sam" and canonical_name("bayesian_sam") == "bsam"
    assert create_optimizer("adaptive_sam", tiny_mlp()).param_groups[0]["rho"] == 2.0


def test_the_loop_syncs_the_ascent_pass_as_each_class_declares():
    from bench.loop.step import effective_ascent_sync

    for name in VARIANTS:
        opt = create_optimizer(name, tiny_mlp())
        declared = type(opt).ascent_sync
        assert declared in ("any", "global", "local")
        for mode in ("local", "global"):
            assert effective_ascent_sync(opt, mode) == (mode if declared == "any" else declared)


def test_logged_values_follow_the_radius():
    model = tiny_mlp()
    opt = create_optimizer("gsam", model, rho=0.1, rho_min=0.02, lr=0.1)
    opt.param_groups[0]["initial_lr"] = 0.1  # what a torch scheduler records
    assert opt.logged_values() == {"rho": pytest.approx(0.1)}
    opt.param_groups[0]["lr"] = 0.05
    assert opt.logged_values() == {"rho": pytest.approx(0.06)}  # halfway from rho to rho_min, as the lr
    assert create_optimizer("sam", tiny_mlp(), rho=0.3).logged_values() == {"rho": 0.3}


def test_the_variants_table_is_generated():
    page = (Path(__file__).resolve().parent.parent / "docs" / "variants.md").read_text()
    table = variants_markdown()
    assert table in page, "docs/variants.md's table is stale: paste optimizers.variants_markdown() into it"
    assert table.count("\n") == 2 + len(VARIANTS)


# -- (h) max_grad_norm clips the descent gradient, in every variant that takes a gradient step -----------


@pytest.mark.parametrize("name", VARIANTS)
def test_max_grad_norm_clips_the_descent_gradient_of_every_variant(name):
    """A norm no gradient reaches changes nothing, bit for bit; a binding one changes the step; bSAM, whose
    update is not a gradient step, refuses it in one line."""
    results = {}
    for norm in (None, 1e12, 1e-3):
        model = tiny_mlp(batchnorm=True)
        extra = {} if norm is None else {"max_grad_norm": norm}
        if name == "bsam":
            if norm is None:
                continue
            with pytest.raises(ValueError, match=r"^BayesianSAM takes no max_grad_norm: its update is not a gradient step$"):
                create_optimizer(name, model, **settings_for(name, **extra))
            return
        opt = create_optimizer(name, model, **settings_for(name, **extra))
        for x, y in batches(3):
            quietly(opt.step, plain_closure(model, x, y))
        results[norm] = flat(model)
    assert torch.equal(results[None], results[1e12])
    assert not torch.equal(results[None], results[1e-3])


def test_max_grad_norm_equals_clip_grad_norm_in_a_plain_loop():
    model, reference = tiny_mlp(), tiny_mlp()
    opt = create_bare("sam", model, lr=0.1, momentum=0.9, rho=0.05, max_grad_norm=0.01)
    ref = create_bare("sam", reference, lr=0.1, momentum=0.9, rho=0.05)
    for x, y in batches(3):
        opt.step(plain_closure(model, x, y))
        nn.functional.cross_entropy(reference(x), y).backward()  # the two-phase form, clipped by hand
        ref.perturb()
        nn.functional.cross_entropy(reference(x), y).backward()
        ref.restore()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
        ref.base_optimizer.step()
        ref.zero_grad()
    assert torch.equal(flat(model), flat(reference))

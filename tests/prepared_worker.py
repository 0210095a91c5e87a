"""Run under ``accelerate launch`` with two CPU processes (tests/test_frameworks.py): every optimizer passed
through ``accelerator.prepare`` with uneven shards, against the same steps in one process; then the fp16
scaler through ``ScaledStep`` and Accelerate's gradient accumulation. Rank 0 writes what it saw as JSON."""

import json
import sys
import warnings

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from bench.cli.main import exit_with
from optimizers import BatchClosure, available_optimizers, create_optimizer
from optimizers.amp import ScaledStep
from optimizers.registry import is_sharpness_aware
from optimizers.regularizer import build_regularizer

STEPS = 3
SIZES = (10, 6)  # per rank: uneven shards
ce = nn.CrossEntropyLoss(reduction="none")


def model_and_optimizer(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    settings = {"lr": 0.01 if name.startswith("adam") else 0.1}
    if is_sharpness_aware(name):
        settings.update(seed=3)
        settings.update(num_data=64) if name == "bsam" else settings.update(momentum=0.9, weight_decay=5e-4)
        if name in ("looksam", "look_layer_sam"):
            settings["k"] = 2
    opt = create_optimizer(name, model, **settings)
    build_regularizer(opt, model, 64, 3, "cpu")  # SAF's and MESA's loss term (unused here: the step is under test)
    return model, opt


def shards(step):
    """Each rank's batch of this step: different samples, different sizes."""
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for n in SIZES]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def one_process(name):
    """The same steps in this process alone: the loss is the mean over ranks of each rank's mean loss, the
    gradient a data-parallel all-reduce averages."""
    model, opt = model_and_optimizer(name)
    for step in range(STEPS):
        parts = shards(step)

        def closure(parts=parts):
            loss = sum(ce(model(x), y).mean() for x, y in parts) / len(parts)
            loss.backward()
            return loss.detach()

        opt.step(closure)
    return flat(model)


def prepared(accelerator, name, rank):
    model, opt = model_and_optimizer(name)
    model, opt = accelerator.prepare(model, opt)
    for step in range(STEPS):
        x, y = shards(step)[rank]
        if name == "esam":  # its ascent backward leaves tensors out: kept local
            closure = BatchClosure(
                model, ce, x, y, backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model), ascent_sync="local"
            )
        else:

            def closure(x=x, y=y):
                loss = ce(model(x), y).mean()
                accelerator.backward(loss)
                return loss.detach()

        opt.step(closure)
    return flat(model)


def main(out):
    accelerator = Accelerator()
    rank = accelerator.process_index
    found = {"processes": accelerator.num_processes, "optimizers": {}}
    warnings.simplefilter("ignore")  # ESAM's and bSAM's plain-closure notes
    for name in available_optimizers():
        got = prepared(accelerator, name, rank)
        replicas = accelerator.gather(got[None]).cpu()
        found["optimizers"][name] = {"replicas_differ": float((replicas - replicas[0]).abs().max())}
        if name != "esam":  # ESAM's ascent is per rank: no one-process equivalent
            expected = one_process(name)
            found["optimizers"][name]["vs_one_process"] = float((got - expected).abs().max() / expected.abs().max())

    # ESAM's plain closure in a data-parallel run: refused in one line
    model, opt = model_and_optimizer("esam")
    model, opt = accelerator.prepare(model, opt)
    x, y = shards(0)[rank]
    try:
        opt.step(lambda: accelerator.backward(ce(model(x), y).mean()))
    except RuntimeError as err:
        found["esam_plain"] = str(err)

    # fp16 on the prepared optimizer's scaler (what Accelerator(mixed_precision="fp16") builds on a GPU) through
    # ScaledStep, against fp32; the scale is a power of two, so scaling is exact
    results = []
    for scaled in (False, True):
        model, opt = model_and_optimizer("sam")
        model, opt = accelerator.prepare(model, opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        wrapped = AcceleratedOptimizer(opt.optimizer, scaler=scaler) if scaled else opt
        amp = ScaledStep(wrapped, scaler, model) if scaled else None
        for step in range(STEPS):
            x, y = shards(step)[rank]
            if amp is not None:
                amp.step(lambda: ce(model(x), y).mean())  # noqa: B023 (called within the iteration)
            else:
                opt.step(lambda: accelerator.backward(ce(model(x), y).mean()))  # noqa: B023
        results.append(flat(model))
    found["fp16_vs_fp32"] = float((results[0] - results[1]).abs().max())

    # gradient accumulation: refused in one line on the step that would run
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, opt = model_and_optimizer("sam")
    model, opt = accelerator.prepare(model, opt)
    try:
        for step in range(2):
            x, y = shards(step)[rank]
            with accelerator.accumulate(model):
                opt.step(lambda x=x, y=y: accelerator.backward(ce(model(x), y).mean()))
    except RuntimeError as err:
        found["accumulation"] = str(err)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(found, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_with(0)  # as launch.py leaves a multi-process job

"""Every variant in the loops people already run: Accelerate's prepared optimizer in two processes with uneven
shards (equal to one process, bit for bit or to float64 rounding), a framework that calls ``step()`` itself
after the passes of its own training step, and the wrappers a step cannot honour refused in one line."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import batches, flat, free_port, plain_closure, tiny_mlp, with_loss_term
from torch import nn

from optimizers import available_optimizers, create_optimizer, optimizer_class
from optimizers.registry import is_sharpness_aware

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [n for n in available_optimizers() if is_sharpness_aware(n)]
TWO_PHASE = [n for n in VARIANTS if optimizer_class(n).uses_base_optimizer]  # bSAM: step(closure) only


def settings_for(name):
    settings = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "seed": 3}
    if name in ("looksam", "look_layer_sam"):
        settings["k"] = 2
    return settings


def setup(name):
    model = tiny_mlp(batchnorm=True)
    return model, with_loss_term(create_optimizer(name, model, **settings_for(name)), model)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "found.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--main_process_port", free_port(), str(ROOT / "tests" / "prepared_worker.py"), str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", available_optimizers())
def test_a_prepared_optimizer_in_two_processes_equals_one_process(two_processes, name):
    assert two_processes["processes"] == 2
    found = two_processes["optimizers"][name]
    assert found["replicas_differ"] == 0.0
    if name != "esam":  # its ascent stays on each rank: no one-process equivalent
        assert found["vs_one_process"] < 1e-15


def test_prepared_fp16_through_scaled_step_equals_fp32(two_processes):
    assert two_processes["fp16_vs_fp32"] == 0.0  # the scale is a power of two: exact


def test_accelerate_gradient_accumulation_is_refused_in_one_line(two_processes):
    message = two_processes["accumulation"]
    assert "\n" not in message and "BatchClosure(..., accumulation_steps=2)" in message


def test_esam_plain_closure_in_a_data_parallel_run_is_refused_in_one_line(two_processes):
    message = two_processes["esam_plain"]
    assert "\n" not in message and "no_sync" in message


@pytest.mark.parametrize("name", TWO_PHASE)
def test_step_without_a_closure_after_the_passes_is_their_descent(name):
    """What the Transformers Trainer does: the passes in training_step, then optimizer.step() on its own."""
    reference, ref_opt = setup(name)
    model, opt = setup(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in batches(4):
            for m, o, finish in ((reference, ref_opt, "descend"), (model, opt, "step")):
                plain_closure(m, x, y)()
                if o.perturbs_this_step:
                    o.perturb()
                    plain_closure(m, x, y)()
                o.descend() if finish == "descend" else o.step()
                o.zero_grad()
    assert torch.equal(flat(model), flat(reference))
    assert [b.clone() for b in model.buffers()][0].equal(list(reference.buffers())[0])


def test_step_without_a_closure_or_the_passes_is_refused():
    model, opt = setup("sam")
    x, y = batches(1)[0]
    plain_closure(model, x, y)()  # one backward, no perturb(): not a sharpness-aware step
    before = flat(model).clone()
    with pytest.raises(RuntimeError, match=r"^SAM\.step needs a closure, or perturb\(\) between"):
        opt.step()
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize("name", VARIANTS)
def test_grad_scaler_step_is_refused_in_one_line_and_changes_nothing(name):
    """davda54/sam issue 7's loop: scaler.scale(loss).backward() around perturb(), then scaler.step(opt)."""
    model = tiny_mlp(batchnorm=True)
    opt = with_loss_term(create_optimizer(name, model, **({"num_data": 64} if name == "bsam" else settings_for(name))), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batches(1)[0]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    before = flat(model).clone()
    with pytest.raises(RuntimeError) as err:
        scaler.step(opt)
    message = str(err.value)
    assert "\n" not in message and message.startswith("a GradScaler cannot step") and "ScaledStep" in message
    assert torch.equal(flat(model), before) and not hasattr(opt, "found_inf")

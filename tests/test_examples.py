"""The examples in examples/ run, train, and take the steps the library takes on its own: Lightning's manual
optimisation and the Transformers Trainer subclass equal a closure step on the same batches."""

import copy
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import free_port
from launching import AS_MAIN

from optimizers import create_optimizer, steps_with_sgd

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 1.386  # ln 4: the loss of a uniform guess on the examples' 4 classes


def example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs(package):
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None, reason=f"needs {package}: pip install -e .[{package}] (CI installs it)"
    )


def reference_steps(net, batches, name="sam"):
    """The same steps with the library's closure form, on a copy of the network."""
    opt = create_optimizer(name, net, lr=0.1, **({"momentum": 0.9} if steps_with_sgd(name) else {}))
    for x, y in batches:

        def closure(x=x, y=y):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return net


def assert_same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", ["sam", "gsam", "looksam"])
def test_plain_loop_trains_with_amp_and_clipping(name):
    assert example("plain_loop").train(name, epochs=3) < CHANCE / 2


@pytest.mark.parametrize("name", ["sgd", "adamw", "bsam"])
def test_plain_loop_runs_the_baselines_and_a_variant_with_its_own_update_rule(name):
    """momentum and max_grad_norm are given where the optimizer declares it takes them (a variant on SGD; one that
    clips its descent gradient), not to AdamW or to bSAM's own update rule."""
    assert math.isfinite(example("plain_loop").train(name, epochs=1))


def test_plain_loop_reports_the_last_step_taken_when_an_epochs_last_step_is_skipped(monkeypatch):
    module = example("plain_loop")
    calls, taken = [0], []

    class SkipsTheLastStep(module.ScaledStep):
        def step(self, loss_fn):
            calls[0] += 1
            loss = super().step(loss_fn)
            if calls[0] == 8:  # the epoch's last step (512 samples, batches of 64), skipped as an overflow would be
                return None
            taken.append(loss.item())
            return loss

    monkeypatch.setattr(module, "ScaledStep", SkipsTheLastStep)
    assert module.train("sam", epochs=1) == taken[-1]


def test_accelerate_loop_trains_in_two_processes(tmp_path):
    """The example launched in two processes, each left as launch.py leaves a multi-process job (tests/launching.py
    AS_MAIN): gloo can abort a finished CPU process at interpreter exit (the example's docstring says why)."""
    script = tmp_path / "as_main.py"
    script.write_text(AS_MAIN)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--main_process_port", free_port(), str(script), str(ROOT / "examples" / "accelerate_loop.py"), "--epochs", "3"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"training loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < 0.75 * CHANCE  # printed once, by rank 0


@needs("lightning")
def test_lightning_manual_optimisation_equals_the_closure_form():
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(128, 20)
    data = TensorDataset(x, (x @ torch.randn(20, 4)).argmax(1))
    module = example("lightning_module").SharpnessAwareModule("sam")
    reference = copy.deepcopy(module.net)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, DataLoader(data, batch_size=32))
    assert trainer.global_step == 8
    assert_same(module.net, reference_steps(reference, list(DataLoader(data, batch_size=32)) * 2))


@needs("transformers")
@pytest.mark.parametrize("name", ["sam", "gam", "lookbehind_sam", "ss_sam"])
def test_the_trainer_subclass_step_equals_the_closure_form(tmp_path, name):
    """GAM's three perturbations and Lookbehind-SAM's k inner steps on one batch included; SS-SAM's draws."""
    from transformers import TrainingArguments

    trainer_example = example("transformers_trainer")
    torch.manual_seed(0)
    model = trainer_example.Classifier()
    reference = copy.deepcopy(model.net)
    args = TrainingArguments(tmp_path, learning_rate=0.1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = trainer_example.SharpnessAwareTrainer(model=model, args=args, train_dataset=[], optimizer_name=name)
    x = torch.randn(32, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)
    torch.manual_seed(1)  # the optimizers' random streams start alike
    trainer.create_optimizer()
    for _ in range(3):  # what the Trainer's inner loop does around training_step
        trainer.training_step(model, {"x": x, "labels": y})
        trainer.optimizer.step()
        model.zero_grad()
    torch.manual_seed(1)
    assert_same(model.net, reference_steps(reference, [(x, y)] * 3, name))


@needs("transformers")
@pytest.mark.parametrize("name", ["gsam", "wsam"])
def test_the_trainers_max_grad_norm_clips_the_descent_gradient(tmp_path, name):
    """GSAM and WSAM form their descent gradient from both passes inside step(): the Trainer's max_grad_norm, given
    to the optimizer, clips that one (the Trainer's own clipping would clip the second pass's); a real train()
    equals the closure form with the same max_grad_norm. The caller's arguments are left as they were."""
    from transformers import TrainingArguments

    trainer_example = example("transformers_trainer")
    torch.manual_seed(0)
    x = torch.randn(32, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)
    model = trainer_example.Classifier()
    reference = copy.deepcopy(model.net)
    args = TrainingArguments(
        tmp_path, num_train_epochs=4, per_device_train_batch_size=32, learning_rate=0.1, max_grad_norm=0.05,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"x": x[i], "labels": y[i]} for i in range(32)]
    trainer_example.SharpnessAwareTrainer(model=model, args=args, train_dataset=data, optimizer_name=name).train()
    assert args.max_grad_norm == 0.05
    opt = create_optimizer(name, reference, lr=0.1, momentum=0.9, max_grad_norm=0.05)
    for _ in range(4):
        opt.step(lambda: F.cross_entropy(reference(x), y).backward())
    for p, q in zip(model.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # the Trainer's loss: the same mean, summed otherwise


@needs("transformers")
@pytest.mark.parametrize("name", ["sam", "sgd"])
def test_the_trainer_subclass_trains(name):
    assert example("transformers_trainer").train(name, epochs=3) < CHANCE


@needs("lightning")
def test_lightning_16_mixed_is_refused_in_one_line():
    """Lightning's fp16 plugin runs the closure once and then GradScaler.step (a CPU scaler here: on a GPU the
    same plugin and class)."""
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(64, 20)
    data = TensorDataset(x, (x @ torch.randn(20, 4)).argmax(1))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, plugins=[plugin], logger=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=r"^a GradScaler cannot step SAM: .* ScaledStep"):
        trainer.fit(example("lightning_module").SharpnessAwareModule("sam"), DataLoader(data, batch_size=32))

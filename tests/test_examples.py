"""The examples in examples/ run, train, and take the steps the library takes on its own: Lightning's manual
optimisation and the Transformers Trainer subclass equal a closure step on the same batches."""

import copy
import importlib.util
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

from optimizers import create_optimizer

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
    opt = create_optimizer(name, net, lr=0.1, momentum=0.9)
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
def test_the_trainer_subclass_step_equals_the_closure_form(tmp_path):
    from transformers import TrainingArguments

    trainer_example = example("transformers_trainer")
    torch.manual_seed(0)
    model = trainer_example.Classifier()
    reference = copy.deepcopy(model.net)
    args = TrainingArguments(tmp_path, learning_rate=0.1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = trainer_example.SharpnessAwareTrainer(model=model, args=args, train_dataset=[], optimizer_name="sam")
    trainer.create_optimizer()
    x = torch.randn(32, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)
    for _ in range(3):  # what the Trainer's inner loop does around training_step
        trainer.training_step(model, {"x": x, "labels": y})
        trainer.optimizer.step()
        model.zero_grad()
    assert_same(model.net, reference_steps(reference, [(x, y)] * 3))


@needs("transformers")
def test_the_trainer_subclass_trains():
    assert example("transformers_trainer").train("sam", epochs=3) < CHANCE


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

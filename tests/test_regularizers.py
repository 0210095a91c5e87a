"""Loss regularisers (optimizers.regularizer) and the methods built on them, SAF and MESA:
the term by hand, SAF's per-sample past logits, MESA's EMA, the harness feeding them
sample ids, and a resumed SAF run repeating the uninterrupted one bit for bit."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, tiny_mlp, with_loss_term
from launching import KILLED_AFTER
from safetensors.torch import load_file
from torch import nn

from bench.cli.main import main
from bench.config import RunConfig
from bench.io import read_jsonl
from bench.loop.step import TrainClosure, take_step
from bench.loop.train import train
from optimizers import create_optimizer, optimizer_class
from optimizers.regularizer import LossRegularizer, WindowedKL, build_regularizer, distillation_kl
from optimizers.saf import MESARegularizer, SAFRegularizer

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("epoch_time_s", "images_per_s", "step_time_mean_s")


# -- the term --------------------------------------------------------------------------------------


class FixedReference(WindowedKL):
    """z_ref from a table indexed by sample id."""

    def __init__(self, table, **settings):
        super().__init__(None, len(table), table.shape[1], "cpu", **settings)
        self.table = table

    def reference(self, outputs, sample_ids, epoch, inputs):
        return self.table[sample_ids], None


def test_the_term_by_hand_in_its_window():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    z_ref = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    tau, lam = 2.0, 0.3
    reg = FixedReference(z_ref, lam=lam, tau=tau, kl_start=1, kl_end=4)
    ids = torch.tensor([0, 1])
    p = torch.exp(z_ref / tau) / torch.exp(z_ref / tau).sum(1, keepdim=True)
    q = torch.exp(z / tau) / torch.exp(z / tau).sum(1, keepdim=True)
    by_hand = lam * tau**2 * (p * (p.log() - q.log())).sum(1)
    official = F.kl_div(F.softmax(z / tau, dim=1).log(), F.softmax(z_ref / tau, dim=1), reduction="none").sum(-1)
    for epoch in range(6):
        term = reg.extra_loss(z, ids, epoch, inputs=None)
        assert term.shape == (2,)
        if 1 < epoch < 4:  # kl_start < epoch < kl_end
            torch.testing.assert_close(term, by_hand, rtol=1e-12, atol=0)
            torch.testing.assert_close(term, lam * tau**2 * official, rtol=1e-12, atol=0)
        else:
            assert torch.equal(term, torch.zeros(2, dtype=torch.float64))
    reg.extra_loss(z, ids, 2, inputs=None).sum().backward()
    assert z.grad is not None and z_ref.grad is None  # the gradient goes through z only
    assert torch.equal(distillation_kl(z_ref, z_ref, tau), torch.zeros(2, dtype=torch.float64))


def test_no_end_and_the_declaration():
    reg = FixedReference(torch.zeros(1, 3), lam=1.0, tau=1.0, kl_start=0)
    assert not reg.active(0) and reg.active(1) and reg.active(10**6)
    for name, regularizer in (("saf", SAFRegularizer), ("mesa", MESARegularizer)):
        assert optimizer_class(name).loss_regularizer is regularizer
    assert optimizer_class("sam").loss_regularizer is None
    with pytest.raises(ValueError, match="kl_end must be > kl_start"):
        create_optimizer("saf", tiny_mlp(), kl_start=3, kl_end=4)


# -- SAF ------------------------------------------------------------------------------------------


def logits(ids, epoch):
    """A sample's predictable logits at an epoch."""
    return torch.stack([torch.tensor([float(i), float(epoch), 1.0]) for i in ids.tolist()]).double()


def saf_epoch(reg, epoch, batches):
    """One epoch of steps; returns each step's (ids, term)."""
    out = []
    for ids in batches:
        z = logits(ids, epoch).requires_grad_(True)
        out.append((ids, reg.extra_loss(z, ids, epoch, inputs=None)))
        reg.after_step(None)
    return out


def test_saf_uses_each_samples_logits_from_past_epochs_before():
    e, tau = 2, 2.0
    reg = SAFRegularizer(None, 5, 3, "cpu", lam=1.0, tau=tau, kl_start=-1, past_epochs=e)
    assert reg.logits.shape == (5, e + 1, 3)
    every = [torch.tensor([3, 0]), torch.tensor([4, 1])]  # sample 2 falls in the dropped remainder
    dropped = {3: [torch.tensor([3, 4]), torch.tensor([1, 2])]}  # ... and sample 0 in epoch 3
    seen = {}
    for epoch in range(7):
        for ids, term in saf_epoch(reg, epoch, dropped.get(epoch, every)):
            for i, value in zip(ids.tolist(), term):
                past = epoch - e
                if past in seen.get(i, ()):
                    expected = distillation_kl(logits(torch.tensor([i]), epoch), logits(torch.tensor([i]), past), tau)
                    torch.testing.assert_close(value.reshape(1), expected, rtol=1e-6, atol=0)
                    assert value > 0
                else:  # no logits from exactly E~ epochs before: before epoch E~, or dropped then
                    assert value == 0, (epoch, i)
            for i in ids.tolist():
                seen.setdefault(i, set()).add(epoch)
    # epoch 5 read epoch 3's slot for sample 0, which still held epoch 0's logits: unused
    assert reg.recorded_in[0].tolist() == [6, 4, 5] and 3 not in seen[0]


def test_saf_records_only_taken_training_passes_first_pass_first():
    reg = SAFRegularizer(None, 3, 3, "cpu", lam=1.0, tau=1.0, kl_start=5, past_epochs=1)
    ids = torch.tensor([0, 1])
    reg.extra_loss(logits(ids, 7).requires_grad_(True), ids, 0, inputs=None)
    reg.after_step(None, skipped=True)  # a skipped step records nothing
    reg.extra_loss(logits(ids, 9), ids, 0, inputs=None)  # no gradient: an evaluation, not noted
    reg.after_step(None)
    assert (reg.recorded_in == -1).all()
    reg.extra_loss(logits(ids, 1).requires_grad_(True), ids, 0, inputs=None)
    reg.extra_loss(logits(torch.tensor([1, 2]), 2).requires_grad_(True), torch.tensor([1, 2]), 0, inputs=None)
    reg.after_step(None)
    assert reg.recorded_in[:, 0].tolist() == [0, 0, 0]
    assert torch.equal(reg.logits[:, 0], torch.tensor([[0.0, 1, 1], [1, 1, 1], [2, 2, 1]]))  # sample 1: first pass


def test_saf_state_round_trip():
    reg = SAFRegularizer(None, 4, 3, "cpu", lam=1.0, tau=1.0, kl_start=0, past_epochs=2)
    saf_epoch(reg, 0, [torch.tensor([2, 1])])
    other = SAFRegularizer(None, 4, 3, "cpu", lam=1.0, tau=1.0, kl_start=0, past_epochs=2)
    other.load_state_dict({k: v.clone() for k, v in reg.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(reg.state_dict().values(), other.state_dict().values()))


# -- MESA -----------------------------------------------------------------------------------------


def test_mesa_ema_update_by_hand():
    model = tiny_mlp(batchnorm=True)
    decay = 0.9
    reg = MESARegularizer(model, 10, 3, "cpu", ema_decay=decay, lam=0.8, tau=5.0, kl_start=0)
    assert not reg.ema.training and not any(p.requires_grad for p in reg.ema.parameters())
    opt = create_optimizer("mesa", model, lr=0.1)
    opt.regularizer = reg  # attached, as build_regularizer does
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    for _ in range(3):
        opt.step(closure)
        reg.after_step(model)
        now = model.state_dict()
        for k, v in expected.items():
            expected[k] = decay * v + (1 - decay) * now[k] if v.is_floating_point() else now[k].clone()
        for k, v in reg.ema.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=1e-15)
    before = {k: v.clone() for k, v in reg.ema.state_dict().items()}
    reg.after_step(model, skipped=True)  # no step: no update
    assert all(torch.equal(v, before[k]) for k, v in reg.ema.state_dict().items())
    # the reference is the EMA model's eval-mode output on the same inputs
    z = model(x)
    torch.testing.assert_close(
        reg.extra_loss(z, torch.arange(16), 1, x), 0.8 * distillation_kl(z, reg.ema.eval()(x), 5.0), rtol=1e-12, atol=0
    )
    assert torch.equal(reg.extra_loss(z, torch.arange(16), 0, x), torch.zeros(16, dtype=torch.float64))
    copy = MESARegularizer(tiny_mlp(seed=3, batchnorm=True), 10, 3, "cpu", ema_decay=decay, lam=0.8, tau=5.0, kl_start=0)
    copy.load_state_dict(reg.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.ema.state_dict().values(), reg.ema.state_dict().values()))


def test_build_regularizer_takes_the_optimizers_settings():
    model = tiny_mlp()
    opt = create_optimizer("mesa", model, lam=0.5, ema_decay=0.99, kl_end=9)
    reg = build_regularizer(opt, model, 10, 3, "cpu")
    assert isinstance(reg, MESARegularizer) and (reg.lam, reg.ema_decay, reg.kl_end, reg.tau) == (0.5, 0.99, 9, 5.0)
    assert build_regularizer(create_optimizer("sam", model), model, 10, 3, "cpu") is None
    with pytest.raises(ValueError, match="takes no setting"):
        LossRegularizer(model, 10, 3, "cpu", rho=1.0)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_a_loss_term_method_refuses_to_step_without_its_term(name):
    """Without its loss term SAF (MESA) would silently be SGD: it refuses, in one line saying how to attach the term,
    and changes nothing; with the term attached it steps."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = create_optimizer(name, model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="is a loss term, not an update rule") as err:
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert "\n" not in str(err.value) and "build_regularizer" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    build_regularizer(opt, model, 16, 3, "cpu")
    opt.zero_grad()
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- the harness ----------------------------------------------------------------------------------


class Recording(LossRegularizer):
    def __init__(self):
        super().__init__(None, 0, 0, "cpu")
        self.calls = []

    def extra_loss(self, outputs, sample_ids, epoch, inputs):
        self.calls.append((sample_ids, inputs, epoch))
        return outputs.sum(1) * 0 + 1.0


def test_the_closure_hands_each_pass_its_ids_and_inputs():
    from accelerate import Accelerator

    model = nn.Linear(4, 3)
    x, y, ids = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.tensor([7, 3, 9, 0, 2, 5, 1, 8])
    reg = Recording()
    closure = TrainClosure(
        model,
        nn.CrossEntropyLoss(reduction="none"),
        x,
        y,
        accelerator=Accelerator(cpu=True),
        ascent_sync="local",
        scaler=None,
        accumulation_steps=2,
        sample_ids=ids,
        regularizer=reg,
        epoch=4,
    )
    subset = torch.tensor([1, 2, 5, 6, 7])
    loss = closure(subset)
    assert torch.equal(torch.cat([c[0] for c in reg.calls]), ids[subset])
    assert torch.equal(torch.cat([c[1] for c in reg.calls]), x[subset]) and {c[2] for c in reg.calls} == {4}
    task = F.cross_entropy(model(x[subset]), y[subset])
    torch.testing.assert_close(loss, task + 1.0)  # the step trains on the regularised loss
    _, loss_sum, seen = closure.sums.metrics()
    torch.testing.assert_close(loss_sum / seen, task.detach())  # the metrics keep the task loss
    assert not take_step(with_loss_term(create_optimizer("saf", model, lr=0.1), model, num_train=10), closure)


def test_the_harness_names_no_variant():
    for path in (ROOT / "bench").rglob("*.py"):
        assert not re.search(r"\b(saf|mesa)\b", path.read_text(), re.IGNORECASE), path


def test_saf_and_mesa_train_through_the_harness(tmp_path):
    """kl_start 0: epoch 1 trains like SGD, epoch 2 with the term; the loss falls."""

    def run(name, **hyperparameters):
        config = RunConfig(
            optimizer=name, hyperparameters=hyperparameters, epochs=2, batch_size=64, cpu=True, output_dir=str(tmp_path / name)
        )
        result = train(config)
        return read_jsonl(result.run_dir / "metrics.jsonl"), load_file(result.run_dir / "model.safetensors")

    sgd_rows, sgd_weights = run("sgd")
    for name, settings in (("saf", {"kl_start": 0, "past_epochs": 1}), ("mesa", {"kl_start": 0})):
        rows, weights = run(name, **settings)
        losses = [r["train_loss"] for r in rows]
        assert losses[1] < 0.8 * losses[0], (name, losses)
        assert rows[0]["train_loss"] == sgd_rows[0]["train_loss"]  # the term is off in epoch 0
        assert any(not torch.equal(weights[k], sgd_weights[k]) for k in weights), name  # and on in epoch 1


def test_a_killed_saf_run_resumes_to_the_same_result(tmp_path):
    """The buffer's epoch-0 logits are used after the resume: it must come back with the checkpoint."""
    flags = [
        "--sam_type",
        "saf",
        "--kl_start",
        "0",
        "--past_epochs",
        "1",
        "--epochs",
        "2",
        "--batch_size",
        "64",
        "--save_every_steps",
        "4",
        "--cpu",
    ]
    assert main(flags + ["--output_dir", str(tmp_path / "whole")]) == 0
    killed = flags + ["--output_dir", str(tmp_path / "killed")]
    env = {**os.environ, "KILL_AFTER": "30"}  # 22 steps per epoch: step 30 is mid-epoch 2, last checkpoint at 28
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER, *killed], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    (run,) = [p for p in (tmp_path / "killed").iterdir() if p.is_dir()]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000024", "step_00000028"]
    assert main(killed + ["--resume", "auto"]) == 0
    (whole,) = [p for p in (tmp_path / "whole").iterdir() if p.is_dir()]
    wa, wb = load_file(whole / "model.safetensors"), load_file(run / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_jsonl(whole / "metrics.jsonl")) == strip(read_jsonl(run / "metrics.jsonl"))


def test_two_processes_keep_the_whole_saf_buffer(tmp_path):
    """Each process trains on its shard, whose samples change every epoch; the gathered buffer gives
    every sample its past logits, so two processes equal one process with the whole batch."""
    args = [
        "--arch_type",
        "mlp",
        "--epochs",
        "2",
        "--batch_size",
        "64",
        "--schedule",
        "constant",
        "--sam_type",
        "saf",
        "--kl_start",
        "0",
        "--past_epochs",
        "1",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29541",
        "launch.py",
        *args,
        "--output_dir",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--cpu", "--output_dir", str(tmp_path / "one")]) == 0
    (two,), (one,) = list((tmp_path / "two").iterdir()), list((tmp_path / "one").iterdir())
    wa, wb = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    for k in wb:
        assert ((wa[k] - wb[k]).norm() / wb[k].norm()).item() < 1e-6, k

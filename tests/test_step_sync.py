"""A training step costs at most one host synchronisation (the skip decision), and a step
skipped at its end is undone exactly: weights, BatchNorm statistics and optimizer state."""

import copy

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.overrides import TorchFunctionMode

from bench.loop.precision import LossScaler
from bench.loop.step import TrainClosure, take_step
from optimizers import create_optimizer
from optimizers.snapshot import StepSnapshot

#: Tensor methods that copy a device value to the host (each one waits for the device).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)
    )


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def closure_for(model, x, y, loss_fn=None, scaler=None, accumulation_steps=1):
    return TrainClosure(
        model,
        loss_fn or nn.CrossEntropyLoss(reduction="none"),
        x,
        y,
        accelerator=Accelerator(cpu=True),
        ascent_sync="local",
        scaler=scaler,
        accumulation_steps=accumulation_steps,
    )


@pytest.mark.parametrize(
    "name, settings",
    [
        ("sgd", {}),
        ("sam", {}),
        ("gsam", {}),
        ("looksam", {"k": 2}),
        ("sam", {"accumulation_steps": 2}),
        ("sam", {"fp16_scaler": True}),
    ],
)
def test_one_host_synchronisation_per_step(name, settings):
    model = bn_cnn()
    accumulation = settings.pop("accumulation_steps", 1)
    scaler = LossScaler() if settings.pop("fp16_scaler", False) else None
    opt = create_optimizer(name, model, lr=0.05, **settings)
    snapshot = StepSnapshot(model) if name != "sgd" else None
    reads_per_step = []
    for step in range(4):  # LookSAM k=2: steps with and without its second pass
        closure = closure_for(model, *batch(step), scaler=scaler, accumulation_steps=accumulation)
        with CountHostReads() as reads:
            skipped = take_step(opt, closure, snapshot)
        assert not skipped
        reads_per_step.append(len(reads.calls))
        assert closure.passes >= 1
    assert reads_per_step == [1, 1, 1, 1]


def _loss_failing_on(pass_number: int):
    calls = 0

    def loss_fn(outputs, targets):
        nonlocal calls
        calls += 1
        losses = nn.functional.cross_entropy(outputs, targets, reduction="none")
        return losses * float("inf") if calls == pass_number else losses

    return loss_fn


@pytest.mark.parametrize("name", ["sam", "gsam", "vasso", "ae_sam"])
@pytest.mark.parametrize("fail_on_pass", [1, 2])
def test_a_step_skipped_at_its_end_is_undone_exactly(name, fail_on_pass):
    """Two good steps, a bad one (its ascent or its descent pass non-finite), a good one: the
    same weights, buffers and optimizer state as the two good steps followed by the last one."""
    model, reference = bn_cnn(), bn_cnn()
    opt, ref_opt = create_optimizer(name, model, lr=0.05, momentum=0.9), create_optimizer(name, reference, lr=0.05, momentum=0.9)
    snapshot = StepSnapshot(model)
    for step in range(2):
        assert not take_step(opt, closure_for(model, *batch(step)), snapshot)
        assert not take_step(ref_opt, closure_for(reference, *batch(step)))
    state_before = copy.deepcopy(opt.state_dict())
    assert take_step(opt, closure_for(model, *batch(7), loss_fn=_loss_failing_on(fail_on_pass)), snapshot)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(
        torch.cat([t.reshape(-1).float() for t in model.state_dict().values()]),
        torch.cat([t.reshape(-1).float() for t in reference.state_dict().values()]),
    )
    restored = opt.state_dict()
    for key, value in state_before["state"].items():
        for field, tensor in value.items() if isinstance(value, dict) else ():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(restored["state"][key][field], tensor), (key, field)
    assert not take_step(opt, closure_for(model, *batch(3)), snapshot)
    assert not take_step(ref_opt, closure_for(reference, *batch(3)))
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_the_dispatch_counter_counts_operators_and_host_reads():
    from bench.studies.dispatch import counted, step_counts

    t = torch.ones(4)
    c = counted(lambda: (t.sum().item(), bool(t.max() > 0), t * 2))
    assert (c.operators, c.host_reads) == (6, 2)  # sum, item, max, gt, bool, mul
    model = nn.Linear(4, 2)

    def forward_backward():
        model(t[None]).sum().backward()

    def step():  # two passes and two operators of bookkeeping, one of them a host read
        forward_backward()
        forward_backward()
        model.weight.grad.norm().item()

    counts = step_counts(step, forward_backward, lambda: 2)
    assert (counts.operators_outside_passes, counts.host_reads) == (2, 1)

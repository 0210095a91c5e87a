"""A training step costs at most one host synchronisation (the skip decision), and a step
skipped at its end is undone exactly: weights, BatchNorm statistics and optimizer state."""

import copy

import pytest
import torch
from accelerate import Accelerator
from helpers import loss_infinite_at
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.loop.precision import LossScaler
from bench.loop.step import TrainClosure, take_step
from bench.loop.sums import EpochSums
from optimizers import SharpnessAwareOptimizer, create_optimizer, optimizer_class
from optimizers.registry import available_optimizers
from optimizers.snapshot import StepSnapshot, as_state_dict, held_state

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
    """Decided once at its end (as where a read waits for the device), a step reads one flag."""
    model = bn_cnn()
    accumulation = settings.pop("accumulation_steps", 1)
    scaler = LossScaler() if settings.pop("fp16_scaler", False) else None
    opt = create_optimizer(name, model, lr=0.05, **settings)
    snapshot = StepSnapshot(model) if name != "sgd" else None
    reads_per_step = []
    for step in range(4):  # LookSAM k=2: steps with and without its second pass
        closure = closure_for(model, *batch(step), scaler=scaler, accumulation_steps=accumulation)
        with CountHostReads() as reads:
            skipped = take_step(opt, closure, snapshot, each_pass=False)
        assert not skipped
        reads_per_step.append(len(reads.calls))
        assert closure.passes >= 1
    assert reads_per_step == [1, 1, 1, 1]


@pytest.mark.parametrize("name, passes", [("sgd", 1), ("sam", 2), ("asam", 2), ("gam", 4), ("gsam", 1)])
def test_on_a_cpu_a_variant_undone_by_its_restore_reads_each_pass_and_takes_no_snapshot(name, passes, monkeypatch):
    """On a CPU (a read waits for nothing) a step of a variant declaring ``undone_by_restore`` reads its flag after
    each pass and copies none of the optimizer's state; any other variant reads once, after a snapshot."""
    model = bn_cnn()
    opt = create_optimizer(name, model, lr=0.05)
    snapshot = StepSnapshot(model)
    saved = []
    monkeypatch.setattr(snapshot, "save", lambda optimizer: saved.append(optimizer))
    for step in range(2):
        closure = closure_for(model, *batch(step))
        with CountHostReads() as reads:
            assert not take_step(opt, closure, snapshot)
        assert len(reads.calls) == passes
    assert len(saved) == (2 if name == "gsam" else 0)


@pytest.mark.parametrize(
    "name, fail_on_pass",
    # ESAM's second loss is its selection's (no gradient), LookSAM's third step has one pass: their first fails
    [(name, p) for name in ("sam", "gsam", "vasso", "ae_sam", "bsam") for p in (1, 2)] + [("esam", 1), ("looksam", 1)],
)
def test_a_step_skipped_at_its_end_is_undone_exactly(name, fail_on_pass):
    """Two good steps, a bad one (its ascent or its descent pass non-finite), a good one: the
    same weights, buffers and optimizer state as the two good steps followed by the last one."""
    model, reference = bn_cnn(), bn_cnn()
    # seeded alike: a variant's own random stream (ESAM's dropped tensors, bSAM's noise) must be undone too
    momentum = {"momentum": 0.9} if optimizer_class(name).uses_base_optimizer else {}  # bSAM: a rule of its own
    opt, ref_opt = (create_optimizer(name, m, lr=0.05, seed=0, **momentum) for m in (model, reference))
    snapshot = StepSnapshot(model)
    for step in range(2):
        assert not take_step(opt, closure_for(model, *batch(step)), snapshot)
        assert not take_step(ref_opt, closure_for(reference, *batch(step)))
    state_before = copy.deepcopy(opt.state_dict())
    assert take_step(opt, closure_for(model, *batch(7), loss_fn=loss_infinite_at(fail_on_pass)), snapshot)
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


# -- steps undone on the device ------------------------------------------------------------------


class DeviceReads(TorchDispatchMode):
    """Counts the scalar reads a step dispatches (each one waits for an accelerator), less those of tensors
    torch keeps on the host by design (``host``: Adam's step counts, which stay on the CPU beside a GPU's
    parameters unless the optimizer is ``capturable``). On a CPU nothing else tells the two apart."""

    def __init__(self, host=()):
        super().__init__()
        self.host, self.reads = {id(t) for t in host}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in self.host:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def host_kept(opt) -> list[torch.Tensor]:
    """The step counts a torch Adam keeps on the host (none before its first step)."""
    base = getattr(opt, "base_optimizer", None) or opt
    return [s["step"] for s in base.state.values() if isinstance(s, dict) and isinstance(s.get("step"), torch.Tensor)]


STEADY = [
    ("sgd", {}),
    ("adamw", {}),
    ("sam", {}),
    ("gsam", {}),
    ("looksam", {"k": 2}),
    ("esam", {"seed": 0}),
    ("sam", {"accumulation_steps": 2}),
]


@pytest.mark.parametrize("name, settings", STEADY)
def test_a_step_undone_on_the_device_reads_nothing_on_the_host(name, settings):
    """A first step that creates the optimizer's state is decided on the host; every later step, with
    or without LookSAM's second pass, ESAM's selection pass included, dispatches no host read."""
    model = bn_cnn()
    accumulation = settings.pop("accumulation_steps", 1)
    opt = create_optimizer(name, model, lr=0.05, **settings)
    snapshot = StepSnapshot(model)
    reads, flags = [], []
    for step in range(5):
        closure = closure_for(model, *batch(step), accumulation_steps=accumulation)
        with DeviceReads(host_kept(opt)) as counter:
            flags.append(take_step(opt, closure, snapshot, on_device=True))
        reads.append(counter.reads)
    assert reads[1:] == [0, 0, 0, 0]  # the first step, which makes the state, is not counted
    assert all(isinstance(f, torch.Tensor) and f.item() == 0 for f in flags[1:]) and not flags[0]


@pytest.mark.parametrize("name, settings", STEADY[:6])
def test_the_device_form_gives_the_host_form_bit_for_bit(name, settings):
    model, reference = bn_cnn(), bn_cnn()
    opt, ref_opt = create_optimizer(name, model, lr=0.05, **settings), create_optimizer(name, reference, lr=0.05, **settings)
    snapshot = StepSnapshot(model)
    for step in range(4):
        take_step(opt, closure_for(model, *batch(step)), snapshot, on_device=True)
        take_step(ref_opt, closure_for(reference, *batch(step)), StepSnapshot(reference))
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name, fail_on_pass",
    # ESAM's second loss is its selection pass, without a backward: its descent is the third
    [
        ("sgd", 1),
        ("adamw", 1),
        ("esam", 1),
        ("esam", 3),
        *((name, n) for name in ("sam", "gsam", "looksam", "vasso") for n in (1, 2)),
    ],
)
def test_a_non_finite_step_undone_on_the_device_changes_nothing(name, fail_on_pass):
    """Two good steps, then one whose first or second pass is non-finite: no host read, its flag set, and
    weights, BatchNorm buffers and every tensor of the optimizer's state bit for bit as before it (what
    follows the loop's clock, the random streams and a declared counter, advanced). The next good step
    equals a reference that never saw the bad one, for a variant whose clock did not reach a different
    branch (LookSAM with k=1: a SAM step every step)."""
    settings = {"k": 1} if name == "looksam" else {"seed": 0} if name in ("esam", "vasso") else {}
    model, reference = bn_cnn(), bn_cnn()
    opt = create_optimizer(name, model, lr=0.05, **settings)
    ref_opt = create_optimizer(name, reference, lr=0.05, **settings)
    snapshot = StepSnapshot(model)
    for step in range(2):
        take_step(opt, closure_for(model, *batch(step)), snapshot, on_device=True)
        take_step(ref_opt, closure_for(reference, *batch(step)))
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    bad = closure_for(model, *batch(7), loss_fn=loss_infinite_at(fail_on_pass))
    with DeviceReads(host_kept(opt)) as counter:
        flag = take_step(opt, bad, snapshot, on_device=True)
    assert counter.reads == 0 and flag.item() != 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = opt.state_dict()
    advancing = type(opt).__dict__.get("advances_when_skipped", ())
    for key, value in state["state"].items():
        if key in advancing:
            continue
        for field, tensor in value.items() if isinstance(value, dict) else [(None, value)]:
            now = after["state"][key] if field is None else after["state"][key][field]
            assert torch.equal(now, tensor) if isinstance(tensor, torch.Tensor) else now == tensor, (key, field)
    for key, value in state.get("base_state", {}).items():
        for field, tensor in value.items():
            assert torch.equal(after["base_state"][key][field], tensor), (key, field)
    take_step(opt, closure_for(model, *batch(3)), snapshot, on_device=True)
    take_step(ref_opt, closure_for(reference, *batch(3)))
    if name not in ("esam",):  # ESAM's next draw comes from a stream that advanced
        for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
            assert torch.equal(a, b)


def _train(tmp_path, monkeypatch, on_device: bool, *argv):
    from bench.cli.main import main
    from bench.io import read_json, read_jsonl

    monkeypatch.setattr("bench.loop.setup.skips_on_device", lambda *args: on_device)
    out = tmp_path / ("device" if on_device else "host")
    code = main(["--arch", "mlp", "--epochs", "2", "--batch_size", "64", "--cpu", "--output_dir", str(out), *argv])
    (run,) = [p.parent for p in out.rglob("summary.json")]
    timeless = [
        {k: v for k, v in row.items() if "time" not in k and "per_s" not in k} for row in read_jsonl(run / "metrics.jsonl")
    ]
    return code, read_json(run / "summary.json"), timeless


@pytest.mark.parametrize("optimizer", [[], ["--sam_type", "LookSAM", "--k", "2"]])
def test_a_run_undoing_its_steps_on_the_device_trains_as_one_deciding_on_the_host(tmp_path, monkeypatch, optimizer):
    host = _train(tmp_path, monkeypatch, False, *optimizer)
    device = _train(tmp_path, monkeypatch, True, *optimizer)
    assert host[0] == device[0] == 0 and host[2] == device[2]


def test_a_run_undoing_its_steps_on_the_device_finds_its_divergence(tmp_path, monkeypatch):
    code, summary, rows = _train(tmp_path, monkeypatch, True, "--lr", "1e30", "--momentum", "0", "--max_consecutive_skips", "3")
    assert code == 1 and summary["status"] == "diverged"
    # the first step is finite and every later one is not: a step deciding on the host stops at step 4; the
    # flags read three at a time find the run of skips at step 6, steps 2-6 skipped (and changing nothing)
    assert (summary["skipped_steps"], rows[-1]["step"]) == (5, 6)


@pytest.mark.parametrize("name", ["sgd", "adamw", "sam", "esam", "looksam", "bsam", "gsam"])
def test_the_held_state_a_snapshot_reads_is_what_state_dict_saves(name):
    """The snapshot reads the optimizer's state unpacked each step (no state_dict packing); packed, it is the
    optimizer's own state_dict: the same entries, the same tensors."""
    model = bn_cnn()
    cls = optimizer_class(name)
    settings = {} if name == "adamw" or not getattr(cls, "uses_base_optimizer", True) else {"momentum": 0.9}
    opt = create_optimizer(name, model, lr=0.05, **settings, **({"seed": 0} if name not in ("sgd", "adamw") else {}))
    for step in range(3):
        assert not take_step(opt, closure_for(model, *batch(step)), StepSnapshot(model))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    state_dict = opt.state_dict()
    assert state_dict["state"] or state_dict.get("base_state")
    assert same(as_state_dict(held_state(opt), opt), state_dict)


def _whole_state(model, opt):
    """Every weight and buffer, and the optimizer's whole state_dict (its settings included), flattened."""
    tensors = [t.reshape(-1).double() for t in model.state_dict().values()]
    numbers = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value.reshape(-1).double())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                numbers.append(str(key))
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            numbers.append(repr(value))

    walk(opt.state_dict())
    return torch.cat(tensors), numbers


UNDONE_BY_RESTORE = [name for name in available_optimizers() if getattr(optimizer_class(name), "undone_by_restore", False)]


def _most_passes(name: str) -> int:
    """The most passes a step of ``name`` takes, from its declared ``passes`` ("2", "4", "1 + fraction of ...")."""
    declared = optimizer_class(name).passes
    return int(declared) if declared.isdigit() else int(declared.split()[0]) + 1


@pytest.mark.parametrize(
    "name, fail_on_pass",
    [
        ("sgd", 1),
        ("adamw", 1),
        *((name, p) for name in UNDONE_BY_RESTORE for p in range(1, _most_passes(name) + 1)),
    ],
)
def test_a_step_stopped_at_a_pass_without_a_snapshot_of_the_optimizer_changes_nothing(name, fail_on_pass):
    """A plain optimizer's step, and each step of a variant declaring ``undone_by_restore``, decides at every pass
    on the host and is undone by the variant's restore and the model's buffers alone: a step that stops at any of
    its passes (a plain optimizer's at its forward, non-finite) leaves every weight, BatchNorm buffer and
    state_dict entry as it was, settings included, and the run goes on as one without it."""
    model, reference = bn_cnn(), bn_cnn()
    seeded = {"seed": 0} if issubclass(optimizer_class(name), SharpnessAwareOptimizer) else {}
    opt, ref_opt = (create_optimizer(name, m, lr=0.05, **seeded) for m in (model, reference))
    snapshot, ref_snapshot = StepSnapshot(model), StepSnapshot(reference)
    for step in range(2):
        assert not take_step(opt, closure_for(model, *batch(step)), snapshot)
        assert not take_step(ref_opt, closure_for(reference, *batch(step)), ref_snapshot)
    before = _whole_state(model, opt)
    bad_x, bad_y = batch(7)
    if fail_on_pass == 1:
        bad_x[0, 0, 0, 0] = float("nan")  # through the forward: BatchNorm's statistics see it
        loss_fn = None
    else:
        loss_fn = loss_infinite_at(fail_on_pass)
    closure = closure_for(model, bad_x, bad_y, loss_fn=loss_fn)
    random_state = torch.get_rng_state()
    assert take_step(opt, closure, snapshot)
    assert closure.passes == fail_on_pass - 1  # stopped at the failing pass
    assert all(p.grad is None for p in model.parameters())
    after = _whole_state(model, opt)
    assert torch.equal(after[0], before[0]) and after[1] == before[1]
    assert torch.equal(torch.get_rng_state(), random_state)  # no draw from torch's global stream either
    for step in (3, 4, 5):
        assert not take_step(opt, closure_for(model, *batch(step)), snapshot)
        assert not take_step(ref_opt, closure_for(reference, *batch(step)), ref_snapshot)
        assert torch.equal(_whole_state(model, opt)[0], _whole_state(reference, ref_opt)[0])


@pytest.mark.parametrize(
    "name, fail_on_pass, each_pass",
    [
        ("sgd", 1, None),  # a plain optimizer: its one pass decides
        ("sam", 1, None),  # each pass decides
        ("sam", 2, None),  # ... after the first pass counted its batch
        ("sam", 2, False),  # decided at the step's end, undone from the snapshot
        ("gsam", 1, None),  # the snapshot, a non-finite loss counted first
        ("friendly_sam", 2, None),
        ("esam", 1, None),  # its descent pass counts on part of the batch (on the device)
        ("bsam", 3, None),  # sub-batches: the first one's samples counted on the device, then a failing pass
        ("sgd", 1, "device"),  # undone on the device: the counts wait for the flag
        ("sam", 2, "device"),
        # ESAM with every tensor kept (beta 1, no random drop: a step undone on the device advances its draws)
        ("esam", 1, "device"),
    ],
)
def test_a_skipped_step_counts_nowhere_in_the_training_metrics(name, fail_on_pass, each_pass, monkeypatch):
    """The epoch's training sums after a run with a skipped step equal, bit for bit, those of a run that never
    met that step: what its passes counted (a non-finite loss or not), predictions and samples, is taken back
    (or, undone on the device, never added), also where the step begins by counting the outputs waiting
    (every second step here)."""
    monkeypatch.setattr("bench.loop.sums.COUNT_EVERY", 2)

    def run(steps, fail_at=None):
        model = bn_cnn()
        seeded = {"seed": 0} if issubclass(optimizer_class(name), SharpnessAwareOptimizer) else {}
        if name == "esam" and each_pass == "device":
            seeded["beta"] = 1.0
        opt, snapshot, sums = (
            create_optimizer(name, model, lr=0.05, **seeded),
            StepSnapshot(model),
            EpochSums(torch.device("cpu")),
        )
        for step in steps:
            loss_fn = loss_infinite_at(fail_on_pass) if step == fail_at else nn.CrossEntropyLoss(reduction="none")
            closure = TrainClosure(
                model, loss_fn, *batch(step), accelerator=Accelerator(cpu=True), ascent_sync="local", scaler=None, sums=sums
            )
            if each_pass == "device":
                skipped = take_step(opt, closure, snapshot, on_device=True)
            else:
                skipped = take_step(opt, closure, snapshot, each_pass=each_pass)
            assert bool(skipped) == (step == fail_at)
        return {k: v for k, v in sums.to_host().items() if k in ("correct", "loss_sum", "seen")}

    with_skip = run([0, 1, 2, 3, 4], fail_at=2)
    assert with_skip == run([0, 1, 3, 4]) and with_skip["seen"] == 64


def test_a_step_s_counts_cannot_be_dropped_once_counted_in_bulk():
    sums = EpochSums(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="needs a begin_step"):
        sums.drop_step()
    sums.begin_step()
    sums.count_batch(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4))
    sums.metrics()  # the waiting outputs, this step's among them, counted together
    with pytest.raises(RuntimeError, match="nothing counted in bulk since"):
        sums.drop_step()

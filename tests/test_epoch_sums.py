"""The epoch's running sums (bench.loop.sums): the numbers of per-step sums, with fewer operators per step.

Correct predictions counted in bulk equal the per-step count; the loss sum is the float32 sum in step
order, bit for bit; a checkpoint taken with predictions still waiting resumes to the same sums; one
closure kept across a run's steps trains as a fresh closure per step does.
"""

import tempfile

import pytest
import torch
from helpers import loss_infinite_at

from bench.loop.epoch import train_on
from bench.loop.setup import setup
from bench.loop.sums import COUNT_EVERY, EpochSums
from bench.studies.dispatch import counted
from bench.studies.perf_harness import harness_config, synthetic_batch, synthetic_dataset


def batches(steps: int, batch: int = 16, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        outputs = torch.randn(batch, classes, generator=g)
        targets = torch.randint(0, classes, (batch,), generator=g)
        losses = torch.rand(batch, generator=g) * 3
        new = torch.rand(batch, generator=g) < 0.5
        yield outputs, targets, losses, new


def per_step(steps: int, partial_every: int = 0):
    """What one add per step and per sum gives (the loop's former counting)."""
    correct, loss_sum, seen = torch.zeros(()), torch.zeros(()), 0
    for i, (outputs, targets, losses, new) in enumerate(batches(steps)):
        mask = new if partial_every and i % partial_every == 0 else torch.ones_like(new)
        correct += ((outputs.argmax(-1) == targets) & mask).sum()
        loss_sum += torch.where(mask, losses, 0.0).sum() if partial_every and i % partial_every == 0 else losses.sum()
        seen += int(mask.sum())
    return correct.item(), loss_sum.item(), seen


def counted_in(sums: EpochSums, steps: int, partial_every: int = 0, start: int = 0) -> EpochSums:
    for i, (outputs, targets, losses, new) in enumerate(batches(steps)):
        if i < start:
            continue
        if partial_every and i % partial_every == 0:
            sums.count_new(outputs, targets, losses, new)
        else:
            sums.count_batch(outputs, targets, losses)
    return sums


@pytest.mark.parametrize("partial_every", [0, 3])
def test_the_sums_equal_per_step_sums_bit_for_bit(partial_every):
    steps = 2 * COUNT_EVERY + 7  # two bulk counts and a remainder
    got = counted_in(EpochSums(torch.device("cpu")), steps, partial_every).to_host()
    correct, loss_sum, seen = per_step(steps, partial_every)
    assert (got["correct"], got["loss_sum"], got["seen"]) == (correct, loss_sum, seen)


def test_a_checkpoint_with_predictions_waiting_resumes_to_the_same_sums():
    steps, cut = 2 * COUNT_EVERY + 5, COUNT_EVERY + 9  # predictions of 9 steps wait at the checkpoint
    whole = counted_in(EpochSums(torch.device("cpu")), steps, partial_every=4).to_host()
    first = counted_in(EpochSums(torch.device("cpu")), cut, partial_every=4)
    saved = first.to_host()
    resumed = counted_in(EpochSums(torch.device("cpu"), saved), steps, partial_every=4, start=cut).to_host()
    assert resumed == whole


def test_a_whole_batch_costs_one_add_until_its_predictions_are_counted():
    sums = EpochSums(torch.device("cpu"))
    outputs, targets, losses, _ = next(batches(1))
    assert counted(lambda: sums.count_batch(outputs, targets, losses)).operators == 2  # sum, add
    total = losses.sum()
    assert counted(lambda: sums.count_batch(outputs, targets, losses, total)).operators == 1  # add


def test_outputs_wait_no_longer_than_their_bound(monkeypatch):
    """Outputs held up to HELD_VALUES are counted when the next step begins: the same counts, fewer values held."""
    monkeypatch.setattr("bench.loop.sums.HELD_VALUES", 3 * 16 * 10)  # three batches of 16 x 10
    sums, steps = EpochSums(torch.device("cpu")), COUNT_EVERY + 5

    def step(outputs, targets, losses):
        sums.begin_step()
        sums.count_batch(outputs, targets, losses)

    operators = [counted(lambda b=b: step(*b[:3])).operators for b in batches(steps)]
    # sum, add; a step that finds three batches waiting first counts them: cat x2, argmax, eq, sum, add
    assert operators == [2, 2, 2] + [8, 2, 2] * (steps // 3 - 1) + [8] + [2] * (steps % 3 - 1)
    got = sums.to_host()
    assert (got["correct"], got["loss_sum"], got["seen"]) == per_step(steps)


@pytest.mark.parametrize("n", [1, 7, 16, 128, 1000, 4097])
def test_on_a_cpu_the_loop_s_mean_loss_is_the_mean_bit_for_bit(n):
    """TrainClosure's pass loss on a CPU is the float32 sum divided by the count: the bits of ``losses.mean()``."""
    data = synthetic_dataset(16, 8)
    with tempfile.TemporaryDirectory() as out:
        run = setup(harness_config("sgd", "mlp", 16, "cpu", out, lr=0.05), data=(data, data))
        x, y = synthetic_batch(data, run.device)
        train_on(run, x, y, torch.arange(16), EpochSums(run.device))
    losses = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4).exp()
    assert torch.equal(run.closure.mean_loss(losses), losses.mean())


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "esam"])
def test_one_closure_kept_across_steps_trains_as_fresh_ones(optimizer):
    data = synthetic_dataset(64, 8)

    def trained(fresh: bool):
        with tempfile.TemporaryDirectory() as out:
            run = setup(harness_config(optimizer, "mlp", 16, "cpu", out, lr=0.05), data=(data, data))
            x, y = synthetic_batch(data, run.device)
            sums = EpochSums(run.device)
            for step in range(4):
                if fresh:
                    run.closure = None
                part = slice(16 * step, 16 * (step + 1))
                train_on(run, x[part], y[part], torch.arange(16 * step, 16 * (step + 1)), sums)
            return [p.detach().clone() for p in run.model.parameters()], sums.to_host()

    (kept, kept_sums), (fresh, fresh_sums) = trained(False), trained(True)
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh))
    assert kept_sums == fresh_sums and kept_sums["seen"] == 64


@pytest.mark.parametrize("held_values", [1 << 20, 3 * 16 * 10])
def test_held_steps_add_the_counts_of_those_taken_in_step_order(held_values, monkeypatch):
    """Steps begun held keep their counts aside with their flags; settling adds those of the steps taken (a zero
    flag, or taken on the host), in step order: the sums of counting them directly, skipped steps left out. Held
    outputs past HELD_VALUES (every third step, in the second case) are counted on the device, masked by their
    flags; nothing is added before the settle, which reads only the flags it is not given."""
    monkeypatch.setattr("bench.loop.sums.HELD_VALUES", held_values)
    steps = list(batches(COUNT_EVERY + 6, seed=3))
    skipped = {2, 5, COUNT_EVERY + 1}
    direct, held = EpochSums(torch.device("cpu")), EpochSums(torch.device("cpu"))
    flags = []
    for i, (outputs, targets, losses, new) in enumerate(steps):
        if i not in skipped:
            direct.begin_step()
            direct.count_batch(outputs, targets, losses) if i % 4 else direct.count_new(outputs, targets, losses, new)
        held.begin_step(held=True)
        held.count_batch(outputs, targets, losses) if i % 4 else held.count_new(outputs, targets, losses, new)
        if i == 7:  # decided on the host, taken
            held.keep_step()
        else:
            flags.append(torch.tensor(float(i in skipped)))
            held.hold(flags[-1])
    assert held.loss_sum.item() == 0 and held.seen == 0  # every count aside
    read = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: read.append(t.numel()) or [bool(v) for v in t])
    held.settle([(f, bool(f)) for f in flags[::2]])  # half the flags read by the caller
    assert read == [len(flags[1::2])]  # the other half read here, at once
    monkeypatch.undo()
    assert held.to_host() == direct.to_host()


def test_a_held_step_needs_its_begin():
    with pytest.raises(RuntimeError, match="needs a step begun held"):
        EpochSums(torch.device("cpu")).hold(torch.zeros(()))


def test_an_epoch_with_a_skipped_step_has_the_sums_of_its_steps_taken():
    """An epoch in which one step is skipped: its training sums in the device form (flags read every 3 steps, or
    only at the epoch's end) equal the host form's, bit for bit; 9 steps of 16 samples counted."""
    from bench.loop.epoch import run_epoch

    data = synthetic_dataset(160, 8)
    found = []
    for on_device, max_consecutive_skips in [(False, 20), (True, 3), (True, 40)]:
        with tempfile.TemporaryDirectory() as out:
            config = harness_config("sam", "mlp", 16, "cpu", out, lr=0.05, max_consecutive_skips=max_consecutive_skips)
            run = setup(config, data=(data, data))
            run.skip_on_device = on_device
            run.loss_fn = loss_infinite_at(9, run.loss_fn)  # the fifth step's first pass
            sums, steps = run_epoch(run)
        assert steps == 10 and run.state.skipped == 1 and sums["seen"] == 144
        found.append((sums["correct"], sums["loss_sum"]))
    assert found[1] == found[0] and found[2] == found[0]

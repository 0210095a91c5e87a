"""--compile and --channels_last: every variant trains through a compiled, channels-last model
with one graph for all its passes (no recompilation after the first step) and the same
arithmetic as the eager model."""

import shutil

import pytest
import torch
import torch._dynamo
from accelerate import Accelerator
from helpers import with_loss_term
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters

from bench.config import ConfigError, RunConfig
from bench.io import read_json, read_jsonl
from bench.loop.step import TrainClosure, take_step
from bench.loop.train import train
from bench.resolve import resolve
from optimizers import available_optimizers, create_optimizer
from optimizers.snapshot import StepSnapshot

#: ESAM's tensor dropping changes which weights need a gradient on every step (refused, below).
SETTINGS = {"looksam": {"k": 2}, "esam": {"beta": 1.0}, "lookbehind_sam": {"k_steps": 2}}


def bn_cnn(channels_last: bool):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)
    )
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_steps(name: str, compiled: bool, channels_last: bool, steps: int = 3):
    model = bn_cnn(channels_last)
    runner = torch.compile(model, backend="eager") if compiled else model
    seeded = {} if name in ("sgd", "adam", "adamw") else {"seed": 0}
    opt = with_loss_term(create_optimizer(name, model, lr=0.05, **seeded, **SETTINGS.get(name, {})), model)
    snapshot = StepSnapshot(model)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        closure = TrainClosure(
            runner,
            nn.CrossEntropyLoss(reduction="none"),
            x,
            y,
            accelerator=Accelerator(cpu=True),
            ascent_sync="local",
            scaler=None,
        )
        assert not take_step(opt, closure, snapshot)
        if step == 0:  # every pass kind has run once: nothing may compile again
            graphs = counters["stats"]["unique_graphs"]
    return model, graphs


@pytest.mark.parametrize("name", available_optimizers())
def test_a_compiled_model_keeps_one_graph_and_the_eager_arithmetic(name):
    torch._dynamo.reset()
    counters.clear()
    eager, _ = train_steps(name, compiled=False, channels_last=True)
    compiled, graphs_after_first_step = train_steps(name, compiled=True, channels_last=True)
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        assert torch.equal(a, b)


def test_channels_last_trains_like_the_default_layout():
    a, _ = train_steps("sam", compiled=False, channels_last=False)
    b, _ = train_steps("sam", compiled=False, channels_last=True)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5)


def test_esam_dropping_tensors_refuses_compile_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="ESAM with beta 0.6 drops a random set of tensors"):
        resolve(RunConfig(optimizer="esam", compile=True, output_dir=str(tmp_path)))
    resolve(RunConfig(optimizer="esam", compile=True, hyperparameters={"beta": 1.0}, output_dir=str(tmp_path)))


def test_a_compiled_channels_last_run_trains_like_an_eager_one(tmp_path):
    """The whole loop with AOT-traced forward and backward graphs: the same losses, to float error."""
    rows = {}
    for compiled in (False, True):
        config = RunConfig(
            optimizer="sam",
            epochs=3,
            batch_size=128,
            compile=compiled,
            compile_backend="aot_eager",
            channels_last=compiled,
            cpu=True,
            save_every_epochs=0,
            output_dir=str(tmp_path / str(compiled)),
        ).validate()
        torch._dynamo.reset()
        rows[compiled] = read_jsonl(train(config).run_dir / "metrics.jsonl")
    assert rows[False][-1]["train_loss"] < 0.8 * rows[False][0]["train_loss"]
    for eager, compiled in zip(rows[False], rows[True]):
        assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=2e-3)
        assert compiled["test_acc"] == pytest.approx(eager["test_acc"], abs=0.02)


def test_perf_harness_writes_its_table(tmp_path):
    """The overhead mode runs the loop's own step function and bare loops of SGD and SAM (their times are a
    benchmark's business, not a test's): one row per contender, the bare loops first."""
    from bench.studies.perf import main as perf_main

    out = tmp_path / "perf_harness.md"
    assert (
        perf_main(
            [
                "--harness",
                "--arch",
                "smallcnn",
                "--image_size",
                "8",
                "--batch_size",
                "8",
                "--steps",
                "1",
                "--rounds",
                "1",
                "--warmup",
                "0",
                "--compile_backend",
                "eager",
                "--optimizers",
                "sam",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| bare PyTorch loop (SGD)",
        "| bare PyTorch loop (SAM)",
        "| harness (sam)",
        "| harness (sam, --channels_last)",
        "| harness (sam, --compile)",
        "| harness (sam, --compile --channels_last)",
    ]
    assert rows[0].split(" | ")[3] == "1.000"
    # what a step dispatches beyond its passes: the bare loop's zero_grad, SGD and scheduler; no host read
    # there, one per pass in the harness's SAM step on a CPU (each pass's skip decision); SAM's step does more
    # bookkeeping than the bare loop's SAM written out in the bare loop, which dispatches more than SGD's
    cells = [r.strip(" |").split(" | ") for r in rows]
    (bare_ops, bare_reads), (bare_sam_ops, bare_sam_reads), (sam_ops, sam_reads) = (map(int, c[-2:]) for c in cells[:3])
    assert (bare_reads, bare_sam_reads, sam_reads) == (0, 0, 2) and 0 < bare_ops < bare_sam_ops < sam_ops


def test_perf_times_every_optimizer_asked_for_on_images_of_the_given_shape(tmp_path):
    """One row per optimizer (sgd always, first), each with its passes per step; the shape in the header."""
    from bench.studies.perf import main as perf_main

    out = tmp_path / "perf.md"
    assert (
        perf_main(
            [
                "--arch",
                "smallcnn",
                "--image_size",
                "8",
                "--channels",
                "1",
                "--batch_size",
                "8",
                "--steps",
                "5",
                "--rounds",
                "1",
                "--warmup",
                "1",
                "--optimizers",
                "sam",
                "looksam",
                "--no_external",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "batch 8 of 8x8x1 images" in text and "--channels 1" in text
    # the command at the top is the one that made the table: the optimizers asked for and the flags included
    assert "--optimizers sam looksam --no_external --out" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0], r[3], r[4]) for r in rows] == [
        ("| sgd", "1.00", "1.00"),
        ("| sam", rows[1][3], "2.00"),
        ("| looksam", rows[2][3], "1.20"),
    ]


def test_perf_recipe_steps_each_optimizer_of_a_recipe_with_the_loops_own_step(tmp_path):
    """The loop's step on the recipe's real batches, one row per optimizer asked for, sgd first (the
    ratios' reference); each counts the passes the loop made: bSAM's 8 sub-batches twice, LookSAM's
    ascent one step in 5. Unknown optimizers are refused in one line."""
    from bench.config import ConfigError
    from bench.studies.perf import main as perf_main
    from bench.studies.perf_harness import steps_placement

    out = tmp_path / "perf_loop.md"
    # passes count over the first step, 4 warm-up steps and 5 timed ones (22 steps in all: from step 6 on)
    assert (
        perf_main(
            [
                "--recipe",
                "digits",
                "--set",
                "epochs=2",
                "--steps",
                "5",
                "--rounds",
                "1",
                "--warmup",
                "4",
                "--optimizers",
                "bsam",
                "looksam",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "every optimizer of digits" in text and "--set epochs=2" in text
    # 22 steps in 2 epochs of 11: 10 stepped on (1 + 4 + 5), after 6 trained
    assert "trained for 6 steps, so that the 10 steps it is then stepped on" in text
    assert "lie in the middle of its 22-step schedule" in text
    at = {"placements": {"sgd": (0, 66), "sam": (0, 66)}, "taken": 66}
    assert steps_placement(at).endswith("are its whole 66-step schedule")
    assert steps_placement(at | {"taken": 76}).startswith("not trained first: the 76 steps it is then stepped on")
    assert "outnumber its 66-step schedule and run on past its end" in steps_placement(at | {"taken": 76})
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("| sgd", "1.00", "1.00 |"),
        ("| bsam", rows[1][2], "16.00 |"),
        ("| looksam", rows[2][2], "1.20 |"),
    ]
    with pytest.raises(ConfigError, match="^perf --recipe digits: its grid has no adamw "):
        perf_main(["--recipe", "digits", "--optimizers", "adamw", "--out", str(out)])
    with pytest.raises(ConfigError, match="^perf: --set and --data_dir apply to --recipe only$"):
        perf_main(["--set", "epochs=2", "--out", str(out)])


def test_perf_recipe_says_where_each_schedule_puts_the_measured_steps(tmp_path):
    """Runs of one recipe may train for different numbers of epochs: each is placed in its own schedule,
    and the header says so for each group of optimizers that shares one, not only for the last."""
    from bench.studies.perf import main as perf_main

    recipe = tmp_path / "mixed.toml"
    recipe.write_text('extends = "digits"\ndescription = "digits, bsam for 2 epochs"\n[optimizers.bsam]\nepochs = 2\n')
    out = tmp_path / "perf_loop.md"
    args = ["--recipe", str(recipe), "--set", "epochs=2", "--steps", "1", "--rounds", "1", "--warmup", "0"]
    # --set epochs=2 has the last word for every optimizer: one schedule, one sentence
    assert perf_main([*args, "--optimizers", "sam", "bsam", "--out", str(out)]) == 0
    assert "sets it up, trained for 10 steps, so that the 2 steps it is then stepped on" in out.read_text()
    args[3] = "seed=0"  # each optimizer keeps its own epochs now: sgd and sam 6, bsam 2
    assert perf_main([*args, "--optimizers", "sam", "bsam", "--out", str(out)]) == 0
    text = " ".join(out.read_text().split())
    assert "brought to its measured steps as its schedule allows (sgd, sam: trained for 32 steps" in text
    assert "lie in the middle of its 66-step schedule; bsam: trained for 10 steps" in text
    assert "lie in the middle of its 22-step schedule); stepped on with" in text


def test_compile_is_an_execution_detail_end_to_end(tmp_path, capsys):
    """Sharpness is measured on the uncompiled module, the exported weights keep the module's own names, and a
    run resumes with --compile switched either way, to the eager run's result."""
    from bench.cli.main import main

    same = dict(optimizer="sam", epochs=1, batch_size=128, cpu=True, save_every_steps=5, sharpness=True)
    same.update(sharpness_samples=64, sharpness_iterations=3, sharpness_probes=2)
    compiled = ["--compile", "--compile_backend", "aot_eager"]
    runs = {}
    for name, extra in (("eager", {}), ("compiled", dict(compile=True, compile_backend="aot_eager"))):
        torch._dynamo.reset()
        runs[name] = train(RunConfig(**same, **extra, output_dir=str(tmp_path / name)).validate()).run_dir
    eager, done = (load_file(runs[k] / "model.safetensors") for k in ("eager", "compiled"))
    assert eager.keys() == done.keys() and not any("_orig_mod" in k for k in done)
    sharpness = {k: read_json(runs[k] / "sharpness.json") for k in runs}
    assert sharpness["compiled"]["hessian_max_eigenvalue"] == pytest.approx(
        sharpness["eager"]["hessian_max_eigenvalue"], rel=1e-2
    )
    for run, switch in ((runs["eager"], compiled), (runs["compiled"], [])):
        (run / "summary.json").unlink()
        newest = sorted((run / "checkpoints").iterdir())[-1]
        shutil.rmtree(newest)  # resumed from step 5: six steps run again under the other setting
        torch._dynamo.reset()
        capsys.readouterr()
        assert main(["--resume", str(run), *switch]) == 0, capsys.readouterr().err
        resumed = load_file(run / "model.safetensors")
        for k in eager:
            assert torch.allclose(resumed[k].float(), eager[k].float(), rtol=1e-4, atol=1e-5), k

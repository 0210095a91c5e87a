"""Results are never written over or out of their folder, and a data file never runs code."""

import builtins
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.config import ConfigError, RunConfig
from bench.data.cifar import read_batch_pickle
from bench.loop.train import train
from bench.studies.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(dataset="digits", arch="smallcnn", optimizer="sgd", epochs=1, batch_size=256, cpu=True, save_every_epochs=0)


@pytest.mark.parametrize("name", ["../victim", "a/b", "..", ".", "", " x", "a\\b"])
def test_a_run_name_is_a_name_not_a_path(tmp_path, name):
    with pytest.raises(ConfigError, match="run_name must be a folder name, not a path"):
        RunConfig(**FAST, output_dir=str(tmp_path), run_name=name).validate()


def test_a_recipe_name_is_a_name_not_a_path(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "../../escape"\n[config]\nepochs = 1\n[grid]\nseed = [0]\n')
    with pytest.raises(ConfigError, match=r"name must be a folder name, not a path .* got '../../escape'"):
        load_recipe(str(path))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_configuration_never_overwrites_a_run(tmp_path):
    first = RunConfig(**FAST, output_dir=str(tmp_path), run_name="mine").validate()
    train(first)
    before = _files(tmp_path / "mine")
    other = RunConfig(**{**FAST, "lr": 0.05}, output_dir=str(tmp_path), run_name="mine").validate()
    with pytest.raises(ConfigError, match=r"mine holds another configuration's run \(it differs in lr\)"):
        train(other)
    # the same configuration again, finished, without --resume: refused, nothing rewritten
    with pytest.raises(ConfigError, match=r"mine holds this run, finished: --resume .* checks it"):
        train(RunConfig(**FAST, output_dir=str(tmp_path), run_name="mine").validate())
    assert _files(tmp_path / "mine") == before
    assert train(first, resume=True).already_finished


def test_an_interrupted_run_is_continued_or_refused_never_started_over(tmp_path):
    """Its checkpoints are progress: the same configuration again without --resume is refused (pointing to
    --resume), and so is another configuration resumed into its folder; --resume continues it, recording the
    code that continued it beside the code it started at."""
    import json
    import shutil

    from bench import environment

    config = RunConfig(**{**FAST, "epochs": 2, "save_every_epochs": 1}, output_dir=str(tmp_path), run_name="mine").validate()
    train(config)
    run = tmp_path / "mine"
    (run / "summary.json").unlink()
    newest = sorted((run / "checkpoints").iterdir())[-1]
    shutil.rmtree(newest)  # interrupted after its first epoch's checkpoint
    kept = sorted((run / "checkpoints").iterdir())[-1].name
    recorded = json.loads((run / "config.json").read_text())
    started_at = {**recorded["code"], "commit": "0" * 40}
    (run / "config.json").write_text(json.dumps({**recorded, "code": started_at}))
    before = _files(run)
    with pytest.raises(ConfigError, match=rf"mine holds this run, interrupted \(its newest checkpoint: {kept}\): --resume auto"):
        train(config)
    other = RunConfig(**{**FAST, "epochs": 2, "save_every_epochs": 1, "lr": 0.05}, output_dir=str(tmp_path), run_name="mine")
    with pytest.raises(ConfigError, match=r"mine holds another configuration's run \(it differs in lr\)"):
        train(other.validate(), resume=True)
    assert _files(run) == before
    assert train(config, resume=True).summary["status"] == "completed"
    code = json.loads((run / "config.json").read_text())
    assert code["code"] == started_at and code["code_resumed"] == [environment.code_version()]


def test_the_command_line_refuses_in_one_line(tmp_path):
    args = [sys.executable, "launch.py", "--dataset", "digits", "--epochs", "1", "--batch_size", "256", "--cpu"]
    args += ["--output_dir", str(tmp_path), "--save_every_epochs", "0"]
    assert subprocess.run([*args, "--run_name", "x"], cwd=ROOT, capture_output=True).returncode == 0
    done = subprocess.run([*args, "--run_name", "x", "--lr", "0.05"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "differs in lr" in done.stderr
    done = subprocess.run([*args, "--run_name", "../y"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "not a path" in done.stderr and not (tmp_path.parent / "y").exists()


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_planted_pickle_in_a_cifar_batch_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "created"
    data = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": _Planted(marker)}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=r"asks for (io|builtins)\.open"):
        read_batch_pickle(data)
    assert not marker.exists()
    # a genuine batch still reads, whatever the protocol
    batch = read_batch_pickle(
        pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [0, 1]}, protocol=protocol)
    )
    assert batch[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]] and batch[b"labels"] == [0, 1]


@pytest.mark.parametrize("target", ["trainer_state.pt", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_planted_pickle_in_a_checkpoint_runs_nothing_on_resume(tmp_path, target, capsys):
    """A forger who also rewrites the manifest still gets no code run: every pickle-format file is read
    weights-only (the model is safetensors), and an extra pickle file is refused unread."""
    import hashlib
    import json

    from bench.cli.main import main

    flags = ["--arch", "mlp", "--epochs", "1", "--batch_size", "64", "--save_every_steps", "5", "--cpu"]
    assert main([*flags, "--output_dir", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    marker = tmp_path / "created"
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / target).write_bytes(pickle.dumps(_Planted(marker)))
        manifest = json.loads((checkpoint / "complete.json").read_text())
        manifest["sha256"][target] = hashlib.sha256((checkpoint / target).read_bytes()).hexdigest()
        (checkpoint / "complete.json").write_text(json.dumps(manifest))
    (run / "summary.json").unlink()
    capsys.readouterr()
    code = main([*flags, "--output_dir", str(tmp_path), "--resume", "auto"])
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "cannot be loaded" in err and "\n" not in err, err
    # a pickle is refused by the weights-only reader; an extra pickle file by Accelerate's count, unread
    assert ("UnpicklingError" if target != "custom_checkpoint_0.pkl" else "Number of custom checkpoints") in err

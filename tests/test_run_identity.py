"""A run's identity: the run id changes with every setting that changes a result, and resuming a run with a
flag that says otherwise is refused, naming the flag as typed."""

import dataclasses
from pathlib import Path

import pytest

from bench.cli.flags import FLAGS
from bench.cli.main import main
from bench.config import OPERATIONAL, ConfigError, RunConfig

#: The settings that do not change what a run computes (where and how it runs, what it measures afterwards).
#: Written out here, not read from the code: a setting moved into OPERATIONAL by mistake fails the test below.
NOT_RESULTS = {
    "output_dir",
    "run_name",
    "data_dir",
    "save_every_steps",
    "save_every_epochs",
    "keep_checkpoints",
    "cpu",
    "sharpness",
    "sharpness_samples",
    "sharpness_iterations",
    "sharpness_probes",
    "log_with",
    "threads",
    "workers",
    "compile",
    "compile_backend",
    "channels_last",
    "test_every_epochs",
}

#: A value different from RunConfig's default for each setting (by field; numbers are derived below).
OTHER = {
    "dataset": "cifar10",
    "arch": "resnet8",
    "optimizer": "sam",
    "base_optimizer": "adamw",
    "schedule": "step",
    "mixed_precision": "bf16",
    "ascent_sync": "global",
    "image_column": "img",
    "label_column": "lbl",
    "step_milestones": (0.5,),
    "hyperparameters": {"rho": 0.1},
    "compile_backend": "eager",
    "output_dir": "elsewhere",
    "run_name": "named",
    "data_dir": "data2",
    "data_id": "0123456789abcdef",
    "log_with": "tensorboard",
}


def other_value(field: dataclasses.Field):
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if field.name in OTHER:
        return OTHER[field.name]
    if isinstance(default, bool):
        return not default
    if field.type in ("int | None",) or isinstance(default, int):
        return (default or 0) + 3
    return (default or 0.0) + 0.125


def test_what_is_not_a_result_is_written_out():
    assert set(OPERATIONAL) == NOT_RESULTS


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(RunConfig)], ids=lambda f: f.name)
def test_the_run_id_changes_with_every_result_changing_setting(field):
    base = RunConfig()
    changed = dataclasses.replace(base, **{field.name: other_value(field)})
    assert getattr(changed, field.name) != getattr(base, field.name)
    if field.name in NOT_RESULTS:
        assert changed.run_id() == base.run_id()
    else:
        assert changed.run_id() != base.run_id(), f"{field.name} is left out of the run id"


def test_a_clean_and_a_noisy_run_are_two_runs():
    assert RunConfig(label_noise=0.6).run_id() != RunConfig().run_id()


# -- resume ---------------------------------------------------------------------------------------

FAST = ["--arch", "mlp", "--epochs", "1", "--batch_size", "64", "--cpu", "--max_steps", "1", "--save_every_epochs", "1"]


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main([*FAST, "--sam_type", "sam", "--output_dir", str(out)]) == 0
    (run,) = list(out.iterdir())
    return run


def flag_value(flag) -> list[str]:
    """The command-line words giving ``flag`` a value other than the run's."""
    if flag.kind == "switch":
        return [flag.name]
    field = next(f for f in dataclasses.fields(RunConfig) if f.name == flag.field)
    value = other_value(field)
    if flag.field == "optimizer":  # --sam_type: the run is SAM already
        value = "gsam"
    if flag.field == "arch":
        value = "smallcnn"
    return [flag.name, str(value)]


RESULT_FLAGS = [f for f in FLAGS if f.config and f.field not in NOT_RESULTS]


def test_every_result_changing_setting_has_a_flag_checked_here():
    fields = {f.name for f in dataclasses.fields(RunConfig)} - NOT_RESULTS
    flagged = {f.field for f in RESULT_FLAGS}
    # set in recipes only: the step schedule's milestones and factor; the variant's settings have their own flags;
    # the data's fingerprint is found, not given
    assert fields - flagged == {"step_milestones", "step_factor", "hyperparameters", "data_id"}


@pytest.mark.parametrize("flag", RESULT_FLAGS, ids=lambda f: f.name)
def test_resume_with_a_changed_setting_is_refused_naming_its_flag(sam_run, flag, capsys):
    words = flag_value(flag)
    assert main(["--resume", str(sam_run), *words]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume {sam_run}: settings differ") and "\n" not in err
    assert f"{flag.name} (" in err, err


@pytest.mark.parametrize(
    "words, named",
    [
        (["--sam_type", "sam", "--optimizer", "adamw"], "--optimizer ('sgd' there, 'adamw' given)"),
        (["--optimizer", "adamw"], "--optimizer ('sgd' there, 'adamw' given)"),
        (["--rho", "0.5"], "--rho (0.05 there, 0.5 given)"),
        (["--k", "3"], "--k (not used by sam)"),
        (["--arch", "resnet8"], "--arch ('mlp' there, 'resnet8' given)"),
    ],
)
def test_resume_names_the_flag_as_typed(sam_run, words, named, capsys):
    """The base optimizer is --optimizer (the seed's spelling), the variant --sam_type; a variant flag is compared
    with the run's variant's setting even when --sam_type is not repeated."""
    assert main(["--resume", str(sam_run), *words]) == 2
    assert named in capsys.readouterr().err


def test_resume_with_the_runs_own_settings_changes_nothing(sam_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in sam_run.rglob("*") if p.is_file()}
    assert main(["--resume", str(sam_run), "--sam_type", "SAM", "--optimizer", "sgd", "--rho", "0.05", "--lr", "0.1"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in sam_run.rglob("*") if p.is_file()} == before


# -- the data is part of the identity -------------------------------------------------------------


def _copy_with_fewer_test_images(source: Path, target: Path) -> Path:
    import pickle
    import shutil

    shutil.copytree(source, target)
    path = target / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({b"data": batch[b"data"][:30], b"labels": batch[b"labels"][:30]}))
    return target


def test_runs_on_different_data_never_share_a_folder(cifar10_dir, tmp_path, capsys):
    """A sweep on a second, different data folder trains its own runs: it never reports the first folder's."""
    from bench.loop.train import train
    from bench.resolve import resolve

    other = _copy_with_fewer_test_images(cifar10_dir, tmp_path / "other")
    same = dict(dataset="cifar10", arch="mlp", epochs=1, batch_size=32, max_steps=1, cpu=True, output_dir=str(tmp_path / "runs"))
    first = train(RunConfig(**same, data_dir=str(cifar10_dir)))
    second = train(RunConfig(**same, data_dir=str(other)), resume=True)  # as a sweep does: --resume auto
    assert not second.already_finished and second.run_dir != first.run_dir
    # a copy of the same files elsewhere is the same data: the same run
    import shutil

    shutil.copytree(cifar10_dir, tmp_path / "copy")
    assert resolve(RunConfig(**same, data_dir=str(tmp_path / "copy"))).run_id() == first.run_dir.name
    # the digits are embedded: no fingerprint, the ids of the committed digits runs stay as they were
    assert resolve(RunConfig()).data_id is None


def test_a_run_that_downloads_into_an_empty_folder_is_named_after_what_it_downloaded(cifar10_dir, tmp_path, monkeypatch):
    """A run whose data is downloaded into an empty --data_dir takes the fingerprint of the downloaded files, so the
    same command afterwards (which finds those files) finds its run finished instead of training it again; a
    sweep's later runs in the same process are named alike."""
    import shutil

    import bench.data.cifar
    from bench.loop.train import train
    from bench.resolve import resolve

    def fake_download(name, root):
        shutil.copytree(cifar10_dir / "cifar-10-batches-py", Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(bench.data.cifar, "_torchvision_download", fake_download)
    monkeypatch.setenv("SAM_BENCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    same = dict(dataset="cifar10", arch="mlp", epochs=1, batch_size=32, max_steps=1, cpu=True, output_dir=str(tmp_path / "runs"))
    same["log_with"] = "tensorboard"  # its logs too go to the folder named after the data
    before = resolve(RunConfig(**same, data_dir=str(data)))
    assert before.data_id is None  # nothing there yet
    first = train(RunConfig(**same, data_dir=str(data)), resume=True)  # as a sweep runs it
    assert not first.already_finished
    (made,) = list((tmp_path / "runs").iterdir())
    assert made == first.run_dir != before.run_dir()
    assert any(p.name.startswith("events") for p in (made / "sam-bench").iterdir())
    assert RunConfig.read(made).data_id == resolve(RunConfig(**same, data_dir=str(cifar10_dir))).data_id
    again = train(RunConfig(**same, data_dir=str(data)), resume=True)
    assert again.already_finished and again.run_dir == first.run_dir
    with pytest.raises(ConfigError, match="holds this run, finished"):  # a new run (no --resume) is refused there
        train(RunConfig(**same, data_dir=str(data)))


def test_a_fingerprint_recorded_before_text_files_were_read_is_still_recognised(tmp_path):
    """Fingerprints now read the bytes of text files (labels); a run recorded with the earlier form (paths and
    sizes) on the same files keeps its id, and any other recorded fingerprint is still refused."""
    from bench.config import ConfigError
    from bench.data.fingerprint import data_fingerprint
    from bench.resolve import resolve

    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x" * 10)
    (tmp_path / "cifar-10-batches-py" / "readme.txt").write_text("labels")
    legacy, current = data_fingerprint("cifar10", str(tmp_path), legacy=True), data_fingerprint("cifar10", str(tmp_path))
    assert legacy != current
    config = RunConfig(dataset="cifar10", data_dir=str(tmp_path), data_id=legacy)
    assert resolve(config).data_id == legacy
    with pytest.raises(ConfigError, match="is not the data this run was made with"):
        resolve(RunConfig(dataset="cifar10", data_dir=str(tmp_path), data_id="0123456789abcdef"))


def test_a_run_is_not_resumed_on_other_data(cifar10_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cifar10_dir, data)
    assert main(["--dataset", "cifar10", "--data_dir", str(data), *FAST, "--output_dir", str(tmp_path / "runs")]) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    (run / "summary.json").unlink()
    shutil.rmtree(data)
    _copy_with_fewer_test_images(cifar10_dir, data)
    from bench.data import fingerprint

    fingerprint.forget_fingerprints()  # a new process would see the new files
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not the data this run was made with" in err and "\n" not in err


def _variant_flag_cases():
    from bench.variant_flags import setting_flags
    from optimizers import available_optimizers

    for name in available_optimizers():
        for flag, setting in setting_flags(name).items():
            yield name, flag, setting


@pytest.mark.parametrize("name, flag, setting", list(_variant_flag_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_resume_compares_every_variant_flag_with_the_runs_own_variant(name, flag, setting, tmp_path):
    """--resume DIR --FLAG VALUE (without --sam_type) is compared with the recorded run's variant: a value
    other than the run's is refused, naming the flag; the run's own value is accepted."""
    import json

    from bench.cli.run import resume_config
    from bench.config import ConfigError
    from bench.resolve import resolve, resolved_hyperparameters

    config = resolve(RunConfig(optimizer=name, output_dir=str(tmp_path)))
    run = tmp_path / "run"
    run.mkdir()
    record = {**config.to_dict(), "resolved_hyperparameters": resolved_hyperparameters(config)}
    (run / "config.json").write_text(json.dumps(record, default=str))
    there = record["resolved_hyperparameters"].get(setting.name)
    if setting.kind is bool:
        words, same = ([f"--{flag}"] if not there else None), ([f"--{flag}"] if there else None)
    else:
        other = setting.kind(3 if there is None else there + 3)
        words, same = [f"--{flag}", str(other)], ([f"--{flag}", str(there)] if there is not None else None)
    if words is not None:
        with pytest.raises(ConfigError, match=rf"settings differ from its config.json: --{flag} \("):
            resume_config(str(run), ["--resume", str(run), *words])
    if same is not None:
        assert resume_config(str(run), ["--resume", str(run), *same]).optimizer == name

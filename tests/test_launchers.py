"""Sweeps through submitit: side by side on this machine (its local executor) with the sequential sweep's
results, a killed job resumed by the next call, and the sbatch submission a SLURM sweep sends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from bench.cli.main import main
from bench.io import read_json

pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """name = "tiny"
[config]
dataset = "digits"
arch = "mlp"
epochs = 2
batch_size = 64
cpu = true
save_every_steps = 5
[grid]
optimizer = ["sgd", "sam"]
seed = [0, 1]
"""
ACCURACY = ["optimizer", "n", "final acc (%)", "best acc (%)", "test loss"]


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    return path


def test_local_jobs_side_by_side_give_the_sequential_sweeps_table(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # what two runs side by side each get
    common = ["sweep", str(recipe), "--set", f"threads={threads}"]
    assert main([*common, "--output_dir", "seq", "--results_dir", "seq_results"]) == 0
    assert main(["sweep", str(recipe), "--launcher", "local", "--max_parallel", "2", "--output_dir", "par"]) == 0
    sequential, parallel = (pd.read_csv(tmp_path / d / "tiny.csv") for d in ("seq_results", "results"))
    assert sequential[ACCURACY].to_csv() == parallel[ACCURACY].to_csv()
    runs = sorted((tmp_path / "par").glob("digits_*"))
    assert len(runs) == 4
    for run in runs:
        job = read_json(run / "job.json")
        assert job["launcher"] == "local" and Path(job["stderr"]).is_file()
        assert read_json(run / "summary.json")["contended"] is True  # side by side: times are not step costs
        assert read_json(run / "config.json")["threads"] == int(threads)


def test_a_killed_local_sweep_is_resumed_by_the_next_call(recipe, tmp_path):
    """Kill the sweep and its jobs mid-run; the next call resumes the interrupted runs from their checkpoints
    and ends with the weights of an uninterrupted run."""
    recipe.write_text(RECIPE.replace("epochs = 2", "epochs = 8"))  # long enough to be caught between checkpoints
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(ROOT / "launch.py"), "sweep", str(recipe), "--launcher", "local", "--max_parallel", "2"]
    sweep = subprocess.Popen(
        argv, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    runs = tmp_path / "runs" / "tiny"

    def interrupted() -> list[Path]:
        return [r for r in runs.glob("digits_*") if list(r.glob("checkpoints/step_*")) and not (r / "summary.json").exists()]

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not interrupted():
            time.sleep(0.05)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and every job it started
        sweep.wait()
    stopped = interrupted()
    assert stopped, "every run had finished before the kill"
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tmp_path / "reference"
    for run in stopped:
        config = read_json(run / "config.json")
        seed, optimizer = str(config["seed"]), config["optimizer"]
        sets = ["--set", f"optimizer={optimizer}", "--set", f"seed={seed}", "--set", f"threads={config['threads']}"]
        assert main(["--recipe", str(recipe), *sets, "--output_dir", str(reference)]) == 0
        (uninterrupted,) = [p for p in reference.glob(f"*_{optimizer}_s{seed}_*")]
        a, b = load_file(run / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
        assert all((a[k] == b[k]).all() for k in a), run.name


def test_a_slurm_sweep_sends_the_resources_asked_for(recipe, tmp_path, monkeypatch):
    """Through submitit's own submission, to a stand-in sbatch that keeps the script it is given; the
    recipe's [launcher] section gives what the flags do not."""
    recipe.write_text(recipe.read_text() + '[launcher]\nnodes_per_run = 2\npartition = "cpu"\n')
    bin_dir, captured = tmp_path / "bin", tmp_path / "captured.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {captured}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    flags = ["--launcher", "slurm", "--no_wait", "--partition", "gpu", "--account", "proj", "--time_min", "90"]
    flags += ["--gpus_per_run", "2", "--cpus_per_run", "8", "--sbatch", "constraint=a100", "--max_parallel", "3"]
    assert main(["sweep", str(recipe), *flags]) == 0
    script = captured.read_text()
    for line in ["--partition=gpu", "--account=proj", "--time=90", "--gpus-per-node=2", "--cpus-per-task=8", "--nodes=2"]:
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --constraint=a100\n" in script and "#SBATCH --array=0-3%3\n" in script  # 4 runs, 3 at once
    jobs = sorted(read_json(p)["job_id"] for p in (tmp_path / "runs" / "tiny").glob("*/job.json"))
    assert jobs == ["4242_0", "4242_1", "4242_2", "4242_3"]
    # the same command again while those jobs may be queued: nothing is submitted twice
    captured.unlink()
    assert main(["sweep", str(recipe), *flags]) == 0
    assert not captured.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--launcher", "cloud"], "--launcher must be one of inline, local, slurm"),
        (["--launcher", "local", "--max_parallel", "0"], "--max_parallel must be an integer >= 1, got 0"),
        (["--launcher", "local", "--partition", "gpu"], "--partition is for --launcher slurm"),
        (["--launcher", "local", "--no_wait"], "--no_wait is for --launcher slurm"),
        (["--max_parallel", "2"], "--max_parallel is for --launcher local or slurm"),
        (["--launcher", "slurm", "--sbatch", "constraint"], "--sbatch expects key=value, got 'constraint'"),
        (["--launcher", "local", "--resubmit"], "--resubmit is for --launcher slurm"),
    ],
)
def test_bad_launcher_flags_are_one_line(recipe, flags, message, capsys):
    assert main(["sweep", str(recipe), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_recipes_node_count_is_refused_for_local_jobs(recipe, capsys):
    recipe.write_text(recipe.read_text() + "[launcher]\nnodes_per_run = 2\n")
    assert main(["sweep", str(recipe), "--launcher", "local"]) == 2
    assert capsys.readouterr().err.strip() == "error: nodes_per_run 2 is for --launcher slurm"


def test_without_submitit_the_launcher_says_how_to_install_it(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(recipe), "--launcher", "local"]) == 2
    assert capsys.readouterr().err.strip() == 'error: --launcher local and slurm need submitit: pip install -e ".[cluster]"'


def test_tuning_goes_through_the_launcher_stage_by_stage(tmp_path, monkeypatch):
    """Trials, the choice, then the final runs, all as local jobs: the sequential tuning's choice and table."""
    recipe = tmp_path / "tinytune.toml"
    recipe.write_text(
        RECIPE.replace('name = "tiny"', 'name = "tinytune"').replace("save_every_steps = 5\n", "")
        + "[tune]\nval_fraction = 0.1\nseeds = [0]\nfinal_seeds = [0, 1]\n"
        + "[tune.grid.sgd]\nlr = [0.05, 0.1]\n[tune.grid.sam]\nrho = [0.05, 0.1]\n"
    )
    monkeypatch.chdir(tmp_path)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert main(["tune", str(recipe), "--launcher", "local", "--max_parallel", "2"]) == 0
    assert main(["tune", str(recipe), "--set", f"threads={threads}", "--output_dir", "seq", "--results_dir", "seq_results"]) == 0
    parallel, sequential = (pd.read_csv(tmp_path / d / "tinytune_tuned.csv") for d in ("results", "seq_results"))
    assert parallel[["tuned", *ACCURACY]].to_csv() == sequential[["tuned", *ACCURACY]].to_csv()
    assert len(list((tmp_path / "runs" / "tinytune_tune").glob("*/*/job.json"))) == 4 + 4  # trials, then final runs


def test_a_run_on_several_nodes_is_one_accelerate_launch_per_node():
    from bench.studies.launchers import launch_command

    command = launch_command(["--recipe", "r.toml"], processes=4, nodes=2, node_rank=1, main_host="node7")
    launch = command[: command.index("--module")]
    assert launch[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in launch
    named = ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip")
    flags = {k: launch[i + 1] for i, k in enumerate(launch) if k in named}
    assert flags == {"--num_processes": "8", "--num_machines": "2", "--machine_rank": "1", "--main_process_ip": "node7"}
    assert command[command.index("--module") :] == ["--module", "bench.cli.main", "--recipe", "r.toml"]

"""Where a sweep's runs train: one at a time in this process (``inline``), or as jobs through submitit on
this machine (``local``) or a SLURM cluster (``slurm``).

A job is the very run a sequential sweep would make: the same ``launch.py`` arguments (its recipe, its
``--set`` values, its folder, ``--resume auto``), so a finished run is skipped, an interrupted one resumes
from its checkpoint, and a preempted or timed-out SLURM job is requeued and resumes (submitit's
``checkpoint`` hook). A run on several GPUs runs under ``accelerate launch`` inside its job. Each run
folder gets ``job.json``: the launcher, the job id and its log files.

Local jobs divide the machine's cores between them (``--set threads=N``), each gets ``--gpus_per_run``
GPUs (one where the machine has any and none was asked for, as a sequential run uses), and their runs
are flagged ``contended``: their accuracy is what a sequential sweep at that thread count gets; their
step times are not step costs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.config import ConfigError, RunConfig
from bench.environment import SIDE_BY_SIDE
from bench.io import read_json, write_json

LAUNCHERS = ("inline", "local", "slurm")
POLL_S = 2.0


@dataclass
class Launcher:
    """How to launch the runs; checked by :func:`launcher_from` (one line per bad value)."""

    kind: str = "inline"
    #: jobs at once (None: local, one per core; slurm, no limit)
    max_parallel: int | None = None
    wait: bool = True
    folder: Path = Path("runs/_jobs")
    partition: str | None = None
    account: str | None = None
    #: each job's time limit (None: 4 h on SLURM, a week locally)
    time_min: int | None = None
    gpus_per_run: int = 0
    nodes_per_run: int = 1
    cpus_per_run: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    #: slurm: submit again a run whose job.json names an earlier job (it may still be queued or running)
    resubmit: bool = False

    @property
    def processes(self) -> int:
        """Processes per node: one per GPU."""
        return max(1, self.gpus_per_run)


#: a recipe's ``[launcher]`` keys and their types (the command line's flags take precedence)
RECIPE_KEYS = {
    "partition": str,
    "account": str,
    "time_min": int,
    "gpus_per_run": int,
    "nodes_per_run": int,
    "cpus_per_run": int,
    "max_parallel": int,
    "sbatch": dict,
}


def launcher_from(given: dict[str, Any], recipe_section: dict[str, Any], where: str) -> Launcher:
    """A checked Launcher from the command line's values (None: not given) over the recipe's ``[launcher]``."""
    unknown = sorted(set(recipe_section) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: [launcher] has unknown key(s) {', '.join(unknown)}; valid: {', '.join(RECIPE_KEYS)}")
    values = {k: v for k, v in recipe_section.items()}
    values.update({k: v for k, v in given.items() if v is not None})
    for key, kind in RECIPE_KEYS.items():
        value = values.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"{where}: launcher {key} must be {kind.__name__}, got {value!r}")
    launcher = Launcher(**{k: v for k, v in values.items() if k in Launcher.__dataclass_fields__ and v is not None})
    if launcher.kind not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher.kind!r}")
    for key, low in (("max_parallel", 1), ("time_min", 1), ("gpus_per_run", 0), ("nodes_per_run", 1), ("cpus_per_run", 1)):
        value = getattr(launcher, key)
        if value is not None and value < low:
            raise ConfigError(f"--{key} must be an integer >= {low}, got {value}")
    launcher.sbatch = {str(k): str(v) for k, v in launcher.sbatch.items()}
    slurm_only = [k for k in ("partition", "account", "sbatch", "nodes_per_run") if given.get(k) is not None]
    if launcher.kind != "slurm" and slurm_only:
        raise ConfigError(f"--{slurm_only[0]} is for --launcher slurm")
    if launcher.kind != "slurm" and launcher.nodes_per_run > 1:
        raise ConfigError(f"nodes_per_run {launcher.nodes_per_run} is for --launcher slurm")
    if launcher.kind != "slurm" and launcher.resubmit:
        raise ConfigError("--resubmit is for --launcher slurm")
    if launcher.kind != "slurm" and not launcher.wait:
        raise ConfigError("--no_wait is for --launcher slurm (inline and local runs train while the sweep waits)")
    if launcher.kind == "inline" and given.get("max_parallel") not in (None, 1):
        raise ConfigError("--max_parallel is for --launcher local or slurm (inline runs train one at a time)")
    return launcher


def parse_sbatch(items: list[str]) -> dict[str, str] | None:
    """``--sbatch key=value`` items (extra sbatch options, e.g. ``constraint=a100``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sbatch expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out or None


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError('--launcher local and slurm need submitit: pip install -e ".[cluster]"') from None
    return submitit


def launch_command(argv: list[str], processes: int, nodes: int = 1, node_rank: int = 0, main_host: str = "") -> list[str]:
    """The command a job runs for a run of ``processes`` per node on ``nodes`` nodes: ``accelerate launch``
    of the harness's own module, with the multi-node settings (this node's rank, the first node's host)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes * nodes)]
    if processes > 1:
        launch += ["--multi_gpu"]
    if nodes > 1:
        launch += ["--num_machines", str(nodes), "--machine_rank", str(node_rank), "--main_process_ip", main_host]
        launch += ["--main_process_port", "29500"]
    return [*launch, "--module", "bench.cli.main", *argv]


class RunJob:
    """One run as a job: ``launch.py`` with the run's arguments, in the job's process (or under ``accelerate
    launch`` for several GPUs or nodes: one task per node). Requeued on preemption or timeout, it resumes
    from its checkpoint. (submitit hands the job to its process as a pickle this sweep wrote.)"""

    def __init__(self, argv: list[str], processes: int = 1, side_by_side: bool = False, nodes: int = 1):
        self.argv, self.processes, self.side_by_side, self.nodes = list(argv), processes, side_by_side, nodes

    def __call__(self) -> int:
        if self.side_by_side:
            os.environ[SIDE_BY_SIDE] = "1"
        if self.processes > 1 or self.nodes > 1:
            rank, host = 0, ""
            if self.nodes > 1:
                job = _submitit().JobEnvironment()
                rank, host = job.node, job.hostnames[0]
            command = launch_command(self.argv, self.processes, self.nodes, rank, host)
            return subprocess.run(command, check=True).returncode
        from bench.cli.main import main

        code = main(self.argv)
        if code != 0:
            raise RuntimeError(f"launch.py exited with {code}")
        return code

    def checkpoint(self, *args, **kwargs):  # submitit's hook on preemption or timeout: run again, resuming
        return _submitit().helpers.DelayedSubmission(RunJob(self.argv, self.processes, self.side_by_side, self.nodes))


def _executor(launcher: Launcher, label: str):
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=str(launcher.folder), cluster=launcher.kind)
    params: dict[str, Any] = dict(
        name=label.replace(" ", "_"), timeout_min=launcher.time_min or (240 if launcher.kind == "slurm" else 7 * 24 * 60)
    )
    if launcher.kind == "local":  # submitit hides every GPU from a local job that asks for none
        gpus = launcher.gpus_per_run or (1 if torch.cuda.is_available() else 0)
        if gpus:
            params["gpus_per_node"] = gpus
    if launcher.kind == "slurm":
        params.update(tasks_per_node=1, nodes=launcher.nodes_per_run)
        if launcher.max_parallel:
            params["slurm_array_parallelism"] = launcher.max_parallel
        if launcher.gpus_per_run:
            params["gpus_per_node"] = launcher.gpus_per_run
        if launcher.cpus_per_run:
            params["cpus_per_task"] = launcher.cpus_per_run
        for key in ("partition", "account"):
            if getattr(launcher, key):
                params[f"slurm_{key}"] = getattr(launcher, key)
        if launcher.sbatch:
            params["slurm_additional_parameters"] = dict(launcher.sbatch)
    executor.update_parameters(**params)
    return executor


def _earlier_job(config: RunConfig) -> str | None:
    """The SLURM job id a run's job.json names, if any."""
    try:
        job = read_json(config.run_dir() / "job.json")
    except (OSError, ValueError):
        return None
    return str(job.get("job_id")) if isinstance(job, dict) and job.get("launcher") == "slurm" else None


def _record(job, config: RunConfig, launcher: Launcher) -> None:
    config.run_dir().mkdir(parents=True, exist_ok=True)
    paths = getattr(job, "paths", None)
    write_json(
        config.run_dir() / "job.json",
        {
            "launcher": launcher.kind,
            "job_id": str(job.job_id),
            "stdout": str(paths.stdout) if paths else None,
            "stderr": str(paths.stderr) if paths else None,
        },
    )


def submit(
    launcher: Launcher,
    pending: list[RunConfig],
    argv_of: Callable[[RunConfig], list[str]],
    label: str,
    progress=None,
) -> list[str]:
    """Train ``pending`` (the runs not done, in the order to start them) as jobs; with ``launcher.wait``,
    wait for them all: a bar (bench.progress: rich on a terminal, plain lines otherwise) and one line per
    finished or failed run. Returns one line per failed run (with its log)."""
    say = progress.print if progress is not None else print
    if launcher.kind == "slurm" and not launcher.resubmit:  # a job of an earlier call may still be queued or running
        earlier = [c for c in pending if _earlier_job(c) is not None]
        if earlier:
            say(
                f"{label}: {len(earlier)} run(s) not done were submitted before (job.json: "
                f"{', '.join(sorted({_earlier_job(c) for c in earlier})[:4])}); not submitted again "
                "(--resubmit submits them anew, once those jobs have ended)"
            )
            pending = [c for c in pending if c not in earlier]
    if not pending:
        return []
    task = progress.add_task(label, total=len(pending)) if progress is not None else None
    executor = _executor(launcher, label)
    cores = os.cpu_count() or 1
    parallel = launcher.max_parallel or (len(pending) if launcher.kind == "slurm" else cores)
    threads = None
    if launcher.kind == "local":  # the machine's cores divided between the runs side by side
        threads = max(1, cores // parallel)

    def job_of(config: RunConfig) -> RunJob:
        argv = argv_of(config) + ([] if threads is None else ["--set", f"threads={threads}"])
        side_by_side = launcher.kind == "local" and parallel > 1
        return RunJob(argv, launcher.processes, side_by_side, launcher.nodes_per_run)

    queue, running, failed, done = list(pending), [], [], 0
    if launcher.kind == "slurm":  # one array; SLURM keeps at most max_parallel running
        with executor.batch():
            jobs = [executor.submit(job_of(config)) for config in queue]
        for job, config in zip(jobs, queue):
            _record(job, config, launcher)
        running, queue = list(zip(jobs, queue)), []
        say(f"{label}: submitted {len(jobs)} job(s) to SLURM (logs in {launcher.folder})")
    while queue or running:
        while queue and len(running) < parallel:
            config = queue.pop(0)
            job = executor.submit(job_of(config))
            _record(job, config, launcher)
            running.append((job, config))
        if not launcher.wait and not queue:
            say(f"{label}: {len(running)} job(s) running; `--tables_only` writes the tables once they are done")
            return failed
        time.sleep(POLL_S)
        for job, config in [(j, c) for j, c in running if j.done()]:
            running.remove((job, config))
            done += 1
            if task is not None:
                progress.advance(task)
            try:
                job.result()
                say(f"[{done}/{len(pending)}] {config.run_dir().name}: done")
            except Exception as err:  # the job's own exception, or the scheduler's
                log = getattr(getattr(job, "paths", None), "stderr", "?")
                failed.append(f"{config.run_dir().name} failed ({type(err).__name__}); its log: {log}")
                say(f"[{done}/{len(pending)}] {failed[-1]}")
    return failed

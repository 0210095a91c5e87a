"""Building a run: the accelerator, the data, the model and the optimizer; starting it or resuming it."""

from __future__ import annotations

import atexit
import functools
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

from architectures import create_model
from bench import environment
from bench.config import ConfigError, RunConfig
from bench.data.augment import Augmentation, default_augmentation, normalize
from bench.data.batches import (
    MemoryBatches,  # noqa: F401 (re-exported)
    TrainBatches,  # noqa: F401 (re-exported)
    epoch_order,  # noqa: F401 (re-exported)
    global_batch,  # noqa: F401 (re-exported)
)
from bench.data.datasets import ImageDataset
from bench.data.fingerprint import awaits_download, data_fingerprint
from bench.data.loader import LoaderBatches, prepared_train_set, run_splits
from bench.data.names import is_loader_dataset
from bench.io import read_json, write_json
from bench.loop import sharding
from bench.loop.checkpoint import checkpoints, load_checkpoint
from bench.loop.precision import LossScaler
from bench.loop.splits import LoaderSplit, Split
from bench.loop.state import Run, lr_lambda
from bench.loop.step import effective_ascent_sync, skips_on_device
from bench.loop.sync_bn import convert_sync_batchnorm
from bench.resolve import optimizer_settings, resolved_hyperparameters
from optimizers import create_optimizer
from optimizers.regularizer import build_regularizer
from optimizers.snapshot import StepSnapshot

#: Tracker project name; TensorBoard writes under RUN_DIR/sam-bench/.
TRACKER_PROJECT = "sam-bench"
#: Files of a previous run that a fresh run in the same directory replaces.
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "label_noise.json",
    "sharpness.json",
    TRACKER_PROJECT,
)


# -- setup -------------------------------------------------------------------------------------


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def take_down_process_group_at_exit() -> None:
    """Destroy the process group before the interpreter exits (as torch asks), rather than leave it to the
    interpreter's teardown, for a program that sets up runs itself; registered once per process. The command
    line leaves a multi-process job's processes without any teardown (:func:`bench.cli.main.exit_with`)."""
    atexit.register(_destroy_process_group)


def make_accelerator(config: RunConfig) -> Accelerator:
    AcceleratorState._reset_state()  # runs in one process may differ in mixed precision
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        log_with=config.log_with,
        project_dir=str(config.run_dir()) if config.log_with else None,
    )
    device = accelerator.device
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU (Accelerate applies no fp16 autocast on CPU); use bf16 on CPU")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision bf16 is not supported by this GPU; use fp16")
    world = accelerator.num_processes
    if world > 1:
        take_down_process_group_at_exit()
    if config.batch_size % (world * config.grad_accum_steps):
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by processes x grad_accum_steps = {world * config.grad_accum_steps}"
        )
    return accelerator


#: how many training images (the first of the training set, un-augmented) an architecture's data-set layer sees
DATA_INIT_IMAGES = 5000


def check_input_size(model: nn.Module, config: RunConfig, train_set) -> None:
    """A model that fails on the dataset's images (one too small for its downsampling, a channel count it does not
    take) is refused in one line, with the first line of the error, before anything runs: one forward of two
    blank images in eval mode, without gradients (nothing moves, nothing is drawn)."""
    size = tuple(train_set.images.shape[-2:]) if isinstance(train_set, ImageDataset) else (train_set.image_size,) * 2
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, train_set.channels, *size))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"arch {config.arch} fails on the {size[0]}x{size[1]} images of {config.dataset}: {reason}") from None
    finally:
        model.train(was_training)


def build_model_and_optimizer(config: RunConfig, accelerator: Accelerator, train_set, fsdp=None):
    """The model and the optimizer over its parameters; with an FSDP plugin the model is sharded first,
    so the optimizer holds the sharded parameters."""
    model = create_model(config.arch, num_classes=train_set.num_classes, in_channels=train_set.channels)
    init_from_data = getattr(model, "init_from_data", None)  # a layer the architecture sets from the images
    if init_from_data is not None:
        if not isinstance(train_set, ImageDataset):
            raise ConfigError(f"arch {config.arch} sets a layer from the training images: it needs a dataset held in memory")
        init_from_data(normalize(train_set.images[:DATA_INIT_IMAGES], train_set.mean, train_set.std))
    check_input_size(model, config, train_set)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model, accelerator.device)
    if fsdp is not None:
        model = sharding.shard_model(accelerator, model, fsdp)
    optimizer = create_optimizer(
        config.optimizer, model, base=config.base_optimizer, **optimizer_settings(config, len(train_set))
    )
    ascent_sync = effective_ascent_sync(optimizer, config.ascent_sync)
    if fsdp is not None:
        sharding.check_sharded_run(config.optimizer, optimizer, config.ascent_sync)
    if accelerator.num_processes > 1 and config.ascent_sync == "global" and ascent_sync == "local":
        raise ConfigError(
            f"{config.optimizer} needs --ascent_sync local under data parallelism: its ascent pass leaves tensors out"
        )
    return model, optimizer, ascent_sync


def setup(config: RunConfig, progress=None, data: tuple[ImageDataset, ImageDataset] | None = None, new: bool = False) -> Run:
    """Everything a run holds, ready to train; ``data`` replaces the config's dataset (train, test). A ``new`` run
    that downloads its data into an empty ``--data_dir`` takes the downloaded files' fingerprint as its
    ``data_id`` (and so its folder), the one the same command finds from then on; every process takes the
    first process's (one broadcast, where there are several)."""
    accelerator = make_accelerator(config)
    device = accelerator.device
    environment.set_threads(config.threads, accelerator.state.num_processes if device.type == "cpu" else 1)
    set_seed(config.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if data is not None:
        train_set, test_set = data
    else:
        with accelerator.main_process_first():  # decode and cache once, then every process reads the cache
            # the first process looks before its download, the others after it: the first's answer counts
            downloads = new and awaits_download(config.dataset, config.data_dir)
            train_set, test_set = run_splits(config)
        if new:
            found = data_fingerprint(config.dataset, config.data_dir) if downloads else config.data_id
            if accelerator.num_processes > 1:
                found = broadcast_object_list([found])[0]
            if found != config.data_id:
                config.data_id = found
                if config.log_with:  # the trackers write into the run's folder, named now
                    project = accelerator.project_configuration
                    project.project_dir = project.logging_dir = str(config.run_dir())
    prepared = prepared_train_set(train_set, config)
    train_set = prepared.train
    fsdp = sharding.fsdp_plugin(accelerator, config.mixed_precision)
    if fsdp is not None and config.compile:
        raise ConfigError(
            "--compile with FSDP sharding is not supported: the compiled graph would have to trace "
            "the shards' all-gathers (run sharded models without --compile)"
        )
    model, optimizer, ascent_sync = build_model_and_optimizer(config, accelerator, train_set, fsdp)
    num_params = sum(p.numel() for p in model.parameters())
    # built from the bare model (a regulariser may copy it), before prepare() wraps it
    regularizer = build_regularizer(
        optimizer,
        model,
        len(train_set),
        train_set.num_classes,
        device,
        gather=accelerator.gather if accelerator.num_processes > 1 else None,
    )
    if config.compile:  # one graph for every pass: no module attribute changes between them (see RunningStatsFreeze)
        # compiled in place: the module keeps its own parameter names (checkpoints, the exported weights and a
        # resume with --compile switched either way see the same state dict)
        model.compile(backend=config.compile_backend)
    if fsdp is None:
        model = accelerator.prepare(model)
    else:  # sharded already; checkpoints hold the whole model and optimizer state (see bench.loop.sharding)
        sharding.register_model_checkpointing(accelerator, model)
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {len(train_set)} training images")
    held_out = [("val", prepared.val)] if prepared.val is not None else []
    aug_generator = torch.Generator(device).manual_seed(config.seed)
    batches, splits = data_access(config, accelerator, train_set, [*held_out, ("test", test_set)], steps_per_epoch, aug_generator)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_per_epoch))
    scaler = LossScaler() if config.mixed_precision == "fp16" else None
    on_device = skips_on_device(device, scaler, regularizer)
    if on_device and device.type == "cuda":  # torch's Adam keeps its step count on the host unless capturable
        for group in optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
    snapshot = StepSnapshot(accelerator.unwrap_model(model))
    run = Run(
        config=config,
        accelerator=accelerator,
        run_dir=config.run_dir(),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_set=train_set,
        batches=batches,
        splits=splits,
        num_params=num_params,
        ascent_sync=ascent_sync,
        steps_per_epoch=steps_per_epoch,
        aug_generator=aug_generator,
        # the function, not its module: a pass calls it without a module's hooks machinery
        loss_fn=functools.partial(nn.functional.cross_entropy, reduction="none", label_smoothing=config.label_smoothing),
        noisy_indices=prepared.noisy_indices,
        regularizer=regularizer,
        snapshot=snapshot,
        fsdp=fsdp,
        load_at_start=environment.load_average(),
        skip_on_device=on_device,
        progress=progress,
    )
    checkpointed = optimizer if fsdp is None else sharding.FullOptimizerState(optimizer, accelerator.is_main_process)
    run.checkpointed = {"optimizer": checkpointed, "scheduler": run.scheduler, "state": run.state}
    if regularizer is not None:
        run.checkpointed["regularizer"] = regularizer
    if accelerator.num_processes > 1:  # each process's running sums of the epoch, and a per-replica ascent's state
        per_replica = fsdp is None and ascent_sync == "local" and getattr(type(optimizer), "state_from_ascent", False)
        run.per_process = ("state", "optimizer") if per_replica else ("state",)
    return run


def data_access(
    config: RunConfig,
    accelerator: Accelerator,
    train_set,
    held_out: list[tuple[str, Any]],
    steps_per_epoch: int,
    aug_generator: torch.Generator,
) -> tuple[TrainBatches, list[Any]]:
    """The training batches and the held-out splits: on the device for an in-memory dataset,
    read by loader workers for an imagefolder or hf: dataset."""
    device, world = accelerator.device, accelerator.num_processes
    if is_loader_dataset(config.dataset):
        batches = LoaderBatches(config, train_set, steps_per_epoch, device, accelerator.process_index, world, config.workers)
        return batches, [LoaderSplit(name, data, config.batch_size // world, batches.workers) for name, data in held_out]
    aug = Augmentation(crop_padding=0, flip=False) if config.no_augment else default_augmentation(config.dataset, config.cutout)
    batches = MemoryBatches(config, train_set, device, aug, aug_generator)
    return batches, [Split(name, data, data.images.to(device), data.labels.to(device)) for name, data in held_out]


def recorded_code(path, now: dict) -> dict[str, Any]:
    """The ``code`` (and ``code_resumed``: the others, in order) a resumed run's config.json keeps: the commit it
    started at, and every other commit (or dirty tree) that continued it, ``now`` included where it differs."""
    try:
        recorded = read_json(path)
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("code"), dict):
        return {"code": now}  # written before the commit was recorded
    later = [c for c in recorded.get("code_resumed", []) if isinstance(c, dict)]
    if now != recorded["code"] and now not in later:
        later.append(now)
    return {"code": recorded["code"], **({"code_resumed": later} if later else {})}


def start_or_resume(run: Run, resume: bool) -> None:
    """Load the newest checkpoint (resume), or clear a previous run's files; then write config.json."""
    config, accelerator = run.config, run.accelerator
    code = {"code": environment.code_version()}
    if resume and checkpoints(run.run_dir):
        # the commit the run started at stays its commit; each other one that continued it is listed
        code = recorded_code(run.run_dir / "config.json", code["code"])
        run.notes += load_checkpoint(accelerator, run.run_dir, run.checkpointed, run.per_process)
        rng = run.state.augmentation_rng
        run.aug_generator.set_state(rng.cpu() if run.device.type == "cpu" else rng)
        if run.scaler is not None and run.state.loss_scale:
            run.scaler.load_state_dict(run.state.loss_scale)
    elif accelerator.is_main_process:
        for stale in RUN_FILES:
            path = run.run_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if accelerator.is_main_process:
        write_json(
            run.run_dir / "config.json",
            {
                **config.to_dict(),
                "run_id": config.run_id(),
                "world_size": accelerator.num_processes,
                "device": str(run.device),
                "environment": environment.describe(run.device),
                **code,
                "resolved_hyperparameters": resolved_hyperparameters(config),
            },
        )
        if run.noisy_indices is not None:
            write_json(
                run.run_dir / "label_noise.json",
                {"fraction": config.label_noise, "seed": config.seed, "changed": run.noisy_indices.tolist()},
            )
    if config.log_with:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
        accelerator.init_trackers(TRACKER_PROJECT, config={**flat, **{f"hp_{k}": v for k, v in config.hyperparameters.items()}})
    run.segment_start = (time.perf_counter(), time.process_time())

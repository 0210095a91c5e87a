"""A configuration resolved against the registries, once, before a run starts.

:meth:`bench.config.RunConfig.validate` checks values alone. :func:`resolve` then gives every
name its canonical spelling (the optimizer, the base optimizer, the dataset), checks that the
model exists, that the data settings fit the dataset, and that the variant accepts its
settings (by building it on a stand-in parameter, so a bad value fails before any work), in
one line per problem. The settings a run hands its optimizer (:func:`optimizer_settings`) and
those it records (:func:`resolved_hyperparameters`) are derived here too, from the variant's
declarations.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import torch

from architectures.registry import resolve as resolve_architecture
from bench.config import TRACKERS, ConfigError, RunConfig
from bench.data.datasets import available_datasets
from bench.data.datasets import canonical_name as dataset_name
from bench.data.fingerprint import data_fingerprint
from bench.data.names import DEFAULT_IMAGE_SIZE, DataError, is_loader_dataset, loader_dataset_name
from bench.variant_flags import filled_by
from optimizers import available_optimizers, create_optimizer, optimizer_class
from optimizers.base import BASE_OPTIMIZERS
from optimizers.registry import canonical_name


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve(config: RunConfig) -> RunConfig:
    """``config`` checked and resolved in place (and returned); ConfigError, one line, for the first problem."""
    _resolve_names(config)
    config.validate()
    _check_data(config)
    _check_optimizer(config)
    return config


def _resolve_names(config: RunConfig) -> None:
    try:
        config.optimizer = canonical_name(config.optimizer)
    except ValueError:
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; choose one of: {', '.join(available_optimizers())}") from None
    base = str(config.base_optimizer).lower()
    _need(
        base in BASE_OPTIMIZERS, f"unknown base optimizer {config.base_optimizer!r}; choose one of: {', '.join(BASE_OPTIMIZERS)}"
    )
    config.base_optimizer = base
    try:
        config.dataset = loader_dataset_name(config.dataset) or dataset_name(config.dataset)
    except DataError as err:
        if str(config.dataset).strip().lower().startswith("hf:"):
            raise ConfigError(str(err)) from None
        raise ConfigError(
            f"unknown dataset {config.dataset!r}; choose one of: {', '.join(available_datasets())}, imagefolder, hf:OWNER/NAME"
        ) from None
    try:
        resolve_architecture(config.arch)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.compile:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        _need(
            config.compile_backend in backends,
            f"unknown compile_backend {config.compile_backend!r}; choose one of: {', '.join(backends)}",
        )
    if config.log_with in TRACKERS:  # an unknown one is validate()'s to report
        _need(
            importlib.util.find_spec(config.log_with) is not None,
            f"log_with {config.log_with} needs the {config.log_with} package: pip install {config.log_with}",
        )


def _check_data(config: RunConfig) -> None:
    """The data's fingerprint (a recorded one must match), then the settings of the datasets read through
    loader workers: only for them, and what each allows."""
    try:
        found = data_fingerprint(config.dataset, config.data_dir)
        if config.data_id not in (None, found) and config.data_id == data_fingerprint(config.dataset, config.data_dir, True):
            found = config.data_id  # recorded before text files were read: the same paths and sizes, its id kept
    except DataError as err:
        raise ConfigError(str(err)) from None
    _need(
        config.data_id in (None, found),
        f"the data under data_dir {config.data_dir} is not the data this run was made with "
        f"(fingerprint {found or 'none'}, recorded {config.data_id}): point --data_dir at that data",
    )
    config.data_id = found
    if not is_loader_dataset(config.dataset):
        given = [f for f in ("image_size", "workers", "image_column", "label_column") if getattr(config, f) is not None]
        _need(not given, f"{', '.join(given)}: only for the imagefolder and hf: datasets, not {config.dataset}")
        return
    if config.image_size is None:
        config.image_size = DEFAULT_IMAGE_SIZE
    for switch in ("cutout", "no_augment"):
        _need(not getattr(config, switch), f"{switch} is for the in-memory datasets; {config.dataset} has its own augmentation")
    if config.dataset == "imagefolder":
        _need(bool(config.data_dir), "imagefolder needs --data_dir DIR holding train/<class>/ and val/<class>/ image folders")
        columns = [f for f in ("image_column", "label_column") if getattr(config, f) is not None]
        _need(not columns, f"{', '.join(columns)}: only for hf: datasets, not imagefolder")
        return
    random_access = [f"{f} {getattr(config, f)}" for f in ("train_subset", "val_fraction", "label_noise") if getattr(config, f)]
    _need(
        not random_access,
        f"{', '.join(random_access)}: needs random access to the training set, which the streamed {config.dataset} does not give",
    )
    regularizer = getattr(optimizer_class(config.optimizer), "loss_regularizer", None)
    _need(
        not getattr(regularizer, "needs_sample_ids", False),
        f"{config.optimizer} keeps a value per training sample, which needs sample ids the streamed {config.dataset} "
        "does not give",
    )


def own_rule_settings(config: RunConfig) -> dict[str, Any]:
    """The run settings a variant with its own update rule may take, if it declares them."""
    return {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay}


def optimizer_settings(config: RunConfig, num_train: int) -> dict[str, Any]:
    """Keyword arguments for ``create_optimizer``: the base optimizer's (or, for a variant with
    its own update rule, the lr and the momentum and weight decay it declares), the quantities
    the harness fills in (``filled_by`` in bench/cli/variant_flags.toml: the training-set size, the total step count),
    then the variant's own."""
    cls = optimizer_class(config.optimizer)
    declared = {s.name: s for s in getattr(cls, "settings", ())}
    fills = {"num_train": num_train, "total_steps": max(1, config.epochs * (num_train // config.batch_size))}
    filled = {name: fills[filled_by(cls, name)] for name in declared if filled_by(cls, name) in fills}
    if config.max_grad_norm is not None and config.optimizer not in BASE_OPTIMIZERS:  # a variant clips its own descent
        filled["max_grad_norm"] = config.max_grad_norm
    if not getattr(cls, "uses_base_optimizer", True):
        # an update rule of its own takes the run's lr, and its momentum and weight decay if it has them
        own = {k: v for k, v in own_rule_settings(config).items() if k in declared or k == "lr"}
        return {**own, **filled, **config.hyperparameters}
    base = config.optimizer if config.optimizer in BASE_OPTIMIZERS else config.base_optimizer
    if base == "sgd":
        settings = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov)
    else:
        settings = dict(lr=config.lr, weight_decay=config.weight_decay)
    return {**settings, **filled, **config.hyperparameters}


def _check_optimizer(config: RunConfig) -> None:
    """Build the optimizer on a stand-in parameter, so a bad hyperparameter fails before any work."""
    try:
        create_optimizer(
            config.optimizer,
            [torch.zeros(1, requires_grad=True)],
            base=config.base_optimizer,
            **optimizer_settings(config, num_train=1),
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{config.optimizer}: {err}") from None
    obstacle = getattr(optimizer_class(config.optimizer), "compile_obstacle", None)
    reason = obstacle(config.hyperparameters) if config.compile and obstacle is not None else None
    _need(reason is None, f"--compile: {reason}")


def resolved_hyperparameters(config: RunConfig) -> dict[str, Any]:
    """The variant's own settings as it will use them, recorded in config.json: its declared defaults
    (not those the harness fills in) overlaid with the given ones, as JSON values."""
    cls = optimizer_class(config.optimizer)
    defaults = {s.name: s.default for s in getattr(cls, "settings", ()) if filled_by(cls, s.name) is None}
    return json.loads(json.dumps({**defaults, **config.hyperparameters}, default=str))


def check_recorded(config: RunConfig) -> None:
    """Refuse to continue or reuse a run made with variant settings this version resolves otherwise.

    A run's id holds only the settings it was given, so after a default changes, an old run has
    the id of a new one; counting it as one would report the old setting as the new."""
    path = config.run_dir() / "config.json"
    try:
        recorded = json.loads(path.read_text()).get("resolved_hyperparameters") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config.json is the resume's or the table's to report
    if not isinstance(recorded, dict):
        return  # written before the settings were recorded
    now = resolved_hyperparameters(config)
    changed = sorted(k for k in {*recorded, *now} if recorded.get(k, "unset") != now.get(k, "unset"))
    then_values = ", ".join(f"{k}={recorded.get(k, 'unset')}" for k in changed)
    now_values = ", ".join(f"{k}={now.get(k, 'unset')}" for k in changed)
    _need(
        not changed,
        f"{config.run_dir()} was run with {then_values}, which this version resolves to {now_values} "
        "(a changed default): move that run aside, or set those values to continue it",
    )


def check_not_taken(config: RunConfig) -> None:
    """A new run (no --resume) never writes over another: a folder holding another configuration's run, or
    this very run finished or interrupted after a checkpoint, is refused in one line, and nothing in it changes."""
    check_same_run(config)
    folder = config.run_dir()
    _need(
        not (folder / "summary.json").is_file(),
        f"{folder} holds this run, finished: --resume {folder} checks it, --run_name NAME starts another",
    )
    from bench.loop.checkpoint import checkpoints  # here: reading results imports no accelerate

    kept = checkpoints(folder)
    if kept:
        newest = kept[-1]
        raise ConfigError(
            f"{folder} holds this run, interrupted (its newest checkpoint: {newest.name}): --resume auto continues it; "
            "move that folder aside to start it over"
        )


def check_same_run(config: RunConfig) -> None:
    """The run folder of ``config`` holds no other configuration's run (a new run's, or one resumed by its
    settings): a file there, an unreadable config.json or another configuration is refused in one line."""
    folder = config.run_dir()
    _need(
        not folder.exists() or folder.is_dir(), f"{folder} is a file, not a run folder: choose another --run_name or --output_dir"
    )
    path = folder / "config.json"
    if not path.is_file():
        return
    try:
        recorded = RunConfig.read(folder).identity()
    except ConfigError as err:
        raise ConfigError(
            f"{folder} holds a run whose config.json cannot be read ({err}): move that folder aside, or choose another "
            "--run_name or --output_dir"
        ) from None
    now = config.identity()
    changed = sorted(k for k in {*recorded, *now} if recorded.get(k) != now.get(k))
    _need(
        not changed,
        f"{folder} holds another configuration's run (it differs in {', '.join(changed)}): choose another "
        "--run_name or --output_dir, or move that folder aside",
    )

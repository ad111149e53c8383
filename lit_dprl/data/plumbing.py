"""Plumbing shared by the data modules: checks of their size arguments, their tokenizer, values known only after
``setup()``, and their loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lit_dprl.models import load_tokenizer

T = TypeVar("T")


def check_sizes(batch_size: int, val_fraction: float, **example_limits: int | None) -> None:
    """Refuse ``batch_size < 1``, ``val_fraction`` outside (0, 1) and an example limit below 1 (None: all rows)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, limit in example_limits.items():
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1 or None (all rows), got {limit}")


def model_tokenizer(source: str | None, module: str) -> PreTrainedTokenizerBase:
    """The tokenizer of model source ``source`` for data module ``module``; None (the model's, which
    ``lit-dprl fit`` fills in from ``model.init_args.model``) is refused outside the command line."""
    if source is None:
        raise ValueError(
            f"{module} has no tokenizer: pass tokenizer=<the model's source> (e.g. 'tiny' or the model's "
            "directory); lit-dprl fit sets it to model.init_args.model"
        )
    return load_tokenizer(source)


def after_setup(value: T | None, what: str) -> T:
    """``value`` once ``setup()`` has set it; before, a ``RuntimeError`` saying that ``what`` needs ``setup``."""
    if value is None:
        raise RuntimeError(f"{what} is known only after setup(); call setup('fit') first")
    return value


def batch_loader(
    dataset: Dataset, collate_fn: Callable[[list[Any]], Any], batch_size: int, num_workers: int, shuffle: bool
) -> DataLoader:
    """Batches of ``batch_size`` rows built by ``collate_fn``: shuffled for training (the DP callback rebuilds that
    loader with Poisson sampling from its dataset and ``collate_fn``), in order for validation."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, num_workers=num_workers
    )

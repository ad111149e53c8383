"""Inside a training step: noise-only steps for empty Poisson batches, and physical chunks of a batch.

An empty Poisson sample never reaches the module: a manual-optimization module's optimizers still take
their declared number of (noise-only) steps, an automatic one's optimizer steps with no loss (under DDP,
where Lightning refuses a skipped step, with a constant zero loss). A batch
larger than ``max_physical_batch_size`` is run in chunks whose per-unit gradients are clipped and summed
into the DP optimizer (skipped steps), then the last chunk goes through Lightning's step, which adds the
noise once. Under user-level DP a user's rows stay in one chunk and the optimizer is told each row's user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection

from lit_dprl.privacy.refusals import DPConfigurationError
from lit_dprl.privacy.sampling import EmptyBatch
from lit_dprl.privacy.units import chunk_bounds


def tensors_of(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) batch."""
    found: list[torch.Tensor] = []
    apply_to_collection(batch, torch.Tensor, found.append)
    return found


def shared_rows(batch: Any) -> int | None:
    """The first dimension all tensors of ``batch`` share (its rows), or None if they do not share one."""
    sizes = {len(t) for t in tensors_of(batch)}
    return sizes.pop() if len(sizes) == 1 else None


def set_step_units(optimizer: Any, row_units: Sequence[int] | None, begin: int, end: int) -> None:
    """Under user-level DP, tell ``optimizer`` the user (0, 1, ...) of each row of ``batch[begin:end]``."""
    if row_units is not None:
        units = torch.tensor(row_units[begin:end], dtype=torch.long)
        optimizer.row_units = units - units[0] if len(units) else units


def noise_only_manual_steps(pl_module: pl.LightningModule, steps_per_optimizer: int) -> None:
    """An empty batch under manual optimization: every optimizer takes its steps, noise only."""
    optimizers = pl_module.optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    for _ in range(steps_per_optimizer):
        for optimizer in optimizers:
            optimizer.zero_grad()
            optimizer.step()


def accumulate_leading_chunks(
    batch: Any,
    training_step: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    *,
    optimizer: Any,
    limit: int,
    row_units: Sequence[int] | None,
) -> Any:
    """Run all but the last chunk of ``batch`` here, clipping and summing their per-unit gradients into
    ``optimizer`` (a skipped step); return the last chunk for Lightning's usual step, which adds noise."""
    rows = shared_rows(batch)
    if rows is None:
        raise DPConfigurationError(
            "max_physical_batch_size needs a batch of tensors sharing their first dimension"
        )
    bounds = chunk_bounds(rows, limit, row_units)
    optimizer.zero_grad()  # Lightning zeroes only after training_step; the chunks below come first
    for begin, end in bounds[:-1]:
        set_step_units(optimizer, row_units, begin, end)
        chunk = apply_to_collection(batch, torch.Tensor, lambda t, b=begin, e=end: t[b:e])
        loss = training_step(chunk, *args, **kwargs)
        (loss["loss"] if isinstance(loss, dict) else loss).backward()
        optimizer.signal_skip_step(do_skip=True)
        optimizer.step()
        optimizer.zero_grad()
    begin, end = bounds[-1]
    set_step_units(optimizer, row_units, begin, end)
    return apply_to_collection(batch, torch.Tensor, lambda t: t[begin:end])


def dp_training_step(
    pl_module: pl.LightningModule,
    training_step: Callable[..., Any],
    batch: Any,
    args: tuple,
    kwargs: dict,
    *,
    steps_per_optimizer: int,
    optimizers: Sequence[Any],
    max_physical_batch_size: int | None,
    row_units: Sequence[int] | None,
) -> Any:
    """``training_step`` on a Poisson batch: an empty one takes noise-only steps, a large one runs in chunks."""
    if isinstance(batch, EmptyBatch):
        if not pl_module.automatic_optimization:
            noise_only_manual_steps(pl_module, steps_per_optimizer)
            return None
        if pl_module.trainer.world_size > 1:
            # Lightning refuses a skipped step under DDP; a zero loss on no parameter has an empty backward
            # (DDP's gradient sync is off: the DP optimizer's all-reduce in the step is the only collective)
            return torch.zeros((), device=pl_module.device, requires_grad=True)
        return None  # automatic optimization: the DP optimizer still takes a noise-only step
    if max_physical_batch_size and pl_module.automatic_optimization:
        (optimizer,) = optimizers
        batch = accumulate_leading_chunks(
            batch,
            training_step,
            args,
            kwargs,
            optimizer=optimizer,
            limit=max_physical_batch_size,
            row_units=row_units,
        )
    return training_step(batch, *args, **kwargs)

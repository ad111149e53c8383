"""How a Poisson batch is spent (contract item 5): the noisy steps it takes, and the check that it took them.

A batch is one accounted event ``PoissonSampled(q, k × Gaussian(σ))``, k = ``noisy_steps_per_example``;
the accountant describes what ran only if each optimizer took exactly ``steps_per_optimizer`` steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import lightning.pytorch as pl

from lit_dprl.privacy.refusals import DPConfigurationError, batch_reuse
from lit_dprl.privacy.sampling import PoissonBatchSampler
from lit_dprl.privacy.steps import shared_rows


@dataclass(frozen=True)
class BatchShape:
    """Each optimizer takes ``epochs_per_batch`` passes of ``minibatches_per_batch`` steps over a batch, and
    each example is in ``noisy_steps_per_example`` (optimizers × epochs_per_batch) of all the steps."""

    epochs_per_batch: int = 1
    minibatches_per_batch: int = 1
    noisy_steps_per_example: int = 1

    @classmethod
    def restored(cls, state: Mapping[str, Any]) -> BatchShape:
        """The shape a checkpoint recorded (one step per batch for a checkpoint that predates the fields)."""
        return cls(*(state.get(field.name, 1) for field in fields(cls)))

    @property
    def steps_per_optimizer(self) -> int:
        return self.epochs_per_batch * self.minibatches_per_batch

    @property
    def optimizer_steps(self) -> int:
        """Steps per batch, all optimizers together."""
        return self.noisy_steps_per_example * self.minibatches_per_batch


def batch_shape(
    pl_module: pl.LightningModule, optimizers: int, *, max_physical_batch_size: int | None, privacy_unit: str
) -> BatchShape:
    """The shape ``pl_module`` declares with ``optimizers`` optimizers; refuses the callback's options that
    need automatic optimization on a manual-optimization module, and a module with no optimizer."""
    epochs, minibatches = batch_reuse(pl_module)
    if max_physical_batch_size and not pl_module.automatic_optimization:
        raise DPConfigurationError(
            "max_physical_batch_size works with automatic optimization; a manual-optimization module takes its "
            "own steps (PPO: use more num_mini_batches or a smaller batch)"
        )
    if privacy_unit == "user" and not pl_module.automatic_optimization:
        raise DPConfigurationError(
            "privacy_unit='user' needs automatic optimization (one backward over the batch's rows per step), "
            "so that each user's rows can be grouped; this module optimizes manually"
        )
    if not optimizers:
        raise DPConfigurationError("the module configures no optimizer; DP needs one to add noise")
    return BatchShape(epochs, minibatches, optimizers * epochs)


def units_in(
    batch: Any, sampler: PoissonBatchSampler | None, privacy_unit: str
) -> tuple[int | None, list[int] | None]:
    """The privacy units of ``batch`` on this rank (None: unknown) and, for ``privacy_unit="user"``, each row's
    unit (its index among the batch's users)."""
    if sampler is None:
        return shared_rows(batch), None
    if not sampler.pending:
        raise RuntimeError(
            "DPCallback lost track of the Poisson batches: a batch arrived that was not sampled"
        )
    row_units = sampler.pending.popleft()
    units = (row_units[-1] + 1) if row_units else 0
    return units, (row_units if privacy_unit == "user" else None)


def steps_taken(optimizers: Sequence[Any], at_start: Sequence[int]) -> list[int]:
    """The noisy steps each DP optimizer took since it had taken ``at_start`` of them."""
    return [opt.noisy_steps - start for opt, start in zip(optimizers, at_start, strict=True)]


def check_steps_taken(taken: list[int], shape: BatchShape) -> None:
    """Refuse a batch in which an optimizer took another number of noisy steps than ``shape`` declares."""
    if any(t != shape.steps_per_optimizer for t in taken):
        raise RuntimeError(
            f"each optimizer must take exactly {shape.steps_per_optimizer} noisy step(s) per batch "
            f"(epochs_per_batch × minibatches_per_batch), but took {taken}; the accountant would not describe "
            "what ran"
        )

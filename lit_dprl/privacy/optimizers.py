"""Opacus DP optimizers with the checks and additions that DP-SGD on a LightningModule needs.

Before Opacus clips, each step:

- refuses per-sample gradients accumulated over several backward passes (two ``manual_backward``
  calls before one ``step``): each pass would be clipped on its own, so an example would enter the
  sum twice, with sensitivity 2C against noise calibrated for C (Opacus's ``make_private`` forbids
  it too). Sum the losses and call backward once;
- fills an all-zero per-sample gradient for a parameter the loss did not touch, so a step with no
  per-sample gradients at all (an empty Poisson batch or minibatch: no forward, no backward) still
  clips nothing, adds N(0, σ²C²) and steps, as DP-SGD requires (Opacus raises instead);
- casts per-sample gradients to the parameter's dtype (fp32 under ``bf16-mixed``), so the norms and
  clipping factors are not computed in bf16, where a clipped gradient can exceed C by 2⁻⁸;
- when rows are grouped into privacy units (user-level DP), averages each unit's rows into one
  per-unit gradient, so Opacus clips one gradient per unit;
- zeroes every per-unit gradient with a NaN or inf in any parameter (counted in ``non_finite_units``): one
  bad example drops out of the sum (a zero contribution is within the bound C) instead of turning the
  whole noisy step into NaN;
- counts the units in the step against what the batch allows (``start_batch``): at most the batch's
  units per step and ``epochs_per_batch`` participations per unit per batch, so a module that feeds
  every row to every minibatch is stopped before its noise is released.

``noisy_steps`` counts steps that added noise, so the callback can check that a module took exactly
the number of steps that the accountant is told about. Clipping, noise and reduction are Opacus's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

if TYPE_CHECKING:
    import lightning.pytorch as pl


def group_rows(grad_sample: torch.Tensor, row_units: torch.Tensor, num_units: int) -> torch.Tensor:
    """Per-unit gradients ``g_u = mean_{i: unit(i) = u} g_i`` of per-row gradients ``g_i`` (rows of ``grad_sample``)."""
    shape = (num_units, *grad_sample.shape[1:])
    sums = torch.zeros(shape, dtype=grad_sample.dtype, device=grad_sample.device)
    sums.index_add_(0, row_units, grad_sample)
    counts = torch.bincount(row_units, minlength=num_units).clamp(min=1).to(grad_sample.dtype)
    return sums / counts.view(-1, *([1] * (grad_sample.dim() - 1)))


class _DPChecks:
    noisy_steps: int = 0
    non_finite_units: int = 0
    row_units: torch.Tensor | None = None
    _units_in_batch: int | None = None
    _participations_allowed: int | None = None
    _participations: int = 0

    def start_batch(self, units: int | None, epochs_per_batch: int) -> None:
        """A new batch of ``units`` privacy units (None: unknown, not checked) begins."""
        self._units_in_batch = units
        self._participations_allowed = None if units is None else units * epochs_per_batch
        self._participations = 0

    def _refuse_accumulated_backwards(self) -> None:
        if any(isinstance(getattr(p, "grad_sample", None), list) for p in self.params):
            raise RuntimeError(
                "two or more backward passes were made before one optimizer step: each would be clipped on its "
                "own, so every example would count twice against noise calibrated for one clipped gradient. "
                "Sum the losses first and call (manual_)backward once per optimizer step, e.g. "
                "manual_backward(policy_loss + vf_coef * value_loss)."
            )

    def _fill_missing_grad_samples(self) -> None:
        params = self.params
        present = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
        if len(present) == len(params):
            return
        batch = present[0].shape[0] if present else 0
        for p in params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((batch, *p.shape), device=p.device, dtype=p.dtype)

    def _prepare_grad_samples(self) -> int:
        """Cast to the parameter dtype, group rows into units; returns the number of units in this step."""
        units = None
        if self.row_units is not None:
            units = int(self.row_units.max()) + 1 if len(self.row_units) else 0
        rows = 0
        for p in self.params:
            grad_sample = p.grad_sample.to(p.dtype)
            if units is not None:
                if grad_sample.shape[0] != len(self.row_units):
                    raise RuntimeError(
                        f"the step has {grad_sample.shape[0]} per-sample gradient rows but the batch has "
                        f"{len(self.row_units)} rows: user-level DP needs one backward over the batch's rows"
                    )
                grad_sample = group_rows(grad_sample, self.row_units.to(grad_sample.device), units)
            p.grad_sample = grad_sample
            rows = grad_sample.shape[0]
        return rows

    def _zero_non_finite_units(self) -> None:
        """Zero, in every parameter, the per-unit gradients that are not finite in some parameter."""
        params = [p for p in self.params if p.grad_sample.shape[0] > 0]
        if not params:
            return
        finite = torch.stack([p.grad_sample.flatten(1).isfinite().all(1) for p in params]).all(0)
        if bool(finite.all()):
            return
        self.non_finite_units += int((~finite).sum())
        for p in params:
            keep = finite.to(p.grad_sample.device).view(-1, *([1] * (p.grad_sample.dim() - 1)))
            p.grad_sample = torch.where(keep, p.grad_sample, torch.zeros_like(p.grad_sample))

    def _count_participation(self, units: int) -> None:
        if self._units_in_batch is None:
            return
        self._participations += units
        if units > self._units_in_batch or self._participations > self._participations_allowed:
            raise RuntimeError(
                f"an optimizer step saw {units} per-example gradients ({self._participations} so far in this "
                f"batch) but the batch has {self._units_in_batch} privacy units and each may take part in "
                f"{self._participations_allowed // max(1, self._units_in_batch)} step(s) per batch "
                "(epochs_per_batch): some examples entered more steps than declared. Give each minibatch "
                "its own rows (a partition of the batch) or declare epochs_per_batch."
            )

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        self._refuse_accumulated_backwards()
        self._fill_missing_grad_samples()
        self._count_participation(self._prepare_grad_samples())
        self._zero_non_finite_units()
        proceed = super().pre_step(closure)
        if proceed:
            self.noisy_steps += 1
        return proceed


class NoiseOnlyDPOptimizer(_DPChecks, DPOptimizer):
    """``opacus.optimizers.DPOptimizer`` with the checks above; also steps on empty batches."""


class NoiseOnlyDistributedDPOptimizer(_DPChecks, DistributedDPOptimizer):
    """``opacus.optimizers.DistributedDPOptimizer`` (noise on rank 0 only) with the checks above."""


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    distributed: bool,
    generator: torch.Generator | None,
    secure_mode: bool = False,
    ghost: bool = False,
) -> DPOptimizer:
    """Wrap ``optimizer``; the update is ``(Σ clipped + N(0, σ²C²)) / expected_batch_size`` (global batch).

    ``secure_mode`` is Opacus's noise that resists floating-point attacks (each coordinate is the sum of
    four Gaussian draws, halved); it needs a cryptographically secure ``generator`` to mean anything.
    ``ghost``: the gradients arrive clipped and summed (``ghost.GhostDPOptimizer``; under DDP the distributed one,
    which all-reduces them after rank 0's noise, as ``DistributedDPOptimizer`` does in hook mode).
    """
    from lit_dprl.privacy import ghost as ghost_mode  # ghost builds on this module's checks

    if ghost:
        cls = ghost_mode.DistributedGhostDPOptimizer if distributed else ghost_mode.GhostDPOptimizer
    else:
        cls = NoiseOnlyDistributedDPOptimizer if distributed else NoiseOnlyDPOptimizer
    return cls(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )


def wrap_optimizers(
    trainer: pl.Trainer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None,
    secure_mode: bool,
    ghost: bool,
    make: Callable[..., DPOptimizer] | None = None,
) -> list[DPOptimizer]:
    """Replace ``trainer``'s optimizers by DP optimizers (``make``, by default ``make_dp_optimizer``) drawing their
    noise from one ``generator``; ``expected_batch_size`` is this process's expected units per step."""
    make = make or make_dp_optimizer
    wrapped = [
        make(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            distributed=trainer.world_size > 1,
            generator=generator,
            secure_mode=secure_mode,
            ghost=ghost,
        )
        for optimizer in trainer.strategy.optimizers
    ]
    trainer.strategy.optimizers = wrapped
    return wrapped

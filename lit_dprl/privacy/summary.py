"""What a DP run tells: ``privacy.json`` (the guarantee, every parameter needed to recompute it, warnings) and
the ``dp/`` metrics logged each batch (not private: only the trained weights carry the guarantee)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import opacus

from lit_dprl.privacy.accounting import batch_noise_multiplier
from lit_dprl.privacy.batches import BatchShape
from lit_dprl.privacy.ledger import PrivacyLedger
from lit_dprl.privacy.refusals import DEFAULT_RANDOMNESS, SECURE_MODE_COST
from lit_dprl.privacy.units import TrainingUnits


def privacy_report(
    data: TrainingUnits,
    ledger: PrivacyLedger,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    shape: BatchShape,
    poisson_sampling: bool,
    target_epsilon: float | None,
    max_epsilon: float | None,
    stopped_by_budget: bool,
    world_size: int,
    strategy: str | None = None,
    secret_randomness: bool,
    secure_mode: bool,
    warnings: list[str],
    stage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report of a run on ``data`` whose accounted batches are ``ledger``'s; ``stage`` is the module's
    ``privacy_metadata()`` (left out when None)."""
    epsilon = ledger.epsilon(data.delta)
    sigma, k = noise_multiplier, shape.noisy_steps_per_example
    report = {
        "differentially_private": math.isfinite(epsilon),
        "epsilon": epsilon,
        **data.report_fields(),
        "accountant": ledger.accountant_name,
        "noise_multiplier": sigma,
        "batch_noise_multiplier": batch_noise_multiplier(sigma, k),
        "epochs_per_batch": shape.epochs_per_batch,
        "minibatches_per_batch": shape.minibatches_per_batch,
        "noisy_steps_per_example_per_batch": k,
        "max_grad_norm": max_grad_norm,
        "grad_sample_mode": grad_sample_mode,
        **ledger.report_fields(data.delta),
        "mechanism": ledger.mechanism()
        + f"; each batch is {k} steps of Gaussian(σ={sigma:.6g}) at sensitivity "
        f"C={max_grad_norm:g}",
        "poisson_sampling": poisson_sampling,
        "target_epsilon": target_epsilon,
        "max_epsilon": max_epsilon,
        "stopped_by_budget": stopped_by_budget,
        "world_size": world_size,
        "strategy": strategy,
        "secret_randomness": secret_randomness,
        "secure_mode": secure_mode,
        "randomness": SECURE_MODE_COST if secure_mode else DEFAULT_RANDOMNESS,
        "warnings": list(warnings),
        "opacus_version": opacus.__version__,
    }
    if stage is not None:
        report["stage"] = stage
    return report


def log_metrics(
    pl_module: pl.LightningModule,
    trainer: pl.Trainer,
    ledger: PrivacyLedger,
    *,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    planned_batches: int | None,
    non_finite: int,
) -> None:
    """Log the ``dp/`` metrics after a batch: ε (recomputed every ``log_every_n_steps`` batches and at the first
    and last, else the last value), σ, q and the examples dropped for a non-finite gradient."""
    n = ledger.batches
    exact = n % trainer.log_every_n_steps == 0 or n in (1, planned_batches) or trainer.should_stop
    metrics = {
        "dp/epsilon": ledger.epsilon(delta) if exact else ledger.last_epsilon(),
        "dp/noise_multiplier": noise_multiplier,
        "dp/sample_rate": sample_rate,
        "dp/non_finite_examples": float(non_finite),
    }
    for name, value in metrics.items():
        pl_module.log(name, value, prog_bar=name == "dp/epsilon", on_step=True, on_epoch=False, batch_size=1)

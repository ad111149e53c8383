"""σ and the ε budget of a fit: σ calibrated so that the planned run spends ``target_epsilon``, and the
``Budget``: the last batch that keeps ε, over the restored history and this fit's batches, within
``max_epsilon`` (the fit is refused if it can take none, and stops before it would exceed it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lit_dprl.privacy.accounting import batch_noise_multiplier, calibrate_noise_multiplier
from lit_dprl.privacy.batches import BatchShape
from lit_dprl.privacy.ledger import PrivacyLedger
from lit_dprl.privacy.refusals import DPConfigurationError, forced_batches


def fit_noise_multiplier(
    *,
    given: float | None,
    restored: dict[str, Any] | None,
    target_epsilon: float | None,
    planned_batches: int | None,
    delta: float,
    sample_rate: float,
    shape: BatchShape,
    accountant: str,
) -> float | None:
    """σ of this fit: the checkpoint's when resuming, else calibrated to ``target_epsilon``, else ``given``."""
    if restored is not None:
        return restored["noise_multiplier"]
    if target_epsilon is None:
        return given
    if planned_batches is None:
        raise DPConfigurationError(
            "target_epsilon needs the planned run length to calibrate σ: set trainer.max_steps or trainer.max_epochs"
        )
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        batches=planned_batches,
        noisy_steps_per_example=shape.noisy_steps_per_example,
        accountant=accountant,
    )


@dataclass(frozen=True)
class Budget:
    """A fit's planned batches and the last batch ``max_epsilon`` allows (None: unbounded), both counted over the
    whole history (a resumed run's restored batches included)."""

    max_epsilon: float | None = None
    planned_batches: int | None = None
    last_batch: int | None = None

    def refuse_another(self, ledger: PrivacyLedger, delta: float) -> None:
        """Refuse to start a batch that the budget does not allow."""
        if self.last_batch is not None and ledger.batches >= self.last_batch:
            raise RuntimeError(
                f"DPCallback: another batch would exceed max_epsilon={self.max_epsilon} "
                f"(ε={ledger.epsilon(delta):.4g} after {ledger.batches} batches); training stops here"
            )

    def stop_after(self, batches: int, trainer: pl.Trainer) -> bool:
        """Stop ``trainer`` once the budget allows no further batch; True when that cuts the planned run short."""
        if self.last_batch is None or batches < self.last_batch or trainer.should_stop:
            return False
        trainer.should_stop = True
        if self.planned_batches is not None and batches >= self.planned_batches:
            return False
        rank_zero_warn(
            f"DPCallback: stopping after {batches} batches: one more would exceed ε={self.max_epsilon}"
        )
        return True


def plan_budget(
    ledger: PrivacyLedger,
    trainer: pl.Trainer,
    *,
    max_epsilon: float | None,
    noise_multiplier: float,
    shape: BatchShape,
    planned_batches: int | None,
    sample_rate: float,
    delta: float,
) -> Budget:
    """The fit's budget: the last batch that ``max_epsilon`` allows after ``ledger``'s history.

    Refuses a budget that allows no further batch, or one that ``min_steps``/``min_epochs`` would force
    Lightning past (it ignores a stop before the minimum).
    """
    if max_epsilon is None:
        return Budget(max_epsilon, planned_batches)
    upper = None if planned_batches is None else max(planned_batches - ledger.batches, 1)
    affordable = ledger.affordable_batches(
        budget=max_epsilon,
        batch_noise=batch_noise_multiplier(noise_multiplier, shape.noisy_steps_per_example),
        sample_rate=sample_rate,
        delta=delta,
        upper=upper,
    )
    if affordable == 0:
        raise DPConfigurationError(
            f"the privacy budget ε={max_epsilon} allows no further step (spent {ledger.epsilon(delta):.3f} in "
            f"{ledger.batches} batches at σ={noise_multiplier:.4g}); raise max_epsilon or the noise"
        )
    last = ledger.batches + affordable
    forced = forced_batches(trainer, shape.optimizer_steps)
    if forced > last:
        raise DPConfigurationError(
            f"trainer min_steps={trainer.fit_loop.min_steps} / min_epochs={trainer.fit_loop.min_epochs} force "
            f"{forced} batches, but max_epsilon={max_epsilon} allows only {last} (Lightning "
            "ignores a stop before the minimum): lower min_steps/min_epochs or raise max_epsilon or the noise"
        )
    return Budget(max_epsilon, planned_batches, last)

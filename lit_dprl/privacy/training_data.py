"""The training set as ``DPCallback`` sees it: its privacy units (N, q, δ and the user grouping, ``units.py``)
and, under Poisson sampling, the sampler that draws its batches; a resumed run must bring the same N."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lit_dprl.privacy import randomness
from lit_dprl.privacy.refusals import DPConfigurationError
from lit_dprl.privacy.sampling import PoissonBatchSampler, PoissonDataLoader
from lit_dprl.privacy.units import TrainingUnits, training_units


class TrainingData:
    """The privacy units of a fit's training set (``units``) and the sampler of its Poisson batches (``sampler``).

    Args:
        privacy_unit: "row" or "user" (``DPCallback``'s).
        user_id_field: The dataset's user id column.
        max_rows_per_user: Under "user", the most rows of each user used.
        target_delta: δ, or None for the default N^-1.1.
        sampling_seed: Fixed seed of the Poisson sampling; None: a secret one.
        secure_rng: The secure generator that draws the batches (``secure_mode``), or None.
        warn: Reports a warning (the callback keeps them for the report).
    """

    def __init__(
        self,
        *,
        privacy_unit: str,
        user_id_field: str,
        max_rows_per_user: int | None,
        target_delta: float | None,
        sampling_seed: int | None,
        secure_rng: Any,
        warn: Callable[[str], None],
    ) -> None:
        self.privacy_unit = privacy_unit
        self.user_id_field = user_id_field
        self.max_rows_per_user = max_rows_per_user
        self.target_delta = target_delta
        self.sampling_seed = sampling_seed
        self.secure_rng = secure_rng
        self.warn = warn
        self.units: TrainingUnits | None = None
        self.sampler: PoissonBatchSampler | None = None

    def poisson_loader(
        self, loader: DataLoader, trainer: pl.Trainer, restored: dict[str, Any] | None
    ) -> PoissonDataLoader:
        """``loader``'s dataset and ``collate_fn`` in Poisson batches of expected size ``loader.batch_size``; a
        resumed run (``restored``: the callback's checkpoint state) draws on after the batches it drew."""
        units = self._count(loader.dataset, loader.batch_size, restored)
        drawn = restored["batches_drawn"] if restored else 0
        self.sampler = randomness.poisson_sampler(
            units, trainer, seed=self.sampling_seed, drawn=drawn, generator=self.secure_rng
        )
        return PoissonDataLoader(loader, self.sampler)

    def fixed_batches(self, trainer: pl.Trainer, restored: dict[str, Any] | None) -> None:
        """The units of the trainer's own shuffled fixed-size batches (``poisson_sampling=False``)."""
        loader = trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None)
        if not isinstance(batch_size, int):
            raise DPConfigurationError("the training DataLoader must have an integer batch_size")
        self._count(loader.dataset, batch_size * trainer.world_size, restored)
        self.warn(
            "poisson_sampling=False: batches are shuffled, not Poisson-sampled; the reported ε treats them as "
            "Poisson samples at q = batch/N, an approximation the guarantee does not cover exactly"
        )

    def _count(self, dataset: Any, global_batch_size: int, restored: dict[str, Any] | None) -> TrainingUnits:
        """N (privacy units), q, δ and the user grouping of ``dataset``; its warnings go to ``warn``."""
        units = training_units(
            dataset,
            global_batch_size,
            privacy_unit=self.privacy_unit,
            user_id_field=self.user_id_field,
            max_rows_per_user=self.max_rows_per_user,
            target_delta=self.target_delta,
        )
        if restored and restored["dataset_size"] != units.num_units:
            raise DPConfigurationError(
                f"the checkpoint was trained on {restored['dataset_size']} privacy units but the training "
                f"set now has {units.num_units}: resuming on different data invalidates the privacy accounting"
            )
        self.units = units
        for message in units.warnings:
            self.warn(message)
        return units

"""``DPCallback``: DP-SGD for any LightningModule, built on Opacus.

Attach it to a ``Trainer`` and the run trains with per-unit clipping, Gaussian noise, Poisson
sampling and privacy accounting. The module and data carry no DP code; they follow this contract:

1. The training loss is the mean over the batch of per-row losses; nothing in the loss mixes rows
   (no batch normalisation, whitening or batch-wide token means).
2. The training data comes from one map-style ``DataLoader`` with an integer ``batch_size``; the
   callback keeps its dataset and ``collate_fn`` and draws batches by Poisson sampling at
   q = batch_size / N (N = number of privacy units). Empty batches never reach ``training_step``.
3. Every trainable parameter belongs to the module and is in one of its optimizers.
4. One backward pass per optimizer step (sum the losses first); the callback refuses a second one.
5. A manual-optimization module that takes several steps per batch declares it with integer
   attributes ``epochs_per_batch`` (passes over the batch; each example takes part in one step per
   pass — PPO's ``ppo_epochs``) and ``minibatches_per_batch`` (steps per pass; PPO's
   ``num_mini_batches``), and takes exactly that many steps per optimizer, empty minibatches
   included (skip forward/backward, still call ``step()``). The callback checks the number of steps
   and that no example takes part in more steps than declared.
6. Forwards that are not part of the loss (generation, scoring) run under ``torch.no_grad()``.
7. A module may list settings that would couple examples in ``privacy_hazards() -> list[str]``;
   the callback refuses to run while that list is non-empty. It may describe itself in
   ``privacy_metadata() -> dict``, which the report stores under ``"stage"``.

The privacy unit is a row (``privacy_unit="row"``) or a user (``"user"``): then users are
Poisson-sampled at q = batch_size / (number of users), so the DataLoader's ``batch_size`` is the
expected number of *users* per batch; a sampled user brings all its rows (at most
``max_rows_per_user``), the per-row gradients of a user are averaged into one per-user gradient,
which is clipped to C; noise and normalisation are by the expected number of users.

Accounting: one Poisson batch at rate q is one event ``PoissonSampled(q, k × Gaussian(σ))`` with
k = (number of optimizers) × ``epochs_per_batch`` (see ``accounting.py``). Values logged during
training (losses, metrics, batch sizes) are not private; only the trained weights carry the guarantee.
The report (``privacy.json``) goes into the run's log dir; the stages export it next to the model
(``report.write_export``).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import opacus
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from opacus.grad_sample import GradSampleHooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lit_dprl.privacy.accounting import (
    batch_noise_multiplier,
    calibrate_noise_multiplier,
)
from lit_dprl.privacy.ledger import PrivacyLedger
from lit_dprl.privacy.optimizers import make_dp_optimizer
from lit_dprl.privacy.refusals import (
    DEFAULT_RANDOMNESS,
    SECURE_MODE_COST,
    DPConfigurationError,
    batch_reuse,
    check_arguments,
    forced_batches,
    planned_batches,
    refuse_trainer,
    refuse_unsupported_modules,
    secure_rng_module,
)
from lit_dprl.privacy.report import REPORT_NAME, stage_metadata, write_json_atomic
from lit_dprl.privacy.sampling import EmptyBatch, PoissonBatchSampler, PoissonDataLoader, derive_seed
from lit_dprl.privacy.steps import (
    accumulate_leading_chunks,
    noise_only_manual_steps,
    set_step_units,
    shared_rows,
)
from lit_dprl.privacy.units import TrainingUnits, training_units

__all__ = ["DPCallback", "DPConfigurationError"]

# Opacus's hooks make torch warn on every backward when the inputs need no grad (frozen embeddings, LoRA);
# the per-example gradients are right all the same (see the tests), so the message is only noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def _secret_seed() -> int:
    return secrets.randbits(62)


class DPCallback(Callback):
    """Differentially private training (DP-SGD) for a LightningModule.

    Args:
        target_epsilon: calibrate σ so that the planned run (``max_steps``/``max_epochs``) spends this ε.
        noise_multiplier: use this σ instead (exactly one of the two must be given).
        target_delta: δ; defaults to N^-1.1 (N = privacy units), strictly below 1/N. A δ ≥ 1/N is
            used only when given here, with a warning in the report.
        max_grad_norm: per-unit clipping norm C.
        accountant: "prv" (Gopi et al., as in the paper) or "rdp".
        poisson_sampling: draw each batch by Poisson sampling (what the accountant assumes). With
            False the user's shuffled fixed-size batches are kept and the reported ε is the usual
            approximation that treats them as Poisson samples.
        max_epsilon: a hard budget: training stops before a batch would make ε exceed it, and a run
            that ``min_steps``/``min_epochs`` would force past it is refused; defaults to
            ``target_epsilon``. A resumed run's budget counts the restored accounting history.
        sampling_seed: fixed seed for Poisson sampling. Default: a secret random seed. The guarantee
            assumes the sampling and noise randomness is secret: fix seeds only for reproducible tests.
        noise_seed: fixed seed for the Gaussian noise (default: a secret random seed).
        report_name: file written into the run's log dir at the end of fit.
        max_physical_batch_size: split each sampled batch into chunks of at most this many rows
            (automatic optimization; a user's rows stay in one chunk): per-unit gradients of all chunks
            are clipped and summed, and the noise is added once, so the step is the same as on the whole
            batch, in less memory. This is the DP replacement for ``accumulate_grad_batches``.
        secure_mode: draw sampling and noise from a cryptographically secure generator (needs
            torchcsprng; refused where it is missing) with Opacus's floating-point-safe noise.
        privacy_unit: "row" (one training row) or "user" (all rows sharing ``user_id_field``).
        user_id_field: the dataset's user id column (see ``sampling.dataset_user_ids``).
        max_rows_per_user: under "user", use at most this many rows of each user (its first ones).
    """

    def __init__(
        self,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        target_delta: float | None = None,
        max_grad_norm: float = 1.0,
        accountant: Literal["prv", "rdp"] = "prv",
        poisson_sampling: bool = True,
        max_epsilon: float | None = None,
        sampling_seed: int | None = None,
        noise_seed: int | None = None,
        report_name: str = REPORT_NAME,
        max_physical_batch_size: int | None = None,
        secure_mode: bool = False,
        privacy_unit: Literal["row", "user"] = "row",
        user_id_field: str = "user_id",
        max_rows_per_user: int | None = None,
    ) -> None:
        check_arguments(
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            target_delta=target_delta,
            max_grad_norm=max_grad_norm,
            max_physical_batch_size=max_physical_batch_size,
            poisson_sampling=poisson_sampling,
            privacy_unit=privacy_unit,
            max_rows_per_user=max_rows_per_user,
        )
        self._secure_rng = None
        if secure_mode:
            if sampling_seed is not None or noise_seed is not None:
                raise DPConfigurationError("secure_mode draws from the OS's secure generator: give no seeds")
            self._secure_rng = secure_rng_module().create_random_device_generator("/dev/urandom")
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.max_grad_norm = max_grad_norm
        self.accountant_name = accountant
        self.poisson_sampling = poisson_sampling
        self.max_epsilon = max_epsilon if max_epsilon is not None else target_epsilon
        self.sampling_seed = sampling_seed
        self.noise_seed = noise_seed
        self.report_name = report_name
        self.max_physical_batch_size = max_physical_batch_size
        self.secure_mode = secure_mode
        self.privacy_unit = privacy_unit
        self.user_id_field = user_id_field
        self.max_rows_per_user = max_rows_per_user

        self._noise_multiplier = noise_multiplier
        self._ledger = PrivacyLedger(accountant)
        self._data: TrainingUnits | None = None
        self._warnings: list[str] = []
        self._restored: dict[str, Any] | None = None
        self._sampler: PoissonBatchSampler | None = None
        self._hooks: GradSampleHooks | None = None
        self._dp_optimizers: list = []
        self._steps_at_batch_start: list[int] = []
        self._row_units: list[int] | None = None
        self._batch_accounted = True
        self._max_batches: int | None = None
        self._planned_batches: int | None = None
        self._stopped_by_budget = False
        self._unpatch: list[Callable[[], None]] = []
        self._world_size = 1
        self._report_dir: str | None = None
        self._module: pl.LightningModule | None = None
        self._epochs_per_batch = 1
        self._minibatches_per_batch = 1
        self._noisy_steps_per_example = 1
        self._optimizer_steps_per_batch = 1

    # ------------------------------------------------------------------ public read-only state
    @property
    def epsilon(self) -> float:
        """ε spent so far (at ``delta``), over the whole accounting history (resumed runs included)."""
        return 0.0 if self.delta is None else self._ledger.epsilon(self.delta)

    @property
    def delta(self) -> float | None:
        """δ of the guarantee (known once the training set size is)."""
        return None if self._data is None else self._data.delta

    @property
    def noise_multiplier(self) -> float | None:
        """σ: noise std / C of every optimizer step (calibrated at train start if ``target_epsilon``)."""
        return self._noise_multiplier

    @property
    def sample_rate(self) -> float | None:
        """q = batch_size / N, the Poisson sampling rate of privacy units."""
        return None if self._data is None else self._data.sample_rate

    @property
    def steps(self) -> int:
        """Number of Poisson-sampled batches accounted so far."""
        return self._ledger.batches

    # ------------------------------------------------------------------ setup: refusals, data, hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_trainer(trainer, pl_module, DPCallback)
        self._world_size = trainer.world_size
        if self.secure_mode and trainer.world_size > 1:
            raise DPConfigurationError(
                "secure_mode draws each Poisson sample from the OS's generator, which ranks cannot share: "
                "use one device with secure_mode"
            )
        self._module = pl_module
        self._warnings = []
        pl_module._lit_dprl_dp_callback = self
        self._unpatch.append(lambda: delattr(pl_module, "_lit_dprl_dp_callback"))
        self._patch_training_step(pl_module)
        if self.poisson_sampling:
            self._patch_train_dataloader(trainer)

    def _patch_train_dataloader(self, trainer: pl.Trainer) -> None:
        source = trainer.fit_loop._data_source  # Lightning's handle on whatever provides the train loader
        original = source.dataloader

        def poisson_dataloader() -> Any:
            return self._make_poisson_loader(original(), trainer)

        source.dataloader = poisson_dataloader
        self._unpatch.append(lambda: delattr(source, "dataloader"))

    def _make_poisson_loader(self, loader: Any, trainer: pl.Trainer) -> PoissonDataLoader:
        if not isinstance(loader, DataLoader):
            raise DPConfigurationError(
                f"DPCallback needs one torch DataLoader for training, got {type(loader).__name__}; return a single "
                "DataLoader(dataset, batch_size=..., collate_fn=...) from train_dataloader()"
            )
        if not isinstance(loader.batch_size, int) or loader.batch_size < 1:
            raise DPConfigurationError(
                "the training DataLoader must have an integer batch_size (the expected Poisson batch size)"
            )
        data = self._set_data(loader.dataset, loader.batch_size)
        sampler = PoissonBatchSampler(
            num_samples=data.num_units,
            sample_rate=data.sample_rate,
            num_batches=max(1, round(1 / data.sample_rate)),
            seed=self._shared_sampling_seed(trainer),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            batches_drawn=self._restored["batches_drawn"] if self._restored else 0,
            units=data.rows_of_unit,
            generator=self._secure_rng,
        )
        self._sampler = sampler
        return PoissonDataLoader(loader, sampler)

    def _shared_sampling_seed(self, trainer: pl.Trainer) -> int:
        if self.sampling_seed is not None:
            return self.sampling_seed
        seed = torch.tensor([_secret_seed()], dtype=torch.int64)
        if trainer.world_size > 1:  # every rank must draw the same global samples
            seed = trainer.strategy.broadcast(seed, src=0)
        return int(seed.item())

    def _set_data(self, dataset: Any, global_batch_size: int) -> TrainingUnits:
        """N (privacy units), q, δ and the user grouping from the training data; warnings into the report."""
        data = training_units(
            dataset,
            global_batch_size,
            privacy_unit=self.privacy_unit,
            user_id_field=self.user_id_field,
            max_rows_per_user=self.max_rows_per_user,
            target_delta=self.target_delta,
        )
        if self._restored and self._restored["dataset_size"] != data.num_units:
            raise DPConfigurationError(
                f"the checkpoint was trained on {self._restored['dataset_size']} privacy units but the training "
                f"set now has {data.num_units}: resuming on different data invalidates the privacy accounting"
            )
        self._data = data
        for message in data.warnings:
            self._warn(message)
        return data

    def _warn(self, message: str) -> None:
        if message not in self._warnings:
            self._warnings.append(message)
            rank_zero_warn(f"DPCallback: {message}")

    # ------------------------------------------------------------------ the training step: empty batches, chunks
    def _patch_training_step(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(batch, EmptyBatch):
                if not pl_module.automatic_optimization:
                    noise_only_manual_steps(pl_module, self._epochs_per_batch * self._minibatches_per_batch)
                return None  # automatic optimization: the DP optimizer still takes a noise-only step
            if self.max_physical_batch_size and pl_module.automatic_optimization:
                (optimizer,) = self._dp_optimizers
                batch = accumulate_leading_chunks(
                    batch,
                    original,
                    args,
                    kwargs,
                    optimizer=optimizer,
                    limit=self.max_physical_batch_size,
                    row_units=self._row_units,
                )
            return original(batch, *args, **kwargs)

        pl_module.training_step = training_step
        self._unpatch.append(lambda: delattr(pl_module, "training_step"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_unsupported_modules(pl_module)
        try:
            self._hooks = GradSampleHooks(pl_module, batch_first=True, loss_reduction="mean", strict=True)
        except NotImplementedError as err:
            raise DPConfigurationError(
                f"Opacus cannot compute per-example gradients for this module: {err}. Freeze those layers or "
                "replace them (opacus.validators.ModuleValidator.fix)."
            ) from err
        self._unpatch.append(self._hooks.cleanup)
        ddp = trainer.strategy.model
        if isinstance(ddp, DistributedDataParallel):
            # Gradients are reduced by Opacus's DistributedDPOptimizer after clipping and noise; DDP's own
            # all-reduce in backward would only cost bandwidth and would hang on a rank with an empty batch.
            ddp.require_backward_grad_sync = False
            ddp.require_forward_param_sync = False

    # ------------------------------------------------------------------ train start: σ, optimizers, budget
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_dir = trainer.log_dir  # a collective under DDP: read it on every rank, here
        self._remove_stale_report(trainer)
        if not self.poisson_sampling:
            loader = trainer.train_dataloader
            batch_size = getattr(loader, "batch_size", None)
            if not isinstance(batch_size, int):
                raise DPConfigurationError("the training DataLoader must have an integer batch_size")
            self._set_data(loader.dataset, batch_size * trainer.world_size)
            self._warn(
                "poisson_sampling=False: batches are shuffled, not Poisson-sampled; the reported ε treats them as "
                "Poisson samples at q = batch/N, an approximation the guarantee does not cover exactly"
            )
        self._epochs_per_batch, self._minibatches_per_batch = batch_reuse(pl_module)
        if self.max_physical_batch_size and not pl_module.automatic_optimization:
            raise DPConfigurationError(
                "max_physical_batch_size works with automatic optimization; a manual-optimization module takes its "
                "own steps (PPO: use more num_mini_batches or a smaller batch)"
            )
        if self.privacy_unit == "user" and not pl_module.automatic_optimization:
            raise DPConfigurationError(
                "privacy_unit='user' needs automatic optimization (one backward over the batch's rows per step), "
                "so that each user's rows can be grouped; this module optimizes manually"
            )
        optimizers = trainer.strategy.optimizers
        if not optimizers:
            raise DPConfigurationError("the module configures no optimizer; DP needs one to add noise")
        self._noisy_steps_per_example = len(optimizers) * self._epochs_per_batch
        self._optimizer_steps_per_batch = self._noisy_steps_per_example * self._minibatches_per_batch
        self._planned_batches = planned_batches(trainer, self._optimizer_steps_per_batch)
        self._set_noise_multiplier()
        expected_local_batch = self._data.batch_size / (self._minibatches_per_batch * trainer.world_size)
        generator = self._noise_generator(pl_module)  # one stream for all optimizers: independent noise
        self._dp_optimizers = [
            make_dp_optimizer(
                opt,
                noise_multiplier=self._noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=expected_local_batch,
                distributed=trainer.world_size > 1,
                generator=generator,
                secure_mode=self.secure_mode,
            )
            for opt in optimizers
        ]
        trainer.strategy.optimizers = self._dp_optimizers
        self._set_budget(trainer)

    def _set_noise_multiplier(self) -> None:
        if self._restored is not None:
            self._noise_multiplier = self._restored["noise_multiplier"]
        elif self.target_epsilon is not None:
            if self._planned_batches is None:
                raise DPConfigurationError(
                    "target_epsilon needs the planned run length to calibrate σ: set trainer.max_steps or "
                    "trainer.max_epochs"
                )
            self._noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                sample_rate=self.sample_rate,
                batches=self._planned_batches,
                noisy_steps_per_example=self._noisy_steps_per_example,
                accountant=self.accountant_name,
            )

    def _noise_generator(self, pl_module: pl.LightningModule) -> Any:
        if self._secure_rng is not None:
            return self._secure_rng
        generator = torch.Generator(device=pl_module.device)
        seed = self.noise_seed if self.noise_seed is not None else _secret_seed()
        return generator.manual_seed(derive_seed(seed, self._ledger.batches))

    def _set_budget(self, trainer: pl.Trainer) -> None:
        """The last batch ``max_epsilon`` allows, composing the restored history with this run's batches."""
        if self.max_epsilon is None:
            self._max_batches = None
            return
        upper = (
            None if self._planned_batches is None else max(self._planned_batches - self._ledger.batches, 1)
        )
        affordable = self._ledger.affordable_batches(
            budget=self.max_epsilon,
            batch_noise=batch_noise_multiplier(self._noise_multiplier, self._noisy_steps_per_example),
            sample_rate=self.sample_rate,
            delta=self.delta,
            upper=upper,
        )
        self._max_batches = self._ledger.batches + affordable
        if affordable == 0:
            raise DPConfigurationError(
                f"the privacy budget ε={self.max_epsilon} allows no further step (spent {self.epsilon:.3f} in "
                f"{self._ledger.batches} batches at σ={self._noise_multiplier:.4g}); raise max_epsilon or the noise"
            )
        forced = forced_batches(trainer, self._optimizer_steps_per_batch)
        if forced > self._max_batches:
            raise DPConfigurationError(
                f"trainer min_steps={trainer.fit_loop.min_steps} / min_epochs={trainer.fit_loop.min_epochs} force "
                f"{forced} batches, but max_epsilon={self.max_epsilon} allows only {self._max_batches} (Lightning "
                "ignores a stop before the minimum): lower min_steps/min_epochs or raise max_epsilon or the noise"
            )

    @rank_zero_only
    def _remove_stale_report(self, trainer: pl.Trainer) -> None:
        (Path(self._report_dir or trainer.default_root_dir) / self.report_name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ per batch: check, account, log
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._max_batches is not None and self._ledger.batches >= self._max_batches:
            raise RuntimeError(
                f"DPCallback: another batch would exceed max_epsilon={self.max_epsilon} (ε={self.epsilon:.4g} after "
                f"{self._ledger.batches} batches); training stops here"
            )
        self._steps_at_batch_start = [opt.noisy_steps for opt in self._dp_optimizers]
        self._batch_accounted = False
        units = self._units_in(batch)
        for opt in self._dp_optimizers:
            opt.start_batch(units, self._epochs_per_batch)
            set_step_units(opt, self._row_units, 0, len(self._row_units or ()))

    def _units_in(self, batch: Any) -> int | None:
        """The privacy units of this batch (on this rank); sets ``_row_units`` under "user"."""
        if self._sampler is None:
            return shared_rows(batch)
        if not self._sampler.pending:
            raise RuntimeError(
                "DPCallback lost track of the Poisson batches: a batch arrived that was not sampled"
            )
        row_units = self._sampler.pending.popleft()
        self._row_units = row_units if self.privacy_unit == "user" else None
        return (row_units[-1] + 1) if row_units else 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        expected = self._optimizer_steps_per_batch // len(self._dp_optimizers)
        taken = [
            opt.noisy_steps - start
            for opt, start in zip(self._dp_optimizers, self._steps_at_batch_start, strict=True)
        ]
        self._account_batch()
        if any(t != expected for t in taken):
            raise RuntimeError(
                f"each optimizer must take exactly {expected} noisy step(s) per batch (epochs_per_batch × "
                f"minibatches_per_batch), but took {taken}; the accountant would not describe what ran"
            )
        if (
            self._max_batches is not None
            and self._ledger.batches >= self._max_batches
            and not trainer.should_stop
        ):
            if self._planned_batches is None or self._ledger.batches < self._planned_batches:
                self._stopped_by_budget = True
                rank_zero_warn(
                    f"DPCallback: stopping after {self._ledger.batches} batches: one more would exceed ε={self.max_epsilon}"
                )
            trainer.should_stop = True
        self._log(trainer, pl_module)

    def _account_batch(self) -> None:
        self._ledger.record(
            batch_noise_multiplier(self._noise_multiplier, self._noisy_steps_per_example),
            self.sample_rate,
            self._optimizer_steps_per_batch,
        )
        self._batch_accounted = True

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = self._ledger.batches == self._planned_batches or trainer.should_stop
        if self._ledger.batches % trainer.log_every_n_steps == 0 or last or self._ledger.batches == 1:
            eps = self.epsilon
        else:
            eps = self._ledger.last_epsilon()
        pl_module.log("dp/epsilon", eps, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(
            "dp/noise_multiplier", self._noise_multiplier, on_step=True, on_epoch=False, batch_size=1
        )
        pl_module.log("dp/sample_rate", self.sample_rate, on_step=True, on_epoch=False, batch_size=1)
        dropped = sum(optimizer.non_finite_units for optimizer in self._dp_optimizers)
        pl_module.log("dp/non_finite_examples", float(dropped), on_step=True, on_epoch=False, batch_size=1)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        partial_batch = len(self._steps_at_batch_start) == len(self._dp_optimizers) and any(
            opt.noisy_steps > start
            for opt, start in zip(self._dp_optimizers, self._steps_at_batch_start, strict=True)
        )
        if partial_batch and not self._batch_accounted:
            self._account_batch()  # noisy updates of this batch were already made: count the batch
        if self.delta is not None and self._noise_multiplier is not None:
            self._write_report(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._noise_multiplier is None and self._restored is not None
        ):  # resumed a finished run: no batch ran
            self._noise_multiplier = self._restored["noise_multiplier"]
            self._epochs_per_batch = self._restored.get("epochs_per_batch", 1)
            self._minibatches_per_batch = self._restored.get("minibatches_per_batch", 1)
            self._noisy_steps_per_example = self._restored.get("noisy_steps_per_example", 1)
            self._report_dir = trainer.log_dir
        if self.delta is not None:
            self._write_report(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        while self._unpatch:
            self._unpatch.pop()()
        self._hooks = None

    # ------------------------------------------------------------------ report and checkpoint
    def report(self) -> dict[str, Any]:
        """What ``privacy.json`` holds: the guarantee, every parameter needed to recompute it, and warnings."""
        sigma = self._noise_multiplier
        report = {
            "differentially_private": math.isfinite(self.epsilon),
            "epsilon": self.epsilon,
            **self._data.report_fields(),
            "accountant": self.accountant_name,
            "noise_multiplier": sigma,
            "batch_noise_multiplier": batch_noise_multiplier(sigma, self._noisy_steps_per_example),
            "epochs_per_batch": self._epochs_per_batch,
            "minibatches_per_batch": self._minibatches_per_batch,
            "noisy_steps_per_example_per_batch": self._noisy_steps_per_example,
            "max_grad_norm": self.max_grad_norm,
            **self._ledger.report_fields(self.delta),
            "mechanism": self._ledger.mechanism()
            + f"; each batch is {self._noisy_steps_per_example} steps of Gaussian(σ={sigma:.6g}) at sensitivity "
            f"C={self.max_grad_norm:g}",
            "poisson_sampling": self.poisson_sampling,
            "target_epsilon": self.target_epsilon,
            "max_epsilon": self.max_epsilon,
            "stopped_by_budget": self._stopped_by_budget,
            "world_size": self._world_size,
            "secret_randomness": self.sampling_seed is None and self.noise_seed is None,
            "secure_mode": self.secure_mode,
            "randomness": SECURE_MODE_COST if self.secure_mode else DEFAULT_RANDOMNESS,
            "warnings": list(self._warnings),
            "opacus_version": opacus.__version__,
        }
        metadata = stage_metadata(self._module) if self._module is not None else None
        if metadata is not None:
            report["stage"] = metadata
        return report

    @rank_zero_only
    def _write_report(self, trainer: pl.Trainer) -> None:
        """Write the report into the run's log dir (the stages export it next to the model)."""
        self.report_path = Path(self._report_dir or trainer.default_root_dir) / self.report_name
        write_json_atomic(self.report_path, self.report())

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._ledger.state_dict(),
            "noise_multiplier": self._noise_multiplier,
            "sample_rate": self.sample_rate,
            "dataset_size": None if self._data is None else self._data.num_units,
            "delta": self.delta,
            "batches_drawn": self._sampler.batches_drawn if self._sampler else self._ledger.batches,
            "accountant_name": self.accountant_name,
            "epochs_per_batch": self._epochs_per_batch,
            "minibatches_per_batch": self._minibatches_per_batch,
            "noisy_steps_per_example": self._noisy_steps_per_example,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["accountant_name"] != self.accountant_name:
            warnings.warn(
                f"resuming with accountant {self.accountant_name!r}; the checkpoint used "
                f"{state_dict['accountant_name']!r}. The history is re-evaluated with {self.accountant_name!r}.",
                stacklevel=2,
            )
        self._ledger.load_state_dict(state_dict)
        self._restored = state_dict

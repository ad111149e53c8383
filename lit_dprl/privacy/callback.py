"""``DPCallback``: DP-SGD for any LightningModule, built on Opacus — the privacy layer's wiring into Lightning.

The module and data carry no DP code but follow the contract in the package docstring (``__init__.py``). The
hooks below call ``patching`` (train loader, ``training_step``, per-example gradients), ``training_data`` (units,
Poisson sampler), ``randomness``, ``batches`` (steps per batch), ``budget`` (σ, ``max_epsilon``), the
``PrivacyLedger`` and ``summary`` (report).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader

from lit_dprl.privacy import batches, budget, fsdp, ghost, patching, randomness, refusals, summary
from lit_dprl.privacy.accounting import batch_noise_multiplier
from lit_dprl.privacy.ledger import PrivacyLedger
from lit_dprl.privacy.optimizers import wrap_optimizers
from lit_dprl.privacy.refusals import DPConfigurationError
from lit_dprl.privacy.report import REPORT_NAME, stage_metadata, write_json_atomic
from lit_dprl.privacy.sampling import PoissonDataLoader
from lit_dprl.privacy.steps import dp_training_step, set_step_units
from lit_dprl.privacy.training_data import TrainingData

__all__ = ["DPCallback", "DPConfigurationError"]

# Opacus's hooks make torch warn on every backward when the inputs need no grad (frozen embeddings, LoRA);
# the per-example gradients are right all the same (see the tests), so the message is only noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


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
        user_id_field: the dataset's user id column (see ``units.dataset_user_ids``).
        max_rows_per_user: under "user", use at most this many rows of each user (its first ones).
        grad_sample_mode: "hooks" (Opacus's per-example gradients) or "ghost" (ghost clipping, ``ghost.py``:
            per-example gradient norms without per-example gradients, then a backward of Σ_i c_i ℓ_i; the same
            update and ε in less memory). Ghost needs ``training_step`` to return ``"per_example_loss"`` (the
            contract's item 8), automatic optimization (not PPO/GRPO) on one process, DDP or FSDP (``fsdp.py``),
            row-level units and no ``max_physical_batch_size``.
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
        grad_sample_mode: Literal["hooks", "ghost"] = "hooks",
    ) -> None:
        refusals.check_arguments(
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            target_delta=target_delta,
            max_grad_norm=max_grad_norm,
            max_physical_batch_size=max_physical_batch_size,
            poisson_sampling=poisson_sampling,
            privacy_unit=privacy_unit,
            max_rows_per_user=max_rows_per_user,
            grad_sample_mode=grad_sample_mode,
        )
        self._secure_rng = randomness.secure_generator(sampling_seed, noise_seed) if secure_mode else None
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
        self.grad_sample_mode = grad_sample_mode
        self.report_path: Path | None = None  # where privacy.json was last written

        self._noise_multiplier = noise_multiplier
        self._ledger = PrivacyLedger(accountant)
        self._warnings: list[str] = []
        self._training = TrainingData(
            privacy_unit=privacy_unit,
            user_id_field=user_id_field,
            max_rows_per_user=max_rows_per_user,
            target_delta=target_delta,
            sampling_seed=sampling_seed,
            secure_rng=self._secure_rng,
            warn=self._warn,
        )
        self._restored: dict[str, Any] | None = None
        self._dp_optimizers: list = []
        self._shape = batches.BatchShape()
        self._budget = budget.Budget()
        self._open_batch: list[int] | None = None  # noisy steps at the start of the batch not yet accounted
        self._row_units: list[int] | None = None
        self._stopped_by_budget = False
        self._unpatch: list[patching.Undo] = []
        self._world_size, self._strategy = 1, None
        self._report_dir: str | None = None
        self._module: pl.LightningModule | None = None
        self._ghost_hooks: ghost.GhostNormHooks | None = None
        self._sharded: Any = None  # under FSDP: the zero-row batch a rank with an empty share runs (fsdp.py)

    # ------------------------------------------------------------------ public read-only state
    @property
    def epsilon(self) -> float:
        """ε spent so far (at ``delta``), over the whole accounting history (resumed runs included)."""
        return 0.0 if self.delta is None else self._ledger.epsilon(self.delta)

    @property
    def delta(self) -> float | None:
        """δ of the guarantee (known once the training set size is)."""
        return None if self._training.units is None else self._training.units.delta

    @property
    def noise_multiplier(self) -> float | None:
        """σ: noise std / C of every optimizer step (calibrated at train start if ``target_epsilon``)."""
        return self._noise_multiplier

    @property
    def sample_rate(self) -> float | None:
        """q = batch_size / N, the Poisson sampling rate of privacy units."""
        return None if self._training.units is None else self._training.units.sample_rate

    @property
    def steps(self) -> int:
        """Number of Poisson-sampled batches accounted so far."""
        return self._ledger.batches

    # ------------------------------------------------------------------ setup: refusals, patches, data
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refusals.refuse_trainer(trainer, pl_module, DPCallback)
        if self.grad_sample_mode == "ghost":
            refusals.refuse_ghost_trainer(trainer, pl_module)
        if fsdp.is_sharded(trainer):
            fsdp.refuse_sharded_trainer(trainer, self.grad_sample_mode)
        self._world_size, self._strategy = trainer.world_size, fsdp.strategy_description(trainer)
        randomness.refuse_secure_mode_across_ranks(self.secure_mode, trainer.world_size)
        self._module = pl_module
        self._warnings = []
        self._unpatch.append(patching.shadow(pl_module, "_lit_dprl_dp_callback", self))
        self._unpatch.append(patching.patch_training_step(pl_module, self._training_step))
        if self.poisson_sampling:
            poisson_loader = partial(self._poisson_loader, trainer=trainer)
            self._unpatch.append(patching.patch_train_dataloader(trainer, poisson_loader))

    def _poisson_loader(self, loader: DataLoader, trainer: pl.Trainer) -> PoissonDataLoader:
        # built after the checkpoint is restored (load_state_dict comes after setup): _restored is known here
        self._sharded = fsdp.zero_row_batch(loader) if fsdp.is_sharded(trainer) else None
        return self._training.poisson_loader(loader, trainer, self._restored)

    def _warn(self, message: str) -> None:
        if message not in self._warnings:
            self._warnings.append(message)
            rank_zero_warn(f"DPCallback: {message}")

    def _training_step(self, original: Callable[..., Any], batch: Any, *args: Any, **kwargs: Any) -> Any:
        if self._sharded is not None:
            batch = fsdp.fill_empty(batch, self._sharded, self._module.device)
        if self._ghost_hooks is not None:
            original = partial(ghost.ghost_training_step, self._ghost_hooks, self._dp_optimizers[0], original)
        return dp_training_step(
            self._module,
            original,
            batch,
            args,
            kwargs,
            steps_per_optimizer=self._shape.steps_per_optimizer,
            optimizers=self._dp_optimizers,
            max_physical_batch_size=self.max_physical_batch_size,
            row_units=self._row_units,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refusals.refuse_unsupported_modules(pl_module)
        if fsdp.is_sharded(trainer):
            fsdp.refuse_unsharded_parameters(trainer.strategy.optimizers, trainer)
            self._ghost_hooks = fsdp.hook_norms(pl_module, self.max_grad_norm)
            self._unpatch += [fsdp.sum_gradients(pl_module), self._ghost_hooks.cleanup]
            self._unpatch.append(partial(setattr, self, "_ghost_hooks", None))
        elif self.grad_sample_mode == "ghost":
            self._ghost_hooks = ghost.hook_norms(pl_module, self.max_grad_norm)
            patching.stop_ddp_gradient_sync(trainer)  # the clipped sums are all-reduced by the DP optimizer
            self._unpatch += [self._ghost_hooks.cleanup, partial(setattr, self, "_ghost_hooks", None)]
        else:
            self._unpatch.append(patching.hook_per_example_gradients(pl_module, trainer).cleanup)

    # ------------------------------------------------------------------ train start: σ, optimizers, budget
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_dir = trainer.log_dir  # a collective under DDP: read it on every rank, here
        self._remove_stale_report(trainer)
        if not self.poisson_sampling:
            self._training.fixed_batches(trainer, self._restored)
        self._shape = batches.batch_shape(
            pl_module,
            len(trainer.strategy.optimizers),
            max_physical_batch_size=self.max_physical_batch_size,
            privacy_unit=self.privacy_unit,
        )
        planned = refusals.planned_batches(trainer, self._shape.optimizer_steps)
        self._noise_multiplier = budget.fit_noise_multiplier(
            given=self._noise_multiplier,
            restored=self._restored,
            target_epsilon=self.target_epsilon,
            planned_batches=planned,
            delta=self.delta,
            sample_rate=self.sample_rate,
            shape=self._shape,
            accountant=self.accountant_name,
        )
        generator = randomness.noise_generator(
            pl_module.device,
            fixed_seed=self.noise_seed,
            batches=self._ledger.batches,
            secure=self._secure_rng,
        )
        local_batch = self._training.units.batch_size / (
            self._shape.minibatches_per_batch * trainer.world_size
        )
        self._dp_optimizers = wrap_optimizers(
            trainer,
            noise_multiplier=self._noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=local_batch,
            generator=generator,
            secure_mode=self.secure_mode,
            ghost=self.grad_sample_mode == "ghost",
            make=partial(fsdp.make_sharded_optimizer, rank=trainer.global_rank)
            if fsdp.is_sharded(trainer)
            else None,
        )
        self._open_batch = None
        self._budget = budget.plan_budget(
            self._ledger,
            trainer,
            max_epsilon=self.max_epsilon,
            noise_multiplier=self._noise_multiplier,
            shape=self._shape,
            planned_batches=planned,
            sample_rate=self.sample_rate,
            delta=self.delta,
        )

    @rank_zero_only
    def _remove_stale_report(self, trainer: pl.Trainer) -> None:
        (Path(self._report_dir or trainer.default_root_dir) / self.report_name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ per batch: check, account, log
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._budget.refuse_another(self._ledger, self.delta)
        self._open_batch = [opt.noisy_steps for opt in self._dp_optimizers]
        units, self._row_units = batches.units_in(batch, self._training.sampler, self.privacy_unit)
        for opt in self._dp_optimizers:
            opt.start_batch(units, self._shape.epochs_per_batch)
            set_step_units(opt, self._row_units, 0, len(self._row_units or ()))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        taken = batches.steps_taken(self._dp_optimizers, self._open_batch)
        self._account_batch()
        batches.check_steps_taken(taken, self._shape)
        if self._budget.stop_after(self._ledger.batches, trainer):
            self._stopped_by_budget = True
        summary.log_metrics(
            pl_module,
            trainer,
            self._ledger,
            delta=self.delta,
            noise_multiplier=self._noise_multiplier,
            sample_rate=self.sample_rate,
            planned_batches=self._budget.planned_batches,
            non_finite=sum(optimizer.non_finite_units for optimizer in self._dp_optimizers),
        )

    def _account_batch(self) -> None:
        self._ledger.record(
            batch_noise_multiplier(self._noise_multiplier, self._shape.noisy_steps_per_example),
            self.sample_rate,
            self._shape.optimizer_steps,
        )
        self._open_batch = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._open_batch is not None and any(batches.steps_taken(self._dp_optimizers, self._open_batch)):
            self._account_batch()  # noisy updates of this batch were already made: count the batch
        if self.delta is not None and self._noise_multiplier is not None:
            self._write_report(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._noise_multiplier is None and self._restored is not None:
            # resumed a finished run: no batch ran, the run's settings are the checkpoint's
            self._noise_multiplier = self._restored["noise_multiplier"]
            self._shape = batches.BatchShape.restored(self._restored)
            self._report_dir = trainer.log_dir
        if self.delta is not None:
            self._write_report(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        while self._unpatch:
            self._unpatch.pop()()

    # ------------------------------------------------------------------ report and checkpoint
    def report(self) -> dict[str, Any]:
        """What ``privacy.json`` holds: the guarantee, every parameter needed to recompute it, and warnings."""
        return summary.privacy_report(
            self._training.units,
            self._ledger,
            noise_multiplier=self._noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            grad_sample_mode=self.grad_sample_mode,
            shape=self._shape,
            poisson_sampling=self.poisson_sampling,
            target_epsilon=self.target_epsilon,
            max_epsilon=self.max_epsilon,
            stopped_by_budget=self._stopped_by_budget,
            world_size=self._world_size,
            strategy=self._strategy,
            secret_randomness=self.sampling_seed is None and self.noise_seed is None,
            secure_mode=self.secure_mode,
            warnings=self._warnings,
            stage=stage_metadata(self._module) if self._module is not None else None,
        )

    @rank_zero_only
    def _write_report(self, trainer: pl.Trainer) -> None:
        """Write the report into the run's log dir (the stages export it next to the model)."""
        self.report_path = Path(self._report_dir or trainer.default_root_dir) / self.report_name
        write_json_atomic(self.report_path, self.report())

    def state_dict(self) -> dict[str, Any]:
        sampler = self._training.sampler
        return {
            **self._ledger.state_dict(),
            "noise_multiplier": self._noise_multiplier,
            "sample_rate": self.sample_rate,
            "dataset_size": None if self._training.units is None else self._training.units.num_units,
            "delta": self.delta,
            "batches_drawn": sampler.batches_drawn if sampler else self._ledger.batches,
            "accountant_name": self.accountant_name,
            **asdict(self._shape),  # epochs_per_batch, minibatches_per_batch, noisy_steps_per_example
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

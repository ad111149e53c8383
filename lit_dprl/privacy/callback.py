"""``DPCallback``: DP-SGD for any LightningModule, built on Opacus.

Attach it to a ``Trainer`` and the run trains with per-example clipping, Gaussian noise, Poisson
sampling and privacy accounting. The module and data carry no DP code; they follow this contract:

1. The training loss is the mean over the batch of per-example losses (one row = one privacy unit);
   nothing in the loss mixes rows (no batch normalisation, whitening or batch-wide token means).
2. The training data comes from one map-style ``DataLoader`` with an integer ``batch_size``; the
   callback keeps its dataset and ``collate_fn`` and draws batches by Poisson sampling at
   q = batch_size / N (N = ``len(dataset)``). Empty batches never reach ``training_step``.
3. Every trainable parameter belongs to the module and is in one of its optimizers.
4. A manual-optimization module that takes several steps per batch declares it with integer
   attributes ``epochs_per_batch`` (passes over the batch; each example takes part in one step per
   pass — PPO's ``ppo_epochs``) and ``minibatches_per_batch`` (steps per pass; PPO's
   ``num_mini_batches``), and takes exactly that many steps per optimizer, empty minibatches
   included (skip forward/backward, still call ``step()``). The callback checks the count.
5. Forwards that are not part of the loss (generation, scoring) run under ``torch.no_grad()``.
6. A module may list settings that would couple examples in ``privacy_hazards() -> list[str]``;
   the callback refuses to run while that list is non-empty. If it has an ``export_dir`` (attribute or
   hyperparameter),
   ``privacy.json`` is also written there, next to the exported model.

Accounting: one Poisson batch at rate q is one event ``PoissonSampled(q, k × Gaussian(σ))`` with
k = (number of optimizers) × ``epochs_per_batch`` (see ``accounting.py``). Values logged during
training (losses, metrics) are not private; only the trained weights carry the guarantee.
"""

from __future__ import annotations

import json
import math
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import opacus
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from opacus.grad_sample import GradSampleHooks
from opacus.validators import ModuleValidator
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lit_dprl.privacy.accounting import (
    batch_noise_multiplier,
    calibrate_noise_multiplier,
    epsilon_after,
    make_accountant,
    max_batches_within,
)
from lit_dprl.privacy.optimizers import make_dp_optimizer
from lit_dprl.privacy.sampling import EmptyBatch, PoissonBatchSampler, PoissonDataLoader, derive_seed

# Opacus's hooks make torch warn on every backward when the inputs need no grad (frozen embeddings, LoRA);
# the per-example gradients are right all the same (see the tests), so the message is only noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


class DPConfigurationError(ValueError):
    """A configuration that would silently break the differential-privacy guarantee."""


def _tensors(batch: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    apply_to_collection(batch, torch.Tensor, found.append)
    return found


def _secret_seed() -> int:
    return secrets.randbits(62)


class DPCallback(Callback):
    """Differentially private training (DP-SGD) for a LightningModule.

    Args:
        target_epsilon: calibrate σ so that the planned run (``max_steps``/``max_epochs``) spends this ε.
        noise_multiplier: use this σ instead (exactly one of the two must be given).
        target_delta: δ; defaults to 1/N (N = training examples). A δ above 1/N is refused.
        max_grad_norm: per-example clipping norm C.
        accountant: "prv" (Gopi et al., as in the paper) or "rdp".
        poisson_sampling: draw each batch by Poisson sampling (what the accountant assumes). With
            False the user's shuffled fixed-size batches are kept and the reported ε is the usual
            approximation that treats them as Poisson samples.
        max_epsilon: stop training before a batch would make ε exceed this budget; defaults to
            ``target_epsilon`` (so a resumed or extended run never overspends).
        sampling_seed: fixed seed for Poisson sampling. Default: a secret random seed. The guarantee
            assumes the sampling and noise randomness is secret: fix seeds only for reproducible tests.
        noise_seed: fixed seed for the Gaussian noise (default: a secret random seed).
        report_name: file written into the run's log dir at the end of fit.
        max_physical_batch_size: split each sampled batch into chunks of at most this many examples
            (automatic optimization): per-example gradients of all chunks are clipped and summed, and the
            noise is added once, so the step is the same as on the whole batch, in less memory. This is
            the DP replacement for ``accumulate_grad_batches``.
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
        report_name: str = "privacy.json",
        max_physical_batch_size: int | None = None,
    ) -> None:
        if (target_epsilon is None) == (noise_multiplier is None):
            raise DPConfigurationError(
                "give exactly one of target_epsilon and noise_multiplier, got "
                f"target_epsilon={target_epsilon} and noise_multiplier={noise_multiplier}; to replace the one "
                "a config sets, set it to null (e.g. --trainer.callbacks.init_args.target_epsilon=null)"
            )
        if target_epsilon is not None and target_epsilon <= 0:
            raise DPConfigurationError(f"target_epsilon must be positive, got {target_epsilon}")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise DPConfigurationError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if max_grad_norm <= 0:
            raise DPConfigurationError(f"max_grad_norm must be positive, got {max_grad_norm}")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise DPConfigurationError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        if target_delta is not None and not 0 < target_delta < 1:
            raise DPConfigurationError(f"target_delta must be in (0, 1), got {target_delta}")
        make_accountant(accountant)  # validates the name
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

        self._noise_multiplier = noise_multiplier
        self._accountant = make_accountant(accountant)
        self._batches = 0
        self._optimizer_steps = 0
        self._dataset_size: int | None = None
        self._batch_size: int | None = None
        self._sample_rate: float | None = None
        self._delta: float | None = None
        self._restored: dict[str, Any] | None = None
        self._sampler: PoissonBatchSampler | None = None
        self._hooks: GradSampleHooks | None = None
        self._dp_optimizers: list = []
        self._steps_at_batch_start: list[int] = []
        self._batch_accounted = True
        self._max_batches: int | None = None
        self._planned_batches: int | None = None
        self._stopped_by_budget = False
        self._epsilon_cache: tuple[int, float] = (0, 0.0)
        self._unpatch: list[Callable[[], None]] = []
        self._world_size = 1
        self._report_dir: str | None = None

    # ------------------------------------------------------------------ public read-only state
    @property
    def epsilon(self) -> float:
        """ε spent so far (at ``delta``)."""
        if self._batches == 0 or self._delta is None:
            return 0.0
        if self._epsilon_cache[0] != self._batches:
            eps = (
                float(self._accountant.get_epsilon(delta=self._delta)) if self.noise_multiplier else math.inf
            )
            self._epsilon_cache = (self._batches, eps)
        return self._epsilon_cache[1]

    @property
    def delta(self) -> float | None:
        """δ of the guarantee (known once the training set size is)."""
        return self._delta

    @property
    def noise_multiplier(self) -> float | None:
        """σ: noise std / C of every optimizer step (calibrated at train start if ``target_epsilon``)."""
        return self._noise_multiplier

    @property
    def sample_rate(self) -> float | None:
        """q = batch_size / N, the Poisson sampling rate."""
        return self._sample_rate

    @property
    def steps(self) -> int:
        """Number of Poisson-sampled batches accounted so far."""
        return self._batches

    # ------------------------------------------------------------------ setup: refusals, data, hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if sum(isinstance(cb, DPCallback) for cb in trainer.callbacks) > 1:
            raise DPConfigurationError(
                "more than one DPCallback is attached to this Trainer; attach exactly one"
            )
        if getattr(pl_module, "_lit_dprl_dp_callback", None) is not None:
            raise DPConfigurationError(
                "this LightningModule already has DP hooks attached (by another DPCallback or an unfinished "
                "fit); attach one DPCallback and let each fit finish"
            )
        if hasattr(pl_module, "autograd_grad_sample_hooks"):
            raise DPConfigurationError("this LightningModule already carries Opacus hooks; remove them first")
        if trainer.accumulate_grad_batches != 1:
            raise DPConfigurationError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} is refused under DP: accumulating "
                "Poisson batches changes the sampling the accountant assumes. Set accumulate_grad_batches=1 and "
                "raise the DataModule's batch_size instead (the Poisson rate is q = batch_size / N); if memory is "
                "the limit, set DPCallback(max_physical_batch_size=...)."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise DPConfigurationError(
                f"precision={trainer.precision!r} uses a GradScaler: per-example gradients would be clipped in "
                "scaled units. Use precision='32-true' or 'bf16-mixed'."
            )
        if (
            not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy)
            or "fsdp" in type(trainer.strategy).__name__.lower()
        ):
            raise DPConfigurationError(
                f"strategy {type(trainer.strategy).__name__} is not supported by DPCallback; use a single "
                "device or strategy='ddp' (or 'ddp_spawn')"
            )
        hazards = pl_module.privacy_hazards() if hasattr(pl_module, "privacy_hazards") else []
        if hazards:
            raise DPConfigurationError(
                "settings that break the per-example guarantee: "
                + "; ".join(hazards)
                + ". Turn them off for a private run (they remain available without DPCallback)."
            )
        self._world_size = trainer.world_size
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
        try:
            n = len(loader.dataset)
        except TypeError as err:
            raise DPConfigurationError("the training dataset must be map-style with a length") from err
        self._set_data_size(n, loader.batch_size)
        sampler = PoissonBatchSampler(
            num_samples=n,
            sample_rate=self._sample_rate,
            num_batches=max(1, round(1 / self._sample_rate)),
            seed=self._shared_sampling_seed(trainer),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            batches_drawn=self._restored["batches_drawn"] if self._restored else 0,
        )
        self._sampler = sampler
        return PoissonDataLoader(loader, sampler)

    def _shared_sampling_seed(self, trainer: pl.Trainer) -> int:
        seed = self.sampling_seed if self.sampling_seed is not None else _secret_seed()
        return trainer.strategy.broadcast(seed, src=0)

    def _set_data_size(self, n: int, global_batch_size: int) -> None:
        if global_batch_size > n:
            raise DPConfigurationError(
                f"batch_size {global_batch_size} exceeds the {n} training examples; use a smaller batch_size"
            )
        if self._restored and self._restored["dataset_size"] != n:
            raise DPConfigurationError(
                f"the checkpoint was trained on {self._restored['dataset_size']} examples but the training set now "
                f"has {n}: resuming on different data invalidates the privacy accounting"
            )
        self._dataset_size = n
        self._batch_size = global_batch_size
        self._sample_rate = global_batch_size / n
        delta = self.target_delta if self.target_delta is not None else 1.0 / n
        if delta > 1.0 / n:
            raise DPConfigurationError(
                f"target_delta={delta:g} is above 1/N = {1.0 / n:g} (N = {n} training examples): such a δ allows "
                "releasing a whole example. Use target_delta <= 1/N (the default is 1/N)."
            )
        self._delta = delta

    def _patch_training_step(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(batch, EmptyBatch):
                if not pl_module.automatic_optimization:
                    self._noise_only_manual_steps(pl_module)
                return None  # automatic optimization: the DP optimizer still takes a noise-only step
            if self.max_physical_batch_size and pl_module.automatic_optimization:
                batch = self._accumulate_leading_chunks(batch, original, args, kwargs)
            return original(batch, *args, **kwargs)

        pl_module.training_step = training_step
        self._unpatch.append(lambda: delattr(pl_module, "training_step"))

    def _accumulate_leading_chunks(
        self, batch: Any, training_step: Callable, args: tuple, kwargs: dict
    ) -> Any:
        """Run all but the last chunk of ``batch`` here, clipping and summing their per-example gradients into
        the DP optimizer (a skipped step); return the last chunk for Lightning's usual step, which adds noise."""
        sizes = {len(t) for t in _tensors(batch)}
        if len(sizes) != 1:
            raise DPConfigurationError(
                "max_physical_batch_size needs a batch of tensors sharing their first dimension"
            )
        size = sizes.pop()
        starts = list(range(0, size, self.max_physical_batch_size))
        (optimizer,) = self._dp_optimizers
        optimizer.zero_grad()  # Lightning zeroes only after training_step; the chunks below come first
        for start in starts[:-1]:
            chunk = apply_to_collection(
                batch, torch.Tensor, lambda t, s=start: t[s : s + self.max_physical_batch_size]
            )
            loss = training_step(chunk, *args, **kwargs)
            (loss["loss"] if isinstance(loss, dict) else loss).backward()
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()
            optimizer.zero_grad()
        return apply_to_collection(batch, torch.Tensor, lambda t: t[starts[-1] :])

    def _noise_only_manual_steps(self, pl_module: pl.LightningModule) -> None:
        optimizers = pl_module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for _ in range(self._steps_per_batch(pl_module)):
            for optimizer in optimizers:
                optimizer.zero_grad()
                optimizer.step()

    @staticmethod
    def _batch_reuse(pl_module: pl.LightningModule) -> tuple[int, int]:
        epochs = getattr(pl_module, "epochs_per_batch", 1)
        minibatches = getattr(pl_module, "minibatches_per_batch", 1)
        for name, value in (("epochs_per_batch", epochs), ("minibatches_per_batch", minibatches)):
            if not isinstance(value, int) or value < 1:
                raise DPConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if pl_module.automatic_optimization and (epochs, minibatches) != (1, 1):
            raise DPConfigurationError(
                "epochs_per_batch/minibatches_per_batch > 1 need manual optimization (one step per batch otherwise)"
            )
        return epochs, minibatches

    def _steps_per_batch(self, pl_module: pl.LightningModule) -> int:
        epochs, minibatches = self._batch_reuse(pl_module)
        return epochs * minibatches

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_unsupported_modules(pl_module)
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

    def _refuse_unsupported_modules(self, pl_module: pl.LightningModule) -> None:
        errors = [
            str(e) for e in ModuleValidator.validate(pl_module, strict=False) if "training mode" not in str(e)
        ]
        errors += [
            f"{name} ({type(m).__name__}) normalises with batch statistics, which couples examples"
            for name, m in pl_module.named_modules()
            if isinstance(m, _BatchNorm) and m.training
        ]
        if errors:
            raise DPConfigurationError(
                "modules that per-example clipping cannot handle: "
                + "; ".join(errors)
                + ". Replace them (e.g. opacus.validators.ModuleValidator.fix turns BatchNorm into GroupNorm)."
            )
        module_params = {id(p) for p in pl_module.parameters()}
        for optimizer in pl_module.trainer.strategy.optimizers:
            for group in optimizer.param_groups:
                if any(p.requires_grad and id(p) not in module_params for p in group["params"]):
                    raise DPConfigurationError(
                        "an optimizer holds trainable parameters that are not in the LightningModule; Opacus "
                        "only computes per-example gradients for the module's own parameters"
                    )

    # ------------------------------------------------------------------ train start: σ, optimizers, budget
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_dir = trainer.log_dir  # a collective under DDP: read it on every rank, here
        if not self.poisson_sampling:
            loader = trainer.train_dataloader
            batch_size = getattr(loader, "batch_size", None)
            if not isinstance(batch_size, int):
                raise DPConfigurationError("the training DataLoader must have an integer batch_size")
            self._set_data_size(len(loader.dataset), batch_size * trainer.world_size)
            rank_zero_warn(
                "DPCallback(poisson_sampling=False): batches are shuffled, not Poisson-sampled; the reported ε treats "
                "them as Poisson samples at q = batch/N, an approximation the guarantee does not cover exactly."
            )
        epochs, minibatches = self._batch_reuse(pl_module)
        if self.max_physical_batch_size and not pl_module.automatic_optimization:
            raise DPConfigurationError(
                "max_physical_batch_size works with automatic optimization; a manual-optimization module takes its "
                "own steps (PPO: use more num_mini_batches or a smaller batch)"
            )
        optimizers = trainer.strategy.optimizers
        if not optimizers:
            raise DPConfigurationError("the module configures no optimizer; DP needs one to add noise")
        self._noisy_steps_per_example = len(optimizers) * epochs
        self._optimizer_steps_per_batch = len(optimizers) * epochs * minibatches
        self._planned_batches = self._plan_batches(trainer)
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
                delta=self._delta,
                sample_rate=self._sample_rate,
                batches=self._planned_batches,
                noisy_steps_per_example=self._noisy_steps_per_example,
                accountant=self.accountant_name,
            )
        expected_local_batch = self._dataset_size * self._sample_rate / (minibatches * trainer.world_size)
        generator = torch.Generator(device=pl_module.device)
        seed = self.noise_seed if self.noise_seed is not None else _secret_seed()
        generator.manual_seed(derive_seed(seed, self._batches))
        self._dp_optimizers = [
            make_dp_optimizer(
                opt,
                noise_multiplier=self._noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=expected_local_batch,
                distributed=trainer.world_size > 1,
                generator=generator,
            )
            for opt in optimizers
        ]
        trainer.strategy.optimizers = self._dp_optimizers
        self._max_batches = self._budget_limit()
        if self._max_batches is not None and self._max_batches <= self._batches:
            raise DPConfigurationError(
                f"the privacy budget ε={self.max_epsilon} allows no further step (spent {self.epsilon:.3f} in "
                f"{self._batches} batches at σ={self._noise_multiplier:.4g}); raise max_epsilon or the noise"
            )

    def _plan_batches(self, trainer: pl.Trainer) -> int | None:
        plans = []
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            plans.append(math.ceil(trainer.max_steps / self._optimizer_steps_per_batch))
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and math.isfinite(trainer.num_training_batches):
            plans.append(max_epochs * int(trainer.num_training_batches))
        return min(plans) if plans else None

    def _budget_limit(self) -> int | None:
        if self.max_epsilon is None:
            return None
        batch_noise = batch_noise_multiplier(self._noise_multiplier, self._noisy_steps_per_example)
        upper = max(self._planned_batches or 0, self._batches + 1)
        return max_batches_within(
            budget=self.max_epsilon,
            accountant=self.accountant_name,
            batch_noise=batch_noise,
            sample_rate=self._sample_rate,
            delta=self._delta,
            upper=upper,
        )

    # ------------------------------------------------------------------ per batch: check, account, log
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._steps_at_batch_start = [opt.noisy_steps for opt in self._dp_optimizers]
        self._batch_accounted = False

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
        if self._max_batches is not None and self._batches >= self._max_batches and not trainer.should_stop:
            if self._planned_batches is None or self._batches < self._planned_batches:
                self._stopped_by_budget = True
                rank_zero_warn(
                    f"DPCallback: stopping after {self._batches} batches: one more would exceed ε={self.max_epsilon}"
                )
            trainer.should_stop = True
        self._log(trainer, pl_module)

    def _account_batch(self) -> None:
        self._accountant.step(
            noise_multiplier=batch_noise_multiplier(self._noise_multiplier, self._noisy_steps_per_example),
            sample_rate=self._sample_rate,
        )
        self._batches += 1
        self._optimizer_steps += self._optimizer_steps_per_batch
        self._batch_accounted = True

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = self._batches == self._planned_batches or trainer.should_stop
        if self._batches % trainer.log_every_n_steps == 0 or last or self._batches == 1:
            eps = self.epsilon
        else:
            eps = self._epsilon_cache[1]
        pl_module.log("dp/epsilon", eps, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(
            "dp/noise_multiplier", self._noise_multiplier, on_step=True, on_epoch=False, batch_size=1
        )
        pl_module.log("dp/sample_rate", self._sample_rate, on_step=True, on_epoch=False, batch_size=1)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        partial_batch = len(self._steps_at_batch_start) == len(self._dp_optimizers) and any(
            opt.noisy_steps > start
            for opt, start in zip(self._dp_optimizers, self._steps_at_batch_start, strict=True)
        )
        if partial_batch and not self._batch_accounted:
            self._account_batch()  # noisy updates of this batch were already made: count the batch
        if self._delta is not None and self._noise_multiplier is not None:
            self._write_report(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._delta is not None:
            export_dir = getattr(pl_module, "export_dir", None) or pl_module.hparams.get("export_dir")
            self._write_report(trainer, export_dir)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        while self._unpatch:
            self._unpatch.pop()()
        self._hooks = None

    # ------------------------------------------------------------------ report and checkpoint
    def report(self) -> dict[str, Any]:
        """What ``privacy.json`` holds: the guarantee and every parameter needed to recompute it."""
        noisy_steps = getattr(self, "_noisy_steps_per_example", 1)
        return {
            "epsilon": self.epsilon,
            "delta": self._delta,
            "accountant": self.accountant_name,
            "noise_multiplier": self._noise_multiplier,
            "batch_noise_multiplier": batch_noise_multiplier(self._noise_multiplier, noisy_steps),
            "noisy_steps_per_example_per_batch": noisy_steps,
            "sample_rate": self._sample_rate,
            "steps": self._batches,
            "optimizer_steps": self._optimizer_steps,
            "max_grad_norm": self.max_grad_norm,
            "dataset_size": self._dataset_size,
            "expected_batch_size": self._batch_size,
            "poisson_sampling": self.poisson_sampling,
            "target_epsilon": self.target_epsilon,
            "max_epsilon": self.max_epsilon,
            "stopped_by_budget": self._stopped_by_budget,
            "epsilon_rdp": epsilon_after(
                accountant="rdp",
                batch_noise=batch_noise_multiplier(self._noise_multiplier, noisy_steps),
                sample_rate=self._sample_rate,
                batches=self._batches,
                delta=self._delta,
            ),
            "world_size": self._world_size,
            "secret_randomness": self.sampling_seed is None and self.noise_seed is None,
            "mechanism": (
                f"{self._batches} × PoissonSampled(q={self._sample_rate:.6g}, {noisy_steps} × Gaussian(σ="
                f"{self._noise_multiplier:.6g}, sensitivity C={self.max_grad_norm:g}))"
            ),
            "privacy_unit": "one training example (one row of the training dataset)",
            "opacus_version": opacus.__version__,
        }

    @rank_zero_only
    def _write_report(self, trainer: pl.Trainer, export_dir: str | None = None) -> None:
        """Write the report into the log dir and, next to the exported model, into ``export_dir``."""
        text = json.dumps(self.report(), indent=2, ensure_ascii=False) + "\n"
        directories = [Path(self._report_dir or trainer.default_root_dir)]
        if export_dir:
            directories.append(Path(export_dir))
        for directory in directories:
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / self.report_name
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(target)
        self.report_path = directories[0] / self.report_name

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self._accountant.state_dict(),
            "batches": self._batches,
            "optimizer_steps": self._optimizer_steps,
            "noise_multiplier": self._noise_multiplier,
            "sample_rate": self._sample_rate,
            "dataset_size": self._dataset_size,
            "delta": self._delta,
            "batches_drawn": self._sampler.batches_drawn if self._sampler else self._batches,
            "accountant_name": self.accountant_name,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["accountant_name"] != self.accountant_name:
            warnings.warn(
                f"resuming with accountant {self.accountant_name!r}; the checkpoint used "
                f"{state_dict['accountant_name']!r}. The history is re-evaluated with {self.accountant_name!r}.",
                stacklevel=2,
            )
        self._accountant.history = list(state_dict["accountant"]["history"])
        self._batches = state_dict["batches"]
        self._optimizer_steps = state_dict["optimizer_steps"]
        self._restored = state_dict

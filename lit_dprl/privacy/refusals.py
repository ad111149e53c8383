"""Configurations that DPCallback refuses (each would silently break the guarantee it reports), and the
run lengths it reads from the Trainer to enforce the budget."""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from opacus.validators import ModuleValidator
from torch.nn.modules.batchnorm import _BatchNorm

SECURE_MODE_COST = (
    "secure_mode draws the Poisson samples and the noise from the OS's cryptographically secure generator "
    "(torchcsprng, /dev/urandom) and makes each noise coordinate the halved sum of four Gaussian draws "
    "(Opacus's defence against floating-point attacks): about 4x the noise-generation time, and runs are "
    "not reproducible"
)

DEFAULT_RANDOMNESS = (
    "torch's Mersenne Twister seeded with 62 secret bits from the OS (the secrets module): secret, but neither "
    "cryptographically secure nor protected against floating-point attacks on the noise"
)


class DPConfigurationError(ValueError):
    """A configuration that would silently break the differential-privacy guarantee."""


def check_arguments(
    *,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    target_delta: float | None,
    max_grad_norm: float,
    max_physical_batch_size: int | None,
    poisson_sampling: bool,
    privacy_unit: str,
    max_rows_per_user: int | None,
    grad_sample_mode: str = "hooks",
) -> None:
    """Refuse DPCallback arguments that are out of range or contradict each other."""
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
    if privacy_unit not in ("row", "user"):
        raise DPConfigurationError(f"privacy_unit must be 'row' or 'user', got {privacy_unit!r}")
    if max_rows_per_user is not None and (privacy_unit != "user" or max_rows_per_user < 1):
        raise DPConfigurationError(
            "max_rows_per_user must be a positive integer and needs privacy_unit='user'"
        )
    if privacy_unit == "user" and not poisson_sampling:
        raise DPConfigurationError(
            "privacy_unit='user' samples users by Poisson sampling: keep poisson_sampling"
        )
    if grad_sample_mode not in ("hooks", "ghost"):
        raise DPConfigurationError(f"grad_sample_mode must be 'hooks' or 'ghost', got {grad_sample_mode!r}")
    if grad_sample_mode == "ghost" and privacy_unit == "user":
        raise DPConfigurationError(
            "grad_sample_mode='ghost' clips one gradient per row and cannot average a user's rows first: "
            "use grad_sample_mode: hooks with privacy_unit='user'"
        )
    if grad_sample_mode == "ghost" and max_physical_batch_size is not None:
        raise DPConfigurationError(
            "grad_sample_mode='ghost' does not split batches (it needs no per-example gradients, so a batch "
            "that fits without DP fits with it): drop max_physical_batch_size, or use grad_sample_mode: hooks"
        )


def refuse_ghost_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse what ``grad_sample_mode='ghost'`` does not serve: manual optimization (PPO/GRPO)."""
    if not pl_module.automatic_optimization:
        raise DPConfigurationError(
            "grad_sample_mode='ghost' needs automatic optimization (the callback runs the norm pass inside "
            f"training_step and hands Lightning the clipped loss); {type(pl_module).__name__} optimizes "
            "manually (PPO/GRPO): use grad_sample_mode: hooks"
        )


def refuse_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, callback_type: type) -> None:
    """Refuse Trainer settings and module states under which DP-SGD's accounting would not hold."""
    if sum(isinstance(cb, callback_type) for cb in trainer.callbacks) > 1:
        raise DPConfigurationError("more than one DPCallback is attached to this Trainer; attach exactly one")
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
    strategy = trainer.strategy
    if (
        not isinstance(strategy, SingleDeviceStrategy | DDPStrategy | ModelParallelStrategy)
        or "fsdp" in type(strategy).__name__.lower()
    ):
        raise DPConfigurationError(
            f"strategy {type(strategy).__name__} is not supported by DPCallback; use a single "
            "device, strategy='ddp' (or 'ddp_spawn'), or FSDP2 through ModelParallelStrategy with "
            "grad_sample_mode='ghost'"
        )
    hazards = pl_module.privacy_hazards() if hasattr(pl_module, "privacy_hazards") else []
    if hazards:
        raise DPConfigurationError(
            "settings that break the per-example guarantee: "
            + "; ".join(hazards)
            + ". Turn them off for a private run (they remain available without DPCallback)."
        )


def refuse_unsupported_modules(pl_module: pl.LightningModule) -> None:
    """Refuse layers Opacus cannot give per-example gradients for, batch statistics, foreign parameters."""
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


def batch_reuse(pl_module: pl.LightningModule) -> tuple[int, int]:
    """``(epochs_per_batch, minibatches_per_batch)`` the module declares (1, 1 by default), checked."""
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


def planned_batches(trainer: pl.Trainer, optimizer_steps_per_batch: int) -> int | None:
    """Batches the run plans (``max_steps``/``max_epochs``, the first reached), None if unbounded."""
    plans = []
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        plans.append(math.ceil(trainer.max_steps / optimizer_steps_per_batch))
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and math.isfinite(trainer.num_training_batches):
        plans.append(max_epochs * int(trainer.num_training_batches))
    return min(plans) if plans else None


def forced_batches(trainer: pl.Trainer, optimizer_steps_per_batch: int) -> int:
    """Batches that ``min_steps``/``min_epochs`` force Lightning to train (it ignores a stop before them)."""
    forced = 0
    if trainer.fit_loop.min_steps:
        forced = math.ceil(trainer.fit_loop.min_steps / optimizer_steps_per_batch)
    min_epochs = trainer.fit_loop.min_epochs
    if min_epochs and math.isfinite(trainer.num_training_batches):
        forced = max(forced, min_epochs * int(trainer.num_training_batches))
    return forced


def secure_rng_module() -> ModuleType:
    """``torchcsprng``, which Opacus's secure mode draws from; refused with the reason when it is missing."""
    try:
        return importlib.import_module("torchcsprng")
    except ImportError as err:
        raise DPConfigurationError(
            "secure_mode=True needs torchcsprng (Opacus's cryptographically secure generator), which is not "
            "installed; its last release (0.2.1, 2021) has no build for current torch or Python, so this "
            "environment cannot provide secure randomness. Without secure_mode the sampling and noise come "
            "from " + DEFAULT_RANDOMNESS + ". " + SECURE_MODE_COST + "."
        ) from err

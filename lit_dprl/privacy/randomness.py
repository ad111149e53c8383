"""The randomness the guarantee rests on: the Poisson sampler's seed and the noise generator.

Both are secret by default (62 bits from the OS), fixed only when a test asks for reproducibility, or drawn
from a cryptographically secure generator under ``secure_mode``.
"""

from __future__ import annotations

import secrets
from typing import Any

import lightning.pytorch as pl
import torch

from lit_dprl.privacy.refusals import DPConfigurationError, secure_rng_module
from lit_dprl.privacy.sampling import PoissonBatchSampler, derive_seed
from lit_dprl.privacy.units import TrainingUnits


def secret_seed() -> int:
    """62 secret bits from the OS."""
    return secrets.randbits(62)


def secure_generator(sampling_seed: int | None, noise_seed: int | None) -> Any:
    """``secure_mode``'s generator (the OS's, through torchcsprng); refused with fixed seeds."""
    if sampling_seed is not None or noise_seed is not None:
        raise DPConfigurationError("secure_mode draws from the OS's secure generator: give no seeds")
    return secure_rng_module().create_random_device_generator("/dev/urandom")


def refuse_secure_mode_across_ranks(secure_mode: bool, world_size: int) -> None:
    """Refuse ``secure_mode`` on several ranks: they could not share the OS generator's Poisson samples."""
    if secure_mode and world_size > 1:
        raise DPConfigurationError(
            "secure_mode draws each Poisson sample from the OS's generator, which ranks cannot share: "
            "use one device with secure_mode"
        )


def shared_sampling_seed(trainer: pl.Trainer, fixed: int | None) -> int:
    """``fixed``, or a secret seed broadcast from rank 0: every rank must draw the same global samples."""
    if fixed is not None:
        return fixed
    seed = torch.tensor([secret_seed()], dtype=torch.int64)
    if trainer.world_size > 1:
        seed = trainer.strategy.broadcast(seed, src=0)
    return int(seed.item())


def poisson_sampler(
    data: TrainingUnits, trainer: pl.Trainer, *, seed: int | None, drawn: int, generator: Any
) -> PoissonBatchSampler:
    """This rank's sampler of Poisson batches of ``data``'s units (``drawn`` of them drawn before a resume),
    seeded with ``seed`` or a shared secret seed, or drawing from the secure ``generator``."""
    return PoissonBatchSampler(
        num_samples=data.num_units,
        sample_rate=data.sample_rate,
        num_batches=max(1, round(1 / data.sample_rate)),
        seed=shared_sampling_seed(trainer, seed),
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        batches_drawn=drawn,
        units=data.rows_of_unit,
        generator=generator,
    )


def noise_generator(device: torch.device, *, fixed_seed: int | None, batches: int, secure: Any) -> Any:
    """One noise stream for all optimizers (so their noises are independent draws): the ``secure`` generator
    if given, else torch's, seeded from ``fixed_seed`` (or a secret seed) and the ``batches`` accounted so far."""
    if secure is not None:
        return secure
    seed = fixed_seed if fixed_seed is not None else secret_seed()
    return torch.Generator(device=device).manual_seed(derive_seed(seed, batches))

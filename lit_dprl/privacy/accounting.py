"""Privacy accounting for what actually runs: one Poisson-sampled batch = one accounted event.

A batch drawn at rate q may be used for k noisy optimizer steps in which each sampled example takes
part once (k = number of DP optimizers × epochs over the batch; PPO with ``ppo_epochs=T`` and one
optimizer gives k = T). Each step is a Gaussian mechanism with sensitivity C and noise σC, so the
batch's mechanism is ``PoissonSampled(q, compose(k × Gaussian(σ)))``. A composition of k Gaussian
mechanisms with multiplier σ is exactly one Gaussian mechanism with multiplier ``σ/√k`` (their privacy
loss distributions add), so each batch is one Opacus accountant step with ``σ_batch = σ/√k`` at rate q.
The accountants themselves (PRV, RDP) are Opacus's.
"""

from __future__ import annotations

import math

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")


def batch_noise_multiplier(noise_multiplier: float, noisy_steps_per_example: int) -> float:
    """``σ_batch = σ / √k``: the single Gaussian equivalent to k composed steps with multiplier σ."""
    return noise_multiplier / math.sqrt(noisy_steps_per_example)


def make_accountant(name: str) -> IAccountant:
    """An empty Opacus accountant ("prv" or "rdp")."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return create_accountant(mechanism=name)


def epsilon_after(
    *, accountant: str, batch_noise: float, sample_rate: float, batches: int, delta: float
) -> float:
    """ε spent after ``batches`` Poisson-sampled batches with per-batch multiplier ``batch_noise``."""
    if batches == 0:
        return 0.0
    if batch_noise == 0.0:
        return math.inf
    acc = make_accountant(accountant)
    acc.history = [(batch_noise, sample_rate, batches)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    batches: int,
    noisy_steps_per_example: int,
    accountant: str,
) -> float:
    """The per-step σ whose ``batches`` Poisson batches (k steps each) spend at most ``target_epsilon``."""
    batch_noise = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=batches,
        accountant=accountant,
        epsilon_tolerance=0.01,
    )
    return batch_noise * math.sqrt(noisy_steps_per_example)


def max_batches_within(
    *, budget: float, accountant: str, batch_noise: float, sample_rate: float, delta: float, upper: int
) -> int:
    """The largest n ≤ ``upper`` with ε(n batches) ≤ ``budget`` (ε grows with n: binary search)."""
    if (
        epsilon_after(
            accountant=accountant,
            batch_noise=batch_noise,
            sample_rate=sample_rate,
            batches=upper,
            delta=delta,
        )
        <= budget
    ):
        return upper
    low, high = 0, upper  # ε(low) <= budget < ε(high)
    while high - low > 1:
        mid = (low + high) // 2
        eps = epsilon_after(
            accountant=accountant, batch_noise=batch_noise, sample_rate=sample_rate, batches=mid, delta=delta
        )
        if eps <= budget:
            low = mid
        else:
            high = mid
    return low

"""Privacy accounting for what actually runs: one Poisson-sampled batch = one accounted event.

A batch drawn at rate q may be used for k noisy optimizer steps in which each sampled example takes
part once (k = number of DP optimizers × epochs over the batch; PPO with ``ppo_epochs=T`` and one
optimizer gives k = T). Each step is a Gaussian mechanism with sensitivity C and noise σC, so the
batch's mechanism is ``PoissonSampled(q, compose(k × Gaussian(σ)))``. A composition of k Gaussian
mechanisms with multiplier σ is exactly one Gaussian mechanism with multiplier ``σ/√k`` (their privacy
loss distributions add), so each batch is one Opacus accountant step with ``σ_batch = σ/√k`` at rate q.
The accountants themselves (PRV, RDP) are Opacus's.

A run's accounting is a *history* of ``(σ_batch, q, batches)`` entries: a resumed run that changes
the batch size or the number of epochs per batch appends a new entry, and its ε (and the budget left)
is that of the whole composition, never of the current (σ, q, k) alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")
MAX_BATCHES = 10**9  # the search for an unbounded run's last affordable batch stops here
History = Sequence[tuple[float, float, int]]


def batch_noise_multiplier(noise_multiplier: float, noisy_steps_per_example: int) -> float:
    """``σ_batch = σ / √k``: the single Gaussian equivalent to k composed steps with multiplier σ."""
    return noise_multiplier / math.sqrt(noisy_steps_per_example)


def make_accountant(name: str) -> IAccountant:
    """An empty Opacus accountant ("prv" or "rdp")."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return create_accountant(mechanism=name)


def epsilon_of(*, accountant: str, history: History, delta: float) -> float:
    """ε at δ of the composition of ``history``: entries ``(σ_batch, q, batches)``, each ``batches`` ×
    PoissonSampled(q, Gaussian(σ_batch)); ∞ if any entry with batches > 0 has no noise."""
    history = [(sigma, q, n) for sigma, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    acc = make_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def epsilon_after(
    *,
    accountant: str,
    batch_noise: float,
    sample_rate: float,
    batches: int,
    delta: float,
    history: History = (),
) -> float:
    """ε spent after ``history`` and then ``batches`` Poisson batches with multiplier ``batch_noise`` at rate q."""
    return epsilon_of(
        accountant=accountant, history=[*history, (batch_noise, sample_rate, batches)], delta=delta
    )


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    batches: int,
    noisy_steps_per_example: int,
    accountant: str,
) -> float:
    """The per-step σ whose ``batches`` Poisson batches (k steps each) spend at most ``target_epsilon``.
    ``ValueError`` with the smallest reachable ε where no σ reaches the target (the accountant's floor)."""
    try:
        batch_noise = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=batches,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    except ValueError as error:
        if "too low" not in str(error):
            raise
        floor = epsilon_after(
            accountant=accountant,
            batch_noise=MAX_SIGMA,
            sample_rate=sample_rate,
            batches=batches,
            delta=delta,
        )
        raise ValueError(
            f"target_epsilon={target_epsilon:g} cannot be reached: with q={sample_rate:.4g}, {batches} batches and "
            f"δ={delta:.3g} the {accountant.upper()} accountant gives at least ε={floor:.4g} even at σ={MAX_SIGMA:g}; "
            f"ask for ε ≥ {floor:.3g}, or run fewer batches (max_steps/max_epochs) or smaller ones (batch_size)"
        ) from None
    return batch_noise * math.sqrt(noisy_steps_per_example)


def max_batches_within(
    *,
    budget: float,
    accountant: str,
    batch_noise: float,
    sample_rate: float,
    delta: float,
    upper: int | None,
    history: History = (),
) -> int:
    """The largest n ≤ ``upper`` (unbounded: None) with ε(history, then n batches) ≤ ``budget``.

    ε grows with n: a doubling search for an unaffordable n when unbounded, then a binary search.
    """

    def affordable(n: int) -> bool:
        eps = epsilon_after(
            accountant=accountant,
            batch_noise=batch_noise,
            sample_rate=sample_rate,
            batches=n,
            delta=delta,
            history=history,
        )
        return eps <= budget

    if not affordable(0):
        return 0
    if upper is None:
        high = 1
        while affordable(high):
            if high >= MAX_BATCHES:
                return MAX_BATCHES
            high *= 2
    elif affordable(upper):
        return upper
    else:
        high = upper
    low = 0  # affordable(low) and not affordable(high)
    while high - low > 1:
        mid = (low + high) // 2
        if affordable(mid):
            low = mid
        else:
            high = mid
    return low

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

from lit_dprl.privacy.refusals import DPConfigurationError

ACCOUNTANTS = ("prv", "rdp")
MAX_BATCHES = 10**9  # the search for an unbounded run's last affordable batch stops here
History = Sequence[tuple[float, float, int]]
# Opacus's calibration doubles σ from 20 and gives up at the first σ above MAX_SIGMA, so the largest σ it can return
# is 10·2^16 ≈ 6.6e5 > FLOOR_SIGMA: a target at or above ε(FLOOR_SIGMA) is reached (ε falls as σ grows).
FLOOR_SIGMA = MAX_SIGMA / 2


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
    """The per-step σ whose ``batches`` Poisson batches (k steps each) spend at most ``target_epsilon``;
    ``DPConfigurationError`` naming the smallest reachable ε (``epsilon_floor``) where no σ reaches it."""
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
        raise unreachable_target(target_epsilon, delta, sample_rate, batches, accountant) from None
    return batch_noise * math.sqrt(noisy_steps_per_example)


def epsilon_floor(*, accountant: str, sample_rate: float, batches: int, delta: float) -> float:
    """The smallest ε that calibration reaches for this run: ε at σ_batch = ``FLOOR_SIGMA``, rounded up to 3
    significant digits. There ε no longer falls with σ: what is left is the accountant's own floor (RDP's
    conversion over its finite orders, PRV's discretisation error), set by δ, hardly by q or the batches."""
    floor = epsilon_after(
        accountant=accountant, batch_noise=FLOOR_SIGMA, sample_rate=sample_rate, batches=batches, delta=delta
    )
    return round_up(floor, digits=3)


def unreachable_target(
    target_epsilon: float, delta: float, sample_rate: float, batches: int, accountant: str
) -> DPConfigurationError:
    """The refusal of a ``target_epsilon`` below the accountant's floor: the floor, why, and what to set."""
    run = {"sample_rate": sample_rate, "batches": batches, "delta": delta}
    floor = epsilon_floor(accountant=accountant, **run)
    prv = (
        ""
        if accountant == "prv"
        else f", or accountant='prv', whose floor here is {epsilon_floor(accountant='prv', **run):g}"
    )
    return DPConfigurationError(
        f"target_epsilon={target_epsilon:g} cannot be reached: for this run (q={sample_rate:.4g}, {batches} "
        f"batches, δ={delta:.3g}) the {accountant.upper()} accountant certifies no ε below {floor:g}, even at "
        f"noise multiplier σ={FLOOR_SIGMA:g} where training learns nothing. The floor comes from δ and the "
        "accountant's precision, not from the number or size of batches: set target_epsilon >= "
        f"{floor:g}{prv} (a larger target_delta lowers the floor too, but weakens the guarantee)"
    )


def round_up(value: float, digits: int) -> float:
    """``value`` rounded up to ``digits`` significant digits, so that a bound stated in a message holds."""
    if not math.isfinite(value) or value <= 0:
        return value
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return math.ceil(value / scale) * scale


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

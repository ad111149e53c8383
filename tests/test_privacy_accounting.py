"""ε and σ against known values and an independent accountant (Google's dp_accounting)."""

import math
import re

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from lit_dprl.privacy.accounting import (
    batch_noise_multiplier,
    calibrate_noise_multiplier,
    epsilon_after,
    epsilon_floor,
    max_batches_within,
)
from lit_dprl.privacy.refusals import DPConfigurationError


def test_known_opacus_values():
    # Opacus's accountant tests: sigma=1.5, q=0.04, 2250 steps, delta=1e-5.
    assert epsilon_after(accountant="rdp", batch_noise=1.5, sample_rate=0.04, batches=2250, delta=1e-5) == (
        pytest.approx(7.32911117143, rel=1e-6)
    )
    prv = epsilon_after(accountant="prv", batch_noise=1.5, sample_rate=0.04, batches=2250, delta=1e-5)
    assert prv == pytest.approx(6.777395712150674, abs=0.02)


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.02, 50), (0.8, 0.05, 300), (2.0, 0.3, 40)])
def test_epsilon_matches_dp_accounting(sigma, q, steps):
    delta = 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    independent_pld = pld.PLDAccountant().compose(event).get_epsilon(delta)
    independent_rdp = rdp.RdpAccountant().compose(event).get_epsilon(delta)
    ours_prv = epsilon_after(accountant="prv", batch_noise=sigma, sample_rate=q, batches=steps, delta=delta)
    ours_rdp = epsilon_after(accountant="rdp", batch_noise=sigma, sample_rate=q, batches=steps, delta=delta)
    assert ours_prv == pytest.approx(independent_pld, rel=0.03)
    assert ours_rdp == pytest.approx(independent_rdp, rel=0.03)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_composed_gaussian_steps_per_batch_equal_one_gaussian(k):
    """PoissonSampled(q, k x Gaussian(sigma)) is accounted as PoissonSampled(q, Gaussian(sigma/sqrt(k)))."""
    sigma, q, batches, delta = 1.3, 0.05, 60, 1e-5
    composed = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma)] * k)
        ),
        batches,
    )
    independent = rdp.RdpAccountant().compose(composed).get_epsilon(delta)
    ours = epsilon_after(
        accountant="rdp",
        batch_noise=batch_noise_multiplier(sigma, k),
        sample_rate=q,
        batches=batches,
        delta=delta,
    )
    assert ours == pytest.approx(independent, rel=0.02)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("k", [1, 3])
def test_calibration_reaches_but_never_exceeds_target(accountant, k):
    q, batches, delta, target = 0.02, 200, 1e-4, 3.0
    sigma = calibrate_noise_multiplier(
        target_epsilon=target,
        delta=delta,
        sample_rate=q,
        batches=batches,
        noisy_steps_per_example=k,
        accountant=accountant,
    )
    eps = epsilon_after(
        accountant=accountant,
        batch_noise=batch_noise_multiplier(sigma, k),
        sample_rate=q,
        batches=batches,
        delta=delta,
    )
    assert target - 0.05 < eps <= target


def test_max_batches_within_budget_is_the_last_affordable_step():
    kwargs = dict(accountant="rdp", batch_noise=1.0, sample_rate=0.05, delta=1e-5)
    n = max_batches_within(budget=2.0, upper=10_000, **kwargs)
    assert 0 < n < 10_000
    assert epsilon_after(batches=n, **kwargs) <= 2.0 < epsilon_after(batches=n + 1, **kwargs)
    assert max_batches_within(budget=math.inf, upper=50, **kwargs) == 50


def test_budget_search_composes_the_history_and_needs_no_upper_bound():
    kwargs = dict(accountant="rdp", batch_noise=1.0, sample_rate=0.05, delta=1e-5)
    history = [(1.0, 0.2, 3)]  # earlier batches at another (σ, q), e.g. before a resume
    n = max_batches_within(budget=4.0, upper=None, history=history, **kwargs)
    assert n > 0
    assert (
        epsilon_after(batches=n, history=history, **kwargs)
        <= 4.0
        < epsilon_after(batches=n + 1, history=history, **kwargs)
    )
    assert n < max_batches_within(budget=4.0, upper=None, **kwargs)  # the history's ε is not free


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_an_unreachable_epsilon_names_the_smallest_reachable_one(accountant):
    run = dict(delta=2e-3, sample_rate=0.0625, noisy_steps_per_example=1, accountant=accountant)
    floors = set()
    for batches in (20, 2000):
        with pytest.raises(DPConfigurationError, match=r"target_epsilon=0\.001 cannot be reached") as refused:
            calibrate_noise_multiplier(target_epsilon=1e-3, batches=batches, **run)
        floor = float(re.search(r"certifies no ε below ([0-9.e+-]+),", str(refused.value)).group(1))
        calibrate_noise_multiplier(target_epsilon=floor, batches=batches, **run)  # the named floor is reached
        with pytest.raises(DPConfigurationError):  # and it is the floor (named rounded up to 3 digits)
            calibrate_noise_multiplier(target_epsilon=0.98 * floor, batches=batches, **run)
        floors.add(floor)
    assert len(floors) == 1  # as the message says, fewer batches do not lower it


def test_the_rdp_floor_is_the_conversion_of_a_zero_divergence():
    """As σ grows every order's RDP goes to 0, so ε goes to min over the orders α of the RDP → (ε, δ) conversion
    at 0 (Balle et al., arXiv:1905.09982, Thm 21; the one Opacus uses): log((α−1)/α) − (log δ + log α)/(α−1)."""
    delta = 2e-3
    independent = min(
        math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    floor = epsilon_floor(accountant="rdp", sample_rate=0.0625, batches=20, delta=delta)
    assert independent <= floor <= 1.01 * independent

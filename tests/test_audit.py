"""The one-run audit: the estimator against mechanisms of known ε, and the command end to end."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom, norm

from lit_dprl.__main__ import main as lit_dprl_main
from lit_dprl.commands.audit import AUDIT_NAME, PLOT_NAME, DivideNoise
from lit_dprl.commands.audit import main as audit_main
from lit_dprl.data.preferences import PreferenceDataModule
from lit_dprl.privacy.audit import (
    epsilon_lower_bound,
    guess_grid,
    make_guesses,
    one_run_audit,
    p_value,
)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """ε at δ of μ-GDP: δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth & Su 2019)."""
    return brentq(
        lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 200
    )


def coins(m: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, rng.random(m) < 0.5


# ---------------------------------------------------------------------------------------------- estimator
def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_delta():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 40, 30, 1.0, 0.0) == pytest.approx(binom.sf(29, 40, q))
    assert p_value(10, 10, 10, 2.0, 0.0) == pytest.approx((math.exp(2) / (1 + math.exp(2))) ** 10)
    # the δ correction: + 2mδ · max_i P[v−i ≤ Bin < v]/i, here i = 1 alone gives a lower bound on it
    with_delta = p_value(100, 40, 30, 1.0, 1e-3)
    assert with_delta >= binom.sf(29, 40, q) + 2 * 100 * 1e-3 * binom.pmf(29, 40, q) - 1e-12
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        p_value(10, 5, 6, 1.0, 0.0)


def test_epsilon_lower_bound_is_where_the_p_value_crosses_the_level():
    bound = epsilon_lower_bound(1000, 100, 90, delta=1e-5, significance=0.05)
    assert p_value(1000, 100, 90, bound - 1e-6, 1e-5) < 0.05 <= p_value(1000, 100, 90, bound + 1e-3, 1e-5)
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5, significance=0.05) == 0.0  # chance accuracy


def test_perfect_separation_reaches_the_most_m_canaries_can_show():
    _, included = coins(256, 0)
    result = one_run_audit(included.astype(float), included, delta=1e-5)
    assert result.correct == result.guesses == 128  # the largest grid point, guessed without error
    assert result.epsilon_lower_bound == result.epsilon_max_detectable
    assert 3.0 < result.epsilon_max_detectable < 3.5  # ≈ the largest ε with sigmoid(ε)^128 ≥ 0.05/8


def test_guesses_take_the_extremes_and_break_ties_by_index_not_membership():
    guesses = make_guesses(np.array([0.5, 3.0, -1.0, 3.0, 0.0]), k_plus=1, k_minus=2)
    assert guesses.tolist() == [0, 0, -1, 1, -1]  # of the tied 3.0s the later index is ranked higher
    assert guess_grid(100) == [(5, 0), (3, 3), (10, 0), (5, 5), (20, 0), (10, 10), (50, 0), (25, 25)]


def test_gaussian_mechanism_bound_is_valid_and_has_power():
    """Scores N(μ·S_i, 1): each canary's score is a μ-GDP release, so ε(δ) is known exactly."""
    delta = 1e-5
    for mu in (1.0, 3.0):
        true_epsilon = gaussian_dp_epsilon(mu, delta)
        for seed in range(3):
            rng, included = coins(1000, seed)
            result = one_run_audit(rng.normal(size=1000) + mu * included, included, delta=delta)
            assert 0 < result.epsilon_lower_bound <= true_epsilon
            assert result.epsilon_lower_bound > (1.0 if mu == 1.0 else 3.0)  # clearly > 0 for a strong signal
    noise_only = [
        one_run_audit(*reversed(coins_and_noise(seed)), delta=delta).epsilon_lower_bound for seed in range(20)
    ]
    assert sum(bound > 0 for bound in noise_only) <= 1  # each is > 0 with probability at most 5 %


def coins_and_noise(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng, included = coins(500, seed)
    return included, rng.normal(size=500)


def test_randomized_response_bound_is_near_epsilon_and_rarely_above_it():
    """ε-DP randomized response on the coins: the audit is nearly tight, so a too-high bound shows. Without the
    Bonferroni correction over the (k₊, k₋) grid, 14 of these 100 runs would exceed ε."""
    epsilon, m = 1.0, 1000
    truthful = math.exp(epsilon) / (1 + math.exp(epsilon))
    bounds = []
    for seed in range(100):
        rng, included = coins(m, seed)
        answer = np.where(rng.random(m) < truthful, included, ~included).astype(float)
        bounds.append(one_run_audit(answer, included, delta=0.0).epsilon_lower_bound)
    assert sum(bound > epsilon for bound in bounds) <= 5  # at most 5 % in expectation
    assert np.median(bounds) > 0.6


def test_one_run_audit_refuses_bad_input():
    with pytest.raises(ValueError, match="finite"):
        one_run_audit([0.0, math.nan], [True, False], delta=1e-5)
    with pytest.raises(ValueError, match="one length"):
        one_run_audit([0.0, 1.0], [True], delta=1e-5)


# ---------------------------------------------------------------------------------------------- the command
FAST_SFT = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.max_steps=3",
    "--trainer.limit_val_batches=0",
    "--data.init_args.max_train_examples=32",
    "--data.init_args.max_length=16",
    "--trainer.callbacks.init_args.target_delta=1e-5",
    "--trainer.callbacks.init_args.target_epsilon=null",  # a fixed σ: calibrating it takes the accountant longer
    "--trainer.callbacks.init_args.noise_multiplier=1.0",
]


def test_sft_audit_end_to_end(tmp_path, capsys):
    out = tmp_path / "dp"
    lit_dprl_main(["audit", "--config", "configs/tiny/sft.yaml", "--canaries", "24", "--seed", "0", "--out", str(out),
                   "--", *FAST_SFT, f"--model.init_args.export_dir={tmp_path / 'model'}"])  # fmt: skip
    audit = json.loads((out / AUDIT_NAME).read_text())
    assert (out / PLOT_NAME).stat().st_size > 0
    assert not (tmp_path / "model").exists()  # weights with canaries are never exported
    included = np.array(audit["canary_included"])
    assert audit["canaries"] == len(included) == len(audit["canary_scores"]) == 24
    assert audit["included"] == included.sum() and audit["training_rows"] == 32 + included.sum()
    assert audit["delta"] == audit["privacy_report"]["delta"] == 1e-5
    assert audit["epsilon_claimed"] == pytest.approx(audit["privacy_report"]["epsilon"])
    assert audit["privacy_report"]["noise_multiplier"] == 1.0 and audit["privacy_report"]["steps"] == 3
    assert 0 < audit["epsilon_claimed"] < math.inf
    assert audit["mode"] == "black-box" and audit["differentially_private"] and audit["planted_bug"] is None
    assert 0 <= audit["correct"] <= audit["guesses"] <= 24
    assert 0 <= audit["epsilon_lower_bound"] <= audit["epsilon_max_detectable"]
    assert "ε_emp ≥" in (printed := capsys.readouterr().out) and "(95 %) vs ε =" in printed

    public = audit_main(["--config", "configs/tiny/sft.yaml", "--canaries", "24", "--seed", "0", "--non-private",
                         "--out", str(tmp_path / "nodp"), "--", *FAST_SFT])  # fmt: skip
    assert public["epsilon_claimed"] == math.inf and not public["differentially_private"]
    assert (
        public["delta"] == 1e-5 and public["canary_included"] == audit["canary_included"]
    )  # same seed, same coins
    assert json.loads((tmp_path / "nodp" / AUDIT_NAME).read_text())["epsilon_claimed"] == math.inf


def test_reward_audit_end_to_end(tmp_path):
    audit = audit_main(["--config", "configs/tiny/reward.yaml", "--canaries", "16", "--seed", "1", "--out", str(tmp_path),
                        "--delta", "1e-6", "--", "--trainer.enable_progress_bar=false", "--trainer.max_steps=2",
                        "--trainer.limit_val_batches=0", "--data.init_args.val_fraction=0.9",
                        "--data.init_args.max_length=64",
                        "--trainer.callbacks.init_args.target_epsilon=null",
                        "--trainer.callbacks.init_args.noise_multiplier=1.0"])  # fmt: skip
    real = PreferenceDataModule(
        "lit_dprl/data/fixtures/imdb_preferences.jsonl", tokenizer="tiny", val_fraction=0.9, max_length=64
    )
    real.setup("fit")
    assert audit["training_rows"] == len(real.train_dataloader().dataset) + audit["included"]
    assert audit["delta"] == 1e-6 and audit["privacy_report"]["delta"] != 1e-6
    assert audit["epsilon_claimed"] > audit["privacy_report"]["epsilon"]  # the same run, read at a smaller δ
    assert np.all(np.isfinite(audit["canary_scores"])) and np.ptp(audit["canary_scores"]) > 0


def test_break_noise_divides_the_noise_of_every_dp_optimizer(tmp_path):
    optimizers = [SimpleNamespace(noise_multiplier=2.0), SimpleNamespace(noise_multiplier=0.5)]
    DivideNoise(100).on_train_start(SimpleNamespace(strategy=SimpleNamespace(optimizers=optimizers)), None)
    assert [o.noise_multiplier for o in optimizers] == [0.02, 0.005]
    with pytest.raises(ValueError, match="needs a DPCallback"):
        audit_main(
            [
                "--config",
                "configs/tiny/sft.yaml",
                "--non-private",
                "--break-noise",
                "10",
                "--out",
                str(tmp_path),
            ]
        )


def test_unknown_command_is_refused():
    with pytest.raises(SystemExit, match="unknown command 'audits'"):
        lit_dprl_main(["audits"])

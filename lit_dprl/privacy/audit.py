"""One-run privacy auditing (Steinke, Nasr & Jagielski, NeurIPS 2023): an empirical lower bound on ε.

The game: m canaries, each included in the training data independently with probability ½ (secret coins
S_i). After training, every canary gets a membership score (higher = more likely included). The guesser
says "in" for the k₊ highest scores and "out" for the k₋ lowest and abstains on the rest; of its
r = k₊ + k₋ guesses, W are correct. If training is (ε, δ)-DP, then (the paper's Theorem for δ > 0)

    P[W ≥ v] ≤ β + 2mδ·α,  β = P[Binomial(r, q) ≥ v],  α = max_{1≤i≤v} P[v−i ≤ Binomial(r, q) < v] / i,
    q = e^ε / (1 + e^ε).

Every ε whose bound stays below the significance level 1 − confidence is rejected; the largest rejected ε
is the lower bound ε_emp (the algorithm of the paper's Appendix D). The guesser may only look at the
scores (never at the coins), so ties are broken by canary index. Choosing (k₊, k₋) after seeing which
guesses were right would be a multiple test: here every (k₊, k₋) of a fixed grid is tested at level
(1 − confidence)/G (Bonferroni over the G grid points) and the largest bound is reported, which keeps the
stated confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom

# Guess counts as fractions of m: each fraction f gives two hypotheses, (k₊, k₋) = (f·m, 0) (guess only
# "in") and (f·m/2, f·m/2) (guess both ways). Few points, so the Bonferroni correction costs little.
DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
_BISECTION_STEPS = 40


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Bound on P[≥ ``correct`` right out of ``guesses``] for an (ε, δ)-DP run with m randomized canaries.

    ``min(1, β + 2mδ·α)`` with β, α and q = e^ε/(1+e^ε) as in the module docstring.
    """
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(1.0, beta)
    shifts = np.arange(1, correct + 1)
    below = np.cumsum(binom.pmf(correct - shifts, guesses, q))  # P[v − i ≤ Binomial(r, q) < v]
    alpha = float(np.max(below / shifts))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε at which (ε, δ)-DP is rejected at ``significance`` (0 when no ε > 0 is rejected).

    Bisection on ``p_value(m, guesses, correct, ε, δ) < significance`` (the p-value grows with ε).
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if p_value(m, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, guesses, correct, high, delta) < significance:
        low, high = high, 2 * high
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if p_value(m, guesses, correct, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def make_guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the ``k_plus`` highest scores, −1 ("out") for the ``k_minus`` lowest, 0 (abstain) elsewhere.

    Ties are broken by index (a stable sort), never by membership.
    """
    scores = np.asarray(scores, dtype=float)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores):
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {len(scores)}")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=int)
    guesses[order[:k_minus]] = -1
    if k_plus:
        guesses[order[len(scores) - k_plus :]] = 1
    return guesses


def guess_grid(m: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The (k₊, k₋) hypotheses for m canaries: (⌈f·m⌉, 0) and (⌈f·m/2⌉, ⌈f·m/2⌉) for each fraction f, deduplicated."""
    grid: list[tuple[int, int]] = []
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"guess fractions must be in (0, 1], got {fraction}")
        one_sided = (min(m, math.ceil(fraction * m)), 0)
        half = min(m // 2, math.ceil(fraction * m / 2))
        for point in (one_sided, (half, half)):
            if sum(point) > 0 and point not in grid:
                grid.append(point)
    return grid


@dataclass(frozen=True)
class AuditResult:
    """The outcome of :func:`one_run_audit` (JSON-ready through :meth:`as_dict`)."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    included: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    hypotheses: int
    epsilon_max_detectable: float

    @property
    def confidence_text(self) -> str:
        """The confidence as a percentage, e.g. "95 %"."""
        return f"{self.confidence * 100:g} %"

    def as_dict(self) -> dict:
        return asdict(self)


def one_run_audit(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditResult:
    """ε_emp from canary scores and the secret coins: the best bound over :func:`guess_grid`, each point tested
    at level (1 − confidence)/G. The result names the (k₊, k₋) that gave it (the first grid point on ties) and
    ``epsilon_max_detectable``, the bound had every guess been right: no run can show more with these m and δ,
    so a claimed ε above it is not tested by the audit."""
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError(
            f"scores and included must be 1-D and of one length, got {scores.shape}, {included.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite; a NaN or inf score means the scoring failed")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = len(scores)
    grid = guess_grid(m, fractions)
    significance = (1 - confidence) / len(grid)
    truth = np.where(included, 1, -1)
    best = None
    for k_plus, k_minus in grid:
        guesses = make_guesses(scores, k_plus, k_minus)
        correct = int(np.sum(guesses == truth))
        bound = epsilon_lower_bound(m, k_plus + k_minus, correct, delta, significance)
        if best is None or bound > best[0]:
            best = (bound, k_plus, k_minus, correct)
    bound, k_plus, k_minus, correct = best
    ceiling = max(epsilon_lower_bound(m, sum(point), sum(point), delta, significance) for point in grid)
    return AuditResult(
        epsilon_lower_bound=bound,
        confidence=confidence,
        delta=delta,
        canaries=m,
        included=int(included.sum()),
        k_plus=k_plus,
        k_minus=k_minus,
        guesses=k_plus + k_minus,
        correct=correct,
        hypotheses=len(grid),
        epsilon_max_detectable=ceiling,
    )

"""The privacy ledger of a run: every accounted Poisson batch, and the budget left.

The history is a list of ``(σ_batch, q, batches)`` entries (Opacus's accountant merges consecutive
batches with the same σ_batch and q). It is saved in checkpoints; a resumed run appends to it, and its
ε and its remaining budget are those of the whole composition (``accounting.epsilon_of``), so changing
the batch size or the epochs per batch at resume can never overspend.
"""

from __future__ import annotations

from typing import Any

from lit_dprl.privacy.accounting import epsilon_of, make_accountant, max_batches_within


class PrivacyLedger:
    """Accounted batches and optimizer steps of one run, with ε over the whole history."""

    def __init__(self, accountant: str) -> None:
        self.accountant_name = accountant
        self._accountant = make_accountant(accountant)
        self.batches = 0
        self.optimizer_steps = 0
        self._cache: tuple[int, float | None, float] = (0, None, 0.0)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(σ_batch, q, batches)`` entries in the order they were spent."""
        return [(float(s), float(q), int(n)) for s, q, n in self._accountant.history]

    def record(self, batch_noise: float, sample_rate: float, optimizer_steps: int) -> None:
        """Account one Poisson batch: ``PoissonSampled(q, Gaussian(σ_batch))``, taken in ``optimizer_steps`` steps."""
        self._accountant.step(noise_multiplier=batch_noise, sample_rate=sample_rate)
        self.batches += 1
        self.optimizer_steps += optimizer_steps

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` of everything recorded (cached until the next batch)."""
        if self._cache[:2] != (self.batches, delta):
            self._cache = (
                self.batches,
                delta,
                epsilon_of(accountant=self.accountant_name, history=self.history, delta=delta),
            )
        return self._cache[2]

    def last_epsilon(self) -> float:
        """The ε last computed (cheap, for logging between evaluations)."""
        return self._cache[2]

    def affordable_batches(
        self, *, budget: float, batch_noise: float, sample_rate: float, delta: float, upper: int | None
    ) -> int:
        """How many more batches (at most ``upper``; None: unbounded) keep ε(history + them) ≤ ``budget``."""
        return max_batches_within(
            budget=budget,
            accountant=self.accountant_name,
            batch_noise=batch_noise,
            sample_rate=sample_rate,
            delta=delta,
            upper=upper,
            history=self.history,
        )

    def mechanism(self) -> str:
        """The composition in words, e.g. ``10 × PoissonSampled(q=0.2, Gaussian(σ_batch=1))``."""
        return " ∘ ".join(
            f"{n} × PoissonSampled(q={q:.6g}, Gaussian(σ_batch={s:.6g}))" for s, q, n in self.history
        )

    def report_fields(self, delta: float) -> dict[str, Any]:
        """The ledger's part of ``privacy.json``: batches, steps, the history and ε by the RDP accountant too."""
        history = self.history
        return {
            "steps": self.batches,
            "optimizer_steps": self.optimizer_steps,
            "accounting_history": [
                {"batch_noise_multiplier": s, "sample_rate": q, "batches": n} for s, q, n in history
            ],
            "epsilon_rdp": epsilon_of(accountant="rdp", history=history, delta=delta),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self._accountant.state_dict(),
            "batches": self.batches,
            "optimizer_steps": self.optimizer_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._accountant.history = list(state["accountant"]["history"])
        self.batches = state["batches"]
        self.optimizer_steps = state["optimizer_steps"]

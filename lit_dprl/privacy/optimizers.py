"""Opacus DP optimizers with two additions: noise-only steps and a count of noisy steps.

- A step with no per-sample gradients (an empty Poisson batch or minibatch: no forward, no backward)
  still clips nothing, adds N(0, σ²C²) and steps, as DP-SGD requires; Opacus raises instead.
  A parameter the loss did not touch gets an all-zero per-sample gradient, which is what it is.
- ``noisy_steps`` counts steps that added noise, so the callback can check that a module took
  exactly the number of steps that the accountant is told about.
Clipping, noise and (distributed) reduction are Opacus's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer


class _NoiseOnlyWhenEmpty:
    noisy_steps: int = 0

    def _fill_missing_grad_samples(self) -> None:
        params = self.params
        present = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
        if len(present) == len(params):
            return
        batch = present[0].shape[0] if present and isinstance(present[0], torch.Tensor) else 0
        for p in params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((batch, *p.shape), device=p.device, dtype=p.dtype)

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        self._fill_missing_grad_samples()
        proceed = super().pre_step(closure)
        if proceed:
            self.noisy_steps += 1
        return proceed


class NoiseOnlyDPOptimizer(_NoiseOnlyWhenEmpty, DPOptimizer):
    """``opacus.optimizers.DPOptimizer`` that also steps on empty batches."""


class NoiseOnlyDistributedDPOptimizer(_NoiseOnlyWhenEmpty, DistributedDPOptimizer):
    """``opacus.optimizers.DistributedDPOptimizer`` (noise on rank 0 only) that also steps on empty batches."""


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    distributed: bool,
    generator: torch.Generator | None,
) -> DPOptimizer:
    """Wrap ``optimizer``; the update is ``(Σ clipped + N(0, σ²C²)) / expected_batch_size`` (global batch)."""
    cls = NoiseOnlyDistributedDPOptimizer if distributed else NoiseOnlyDPOptimizer
    return cls(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )

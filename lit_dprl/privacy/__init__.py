"""The privacy layer: DP-SGD for any LightningModule (``DPCallback``), sampling, accounting and reports.

The contract. Attach ``DPCallback`` to a ``Trainer`` and the run trains with per-unit clipping, Gaussian noise,
Poisson sampling and privacy accounting. The module and data carry no DP code; they follow this contract:

1. The training loss is the mean over the batch of per-row losses; nothing in the loss mixes rows
   (no batch normalisation, whitening or batch-wide token means).
2. The training data comes from one map-style ``DataLoader`` with an integer ``batch_size``; the
   callback keeps its dataset and ``collate_fn`` and draws batches by Poisson sampling at
   q = batch_size / N (N = number of privacy units). Empty batches never reach ``training_step``.
3. Every trainable parameter belongs to the module and is in one of its optimizers.
4. One backward pass per optimizer step (sum the losses first); the callback refuses a second one.
5. A manual-optimization module that takes several steps per batch declares it with integer
   attributes ``epochs_per_batch`` (passes over the batch; each example takes part in one step per
   pass — PPO's ``ppo_epochs``) and ``minibatches_per_batch`` (steps per pass; PPO's
   ``num_mini_batches``), and takes exactly that many steps per optimizer, empty minibatches
   included (skip forward/backward, still call ``step()``). The callback checks the number of steps
   and that no example takes part in more steps than declared.
6. Forwards that are not part of the loss (generation, scoring) run under ``torch.no_grad()``.
7. A module may list settings that would couple examples in ``privacy_hazards() -> list[str]``;
   the callback refuses to run while that list is non-empty. It may describe itself in
   ``privacy_metadata() -> dict``, which the report stores under ``"stage"``.
8. Under ``grad_sample_mode="ghost"`` (ghost clipping, ``ghost.py``), ``training_step`` returns a dict with
   ``"loss"`` (the batch mean) and ``"per_example_loss"`` (shape ``[B]``, one loss per row, the loss
   being their mean; ``lit_dprl.losses.training_output`` builds it). The callback runs the norm pass
   inside the step and hands Lightning ``Σ_i c_i ℓ_i`` instead of ``"loss"``. Ghost mode needs automatic
   optimization, one process, ``privacy_unit="row"`` and no ``max_physical_batch_size``; the default
   ``"hooks"`` mode accepts a plain loss tensor as before.

The privacy unit is a row (``privacy_unit="row"``) or a user (``"user"``): then users are
Poisson-sampled at q = batch_size / (number of users), so the DataLoader's ``batch_size`` is the
expected number of *users* per batch; a sampled user brings all its rows (at most
``max_rows_per_user``), the per-row gradients of a user are averaged into one per-user gradient,
which is clipped to C; noise and normalisation are by the expected number of users.

Accounting: one Poisson batch at rate q is one event ``PoissonSampled(q, k × Gaussian(σ))`` with
k = (number of optimizers) × ``epochs_per_batch`` (see ``accounting.py``). Values logged during
training (losses, metrics, batch sizes) are not private; only the trained weights carry the guarantee.
The report (``privacy.json``) goes into the run's log dir; the stages export it next to the model
(``report.write_export``).

Modules: ``callback`` (``DPCallback``, the Lightning wiring), ``patching``, ``refusals``, ``units``,
``training_data``, ``sampling``, ``randomness``, ``batches``, ``steps``, ``optimizers``, ``ghost`` (with ``tied``),
``budget``, ``accounting``, ``ledger``, ``summary``, ``report`` (exports), ``composition`` (several stages),
``audit``. ``DPCallback`` and ``DPConfigurationError`` are imported on first use, so that
``lit_dprl.privacy.report`` (used by every stage's export) does not load Opacus.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DPCallback", "DPConfigurationError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lit_dprl.privacy import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Poisson sampling of training batches, identical on every rank and safe to resume.

Opacus's ``UniformWithReplacementSampler`` draws the right distribution but cannot be checkpointed,
and its distributed variant drops empty local batches, so ranks can disagree on the number of steps
and hang in ``all_reduce``. Here one *global* Bernoulli(q) mask over all N examples is drawn per
step from a generator that every rank seeds identically; each rank then takes every ``world_size``-th
sampled index. The union over ranks is exactly a Poisson sample of the dataset, every rank yields
the same number of batches (empty ones included), and the only state is a seed and a step counter.

The sampled unit is a row by default. For user-level DP the sampler is given ``units`` (the row
indices of each user): a Bernoulli(q) draw per *user*, and a sampled user brings all its rows, which
the sampler yields next to each other. For every batch it records which unit each row belongs to
(``pending``), so the callback can group per-row gradients into per-unit ones.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EmptyBatch:
    """Stands for a Poisson sample with no example in it (on this rank).

    The DP callback turns it into a noise-only optimizer step; a training step never sees it.
    """

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "EmptyBatch()"


def derive_seed(base_seed: int, counter: int) -> int:
    """A 63-bit seed for the stream that starts after ``counter`` draws of a run seeded ``base_seed``."""
    digest = hashlib.sha256(f"{base_seed}:{counter}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``num_batches`` index lists per pass; each index is included independently with prob. q.

    Args:
        num_samples: dataset size N.
        sample_rate: inclusion probability q of each example in each batch.
        num_batches: batches per pass (an "epoch"), usually ``round(1/q)``.
        seed: base seed shared by all ranks (secret by default: see ``DPCallback``).
        rank: this process's rank; world_size: number of processes.
        batches_drawn: how many batches earlier passes (or an interrupted run) already drew; each pass
            starts a fresh generator from ``(seed, batches_drawn)`` so no draw is ever repeated.
        units: the row indices of each privacy unit (user); None: every row is its own unit. With
            units, ``num_samples`` is the number of units and q is the rate at which units are drawn.
        generator: draw from this generator (e.g. a cryptographically secure one) instead of one seeded
            from ``(seed, batches_drawn)``; batches are then neither reproducible nor shared by ranks.

    ``pending`` holds, for each batch yielded and not yet taken by the callback, the unit (0, 1, ...
    in order of appearance) of each of its rows; the DataLoader yields batches in the order drawn.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        num_batches: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        batches_drawn: int = 0,
        units: Sequence[Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError("Poisson sampling needs at least one training example")
        if units is not None and len(units) != num_samples:
            raise ValueError(f"got {len(units)} units for num_samples={num_samples}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.num_batches = num_batches
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_drawn = batches_drawn
        self.units = units
        self.generator = generator
        self.pending: deque[list[int]] = deque()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = self.generator or torch.Generator().manual_seed(
            derive_seed(self.seed, self.batches_drawn)
        )
        self.pending.clear()  # a new pass: every batch of the previous one was trained on or dropped
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            self.batches_drawn += 1
            sampled = mask.nonzero().flatten()[self.rank :: self.world_size].tolist()
            if self.units is None:
                self.pending.append(list(range(len(sampled))))
                yield sampled
            else:
                rows = [list(self.units[u]) for u in sampled]
                self.pending.append([unit for unit, unit_rows in enumerate(rows) for _ in unit_rows])
                yield [row for unit_rows in rows for row in unit_rows]


class _CollateOrEmpty:
    """Collate non-empty lists with the user's ``collate_fn``; an empty list becomes ``EmptyBatch``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, examples: Sequence[Any]) -> Any:
        if len(examples) == 0:
            return EmptyBatch()
        return self.collate_fn(list(examples))


class PoissonDataLoader:
    """A training loader with Poisson-sampled batches built from a user's ``DataLoader``.

    It keeps the user's dataset, ``collate_fn`` and worker settings, and replaces only how batches
    are drawn. It is a plain iterable (not a ``DataLoader``) so Lightning does not inject a
    ``DistributedSampler`` into it.
    """

    def __init__(self, template: DataLoader, sampler: PoissonBatchSampler) -> None:
        self.batch_sampler = sampler
        self.dataset: Dataset = template.dataset
        worker_kwargs: dict[str, Any] = {}
        if template.num_workers > 0:
            worker_kwargs = {
                "prefetch_factor": template.prefetch_factor,
                "persistent_workers": False,
                "multiprocessing_context": template.multiprocessing_context,
            }
        self._loader = DataLoader(
            template.dataset,
            batch_sampler=sampler,
            collate_fn=_CollateOrEmpty(template.collate_fn),
            num_workers=template.num_workers,
            pin_memory=template.pin_memory,
            worker_init_fn=template.worker_init_fn,
            **worker_kwargs,
        )

    def __iter__(self) -> Iterator[Any]:
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self.batch_sampler)

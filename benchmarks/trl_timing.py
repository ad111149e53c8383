"""Per-batch wall times of a transformers ``Trainer`` loop, shared by the TRL side-by-side benchmarks."""

from __future__ import annotations

import time
from itertools import pairwise

from transformers import TrainerCallback


class BatchTimer(TrainerCallback):
    """Wall and process CPU time of each rollout batch, end to end: TRL's PPOTrainer fires ``on_step_end`` once
    per batch (no ``on_step_begin``), GRPOTrainer once per optimizer step (one rollout batch with one step per
    generation)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def on_train_begin(self, *args, **kwargs) -> None:
        self.ends = [time.perf_counter()]
        self.cpu_ends = [time.process_time()]

    def on_step_end(self, *args, **kwargs) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    @property
    def times(self) -> list[float]:
        return [end - start for start, end in pairwise(self.ends)]

    @property
    def cpu_times(self) -> list[float]:
        return [end - start for start, end in pairwise(self.cpu_ends)]

"""Small LightningModules with no DP code, used to test DPCallback on non-language models."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lit_dprl.losses import training_output


def toy_dataset(n: int = 200, dim: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class ToyClassifier(pl.LightningModule):
    """An MLP classifier with a plain mean cross-entropy loss (automatic optimization); with ``per_example``
    its training step also returns the per-example losses (``training_output``), as ghost mode needs."""

    def __init__(
        self,
        n: int = 200,
        batch_size: int = 8,
        lr: float = 0.1,
        hidden: int = 16,
        zero_loss=False,
        per_example: bool = False,
    ):
        super().__init__()
        self.n, self.batch_size, self.lr, self.zero_loss = n, batch_size, lr, zero_loss
        self.per_example = per_example
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)
        )
        self.batch_sizes: list[int] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sizes.append(len(x))
        logits = self(x)
        if self.per_example:
            losses = (
                (logits * 0.0).sum(-1) if self.zero_loss else F.cross_entropy(logits, y, reduction="none")
            )
            return training_output(losses)
        if self.zero_loss:
            return (logits * 0.0).sum(-1).mean()
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(toy_dataset(self.n), batch_size=self.batch_size, shuffle=True)

    def accuracy(self) -> float:
        x, y = toy_dataset(self.n).tensors
        with torch.no_grad():
            return (self(x).argmax(-1) == y).float().mean().item()


class TwoOptimizerModule(ToyClassifier):
    """Manual optimization with two optimizers over disjoint parameter sets."""

    def __init__(self, steps_taken_per_batch: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.steps_taken_per_batch = steps_taken_per_batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sizes.append(len(x))
        opt_a, opt_b = self.optimizers()
        for _ in range(self.steps_taken_per_batch):
            for opt in (opt_a, opt_b):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(self(x), y)
                self.manual_backward(loss)
                opt.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=self.lr),
            torch.optim.SGD(self.net[2].parameters(), lr=self.lr),
        )


def mean_char_code(prompts: list[str], responses: list[str]) -> list[float]:
    """A dense toy reward for tests: the mean code point of the response's characters / 255."""
    return [sum(map(ord, r)) / (255 * max(1, len(r))) for r in responses]

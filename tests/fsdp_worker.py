"""Run by tests/test_privacy_fsdp.py as a script: Lightning's ModelParallelStrategy relaunches it once per rank
(2 CPU processes on gloo) and it trains a toy model sharded by FSDP2's ``fully_shard`` under DPCallback (ghost
mode), once per scenario named on the command line, saving what each rank saw into ``OUT/SCENARIO-rankR.pt``."""

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Subset

from lit_dprl.losses import training_output
from lit_dprl.privacy import DPCallback, DPConfigurationError
from tests.toy_modules import toy_dataset

warnings.filterwarnings("ignore")

# name: (examples, index removed or None, batch size, hidden, zero loss, sigma, clip, steps)
SCENARIOS = {
    "exact": (8, None, 8, 16, False, 0.0, 1.35, 1),  # q = 1: the global batch is the whole dataset
    "neighbour": (8, 3, 7, 16, False, 0.0, 1.35, 1),  # the same without row 3, still q = 1
    "noise": (64, None, 8, 300, True, 4.0, 0.5, 1),  # zero gradients: the update is the noise
    "sparse": (64, None, 2, 16, False, 1.0, 0.5, 8),  # q = 1/32: most ranks' shares are empty
    "hooks": (8, None, 8, 16, False, 1.0, 0.5, 1),  # hook mode: refused
}


def initial_net(hidden: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))


def dataset(n: int, removed: int | None):
    data = toy_dataset(n)
    return data if removed is None else Subset(data, [i for i in range(n) if i != removed])


class ShardedToy(pl.LightningModule):
    def __init__(self, n: int, removed: int | None, batch_size: int, hidden: int, zero_loss: bool) -> None:
        super().__init__()
        self.data, self.batch_size, self.zero_loss = dataset(n, removed), batch_size, zero_loss
        self.net = initial_net(hidden)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.rows.append((x.clone(), y.clone()))
        logits = self.net(x)
        if self.zero_loss:
            return training_output((logits * 0.0).sum(-1))
        return training_output(torch.nn.functional.cross_entropy(logits, y, reduction="none"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def run(out_dir: Path, name: str) -> None:
    n, removed, batch_size, hidden, zero_loss, sigma, clip, steps = SCENARIOS[name]
    model = ShardedToy(n, removed, batch_size, hidden, zero_loss)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    mode = "hooks" if name == "hooks" else "ghost"
    cb = DPCallback(
        noise_multiplier=sigma, max_grad_norm=clip, sampling_seed=11, noise_seed=5, grad_sample_mode=mode
    )
    root = out_dir / name
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    try:
        trainer.fit(model)
    except DPConfigurationError as err:
        torch.save({"refused": str(err)}, out_dir / f"{name}-rank{trainer.global_rank}.pt")
        return
    final = torch.cat([p.detach().full_tensor().flatten() for p in model.parameters()])  # a collective
    rank = trainer.global_rank
    torch.save(
        {
            "initial": initial,
            "final": final,
            "first_weight_shard": model.net[0].weight.detach().to_local().clone(),
            "rows": model.rows,
            "steps": cb.steps,
            "noisy_steps": cb._dp_optimizers[0].noisy_steps,
            "epsilon": cb.epsilon,
            "q": cb.sample_rate,
            "report": json.loads((root / "privacy.json").read_text()) if rank == 0 else None,
        },
        out_dir / f"{name}-rank{rank}.pt",
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for scenario in sys.argv[2:]:
        run(Path(sys.argv[1]), scenario)

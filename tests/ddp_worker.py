"""Run by tests/test_privacy_ddp.py as a script: Lightning DDP relaunches it once per rank.

With a fifth argument ``nodes`` (> 1) it is one node of a multi-node run with one process per node: the test
starts one process per node with ``NODE_RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set, as a cluster
launcher would, and Lightning joins them (``num_nodes=nodes``, ``devices=1``). A sixth argument is the
``grad_sample_mode`` (default hooks; the module returns per-example losses in both modes), a seventh the
expected global batch size (default 8 of 64 examples)."""

import sys
import warnings

import lightning.pytorch as pl
import torch

from lit_dprl.privacy import DPCallback
from tests.toy_modules import ToyClassifier

warnings.filterwarnings("ignore")

if __name__ == "__main__":
    out_dir, zero_loss, sigma, steps = (
        sys.argv[1],
        sys.argv[2] == "zero",
        float(sys.argv[3]),
        int(sys.argv[4]),
    )
    nodes = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    mode = sys.argv[6] if len(sys.argv) > 6 else "hooks"
    batch_size = int(sys.argv[7]) if len(sys.argv) > 7 else 8
    torch.manual_seed(0)
    model = ToyClassifier(
        n=64,
        batch_size=batch_size,
        lr=1.0,
        hidden=300 if zero_loss else 16,
        zero_loss=zero_loss,
        per_example=True,
    )
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    cb = DPCallback(
        noise_multiplier=sigma, max_grad_norm=0.5, sampling_seed=11, noise_seed=5, grad_sample_mode=mode
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if nodes == 1 else 1,
        num_nodes=nodes,
        strategy="ddp",
        max_steps=steps,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model)
    final = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(
        {
            "initial": initial,
            "final": final,
            "batch_sizes": model.batch_sizes,
            "steps": cb.steps,
            "q": cb.sample_rate,
            "epsilon": cb.epsilon,
            "noisy_steps": cb._dp_optimizers[0].noisy_steps,
            "world_size": cb.report()["world_size"],
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )

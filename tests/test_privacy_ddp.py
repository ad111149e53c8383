"""DDP with 2 CPU processes (gloo): ranks stay identical, noise is added once for the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_ddp(tmp_path: Path, zero_loss: bool, sigma: float, steps: int) -> tuple[dict, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "tests.ddp_worker",
        str(tmp_path),
        "zero" if zero_loss else "ce",
        str(sigma),
        str(steps),
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")


def test_ddp_ranks_stay_identical_and_in_step(tmp_path):
    rank0, rank1 = run_ddp(tmp_path, zero_loss=False, sigma=1.0, steps=16)
    torch.testing.assert_close(rank0["final"], rank1["final"], rtol=0, atol=0)
    assert not torch.equal(rank0["initial"], rank0["final"])
    assert rank0["steps"] == rank1["steps"] == 16
    # q = 8/64: each rank sees about half of every global Poisson sample, and empty local batches occur
    # without desynchronising the ranks (they are noise-only steps on that rank)
    assert sum(rank0["batch_sizes"]) + sum(rank1["batch_sizes"]) > 0


def test_ddp_noise_is_added_once(tmp_path):
    sigma, clip = 4.0, 0.5
    rank0, _ = run_ddp(tmp_path, zero_loss=True, sigma=sigma, steps=1)
    update = (
        rank0["initial"] - rank0["final"]
    )  # SGD lr=1 on zero gradients: the noise / expected global batch
    expected_std = sigma * clip / (64 * rank0["q"])
    ratio = update.std().item() / expected_std
    assert 0.9 < ratio < 1.1, ratio  # noise added on every rank would give sqrt(2) = 1.41

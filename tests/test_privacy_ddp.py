"""DDP with 2 CPU processes (gloo): ranks stay identical, noise is added once for the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_ddp(
    tmp_path: Path, zero_loss: bool, sigma: float, steps: int, mode: str = "hooks", batch_size: int = 8
) -> tuple[dict, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "tests.ddp_worker",
        str(tmp_path),
        "zero" if zero_loss else "ce",
        str(sigma),
        str(steps),
        "1",
        mode,
        str(batch_size),
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


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_ddp_noise_is_added_once(tmp_path, mode):
    sigma, clip = 4.0, 0.5
    rank0, rank1 = run_ddp(tmp_path, zero_loss=True, sigma=sigma, steps=1, mode=mode)
    torch.testing.assert_close(rank0["final"], rank1["final"], rtol=0, atol=0)
    update = (
        rank0["initial"] - rank0["final"]
    )  # SGD lr=1 on zero gradients: the noise / expected global batch
    expected_std = sigma * clip / (64 * rank0["q"])
    ratio = update.std().item() / expected_std
    assert 0.9 < ratio < 1.1, ratio  # noise added on every rank would give sqrt(2) = 1.41


def run_two_nodes(tmp_path: Path, sigma: float, steps: int) -> tuple[dict, dict]:
    """Two single-process "nodes" on this machine, started as a cluster launcher would start them."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ddp_worker", str(tmp_path), "ce", str(sigma), str(steps), "2"],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "NODE_RANK": str(node),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "2",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-3000:]
    return torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")


def test_two_nodes_train_exactly_as_two_devices_on_one_node(tmp_path):
    """num_nodes × devices ranks share one global Poisson sample: 2 nodes × 1 process give the same steps,
    batches, sample rate and weights as 1 node × 2 processes with the same seeds."""
    (tmp_path / "nodes").mkdir()
    (tmp_path / "devices").mkdir()
    nodes0, nodes1 = run_two_nodes(tmp_path / "nodes", sigma=1.0, steps=8)
    devices0, devices1 = run_ddp(tmp_path / "devices", zero_loss=False, sigma=1.0, steps=8)
    torch.testing.assert_close(nodes0["final"], nodes1["final"], rtol=0, atol=0)
    assert nodes0["q"] == devices0["q"] == 8 / 64
    assert nodes0["steps"] == devices0["steps"] == 8
    assert (
        nodes0["batch_sizes"] == devices0["batch_sizes"] and nodes1["batch_sizes"] == devices1["batch_sizes"]
    )
    torch.testing.assert_close(nodes0["final"], devices0["final"])


def test_ghost_mode_under_ddp_trains_as_hook_mode(tmp_path):
    """Ghost clipping under 2-process DDP: with the same seeds, the same Poisson shares, the same noise (rank 0's)
    and the same weights as hook mode, step for step through empty local shares, and the same ε."""
    (tmp_path / "ghost").mkdir()
    (tmp_path / "hooks").mkdir()
    ghost0, ghost1 = run_ddp(
        tmp_path / "ghost", zero_loss=False, sigma=1.0, steps=16, mode="ghost", batch_size=2
    )
    hooks0, hooks1 = run_ddp(
        tmp_path / "hooks", zero_loss=False, sigma=1.0, steps=16, mode="hooks", batch_size=2
    )
    torch.testing.assert_close(ghost0["final"], ghost1["final"], rtol=0, atol=0)
    assert ghost0["batch_sizes"] == hooks0["batch_sizes"] and ghost1["batch_sizes"] == hooks1["batch_sizes"]
    # q = 2/64: rank 1 keeps every 2nd sampled row, so its share is empty in about 2 steps of 5 (a step that never reaches training_step)
    assert min(len(ghost0["batch_sizes"]), len(ghost1["batch_sizes"])) < 16
    assert ghost0["steps"] == ghost0["noisy_steps"] == ghost1["noisy_steps"] == 16
    assert not torch.equal(ghost0["initial"], ghost0["final"])
    torch.testing.assert_close(ghost0["final"], hooks0["final"], rtol=1e-5, atol=1e-6)
    assert ghost0["epsilon"] == hooks0["epsilon"] > 0 and ghost0["world_size"] == 2

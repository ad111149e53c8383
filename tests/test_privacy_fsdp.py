"""FSDP2 (ModelParallelStrategy + fully_shard) with 2 CPU processes on gloo, ghost mode: the update is the
single-process DP-SGD update on the global Poisson batch, the noise is added once per parameter element, ε is
hook mode's, and ranks stay in step through empty shares of a sample."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_dprl.privacy import DPCallback, DPConfigurationError, fsdp
from tests.fsdp_worker import SCENARIOS, initial_net
from tests.test_privacy_callback import make_trainer
from tests.toy_modules import ToyClassifier, toy_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Every scenario of ``fsdp_worker`` in one launch of 2 ranks (about 20 s)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "tests.fsdp_worker", str(out), *SCENARIOS]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: tuple(torch.load(out / f"{name}-rank{r}.pt") for r in (0, 1)) for name in SCENARIOS}


def global_batch(ranks: tuple[dict, dict], step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*(rank["rows"][step] for rank in ranks), strict=True)
    return torch.cat(x), torch.cat(y)


def clipped_sum(
    hidden: int, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[torch.Tensor, list[float]]:
    """Σ_i min(1, C/‖g_i‖) g_i, one full per-example gradient at a time, on one process; and the ‖g_i‖."""
    net = initial_net(hidden)
    total, norms = torch.zeros(sum(p.numel() for p in net.parameters())), []
    for i in range(len(x)):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.flatten() for p in net.parameters()])
        norms.append(g.norm().item())
        total += min(1.0, clip / (norms[-1] + 1e-6)) * g
    return total, norms


def test_update_is_the_single_process_clipped_sum_of_the_global_batch(runs):
    n, _, batch_size, hidden, _, _, clip, _ = SCENARIOS["exact"]
    rank0, rank1 = runs["exact"]
    x, y = global_batch((rank0, rank1))
    # q = 1: the global batch is the dataset, split between the ranks
    assert len(x) == n and len(rank0["rows"][0][0]) == len(rank1["rows"][0][0]) == n // 2
    torch.testing.assert_close(rank0["final"], rank1["final"], rtol=0, atol=0)
    total, norms = clipped_sum(hidden, x, y, clip)
    assert min(norms) < clip < max(norms)  # some examples are clipped, some are not
    # SGD with lr = 1 and σ = 0: the update is the clipped sum over the expected global batch size
    torch.testing.assert_close(rank0["initial"] - rank0["final"], total / batch_size, rtol=1e-4, atol=1e-7)


def test_removing_one_example_changes_only_its_clipped_contribution(runs):
    _, removed, batch_size, hidden, _, _, clip, _ = SCENARIOS["neighbour"]
    with_row, without_row = runs["exact"][0], runs["neighbour"][0]
    sum_with = (with_row["initial"] - with_row["final"]) * SCENARIOS["exact"][2]
    sum_without = (without_row["initial"] - without_row["final"]) * batch_size
    x, y = global_batch(runs["exact"])
    row = (x == toy_dataset(SCENARIOS["exact"][0]).tensors[0][removed]).all(1).nonzero().flatten()
    assert len(row) == 1
    contribution, _ = clipped_sum(hidden, x[row], y[row], clip)
    assert contribution.norm() <= clip + 1e-5
    torch.testing.assert_close(sum_with - sum_without, contribution, rtol=1e-4, atol=1e-6)


def test_noise_is_added_once_per_parameter_element(runs):
    _, _, batch_size, _, _, sigma, clip, _ = SCENARIOS["noise"]
    rank0, rank1 = runs["noise"]
    update = rank0["initial"] - rank0["final"]  # zero gradients: the noise / expected global batch
    ratio = update.std().item() / (sigma * clip / batch_size)
    assert 0.9 < ratio < 1.1, ratio  # noise on every rank, summed, would give sqrt(2) = 1.41
    # the ranks' shards get independent noise (equal streams would repeat it from shard to shard)
    shard0, shard1 = rank0["first_weight_shard"].flatten(), rank1["first_weight_shard"].flatten()
    assert len(shard0) == len(shard1) == 150 * 4
    assert abs(torch.corrcoef(torch.stack([shard0, shard1]))[0, 1].item()) < 0.2


def test_ranks_stay_in_step_through_empty_shares_and_spend_hook_modes_epsilon(runs, tmp_path):
    n, _, batch_size, _, _, sigma, clip, steps = SCENARIOS["sparse"]
    rank0, rank1 = runs["sparse"]
    assert rank0["steps"] == rank1["steps"] == rank0["noisy_steps"] == rank1["noisy_steps"] == steps
    sizes = [len(x) for rank in (rank0, rank1) for x, _ in rank["rows"]]
    assert 0 in sizes and len(sizes) == 2 * steps  # empty shares ran as zero-row batches
    torch.testing.assert_close(rank0["final"], rank1["final"], rtol=0, atol=0)
    single = DPCallback(noise_multiplier=sigma, max_grad_norm=clip, sampling_seed=0)
    make_trainer(tmp_path, [single], max_steps=steps).fit(ToyClassifier(n=n, batch_size=batch_size))
    assert rank0["q"] == single.sample_rate == batch_size / n
    assert rank0["epsilon"] == rank1["epsilon"] == single.epsilon > 0
    report = rank0["report"]
    assert report["epsilon"] == single.epsilon and report["world_size"] == 2
    assert report["grad_sample_mode"] == "ghost" and "FSDP2" in report["strategy"]


def test_fsdp_refuses_hook_mode(runs):
    message = runs["hooks"][0]["refused"]
    assert "needs grad_sample_mode='ghost'" in message and runs["hooks"][1]["refused"] == message


def test_fsdp_refuses_tensor_parallelism():
    mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2)}
    trainer = SimpleNamespace(strategy=SimpleNamespace(device_mesh=mesh))
    with pytest.raises(DPConfigurationError, match="tensor parallelism"):
        fsdp.refuse_sharded_trainer(trainer, "ghost")

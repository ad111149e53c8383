"""Poisson sampling: the rate the accountant is told is the rate that is drawn; ranks agree; no replay."""

import torch

from lit_dprl.privacy.sampling import PoissonBatchSampler


def draws(sampler):
    return [list(batch) for batch in sampler]


def test_inclusion_rate_is_the_accounted_sample_rate():
    n, q, steps = 400, 0.05, 2000
    counts = torch.zeros(n)
    sizes = []
    for batch in PoissonBatchSampler(n, q, steps, seed=0):
        counts[batch] += 1
        sizes.append(len(batch))
    assert abs(sum(sizes) / steps - q * n) < 0.5  # mean batch size q·N = 20 (std of the mean ≈ 0.1)
    assert abs(counts.mean().item() / steps - q) < 0.002
    assert 0 < min(sizes) < max(sizes)  # the batch size varies, as Poisson sampling does
    assert (counts / steps - q).abs().max() < 0.03  # every example, not only on average


def test_ranks_split_one_global_sample_and_take_the_same_number_of_steps():
    global_batches = draws(PoissonBatchSampler(100, 0.1, 50, seed=3))
    per_rank = [draws(PoissonBatchSampler(100, 0.1, 50, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 50  # empty local batches included
    for step, batch in enumerate(global_batches):
        assert sorted(per_rank[0][step] + per_rank[1][step]) == batch
        assert not set(per_rank[0][step]) & set(per_rank[1][step])


def test_a_resumed_sampler_never_replays_earlier_samples():
    first = PoissonBatchSampler(1000, 0.01, 20, seed=7)
    earlier = draws(first)
    resumed = draws(PoissonBatchSampler(1000, 0.01, 20, seed=7, batches_drawn=first.batches_drawn))
    assert first.batches_drawn == 20
    assert earlier != resumed
    assert draws(PoissonBatchSampler(1000, 0.01, 20, seed=7)) == earlier  # same seed and position: same draws

"""The PPO math in ``lit_dprl.rl`` against straightforward Python loops and hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dprl import rl

EOS, PAD = 7, 9
SHAPES = [(1, 1), (3, 5), (6, 17)]


def random_responses(batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids in [0, 10) with EOS (7) appearing at random places, sometimes not at all."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (batch, length), generator=generator)


def prefix_mask(lengths: list[int], length: int) -> torch.Tensor:
    return torch.tensor([[t < n for t in range(length)] for n in lengths])


def random_prefix_mask(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return prefix_mask(torch.randint(1, length + 1, (batch,), generator=generator).tolist(), length)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- tokens and masks


def loop_first_true(row: list[bool]) -> int:
    for t, value in enumerate(row):
        if value:
            return t
    return len(row)


def test_first_true_indices_hand_cases():
    bools = torch.tensor(
        [[False, True, True], [True, False, False], [False, False, False], [False, False, True]]
    )
    assert rl.first_true_indices(bools).tolist() == [1, 0, 3, 2]


@pytest.mark.parametrize("shape", SHAPES)
def test_first_true_indices_matches_loop(shape):
    bools = random_responses(*shape, seed=1) == EOS
    assert rl.first_true_indices(bools).tolist() == [loop_first_true(row) for row in bools.tolist()]


def test_truncate_after_eos_hand_cases():
    responses = torch.tensor(
        [
            [EOS, 1, 2, 3],  # EOS first: only the EOS stays
            [1, 2, 3, EOS],  # EOS last: nothing to cut
            [1, EOS, 2, EOS],  # two EOS: cut after the first
            [1, 2, 3, 4],  # no EOS: unchanged
        ]
    )
    truncated, contains_eos = rl.truncate_after_eos(responses, EOS, PAD)
    assert truncated.tolist() == [[EOS, PAD, PAD, PAD], [1, 2, 3, EOS], [1, EOS, PAD, PAD], [1, 2, 3, 4]]
    assert contains_eos.tolist() == [True, True, True, False]
    assert rl.response_lengths(responses, EOS).tolist() == [1, 4, 2, 4]
    assert rl.response_mask(truncated, EOS).tolist() == rl.response_mask(responses, EOS).tolist()


def test_response_mask_ignores_pad_ids_inside_a_response():
    responses = torch.tensor([[1, PAD, 2, EOS, 3]])
    assert rl.response_mask(responses, EOS).tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize("shape", SHAPES)
def test_truncate_and_mask_match_loop(shape):
    responses = random_responses(*shape, seed=2)
    truncated, contains_eos = rl.truncate_after_eos(responses, EOS, PAD)
    mask = rl.response_mask(responses, EOS)
    for b, row in enumerate(responses.tolist()):
        seen_eos, expected_row, expected_mask = False, [], []
        for token in row:
            expected_row.append(PAD if seen_eos else token)
            expected_mask.append(not seen_eos)
            seen_eos = seen_eos or token == EOS
        assert truncated[b].tolist() == expected_row
        assert mask[b].tolist() == expected_mask
        assert contains_eos[b].item() == (EOS in row)


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators_hand_values():
    logprobs, ref_logprobs = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert rl.kl_estimate(logprobs, ref_logprobs, "k1").item() == pytest.approx(math.log(2))
    assert rl.kl_estimate(logprobs, ref_logprobs, "k3").item() == pytest.approx((0.5 - 1) + math.log(2))
    same = torch.tensor([[-1.3, -0.2]])
    assert rl.kl_estimate(same, same, "k1").tolist() == [[0.0, 0.0]]
    assert rl.kl_estimate(same, same, "k3").tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="k1"):
        rl.kl_estimate(same, same, "k2")


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_estimators_match_loop(shape):
    logprobs, ref_logprobs = -randn(*shape, seed=3).abs(), -randn(*shape, seed=4).abs()
    k1, k3 = rl.kl_estimate(logprobs, ref_logprobs, "k1"), rl.kl_estimate(logprobs, ref_logprobs, "k3")
    for b in range(shape[0]):
        for t in range(shape[1]):
            log_r = ref_logprobs[b, t].item() - logprobs[b, t].item()
            assert k1[b, t].item() == pytest.approx(-log_r)
            assert k3[b, t].item() == pytest.approx(math.exp(log_r) - 1 - log_r)
    assert (k3 >= 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_per_token_rewards_match_loop(shape):
    batch, length = shape
    kl, scores, mask = randn(*shape, seed=5), randn(batch, seed=6), random_prefix_mask(*shape, seed=7)
    rewards = rl.per_token_rewards(kl, scores, mask, kl_coef=0.05)
    for b in range(batch):
        last = max(t for t in range(length) if mask[b, t])
        for t in range(length):
            expected = -0.05 * kl[b, t].item() if mask[b, t] else 0.0
            expected += scores[b].item() if t == last else 0.0
            assert rewards[b, t].item() == pytest.approx(expected)


def test_per_token_rewards_refuse_an_empty_row():
    with pytest.raises(ValueError, match="empty mask"):
        rl.per_token_rewards(torch.zeros(2, 3), torch.zeros(2), prefix_mask([2, 0], 3), kl_coef=0.1)


def test_missing_eos_penalty_only_hits_rows_without_eos():
    scores, contains_eos = torch.tensor([1.0, 2.0, -0.5]), torch.tensor([True, False, False])
    assert rl.apply_missing_eos_penalty(scores, contains_eos, 1.0).tolist() == [1.0, 1.0, -1.5]
    assert rl.apply_missing_eos_penalty(scores, contains_eos, 0.0).tolist() == scores.tolist()
    with pytest.raises(ValueError, match=">= 0"):
        rl.apply_missing_eos_penalty(scores, contains_eos, -1.0)


# ---------------------------------------------------------------- GAE


def loop_gae(rewards, values, mask, gamma, lam):
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rewards.tolist(), values.tolist(), mask.tolist(), strict=True):
        r = [x * m for x, m in zip(r_row, m_row, strict=True)]
        v = [x * m for x, m in zip(v_row, m_row, strict=True)]
        a, next_a, next_v = [0.0] * len(r), 0.0, 0.0
        for t in reversed(range(len(r))):
            delta = r[t] + gamma * next_v - v[t]
            a[t] = (delta + gamma * lam * next_a) * m_row[t]
            next_a, next_v = a[t], v[t]
        advantages.append(a)
        returns.append([(x + y) * m for x, y, m in zip(a, v, m_row, strict=True)])
    return advantages, returns


def test_gae_hand_worked_three_tokens():
    # γ = 1, λ = 0.95, r = (-0.1, -0.2, 1.0), V = (0.5, 0.4, 0.3):
    # δ2 = 1.0 - 0.3 = 0.7;  δ1 = -0.2 + 0.3 - 0.4 = -0.3;  δ0 = -0.1 + 0.4 - 0.5 = -0.2
    # A2 = 0.7;  A1 = -0.3 + 0.95·0.7 = 0.365;  A0 = -0.2 + 0.95·0.365 = 0.14675
    # returns = A + V = (0.64675, 0.765, 1.0)
    # Second row: same numbers, length 2, so V2 counts as 0 and the third position is ignored:
    # δ1 = -0.2 - 0.4 = -0.6;  δ0 = -0.2;  A1 = -0.6;  A0 = -0.2 + 0.95·(-0.6) = -0.77
    rewards = torch.tensor([[-0.1, -0.2, 1.0], [-0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 0.3]], dtype=torch.float64)
    advantages, returns = rl.generalized_advantage_estimation(
        rewards, values, prefix_mask([3, 2], 3), gamma=1.0, lam=0.95
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.14675, 0.365, 0.7], [-0.77, -0.6, 0.0]]).double())
    torch.testing.assert_close(returns, torch.tensor([[0.64675, 0.765, 1.0], [-0.27, -0.2, 0.0]]).double())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_loop(shape, gamma, lam):
    rewards, values = randn(*shape, seed=8), randn(*shape, seed=9)
    for mask in (
        random_prefix_mask(*shape, seed=10),
        torch.rand(*shape, generator=torch.Generator().manual_seed(11)) > 0.3,
    ):
        advantages, returns = rl.generalized_advantage_estimation(rewards, values, mask, gamma, lam)
        expected_advantages, expected_returns = loop_gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(advantages, torch.tensor(expected_advantages, dtype=torch.float64))
        torch.testing.assert_close(returns, torch.tensor(expected_returns, dtype=torch.float64))


# ---------------------------------------------------------------- PPO losses


@pytest.mark.parametrize("shape", SHAPES)
def test_policy_loss_matches_loop(shape):
    logprobs, old_logprobs = 0.3 * randn(*shape, seed=12), 0.3 * randn(*shape, seed=13)
    advantages, mask = randn(*shape, seed=14), random_prefix_mask(*shape, seed=15)
    out = rl.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    for b in range(shape[0]):
        losses, clipped, squares, ratios = [], [], [], []
        for t in range(shape[1]):
            if not mask[b, t]:
                continue
            log_ratio = logprobs[b, t].item() - old_logprobs[b, t].item()
            ratio, a = math.exp(log_ratio), advantages[b, t].item()
            unclipped_term, clipped_term = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            losses.append(max(unclipped_term, clipped_term))
            clipped.append(float(clipped_term > unclipped_term))
            squares.append(log_ratio**2)
            ratios.append(ratio)
        n = len(losses)
        assert out.loss[b].item() == pytest.approx(sum(losses) / n)
        assert out.clip_fraction[b].item() == pytest.approx(sum(clipped) / n)
        assert out.approx_kl[b].item() == pytest.approx(0.5 * sum(squares) / n)
        assert out.ratio_mean[b].item() == pytest.approx(sum(ratios) / n)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs, advantages = randn(3, 4, seed=16), randn(3, 4, seed=17)
    mask = prefix_mask([4, 2, 1], 4)
    out = rl.ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)
    expected = [-sum(advantages[b, :n].tolist()) / n for b, n in enumerate([4, 2, 1])]
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=torch.float64))
    assert out.clip_fraction.tolist() == [0.0, 0.0, 0.0]
    assert out.approx_kl.tolist() == [0.0, 0.0, 0.0]
    assert out.ratio_mean.tolist() == [1.0, 1.0, 1.0]


def test_policy_loss_clipping_cases():
    # ratio 1.5 or 0.5, A = ±1, ε = 0.2: the pessimistic (larger) term wins.
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]], dtype=torch.float64)
    advantages = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64)
    out = rl.ppo_policy_loss(
        ratios.log(), torch.zeros_like(ratios), advantages, torch.ones(4, 1), cliprange=0.2
    )
    # A>0, ρ=1.5: max(-1.5, -1.2) = -1.2 (clipped);  A<0, ρ=0.5: max(0.5, 0.8) = 0.8 (clipped)
    # A>0, ρ=0.5: max(-0.5, -0.8) = -0.5 (not clipped);  A<0, ρ=1.5: max(1.5, 1.2) = 1.5 (not clipped)
    torch.testing.assert_close(out.loss, torch.tensor([-1.2, 0.8, -0.5, 1.5], dtype=torch.float64))
    assert out.clip_fraction.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_policy_loss_ignores_padding_values():
    logprobs = torch.tensor([[-1.0, float("-inf")]])
    old_logprobs = torch.tensor([[-1.0, 1.0]])
    out = rl.ppo_policy_loss(logprobs, old_logprobs, torch.tensor([[2.0, 0.0]]), prefix_mask([1], 2), 0.2)
    assert out.loss.tolist() == [-2.0]
    assert torch.isfinite(torch.stack(out)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_value_loss_matches_loop(shape):
    values, old_values, returns = randn(*shape, seed=18), randn(*shape, seed=19), randn(*shape, seed=20)
    mask = random_prefix_mask(*shape, seed=21)
    out = rl.ppo_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    for b in range(shape[0]):
        losses, clipped = [], []
        for t in range(shape[1]):
            if not mask[b, t]:
                continue
            v, v_old, r = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clipped = v_old + min(max(v - v_old, -0.2), 0.2)
            losses.append(max((v - r) ** 2, (v_clipped - r) ** 2))
            clipped.append(float((v_clipped - r) ** 2 > (v - r) ** 2))
        assert out.loss[b].item() == pytest.approx(0.5 * sum(losses) / len(losses))
        assert out.clip_fraction[b].item() == pytest.approx(sum(clipped) / len(clipped))


def test_value_loss_clipping_cases():
    # v_old = 0, v = 1, c = 0.2 → v_clip = 0.2.
    # R = 0: max(1, 0.04) = 1 → 0.5 (unclipped wins);  R = 2: max(1, 3.24) = 3.24 → 1.62 (clipped wins).
    values, old_values = torch.ones(2, 1, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
    returns = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    out = rl.ppo_value_loss(values, old_values, returns, torch.ones(2, 1), cliprange_value=0.2)
    torch.testing.assert_close(out.loss, torch.tensor([0.5, 1.62], dtype=torch.float64))
    assert out.clip_fraction.tolist() == [0.0, 1.0]


def test_entropy_from_logits_matches_loop():
    logits = randn(2, 3, 5, seed=22)
    entropy = rl.entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            z = sum(math.exp(x) for x in row)
            assert entropy[b, t].item() == pytest.approx(
                -sum(math.exp(x) / z * (x - math.log(z)) for x in row)
            )
    torch.testing.assert_close(rl.entropy_from_logits(torch.zeros(1, 1, 8)), torch.tensor([[math.log(8)]]))


# ---------------------------------------------------------------- whitening (batch statistic)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten_statistics(unbiased):
    values, mask = 3.0 + 2.0 * randn(4, 6, seed=23), random_prefix_mask(4, 6, seed=24)
    selected = values[mask]
    whitened = rl.masked_whiten(values, mask, unbiased=unbiased)[mask]
    assert whitened.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened.var(correction=1 if unbiased else 0).item() == pytest.approx(1.0, abs=1e-6)
    kept_mean = rl.masked_whiten(values, mask, shift_mean=False, unbiased=unbiased)[mask]
    assert kept_mean.mean().item() == pytest.approx(selected.mean().item())
    assert (rl.masked_whiten(values, mask)[~mask] == 0).all()


def test_masked_whiten_couples_rows_and_needs_two_entries():
    values, mask = randn(3, 4, seed=25), torch.ones(3, 4, dtype=torch.bool)
    changed = values.clone()
    changed[0] += 5.0
    assert not torch.equal(rl.masked_whiten(values, mask)[1:], rl.masked_whiten(changed, mask)[1:])
    with pytest.raises(ValueError, match="at least 2"):
        rl.masked_whiten(values, prefix_mask([1, 0, 0], 4))


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller():
    controller = rl.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=6.0, n_steps=128)
    assert controller.value == pytest.approx(0.2)
    for current_kl in [0.0, 1.0, 5.0, 7.0, 100.0]:
        before = controller.value
        controller.update(current_kl, n_steps=256)
        assert abs(controller.value / before - 1) <= 0.2 * 256 / 10000 + 1e-12
    controller = rl.AdaptiveKLController(0.2, 6.0, 10000)
    controller.update(current_kl=6.6, n_steps=100)  # e = 0.1 → β·(1 + 0.1·100/10000)
    assert controller.value == pytest.approx(0.2 * 1.001)
    restored = rl.AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    with pytest.raises(ValueError, match="target > 0"):
        rl.AdaptiveKLController(0.2, 0.0, 10000)


def test_fixed_kl_controller():
    controller = rl.FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=512)
    assert controller.value == 0.05
    restored = rl.FixedKLController(0.1)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05
    with pytest.raises(ValueError, match=">= 0"):
        rl.FixedKLController(-0.1)


# ---------------------------------------------------------------- group baselines (RLOO, GRPO)


@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (5, 8)])
def test_rloo_advantages_match_loop(shape):
    rewards = randn(*shape, seed=40)
    expected = torch.tensor(
        [[r[g] - sum(r[h] for h in range(len(r)) if h != g) / (len(r) - 1) for g in range(len(r))] for r in rewards.tolist()],
        dtype=torch.float64,
    )  # fmt: skip
    torch.testing.assert_close(rl.rloo_advantages(rewards), expected)


@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (5, 8)])
def test_grpo_advantages_match_loop(shape):
    rewards = randn(*shape, seed=41)
    expected = []
    for row in rewards.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - 1))
        expected.append([(r - mean) / (std + 1e-4) for r in row])
    torch.testing.assert_close(rl.grpo_advantages(rewards), torch.tensor(expected, dtype=torch.float64))


def test_group_baselines_hand_cases():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    assert rl.rloo_advantages(rewards).tolist() == [[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]
    assert rl.grpo_advantages(rewards)[1].tolist() == [0.0, 0.0, 0.0]  # equal rewards: no signal
    torch.testing.assert_close(
        rl.grpo_advantages(rewards)[0], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-3, rtol=0
    )
    for baseline in (rl.rloo_advantages, rl.grpo_advantages):
        with pytest.raises(ValueError, match="at least 2 completions"):
            baseline(torch.ones(3, 1))


def test_sequence_rewards_match_loop():
    scores, kl, mask = (
        randn(3, 4, seed=42),
        randn(3, 4, 6, seed=43),
        random_prefix_mask(12, 6, seed=44).view(3, 4, 6),
    )
    expected = [
        [
            scores[p, g].item() - 0.1 * sum(kl[p, g, t].item() for t in range(6) if mask[p, g, t])
            for g in range(4)
        ]
        for p in range(3)
    ]
    torch.testing.assert_close(
        rl.sequence_rewards(scores, kl, mask, 0.1), torch.tensor(expected, dtype=torch.float64)
    )


# ---------------------------------------------------------------- no cross-row coupling


def batch_inputs(seed: int, batch: int = 4, length: int = 6, vocab: int = 5) -> dict[str, torch.Tensor]:
    responses = random_responses(batch, length, seed)
    responses[:, 0] = 1  # no row is empty
    return {
        "responses": responses,
        "bools": responses == EOS,
        "mask": random_prefix_mask(batch, length, seed + 1),
        "logprobs": -randn(batch, length, seed=seed + 2).abs(),
        "other_logprobs": -randn(batch, length, seed=seed + 3).abs(),
        "values": randn(batch, length, seed=seed + 4),
        "other_values": randn(batch, length, seed=seed + 5),
        "returns": randn(batch, length, seed=seed + 6),
        "scores": randn(batch, seed=seed + 7),
        "contains_eos": torch.arange(batch) % 2 == seed % 2,
        "logits": randn(batch, length, vocab, seed=seed + 8),
    }


PER_EXAMPLE_FUNCTIONS = {
    "first_true_indices": lambda x: (rl.first_true_indices(x["bools"]),),
    "response_lengths": lambda x: (rl.response_lengths(x["responses"], EOS),),
    "response_mask": lambda x: (rl.response_mask(x["responses"], EOS),),
    "truncate_after_eos": lambda x: rl.truncate_after_eos(x["responses"], EOS, PAD),
    "kl_k1": lambda x: (rl.kl_estimate(x["logprobs"], x["other_logprobs"], "k1"),),
    "kl_k3": lambda x: (rl.kl_estimate(x["logprobs"], x["other_logprobs"], "k3"),),
    "per_token_rewards": lambda x: (rl.per_token_rewards(x["values"], x["scores"], x["mask"], 0.1),),
    "missing_eos_penalty": lambda x: (rl.apply_missing_eos_penalty(x["scores"], x["contains_eos"], 1.0),),
    "gae": lambda x: rl.generalized_advantage_estimation(x["returns"], x["values"], x["mask"], 1.0, 0.95),
    "policy_loss": lambda x: rl.ppo_policy_loss(
        x["logprobs"], x["other_logprobs"], x["values"], x["mask"], 0.2
    ),
    "value_loss": lambda x: rl.ppo_value_loss(x["values"], x["other_values"], x["returns"], x["mask"], 0.2),
    "entropy": lambda x: (rl.entropy_from_logits(x["logits"]),),
    "sequence_rewards": lambda x: (rl.sequence_rewards(x["scores"], x["values"], x["mask"], 0.1),),
    "rloo": lambda x: (rl.rloo_advantages(x["values"]),),  # rows = prompts, columns = their completions
    "grpo": lambda x: (rl.grpo_advantages(x["values"]),),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE_FUNCTIONS))
def test_changing_one_row_changes_only_that_row(name):
    function, changed_row = PER_EXAMPLE_FUNCTIONS[name], 2
    inputs, other = batch_inputs(seed=30), batch_inputs(seed=31)
    other["bools"][changed_row] = ~inputs["bools"][changed_row]  # make sure the first-true index moves
    perturbed = {key: value.clone() for key, value in inputs.items()}
    for key in perturbed:
        perturbed[key][changed_row] = other[key][changed_row]
    inputs["mask"][changed_row], perturbed["mask"][changed_row] = (
        prefix_mask([6], 6)[0],
        prefix_mask([2], 6)[0],
    )
    before, after = function(inputs), function(perturbed)
    keep = torch.arange(4) != changed_row
    for out_before, out_after in zip(before, after, strict=True):
        assert torch.equal(out_before[keep], out_after[keep])
    assert any(not torch.equal(b[changed_row], a[changed_row]) for b, a in zip(before, after, strict=True))

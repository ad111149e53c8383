"""PPO-for-language-models math as small pure functions on tensors (cleanrl style).

Shapes: ``B`` rows (one row = one completion), ``T`` response tokens, ``V`` vocabulary; ``P`` prompts with
``G`` completions each (``B = P·G``; ``G = 1`` for PPO with GAE). One prompt is one privacy unit.
Per-token tensors are ``[B, T]`` and aligned to the *response* tokens: position ``t`` holds the
log-prob / value / reward of response token ``t``. ``mask`` marks the valid response tokens (those up to
and including the first EOS). Group tensors are ``[P, G]``.

Every function here except :func:`masked_whiten` and the KL controllers works row by row (group by group
for ``[P, G]`` inputs): changing one prompt's inputs changes only that prompt's outputs, as the DP contract
requires. The per-example losses return shape ``[B]``; the training loss is their plain ``.mean()``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from lit_dprl.losses import masked_row_mean


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first ``True`` in each row, or ``T`` when the row has none: ``[B, T] -> [B]``."""
    positions = torch.arange(bools.size(-1), device=bools.device)
    return torch.where(bools.bool(), positions, bools.size(-1)).min(-1).values


def response_lengths(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Valid tokens per row: ``first_eos + 1`` (the EOS counts), or ``T`` without EOS: ``[B, T] -> [B]``.

    Works on raw or truncated responses alike (the first EOS is at the same place). It never reads pad
    tokens, so a pad id sampled inside a response cannot shorten it.
    """
    return (first_true_indices(responses == eos_token_id) + 1).clamp(max=responses.size(-1))


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Boolean mask ``m[b, t] = t < response_lengths[b]`` (tokens up to and including the first EOS), ``[B, T]``."""
    positions = torch.arange(responses.size(-1), device=responses.device)
    return positions < response_lengths(responses, eos_token_id).unsqueeze(-1)


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row up to and including its first EOS and fill the rest with ``pad_token_id``.

    Returns ``(truncated [B, T], contains_eos [B] bool)``; rows without EOS are returned unchanged.
    """
    truncated = torch.where(response_mask(responses, eos_token_id), responses, pad_token_id)
    contains_eos = first_true_indices(responses == eos_token_id) < responses.size(-1)
    return truncated, contains_eos


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of ``KL(π || π_ref)`` from log-probs of the sampled tokens, ``[B, T]``.

    With ``log r = ref_logp - logp``:
    ``k1 = -log r = logp - ref_logp`` (unbiased, can be negative);
    ``k3 = (exp(log r) - 1) - log r`` (unbiased, always >= 0; Schulman's "approximating KL").
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'.")


def last_valid_indices(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last ``True`` of each row of ``mask`` (``[B, T] -> [B]``); every row needs one."""
    if not mask.bool().any(-1).all():
        raise ValueError("every row needs at least one valid response token; got a row with an empty mask.")
    return mask.size(-1) - 1 - first_true_indices(mask.bool().flip(-1))


def per_token_rewards(
    kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Ziegler et al. shaped reward, ``[B, T]``.

    ``r[b, t] = -β · kl[b, t] · m[b, t]``, plus ``scores[b]`` added at the last valid token of row ``b``
    (the reward model's score is a terminal reward). Positions outside the mask are 0.
    """
    rewards = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    last = last_valid_indices(mask).unsqueeze(-1)
    return rewards.scatter_add(-1, last, scores.to(rewards.dtype).unsqueeze(-1))


def apply_missing_eos_penalty(
    scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float
) -> torch.Tensor:
    """The "EOS trick": ``scores[b] - penalty`` for rows without EOS, unchanged otherwise, ``[B]``."""
    if penalty < 0:
        raise ValueError(f"missing_eos_penalty is subtracted from the score and must be >= 0, got {penalty}.")
    return torch.where(contains_eos.bool(), scores, scores - penalty)


def sequence_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Sequence-level KL-penalised reward (TRL RLOO's ``rlhf_reward``), ``[..., T] -> [...]``:
    ``R = score - β · Σ_{t∈M} kl_t``."""
    return scores - kl_coef * torch.where(mask.bool(), kl, 0.0).sum(-1)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024), ``[P, G] -> [P, G]``::

        A_{p,g} = r_{p,g} - (1/(G-1)) · Σ_{h≠g} r_{p,h}

    The baseline of a completion is the mean reward of the other ``G - 1`` completions of the same prompt.
    """
    group = rewards.size(-1)
    if group < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt, got {group}.")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (group - 1)


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024; TRL's ``scale_rewards="group"``), ``[P, G] -> [P, G]``::

        A_{p,g} = (r_{p,g} - mean_h r_{p,h}) / (std_h r_{p,h} + eps)

    with the sample standard deviation (Bessel's correction, as ``torch.std``) of the prompt's own ``G``
    rewards; a group of equal rewards gets advantages 0.
    """
    group = rewards.size(-1)
    if group < 2:
        raise ValueError(f"GRPO needs at least 2 completions per prompt, got {group}.")
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def generalized_advantage_estimation(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2015) per row, returning ``(advantages, returns)``, both ``[B, T]``.

    Rewards and values outside the mask count as 0, so ``V`` beyond the last valid token is 0. Scanning
    backwards over time (each step vectorised over rows)::

        δ_t = r_t + γ · V_{t+1} - V_t
        A_t = δ_t + γ · λ · A_{t+1}          (A_T = V_T = 0)
        returns_t = A_t + V_t

    Both outputs are 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(-1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


class PolicyLossOutput(NamedTuple):
    """Per-example clipped-surrogate loss and diagnostics, each ``[B]``."""

    loss: torch.Tensor
    """Masked row mean of ``max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))``."""
    clip_fraction: torch.Tensor
    """Fraction of valid tokens where the clipped term is the larger one."""
    approx_kl: torch.Tensor
    """``0.5 · mean_t (log ρ)²`` (the k2 estimator of ``KL(π_old || π)``)."""
    ratio_mean: torch.Tensor
    """Masked row mean of ``ρ``."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLossOutput:
    """PPO clipped surrogate per example, with ``ρ_t = exp(logp_t - old_logp_t)``::

        loss_b = (1/|M_b|) · Σ_{t∈M_b} max(-A_t · ρ_t, -A_t · clip(ρ_t, 1-ε, 1+ε))

    Inputs are ``[B, T]``; every output field is ``[B]``. Positions outside the mask are ignored (their
    log-ratio is set to 0 before exponentiating, so padding values never overflow).
    """
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return PolicyLossOutput(
        loss=masked_row_mean(torch.maximum(unclipped, clipped), mask),
        clip_fraction=masked_row_mean((clipped > unclipped).to(ratio.dtype), mask),
        approx_kl=0.5 * masked_row_mean(log_ratio.square(), mask),
        ratio_mean=masked_row_mean(ratio, mask),
    )


class ValueLossOutput(NamedTuple):
    """Per-example clipped value loss and its clip fraction, each ``[B]``."""

    loss: torch.Tensor
    """``0.5 ·`` masked row mean of ``max((v - R)², (clip(v, v_old ± c) - R)²)``."""
    clip_fraction: torch.Tensor
    """Fraction of valid tokens where the clipped error is the larger one."""


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> ValueLossOutput:
    """Clipped value loss per example, with ``v^clip_t = old_v_t + clip(v_t - old_v_t, -c, c)``::

        loss_b = 0.5 · (1/|M_b|) · Σ_{t∈M_b} max((v_t - R_t)², (v^clip_t - R_t)²)

    Inputs are ``[B, T]``; both output fields are ``[B]``.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    return ValueLossOutput(
        loss=0.5 * masked_row_mean(torch.maximum(unclipped_error, clipped_error), mask),
        clip_fraction=masked_row_mean((clipped_error > unclipped_error).to(values.dtype), mask),
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: ``H = logsumexp(l) - Σ_v softmax(l)_v · l_v``, ``[B, T, V] -> [B, T]``."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True
) -> torch.Tensor:
    """Standardise ``values`` with the mean and variance of ALL valid entries of the BATCH, ``[B, T]``.

    .. warning::
        This is a batch statistic: every output depends on every row. It couples examples and breaks
        the per-example sensitivity bound of DP-SGD, so it is ONLY for non-private PPO (TRL / N+
        advantage whitening). Never use it inside a private loss.

    ``out = (x - μ) / sqrt(σ² + 1e-8)`` (plus ``μ`` again when ``shift_mean=False``), with ``μ``, ``σ²``
    over the masked entries; ``unbiased=True`` uses Bessel's correction (TRL), ``False`` the biased
    variance (N+ / TF). Positions outside the mask are 0.
    """
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count < 2:
        raise ValueError(
            f"masked_whiten needs at least 2 valid entries to estimate a variance, got {int(count)}."
        )
    mean = (values * mask).sum() / count
    variance = ((values - mean).square() * mask).sum() / (count - 1 if unbiased else count)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


class FixedKLController:
    """A constant KL coefficient β (TRL / N+ default 0.05)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}.")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        """Checkpoint state: ``{"value": β}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller steering the observed KL towards ``target``.

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``;  ``β ← β · (1 + e · n_steps / horizon)``.

    .. warning::
        ``current_kl`` is a batch statistic of the (private) prompts; feeding it back into β leaks
        information that DP-SGD does not account for. Use :class:`FixedKLController` for private PPO.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef >= 0, target > 0 and horizon > 0; got {init_kl_coef}, {target}, {horizon}."
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply β by ``1 + clip(current_kl / target - 1, ±0.2) · n_steps / horizon``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Checkpoint state: ``{"value": β}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from :meth:`state_dict`."""
        self.value = float(state["value"])

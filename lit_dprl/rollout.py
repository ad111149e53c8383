"""Rollout pieces of stage 3 that keep each prompt's computation its own (the DP unit is one prompt).

- **Randomness per prompt.** Every prompt of rollout batch ``n`` gets streams seeded by
  ``SHA-256(secret, n, key(prompt), purpose, index)``, where ``key`` hashes the prompt's non-pad token ids:
  its completions' tokens and its minibatch choices depend on the secret, the batch number and the prompt
  alone, never on the other prompts of the batch, their order or their padding. (Two identical prompts in one
  batch draw identical completions.)
- **One row per prompt.** A prompt's ``G`` completions are packed into ONE sequence, ``[prompt, response_1,
  ..., response_G]``, with an attention mask under which response ``g`` sees the prompt and its own earlier
  tokens only, and position ids that restart after the prompt for every response. Each completion's logits
  are exactly those of the unpacked ``[prompt, response_g]`` (up to float rounding), the prompt is computed
  once, and the leading dimension of every activation is the prompt: per-example gradients (Opacus) are
  per prompt, clipped once, whatever ``G`` is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from lit_dprl.generation import row_generators, sample_with_logprobs, sampling_logprobs
from lit_dprl.losses import masked_row_mean
from lit_dprl.models import position_ids_from_mask
from lit_dprl.rl import (
    generalized_advantage_estimation,
    grpo_advantages,
    kl_estimate,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    response_mask,
    rloo_advantages,
    sequence_rewards,
    truncate_after_eos,
)


def stream_seed(secret: int, *parts: object) -> int:
    """A 63-bit seed: the first 8 bytes of ``SHA-256(secret : part_1 : ... : part_k)``."""
    text = ":".join(str(part) for part in (secret, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def prompt_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """Each prompt's identity: hex SHA-256 of its non-pad token ids (the same at any padding), ``[B, L] -> B``."""
    return [
        hashlib.sha256(ids[mask.bool()].cpu().numpy().astype("int64").tobytes()).hexdigest()
        for ids, mask in zip(input_ids, attention_mask, strict=True)
    ]


def completion_seeds(secret: int, batch: int | str, keys: list[str], samples_per_prompt: int) -> list[int]:
    """Sampling seeds of the ``P·G`` completions, prompt-major (completion ``g`` of prompt ``p`` at ``p·G + g``)."""
    return [stream_seed(secret, batch, key, "sample", g) for key in keys for g in range(samples_per_prompt)]


def minibatch_ids(
    secret: int, batch: int, keys: list[str], num_mini_batches: int, epochs: int
) -> torch.Tensor:
    """``[P, epochs]``: the minibatch of each prompt in each PPO epoch, uniform on ``{0..M-1}``, drawn from the
    prompt's own stream (adding or removing a prompt moves no other prompt)."""
    rows = [
        torch.randint(
            num_mini_batches,
            (epochs,),
            generator=torch.Generator().manual_seed(stream_seed(secret, batch, key, "minibatch")),
        )
        for key in keys
    ]
    return torch.stack(rows) if rows else torch.zeros(0, epochs, dtype=torch.long)


def assign_minibatches(
    assignment: str, secret: int, batch: int, keys: list[str], num_mini_batches: int, epochs: int
) -> list[list[torch.Tensor]]:
    """Per PPO epoch, the prompt indices of each of the ``M`` minibatches (some may be empty).

    ``"independent"``: each prompt's minibatch in each epoch from :func:`minibatch_ids` (DP-safe).
    ``"permutation"``: TRL's split, a random permutation per epoch cut into ``M`` near-equal parts; one prompt's
    presence moves the others between minibatches, so it is for non-private training only.
    """
    if assignment == "independent":
        ids = minibatch_ids(secret, batch, keys, num_mini_batches, epochs)
        return [[torch.nonzero(column == m).flatten() for m in range(num_mini_batches)] for column in ids.T]
    generator = torch.Generator().manual_seed(stream_seed(secret, batch, "permutation"))
    return [
        list(torch.randperm(len(keys), generator=generator).tensor_split(num_mini_batches))
        for _ in range(epochs)
    ]


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout of ``model`` to 0 (TRL does the same for PPO): sampled and trained log-probs then agree,
    and no dropout mask is drawn from the shared torch RNG."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class Packed(NamedTuple):
    """``P`` prompts with their ``G`` completions of width ``T``, one sequence of length ``L = Lp + G·T`` each."""

    input_ids: torch.Tensor  # [P, L]
    allowed: torch.Tensor  # [P, L, L] bool: query position i may attend to key position j
    position_ids: torch.Tensor  # [P, L]
    keep: torch.Tensor  # [G·T]: the position whose logits predict response token (g, t)


def pack_completions(
    queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor
) -> Packed:
    """Pack left-padded ``queries`` ``[P, Lp]`` and ``responses``/``mask`` ``[P, G, T]`` (valid tokens up to
    the first EOS) one prompt per row.

    Key ``j`` is visible from query ``i`` iff ``j <= i``, ``j`` is a valid token, and ``j`` is in the prompt or
    in the same response as ``i`` (every position also sees itself, so padding rows stay finite). Response
    token ``t`` has position ``n_p + t`` (``n_p`` the prompt's length) and is predicted by the logits of the last
    prompt position (``t = 0``) or of its own response's token ``t - 1``.
    """
    prompts, context = queries.shape
    _, group, width = responses.shape
    length = context + group * width
    device = queries.device
    input_ids = torch.cat([queries, responses.reshape(prompts, group * width)], dim=1)
    valid = torch.cat([query_mask.bool(), mask.reshape(prompts, group * width).bool()], dim=1)
    block = torch.cat(
        [torch.zeros(context, dtype=torch.long, device=device),
         torch.arange(1, group + 1, device=device).repeat_interleave(width)]
    )  # fmt: skip
    order = torch.arange(length, device=device)
    visible = (order[None, :] <= order[:, None]) & (
        (block[None, :] == 0) | (block[None, :] == block[:, None])
    )
    allowed = (visible[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
    steps = torch.arange(width, device=device).repeat(group)
    response_positions = query_mask.sum(1, keepdim=True) + steps
    position_ids = torch.cat([position_ids_from_mask(query_mask), response_positions], dim=1)
    starts = context + torch.arange(group, device=device).repeat_interleave(width) * width
    keep = torch.where(steps == 0, context - 1, starts + steps - 1)
    return Packed(input_ids, allowed, position_ids, keep)


def packed_forward(
    model: torch.nn.Module, packed: Packed, rows: torch.Tensor, output_hidden_states: bool = False
):
    """The model's output on rows ``rows`` of ``packed``, logits only at ``packed.keep`` (``[R, G·T, V]``)."""
    dtype = next(model.parameters()).dtype
    allowed = packed.allowed[rows].unsqueeze(1)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    return model(
        input_ids=packed.input_ids[rows],
        attention_mask=additive,
        position_ids=packed.position_ids[rows],
        output_hidden_states=output_hidden_states,
        logits_to_keep=packed.keep,
    )


class Completions(NamedTuple):
    """``G`` sampled completions of each of ``P`` prompts; per-token tensors ``[P, G, T]``."""

    responses: torch.Tensor  # truncated after the first EOS (pad after)
    mask: torch.Tensor  # valid tokens, up to and including the first EOS
    logprobs: torch.Tensor  # log q_t of the sampling distribution (0 after EOS)
    contains_eos: torch.Tensor  # [P, G]
    packed: Packed


def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    seeds: list[int],
    *,
    temperature: float,
    min_new_tokens: int,
    max_new_tokens: int,
) -> Completions:
    """Sample ``G = len(seeds) / P`` completions per prompt, completion ``p·G + g`` from ``seeds[p·G + g]``, and
    pack them one prompt per row."""
    prompts, group = queries.shape[0], len(seeds) // queries.shape[0]
    samples = sample_with_logprobs(
        model, tokenizer, queries, query_mask, row_generators(seeds, queries.device),
        temperature=temperature, min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
        samples_per_prompt=group,
    )  # fmt: skip
    responses, contains_eos = truncate_after_eos(
        samples.tokens, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    shape = (prompts, group, responses.shape[1])
    responses, mask = responses.view(shape), response_mask(samples.tokens, tokenizer.eos_token_id).view(shape)
    packed = pack_completions(queries, query_mask, responses, mask)
    return Completions(
        responses, mask, samples.logprobs.view(shape), contains_eos.view(prompts, group), packed
    )


@dataclass
class Rollout:
    """One rollout batch of ``P`` prompts with ``G`` completions each; per-token tensors are ``[P, G, T]``."""

    queries: torch.Tensor  # [P, Lp] left-padded prompts
    keys: list[str]  # prompt_keys(queries)
    packed: Packed
    responses: torch.Tensor  # [P, G, T] truncated response tokens
    mask: torch.Tensor  # [P, G, T] valid response tokens (up to and including the first EOS)
    logprobs: torch.Tensor  # log q of the sampling policy (from the sampling loop: the "old" log-probs)
    ref_logprobs: torch.Tensor  # log-probs under the reference (0 after EOS)
    values: torch.Tensor | None  # GAE only
    scores: torch.Tensor  # [P, G]
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None  # GAE only
    contains_eos: torch.Tensor  # [P, G]
    prompts: list[str]
    texts: list[str]  # P·G, prompt-major


def completion_logprobs(
    model: torch.nn.Module,
    packed: Packed,
    rows: torch.Tensor,
    responses: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    *,
    temperature: float,
    min_new_tokens: int,
    value_head: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampling-distribution log-probs ``[R, G, T]`` of ``responses`` (rows ``rows`` of ``packed``) under
    ``model``, and ``value_head``'s values ``[R, G, T]`` on the last hidden states (None without a head).
    One ``[R, G·T, V]`` logits tensor is kept (scaled, then masked in place)."""
    out = packed_forward(model, packed, rows, output_hidden_states=value_head is not None)
    hidden = out.hidden_states[-1][:, packed.keep] if value_head is not None else None
    logits = out.logits.view(*responses.shape, -1) / temperature  # not in place: hooks may wrap the output
    del out  # the model's own logits are not needed for backward: one [R, G·T, V] tensor remains
    logprobs = sampling_logprobs(logits, responses, tokenizer, min_new_tokens)
    if value_head is None:
        return logprobs, None
    return logprobs, value_head(hidden).view(responses.shape)


def group_advantages(
    estimator: str,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages ``[P, G, T]`` (0 outside the mask) and returns (``"gae"`` only, else None).

    ``"gae"``: reward ``-β·kl_t`` plus the score at the last token, then GAE(γ, λ) with ``values``.
    ``"rloo"``/``"grpo"``: ``R = score - β·Σ_t kl_t`` per completion and the baseline of the prompt's own ``G``
    values of ``R``; every token of a completion gets its advantage.
    """
    if estimator == "gae":
        flat_mask = mask.flatten(0, 1)
        rewards = per_token_rewards(kl.flatten(0, 1), scores.flatten(), flat_mask, kl_coef)
        advantages, returns = generalized_advantage_estimation(
            rewards, values.flatten(0, 1), flat_mask, gamma, lam
        )
        return advantages.view_as(kl), returns.view_as(kl)
    baseline = {"rloo": rloo_advantages, "grpo": grpo_advantages}[estimator]
    return baseline(sequence_rewards(scores, kl, mask, kl_coef)).unsqueeze(-1) * mask, None


def group_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor | None,
    rollout: Rollout,
    rows: torch.Tensor,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    kl_coef_in_loss: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-prompt losses ``[R]`` of prompts ``rows`` and per-completion diagnostics ``[R·G]``::

        loss_p = (1/G) Σ_g [ surrogate_{p,g} + β·mean_t k3_{p,g,t} (kl_in_loss) + c_v·value_loss_{p,g} (gae) ]

    each term a token mean over completion ``(p, g)`` (``ppo_policy_loss``, ``ppo_value_loss``; k3 with
    ``log r = logp_ref - logp``).
    """
    mask = rollout.mask[rows].flatten(0, 1)
    current = logprobs.flatten(0, 1)
    policy = ppo_policy_loss(
        current,
        rollout.logprobs[rows].flatten(0, 1),
        rollout.advantages[rows].flatten(0, 1),
        mask,
        cliprange,
    )
    loss = policy.loss
    stats = {"pg": policy.loss, "approxkl": policy.approx_kl, "clipfrac": policy.clip_fraction, "ratio": policy.ratio_mean}  # fmt: skip
    if kl_coef_in_loss is not None:
        ref = rollout.ref_logprobs[rows].flatten(0, 1)
        stats["kl_loss"] = masked_row_mean(kl_estimate(torch.where(mask, current, ref), ref, "k3"), mask)
        loss = loss + kl_coef_in_loss * stats["kl_loss"]
    if values is not None:
        value = ppo_value_loss(
            values.flatten(0, 1),
            rollout.values[rows].flatten(0, 1),
            rollout.returns[rows].flatten(0, 1),
            mask,
            cliprange_value,
        )
        stats |= {"vf": value.loss, "vf_clipfrac": value.clip_fraction}
        loss = loss + vf_coef * value.loss
    return loss.view(len(rows), -1).mean(1), {k: v.detach() for k, v in stats.items()}


def rollout_metrics(rollout: Rollout, kl_coef: float) -> dict[str, torch.Tensor]:
    """What one rollout batch looked like: lit_dprl's PPO keys (TRL PPO's) and TRL GRPO/RLOO's keys."""
    mask = rollout.mask.float()
    lengths = mask.sum(-1)
    kl_sum = rollout.kl.sum(-1)
    non_score = -kl_coef * kl_sum
    scores = rollout.scores
    entropy = -rollout.logprobs * mask
    metrics = {
        "objective/kl": kl_sum.mean(),
        "objective/entropy": entropy.sum(-1).mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": (scores + non_score).mean(),
        "objective/scores": scores.mean(),
        "objective/kl_coef": torch.tensor(kl_coef),
        "val/num_eos_tokens": rollout.contains_eos.float().sum(),
        "reward": scores.mean(),
        "kl": rollout.kl.sum() / mask.sum(),
        "entropy": entropy.sum() / mask.sum(),
        "completions/mean_length": lengths.mean(),
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/clipped_ratio": 1.0 - rollout.contains_eos.float().mean(),
    }
    if scores.shape[1] > 1:
        group_std = scores.std(-1)
        metrics |= {"reward_std": group_std.mean(), "frac_reward_zero_std": (group_std == 0).float().mean()}
    return metrics


def update_metrics(stats: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Means over a rollout batch's optimizer steps of :func:`group_loss`'s diagnostics."""
    if not stats:
        return {}
    cat = {k: torch.cat(v) for k, v in stats.items()}
    metrics = {
        "loss/policy_avg": cat["pg"].mean(),
        "policy/approxkl_avg": cat["approxkl"].mean(),
        "policy/clipfrac_avg": cat["clipfrac"].mean(),
        "clip_ratio/region_mean": cat["clipfrac"].mean(),
        "val/ratio": cat["ratio"].mean(),
    }
    if "kl_loss" in cat:
        metrics["loss/kl_avg"] = cat["kl_loss"].mean()
    if "vf" in cat:
        metrics |= {"loss/value_avg": cat["vf"].mean(), "val/clipfrac_avg": cat["vf_clipfrac"].mean()}
    return metrics

"""Per-example losses. Each returns one value per row so that rows (privacy units) never mix.

The batch loss a LightningModule returns is the plain mean of these per-example values; a
batch-wide token mean (Hugging Face's ``labels=`` loss) would weight every example by the
others' lengths and couple them, so it is never used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def training_output(per_example_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """A training step's output: ``{"loss": (1/B) Σ_i ℓ_i, "per_example_loss": ℓ}``; the per-example losses
    are what ``DPCallback(grad_sample_mode="ghost")`` clips (the privacy contract in ``lit_dprl.privacy``)."""
    return {"loss": per_example_loss.mean(), "per_example_loss": per_example_loss}


def masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over masked positions: ``sum_t(v[b,t]·m[b,t]) / max(1, sum_t m[b,t])``, shape ``[B]``."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[b, t, tokens[b, t]]``, shape ``[B, T]`` (logits already aligned to tokens)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def causal_lm_sequence_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Per-sequence next-token NLL: ``-(1/|M_b|) · sum_{t in M_b} log p(x_{b,t+1} | x_{b,<=t})``, shape ``[B]``.

    ``loss_mask[b, t]`` marks the *target* tokens ``x_{b,t}`` that count (padding and, if wanted, the
    prompt are 0).
    """
    logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return -masked_row_mean(logprobs, loss_mask[:, 1:])


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley–Terry loss ``-log σ(r_chosen - r_rejected)``, shape ``[B]`` (log 2 when equal)."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def masked_row_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum over masked positions: ``sum_t v[b,t]·m[b,t]``, shape ``[B]``."""
    return (values * mask.to(values.dtype)).sum(-1)


def sequence_logprob(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Per-row log-probability of the masked tokens: ``sum_{t in M_b} log p(x_{b,t} | x_{b,<t})``, shape ``[B]``.

    ``target_mask[b, t]`` marks the tokens ``x_{b,t}`` that count (a response's tokens); position 0 has no
    prediction and never counts.
    """
    return masked_row_sum(token_logprobs(logits[:, :-1], input_ids[:, 1:]), target_mask[:, 1:])


def dpo_sigmoid_loss(margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO loss per pair (Rafailov et al. 2023), conservative with ``label_smoothing`` = ε (cDPO):
    ``-(1-ε)·log σ(β·h) - ε·log σ(-β·h)``, shape ``[B]``.

    ``h = (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))`` is the pair's log-ratio margin.
    """
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
        -beta * margin
    )


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO loss per pair (Azar et al. 2023, eq. 17, τ = β): ``(h - 1/(2β))²``, shape ``[B]``.

    As in TRL, ``h`` is built from length-normalised log-ratios (``h = Δ_c/|y_c| - Δ_r/|y_r|``).
    """
    return (margin - 1.0 / (2.0 * beta)).square()


def robust_dpo_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO loss per pair (Chowdhury et al. 2024; TRL's ``robust``) for label-flip rate ε < 1/2:
    ``(-(1-ε)·log σ(β·h) + ε·log σ(-β·h)) / (1 - 2ε)``, shape ``[B]`` (an unbiased loss under flips)."""
    return (
        -(1.0 - label_smoothing) * F.logsigmoid(beta * margin)
        + label_smoothing * F.logsigmoid(-beta * margin)
    ) / (1.0 - 2.0 * label_smoothing)

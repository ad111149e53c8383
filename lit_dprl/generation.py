"""Sampling responses and scoring their tokens — shared by PPO rollouts and evaluation."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from lit_dprl.models import position_ids_from_mask
from lit_dprl.rl import response_mask, truncate_after_eos


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float,
    min_new_tokens: int,
    max_new_tokens: int,
) -> torch.Tensor:
    """Sampled continuations ``[B, T]`` of left-padded prompts (KV-cached ``generate``, top-k 0, top-p 1).

    EOS may end a response after ``min_new_tokens``; the pad token is never sampled, so after truncation
    every pad is padding.
    """
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=temperature,
        min_new_tokens=min_new_tokens,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[tokenizer.pad_token_id],
    )
    return output[:, input_ids.shape[1] :]


def join_prompts_and_responses(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    raw_responses: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(query_responses, attention_mask, responses, response_mask, contains_eos)`` with responses cut after EOS."""
    responses, contains_eos = truncate_after_eos(
        raw_responses, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    mask = response_mask(raw_responses, tokenizer.eos_token_id)
    query_responses = torch.cat([input_ids, responses], dim=1)
    full_mask = torch.cat([attention_mask, mask.long()], dim=1)
    return query_responses, full_mask, responses, mask, contains_eos


def response_logits(
    model: torch.nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float = 1.0,
    output_hidden_states: bool = False,
):
    """``(logits / temperature)`` at the positions that predict the response tokens ``[B, T, V]``, and the
    model output (for hidden states)."""
    out = model(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=output_hidden_states,
    )
    return out.logits[:, context_length - 1 : -1] / temperature, out


def sampling_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, tokenizer: PreTrainedTokenizerBase, min_new_tokens: int
) -> torch.Tensor:
    """Log-probs ``[B, T]`` of response ``tokens`` under the distribution ``sample_responses`` draws from.

    ``generate`` never samples the pad token, nor EOS before ``min_new_tokens``, so the sampling
    distribution at step t is the softmax of the (temperature-scaled) logits over the allowed tokens A_t:
    ``log q(y_t) = z_t[y_t] − log Σ_{v ∈ A_t} exp z_t[v]``. Scoring with the plain softmax instead biases the
    policy gradient (its ``∇ log(1 − p_blocked)`` term) and the KL estimates. The target's logit is read
    unmasked, so the padding after EOS (masked out downstream) stays finite.
    """
    allowed = logits.to(torch.float32, copy=True)
    allowed[..., tokenizer.pad_token_id] = float("-inf")
    allowed[:, :min_new_tokens, tokenizer.eos_token_id] = float("-inf")
    target = torch.gather(logits.float(), -1, tokens.unsqueeze(-1)).squeeze(-1)
    return target - allowed.logsumexp(dim=-1)


def response_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    *,
    temperature: float,
    min_new_tokens: int,
) -> torch.Tensor:
    """Sampling log-probs (``sampling_logprobs``) of the response tokens under ``model``, ``[B, T]``."""
    logits, _ = response_logits(model, query_responses, attention_mask, context_length, temperature)
    return sampling_logprobs(logits, query_responses[:, context_length:], tokenizer, min_new_tokens)

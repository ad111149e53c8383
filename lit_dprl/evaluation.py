"""Evaluating an aligned policy on held-out prompts: reward, KL to a reference model, ROUGE, samples.

Used by the pipeline after training; every number is computed on prompts the training never saw (the
IMDb test split or a user's held-out file).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics.text.rouge import ROUGEScore
from transformers import PreTrainedTokenizerBase

from lit_dprl.generation import join_prompts_and_responses, response_logprobs, sample_responses
from lit_dprl.models import load_causal_lm, load_tokenizer
from lit_dprl.rewards import RewardFunction, score_responses


@torch.no_grad()
def evaluate_policy(
    policy: str,
    prompts: Sequence[str],
    reward: RewardFunction,
    *,
    reference: str | None = None,
    references: Sequence[str] | None = None,
    temperature: float = 1.0,
    min_new_tokens: int = 4,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    num_samples: int = 8,
    fluency: str | None = None,
) -> dict[str, Any]:
    """Sample one response per prompt from ``policy`` (a model source) and score it.

    Returns ``reward_mean``/``reward_std`` (the ``reward`` on prompt + response), ``kl_to_reference``
    (mean over prompts of Σ_t log π(y_t|·) − log π_ref(y_t|·) on the sampled responses: a Monte-Carlo
    estimate of KL(π‖π_ref)) when ``reference`` is given, ROUGE-1/2/L F-measures against ``references``
    when given, ``fluency_perplexity`` (``response_perplexity`` under the fixed model ``fluency``, e.g. the
    pretrained model: word salad that games the reward scores far above fluent text) when given, and the
    first ``num_samples`` (prompt, response, reward) rows.
    """
    tokenizer = load_tokenizer(policy)
    model = load_causal_lm(policy, tokenizer).eval()
    ref_model = load_causal_lm(reference, load_tokenizer(reference)).eval() if reference else None
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rewards: list[float] = []
    kls: list[float] = []
    responses_text: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        raw = sample_responses(
            model, tokenizer, encoded["input_ids"], encoded["attention_mask"],
            temperature=temperature, min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
        )  # fmt: skip
        query_responses, attention_mask, responses, mask, _ = join_prompts_and_responses(
            encoded["input_ids"], encoded["attention_mask"], raw, tokenizer
        )
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        responses_text += texts
        rewards += score_responses(reward, chunk, texts).tolist()
        if ref_model is not None:
            context = encoded["input_ids"].shape[1]
            sampling = dict(temperature=temperature, min_new_tokens=min_new_tokens)
            logp = response_logprobs(model, tokenizer, query_responses, attention_mask, context, **sampling)
            ref_logp = response_logprobs(
                ref_model, tokenizer, query_responses, attention_mask, context, **sampling
            )
            kls += ((logp - ref_logp) * mask).sum(1).tolist()
    torch.random.set_rng_state(generator_state)
    result: dict[str, Any] = {
        "policy": str(policy),
        "prompts": len(prompts),
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "reward_stderr": statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else 0.0,
        "positive_share": sum(r > 0 for r in rewards) / len(rewards),
        "distinct_2": distinct_n(responses_text, 2),
    }
    if kls:
        result["kl_to_reference"] = statistics.fmean(kls)
    if fluency is not None:
        fluency_model = load_causal_lm(fluency, load_tokenizer(fluency)).eval()
        result["fluency_perplexity"] = response_perplexity(
            fluency_model, load_tokenizer(fluency), prompts, responses_text
        )
    if references is not None:
        rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
        scores = rouge(responses_text, list(references))
        result |= {k: float(v) for k, v in scores.items() if k.endswith("_fmeasure")}
    result["samples"] = [
        {"prompt": p, "response": r, "reward": s}
        for p, r, s in zip(
            prompts[:num_samples], responses_text[:num_samples], rewards[:num_samples], strict=True
        )
    ]
    result["rewards"] = rewards
    return result


@torch.no_grad()
def response_perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
) -> float:
    """``exp(−Σ log p(y_t | prompt, y_<t) / #tokens)`` of the responses under ``model``, pooled over all rows.

    Texts are re-tokenised with ``tokenizer`` (the scoring model's own), so any policy can be scored; the
    response tokens are those of ``prompt + response`` past the tokens of ``prompt``.
    """
    total_nll, total_tokens = 0.0, 0
    for prompt, response in zip(prompts, responses, strict=True):
        context = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(prompt + response, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] <= max(context, 1):
            continue
        logits = model(input_ids=ids.to(model.device)).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="none")
        first = max(context, 1) - 1  # logits[i] predicts token i + 1
        total_nll += float(nll[first:].sum())
        total_tokens += nll.shape[0] - first
    if total_tokens == 0:
        raise ValueError("response_perplexity: every response is empty")
    return math.exp(total_nll / total_tokens)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: ``#unique word n-grams / #word n-grams`` over all ``texts`` (Li et al. 2016); 1 = no repeats."""
    grams = [
        tuple(words[i : i + n])
        for text in texts
        for words in [text.split()]
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def paired_gain(after: Sequence[float], before: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of ``after[i] − before[i]`` over prompts (the same held-out prompts)."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), stderr


def write_markdown_samples(evaluations: dict[str, dict[str, Any]], path: Path) -> None:
    """A Markdown table with one row per held-out prompt and each model's continuation (and reward) side by side."""
    labels = list(evaluations)
    lines = ["| prompt | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    rows = zip(*(evaluations[label]["samples"] for label in labels), strict=True)
    for samples in rows:
        cells = [samples[0]["prompt"]] + [f"{s['response']} ({s['reward']:+.2f})" for s in samples]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def format_epsilon(epsilon: float) -> str:
    """``"∞"`` for ε = ∞ (non-private training on private data), else ε to 3 decimals."""
    return "∞" if math.isinf(epsilon) else f"{epsilon:.3f}"


def save_json(data: Any, path: Path) -> None:
    """Write ``data`` as indented UTF-8 JSON (atomically); ε = ∞ is written as ``Infinity``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)

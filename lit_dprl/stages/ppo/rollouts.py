"""The generation side of stage 3: sampling completions from the policy, scoring them, the reference
log-probs and KL, the advantages of one rollout batch, and the held-out evaluation, all without gradients
(``lit_dprl.rollout`` holds the per-prompt pieces).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_dprl.models import check_context, check_data_matches_model
from lit_dprl.rewards import RewardFunction, score_responses
from lit_dprl.rl import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    kl_estimate,
    masked_whiten,
)
from lit_dprl.rollout import (
    Completions,
    Packed,
    Rollout,
    completion_logprobs,
    completion_seeds,
    group_advantages,
    prompt_keys,
    sample_completions,
)
from lit_dprl.stages.ppo.policy import reference_mode


class PolicyRollouts(L.LightningModule):
    """Rollouts and evaluation of a policy against its reference, for the module that trains it (``PPOModule``).

    The subclass saves the hyperparameters (``temperature``, ``min_new_tokens``, ``max_new_tokens``,
    ``samples_per_prompt``, ``kl_estimator``, ``kl_in_loss``, ``advantage_estimator``, ``gamma``, ``lam``,
    ``whiten_advantages``, ``missing_eos_penalty``, ``steering_layers``, ``reward_function``, ``model``,
    ``num_samples_to_log``) and sets the attributes annotated below in its ``__init__``.
    """

    tokenizer: PreTrainedTokenizerBase
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    value_head: torch.nn.Linear | None
    reward: RewardFunction
    kl_controller: FixedKLController | AdaptiveKLController
    rollout_seed: int
    rollout_batches: int

    def __init__(self) -> None:
        super().__init__()
        self.eval_reward = MeanMetric()
        self.eval_kl = MeanMetric()
        self._samples: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        """Refuse prompts tokenized for another model or that with their responses exceed the context."""
        if hasattr(self.reward, "to"):
            self.reward.to(self.device)
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        check_data_matches_model(datamodule, self.tokenizer, self.hparams.model, self.policy.config)
        prompt_tokens = getattr(datamodule.hparams, "max_prompt_tokens", None)
        if prompt_tokens is not None:
            check_context(
                prompt_tokens + self.hparams.max_new_tokens,
                self.policy.config,
                "max_prompt_tokens + max_new_tokens",
                "lower data.init_args.max_prompt_tokens or model.init_args.max_new_tokens",
            )

    def _score(self, prompts: list[str], texts: list[str]) -> torch.Tensor:
        """Scores ``[N]``; a ``reward_function`` is called once per response, so it cannot see other rows."""
        return score_responses(
            self.reward,
            prompts,
            texts,
            device=self.device,
            one_at_a_time=self.hparams.reward_function is not None,
        )

    def _sample(self, queries: torch.Tensor, query_mask: torch.Tensor, seeds: list[int]) -> Completions:
        """One completion per seed from the policy (``rollout.sample_completions``), prompt-major."""
        hp = self.hparams
        return sample_completions(
            self.policy, self.tokenizer, queries, query_mask, seeds,
            temperature=hp.temperature, min_new_tokens=hp.min_new_tokens, max_new_tokens=hp.max_new_tokens,
        )  # fmt: skip

    def completion_logprobs(
        self, packed: Packed, rows: torch.Tensor, responses: torch.Tensor, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rollout.completion_logprobs`` under the policy (with values under "gae") or the reference."""
        hp = self.hparams
        model = self.reference if reference and self.reference is not None else self.policy
        steering = bool(hp.steering_layers)
        with reference_mode(self.policy, self.reference, steering) if reference else contextlib.nullcontext():
            return completion_logprobs(
                model, packed, rows, responses, self.tokenizer,
                temperature=hp.temperature, min_new_tokens=hp.min_new_tokens,
                value_head=None if reference else self.value_head,
            )  # fmt: skip

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, batch: dict[str, torch.Tensor]) -> Rollout:
        """Sample, score and compute advantages for one batch of prompts (no gradients)."""
        hp = self.hparams
        queries, query_mask = batch["input_ids"], batch["attention_mask"]
        prompts_n, group = queries.shape[0], hp.samples_per_prompt
        keys = prompt_keys(queries, query_mask)
        sampled = self._sample(
            queries, query_mask, completion_seeds(self.rollout_seed, self.rollout_batches, keys, group)
        )
        responses, mask, logprobs, contains_eos, packed = sampled
        every = torch.arange(prompts_n, device=queries.device)
        ref_logprobs, _ = self.completion_logprobs(packed, every, responses, reference=True)
        ref_logprobs = torch.where(mask, ref_logprobs, 0.0)  # 0 after EOS, as the sampling log-probs
        values = (
            self.completion_logprobs(packed, every, responses)[1] if self.value_head is not None else None
        )
        prompts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
        texts = self.tokenizer.batch_decode(responses.flatten(0, 1), skip_special_tokens=True)
        scores = self._score([p for p in prompts for _ in range(group)], texts).view(prompts_n, group)
        if hp.missing_eos_penalty is not None:
            scores = apply_missing_eos_penalty(scores, contains_eos, hp.missing_eos_penalty)
        kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, hp.kl_estimator), 0.0)
        advantages, returns = group_advantages(
            hp.advantage_estimator, scores, kl, mask, values,
            kl_coef=0.0 if hp.kl_in_loss else self.kl_controller.value, gamma=hp.gamma, lam=hp.lam,
        )  # fmt: skip
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages.flatten(0, 1), mask.flatten(0, 1)).view_as(kl)
        return Rollout(
            queries, keys, packed, responses, mask, logprobs, ref_logprobs, values, scores, kl, advantages,
            returns, contains_eos, prompts, texts,
        )  # fmt: skip

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        queries, query_mask = batch["input_ids"], batch["attention_mask"]
        seeds = completion_seeds(self.rollout_seed, "validation", prompt_keys(queries, query_mask), 1)
        responses, mask, logprobs, _, packed = self._sample(queries, query_mask, seeds)
        rows = torch.arange(queries.shape[0], device=queries.device)
        ref_logprobs, _ = self.completion_logprobs(packed, rows, responses, reference=True)
        kl = torch.where(mask, logprobs - ref_logprobs, 0.0).sum((1, 2))
        responses = responses.squeeze(1)
        prompts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = self._score(prompts, texts)
        self.eval_reward.update(scores)
        self.eval_kl.update(kl)
        for prompt, text, score in zip(prompts, texts, scores.tolist(), strict=True):
            if len(self._samples) < self.hparams.num_samples_to_log:
                self._samples.append({"prompt": prompt, "response": text, "reward": score})
        self.log("eval/reward", self.eval_reward, on_epoch=True, prog_bar=True, batch_size=len(texts))
        self.log("eval/kl", self.eval_kl, on_epoch=True, batch_size=len(texts))

    def on_validation_epoch_start(self) -> None:
        # re-create metric states in the current grad mode: states left by an earlier
        # ``trainer.validate`` (inference mode) cannot be updated in place during ``fit``
        self.eval_reward.reset()
        self.eval_kl.reset()

    def on_validation_epoch_end(self) -> None:
        if self._samples and self.trainer.is_global_zero and self.logger is not None and self.trainer.log_dir:
            path = Path(self.trainer.log_dir) / f"samples_step{self.global_step}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self._samples))
        self._samples = []

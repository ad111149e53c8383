"""Stage 3: PPO alignment of the policy on private prompts (DPPPO when ``DPCallback`` is attached).

One ``training_step`` is one rollout batch (cleanrl's loop, top to bottom):

1. sample responses for the batch's prompts (KV-cached ``generate``; pure sampling, top-k 0, top-p 1; every
   log-prob is one of that sampling distribution: no pad, no EOS before ``min_new_tokens``);
2. truncate after the first EOS; score prompt + response with the reward source;
3. per-token reward = -β·KL(π‖π_ref) estimate, plus the score at the last response token;
4. GAE(γ, λ) with the value head's estimates;
5. ``ppo_epochs`` passes; each splits the batch into ``num_mini_batches`` minibatches and takes one
   optimizer step per minibatch on ``mean_b(policy_loss_b + vf_coef·value_loss_b)``.

The policy is the stage-1 model with a fresh LoRA adapter and a value head on the same body; the
reference model is that body with the adapter disabled (no second copy). Every loss term is computed
per prompt from that prompt's own trajectory. Settings that use batch statistics (advantage whitening,
the adaptive KL controller, permutation minibatches) are available for non-private PPO and are
reported by ``privacy_hazards`` so that a DP run refuses them.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from lit_dprl.generation import (
    join_prompts_and_responses,
    response_logits,
    sample_responses,
    sampling_logprobs,
)
from lit_dprl.models import add_lora, load_causal_lm, load_tokenizer, merged_copy
from lit_dprl.privacy.report import export_after_fit
from lit_dprl.rewards import (
    RewardFunction,
    SequenceClassifierReward,
    load_reward_callable,
    score_responses,
)
from lit_dprl.rl import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    generalized_advantage_estimation,
    kl_estimate,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)


@dataclass
class Rollout:
    """One rollout batch; per-token tensors are ``[B, T]`` over response tokens."""

    query_responses: torch.Tensor  # [B, P + T] prompt (left-padded) + truncated response
    attention_mask: torch.Tensor  # [B, P + T]
    context_length: int  # P
    responses: torch.Tensor  # [B, T] truncated response tokens
    mask: torch.Tensor  # [B, T] valid response tokens (up to and including the first EOS)
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # [B]
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    contains_eos: torch.Tensor  # [B]
    prompts: list[str]
    texts: list[str]


def minibatch_indices(
    batch_size: int, num_mini_batches: int, assignment: str, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Row indices of each minibatch for one pass over a batch.

    ``"independent"``: every row picks one of the ``M`` minibatches uniformly at random, on its own, so
    adding or removing a row never moves another (sizes vary; a minibatch may be empty).
    ``"permutation"``: a random permutation cut into ``M`` near-equal parts (TRL); one row's presence
    shifts the others, so it is for non-private training.
    """
    if assignment == "independent":
        which = torch.randint(num_mini_batches, (batch_size,), generator=generator)
        return [torch.nonzero(which == m).flatten() for m in range(num_mini_batches)]
    if assignment == "permutation":
        return list(torch.randperm(batch_size, generator=generator).tensor_split(num_mini_batches))
    raise ValueError(f"minibatch_assignment must be 'independent' or 'permutation', got {assignment!r}")


class PPOModule(L.LightningModule):
    """PPO for a causal LM with a value head, a frozen reference and a pluggable reward.

    Args:
        model: Stage-1 model source (an SFT export directory, "tiny", "smollm2", a .gguf path).
        reward_function: A Python callable ``"package.module:function"`` taking
            ``(prompts: list[str], responses: list[str])`` and returning one float per response.
        reward_classifier: A local Hugging Face sequence-classifier directory (public, e.g. sentiment).
        reward_classifier_label: The classifier's label (index or name) whose score is the reward.
        reward_classifier_output: "logit" or "probability" of that label.
        reward_model: A stage-2 reward-model export directory.
        reward_model_is_public: Declare a reward model public (trained without private data); without
            this, a DP run needs the reward model's ``privacy.json``.
        use_lora: Train a fresh LoRA adapter (the reference is the adapter-disabled body); otherwise
            train the whole policy and keep a frozen copy as reference.
        lora_r: LoRA rank (paper: 4).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        lora_target_modules: Modules to adapt (None: peft's default for the architecture).
        learning_rate: AdamW learning rate (paper, DPPPO on GPT-2: 3e-3).
        weight_decay: AdamW weight decay.
        ppo_epochs: Passes over each rollout batch (T_PPO; the paper uses 1 under DP).
        num_mini_batches: Optimizer steps per pass (paper: 4096 / 256 = 16).
        minibatch_assignment: "independent" (each prompt picks its minibatch alone; DP-safe) or
            "permutation" (TRL's equal split; non-private only).
        kl_coef: β of the per-token KL penalty (initial value if adaptive).
        kl_estimator: "k1" (logp − logp_ref) or "k3".
        adaptive_kl: Ziegler et al.'s adaptive β driven by the batch's mean KL (non-private only).
        kl_target: Target KL of the adaptive controller.
        kl_horizon: Horizon of the adaptive controller.
        whiten_advantages: Normalise advantages with the batch's mean and std (non-private only).
        gamma: GAE discount γ.
        lam: GAE λ.
        cliprange: PPO ratio clip ε.
        cliprange_value: Value clip.
        vf_coef: Weight of the value loss. Under DP the value head shares each prompt's clipping budget
            with the policy; on SmolLM2 its gradient is ~30x the policy's at vf_coef 0.1 and takes nearly
            all of it, so DP configs use a small weight (configs/demo/ppo.yaml: 0.005,
            configs/cpu/ppo.yaml: 0.0002). Adam still learns the value head: its update does not scale with it.
        temperature: Sampling temperature (log-probs use the same temperature and blocked tokens).
        min_new_tokens: Fewest response tokens (EOS is blocked before).
        max_new_tokens: Most response tokens.
        missing_eos_penalty: Subtracted from the score of responses without EOS (None: off).
        num_samples_to_log: Prompt/response/reward rows written per validation.
        export_dir: Where to write the merged policy and tokenizer at the end of fit.
        seed: Seed of the tiny random model.
    """

    def __init__(
        self,
        model: str = "tiny",
        reward_function: str | None = None,
        reward_classifier: str | None = None,
        reward_classifier_label: int | str = 1,
        reward_classifier_output: Literal["logit", "probability"] = "logit",
        reward_model: str | None = None,
        reward_model_is_public: bool = False,
        use_lora: bool = True,
        lora_r: int = 4,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
        ppo_epochs: int = 1,
        num_mini_batches: int = 1,
        minibatch_assignment: Literal["independent", "permutation"] = "independent",
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        whiten_advantages: bool = False,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        temperature: float = 0.7,
        min_new_tokens: int = 4,
        max_new_tokens: int = 16,
        missing_eos_penalty: float | None = None,
        num_samples_to_log: int = 8,
        export_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        sources = [s for s in (reward_function, reward_classifier, reward_model) if s is not None]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one reward source: reward_function ('package.module:function'), "
                "reward_classifier (a local sequence-classifier directory) or reward_model (a stage-2 export)"
            )
        if ppo_epochs < 1 or num_mini_batches < 1:
            raise ValueError("ppo_epochs and num_mini_batches must be >= 1")
        if not 1 <= min_new_tokens <= max_new_tokens:
            raise ValueError(
                f"need 1 <= min_new_tokens <= max_new_tokens, got {min_new_tokens}, {max_new_tokens}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model)
        body = load_causal_lm(model, self.tokenizer, seed=seed)
        self.reference = None
        if use_lora:
            self.policy = add_lora(
                body, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules
            )
        else:
            self.policy = body
            self.reference = copy.deepcopy(body).requires_grad_(False).eval()
        self.value_head = torch.nn.Linear(body.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.kl_controller = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon)
            if adaptive_kl
            else FixedKLController(kl_coef)
        )
        self.reward = self._build_reward()
        self.episodes = 0
        self.eval_reward = MeanMetric()
        self.eval_kl = MeanMetric()
        self._samples: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- what the DP callback reads
    @property
    def epochs_per_batch(self) -> int:
        """Each prompt of a rollout batch takes part in one optimizer step per PPO epoch."""
        return self.hparams.ppo_epochs

    @property
    def minibatches_per_batch(self) -> int:
        """Optimizer steps per PPO epoch (empty minibatches included)."""
        return self.hparams.num_mini_batches

    def privacy_hazards(self) -> list[str]:
        """Settings under which one prompt's loss depends on other prompts, or on private data beyond D3."""
        hp = self.hparams
        hazards = []
        if hp.whiten_advantages:
            hazards.append("whiten_advantages=True normalises advantages with the batch's mean and std")
        if hp.adaptive_kl:
            hazards.append("adaptive_kl=True sets β from the batch's mean KL")
        if hp.minibatch_assignment == "permutation":
            hazards.append(
                "minibatch_assignment='permutation' lets one prompt move the others between minibatches"
            )
        reward_model_private = hp.reward_model is not None and not hp.reward_model_is_public
        if reward_model_private and not (Path(hp.reward_model) / "privacy.json").is_file():
            hazards.append(
                f"reward_model {hp.reward_model!r} has no privacy.json: a non-private reward model trained on "
                "private data couples every update to all of its data (train it with DPCallback, or set "
                "reward_model_is_public=true if it saw only public data)"
            )
        return hazards

    # ---------------------------------------------------------------- model pieces
    def _build_reward(self) -> RewardFunction:
        hp = self.hparams
        if hp.reward_function is not None:
            return load_reward_callable(hp.reward_function)
        if hp.reward_classifier is not None:
            return SequenceClassifierReward(
                hp.reward_classifier, label=hp.reward_classifier_label, output=hp.reward_classifier_output
            )
        from lit_dprl.stages.reward import RewardModelScorer

        return RewardModelScorer(hp.reward_model)

    def setup(self, stage: str) -> None:
        if hasattr(self.reward, "to"):
            self.reward.to(self.device)

    def _forward(
        self,
        query_responses: torch.Tensor,
        attention_mask: torch.Tensor,
        context_length: int,
        reference: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Temperature-scaled logits for the response positions ``[B, T, V]`` and values ``[B, T]`` (None for
        the reference)."""
        temperature = self.hparams.temperature
        if reference and self.reference is not None:
            logits, _ = response_logits(
                self.reference, query_responses, attention_mask, context_length, temperature
            )
            return logits, None
        if reference:
            with self.policy.disable_adapter():
                logits, _ = response_logits(
                    self.policy, query_responses, attention_mask, context_length, temperature
                )
            return logits, None
        logits, out = response_logits(
            self.policy,
            query_responses,
            attention_mask,
            context_length,
            temperature,
            output_hidden_states=True,
        )
        values = self.value_head(out.hidden_states[-1][:, context_length - 1 : -1]).squeeze(-1)
        return logits, values

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sampled response tokens ``[B, T]`` (T <= max_new_tokens); the pad token is never sampled."""
        hp = self.hparams
        return sample_responses(
            self.policy, self.tokenizer, input_ids, attention_mask,
            temperature=hp.temperature, min_new_tokens=hp.min_new_tokens, max_new_tokens=hp.max_new_tokens,
        )  # fmt: skip

    def logprobs(self, logits: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Log-probs ``[B, T]`` of sampled responses under the distribution ``generate`` samples from."""
        return sampling_logprobs(logits, responses, self.tokenizer, self.hparams.min_new_tokens)

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, batch: dict[str, torch.Tensor]) -> Rollout:
        """Generate, score and compute advantages for one batch of prompts (no gradients)."""
        hp = self.hparams
        queries, query_mask = batch["input_ids"], batch["attention_mask"]
        context_length = queries.shape[1]
        raw = self.generate(queries, query_mask)
        query_responses, attention_mask, responses, mask, contains_eos = join_prompts_and_responses(
            queries, query_mask, raw, self.tokenizer
        )
        logits, values = self._forward(query_responses, attention_mask, context_length)
        logprobs = self.logprobs(logits, responses)
        ref_logits, _ = self._forward(query_responses, attention_mask, context_length, reference=True)
        ref_logprobs = self.logprobs(ref_logits, responses)
        prompts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = score_responses(self.reward, prompts, texts, device=self.device)
        if hp.missing_eos_penalty is not None:
            scores = apply_missing_eos_penalty(scores, contains_eos, hp.missing_eos_penalty)
        kl = kl_estimate(logprobs, ref_logprobs, hp.kl_estimator) * mask
        rewards = per_token_rewards(kl, scores, mask, self.kl_controller.value)
        advantages, returns = generalized_advantage_estimation(rewards, values, mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return Rollout(
            query_responses, attention_mask, context_length, responses, mask, logprobs, ref_logprobs,
            values, scores, kl, advantages, returns, contains_eos, prompts, texts,
        )  # fmt: skip

    # ---------------------------------------------------------------- training
    def minibatch_loss(
        self, rollout: Rollout, rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mean_b(policy_loss_b + vf_coef·value_loss_b)`` over ``rows``, and per-row diagnostics."""
        hp = self.hparams
        logits, values = self._forward(
            rollout.query_responses[rows], rollout.attention_mask[rows], rollout.context_length
        )
        mask = rollout.mask[rows]
        policy = ppo_policy_loss(
            self.logprobs(logits, rollout.responses[rows]),
            rollout.logprobs[rows],
            rollout.advantages[rows],
            mask,
            hp.cliprange,
        )
        value = ppo_value_loss(values, rollout.values[rows], rollout.returns[rows], mask, hp.cliprange_value)
        stats = {
            "pg": policy.loss,
            "vf": value.loss,
            "approxkl": policy.approx_kl,
            "clipfrac": policy.clip_fraction,
            "vf_clipfrac": value.clip_fraction,
            "ratio": policy.ratio_mean,
        }
        return (policy.loss + hp.vf_coef * value.loss).mean(), {k: v.detach() for k, v in stats.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        rollout = self.rollout(batch)
        batch_size = rollout.responses.shape[0]
        optimizer = self.optimizers()
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(hp.ppo_epochs):
            for rows in minibatch_indices(batch_size, hp.num_mini_batches, hp.minibatch_assignment):
                optimizer.zero_grad()
                if len(rows) > 0:  # an empty minibatch still steps (noise only under DP)
                    loss, row_stats = self.minibatch_loss(rollout, rows)
                    self.manual_backward(loss)
                    for key, value in row_stats.items():
                        stats.setdefault(key, []).append(value)
                optimizer.step()
        mean_kl = (rollout.kl * rollout.mask).sum(1).mean()
        self.kl_controller.update(mean_kl.item(), batch_size)
        self.episodes += batch_size
        self._log_training(rollout, stats, batch_size / (time.perf_counter() - started))

    def _log_training(
        self, rollout: Rollout, stats: dict[str, list[torch.Tensor]], episodes_per_second: float
    ) -> None:
        mask = rollout.mask.float()
        kl_sum = (rollout.kl * mask).sum(1)
        non_score = -self.kl_controller.value * kl_sum
        metrics = {
            "objective/kl": kl_sum.mean(),
            "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (rollout.scores + non_score).mean(),
            "objective/scores": rollout.scores.mean(),
            "val/num_eos_tokens": rollout.contains_eos.float().sum(),
            "episodes_per_second": torch.tensor(episodes_per_second),
            "episode": torch.tensor(float(self.episodes)),
            "objective/kl_coef": torch.tensor(self.kl_controller.value),
        }
        if stats:
            cat = {k: torch.cat(v) for k, v in stats.items()}
            metrics |= {
                "loss/policy_avg": cat["pg"].mean(),
                "loss/value_avg": cat["vf"].mean(),
                "policy/approxkl_avg": cat["approxkl"].mean(),
                "policy/clipfrac_avg": cat["clipfrac"].mean(),
                "val/clipfrac_avg": cat["vf_clipfrac"].mean(),
                "val/ratio": cat["ratio"].mean(),
            }
        batch_size = rollout.responses.shape[0]
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/reward", rollout.scores.mean(), prog_bar=True, on_step=True, batch_size=batch_size)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        raw = self.generate(batch["input_ids"], batch["attention_mask"])
        query_responses, attention_mask, responses, mask, _ = join_prompts_and_responses(
            batch["input_ids"], batch["attention_mask"], raw, self.tokenizer
        )
        context = batch["input_ids"].shape[1]
        logits, _ = self._forward(query_responses, attention_mask, context)
        ref_logits, _ = self._forward(query_responses, attention_mask, context, reference=True)
        kl = kl_estimate(self.logprobs(logits, responses), self.logprobs(ref_logits, responses), "k1")
        prompts = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = score_responses(self.reward, prompts, texts, device=self.device)
        self.eval_reward.update(scores)
        self.eval_kl.update((kl * mask).sum(1))
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

    # ---------------------------------------------------------------- optimizer, checkpoint, export
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay, eps=1e-5
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ppo"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "episodes": self.episodes,
            "torch_rng": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["ppo"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.episodes = state["episodes"]
        torch.set_rng_state(state["torch_rng"])

    def export(self, directory: str | Path) -> Path:
        """Write the policy (adapter merged) and tokenizer as a plain ``transformers`` directory."""
        directory = Path(directory)
        merged_copy(self.policy).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        torch.save({k: v.cpu() for k, v in self.value_head.state_dict().items()}, directory / "value_head.pt")
        return directory

    def on_fit_end(self) -> None:
        export_after_fit(self, self.hparams.export_dir or None)

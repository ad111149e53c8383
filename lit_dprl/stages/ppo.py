"""Stage 3: policy optimisation on private prompts (DP when ``DPCallback`` is attached): PPO with a value
head and GAE, or critic-free RLOO / GRPO with ``G`` completions per prompt.

One ``training_step`` is one rollout batch of ``P`` prompts:

1. sample ``G`` completions per prompt (KV-cached, pure sampling at the temperature, no pad, no EOS before
   ``min_new_tokens``); each completion draws from its own stream, derived from a secret seed, the batch number
   and the prompt (``lit_dprl.rollout``). The loop's log-probs of that sampling distribution are the "old"
   log-probs of the ratio (no extra forward);
2. truncate after the first EOS; score prompt + response (a ``reward_function`` sees one response per call);
3. reference log-probs (adapter disabled, no grad) and a per-token KL estimate;
4. advantages. ``gae``: per-token reward −β·KL plus the score at the last token, GAE(γ, λ) with the value head.
   ``rloo`` / ``grpo``: sequence reward ``R = score − β·Σ_t KL`` (``score`` alone with ``kl_in_loss``) and the
   baseline of the prompt's own ``G`` rewards (``lit_dprl.rl.rloo_advantages`` / ``grpo_advantages``);
5. ``ppo_epochs`` passes; in each, every prompt joins one of ``num_mini_batches`` minibatches (drawn from its
   own stream) and one optimizer step per minibatch minimises ``mean_p loss_p`` with
   ``loss_p = mean_g [clipped surrogate_{p,g} (+ β·k3-KL_{p,g} with kl_in_loss) (+ vf_coef·value loss, gae)]``,
   each term a token mean over completion ``g``.

A prompt's ``G`` completions are ONE packed row of every training forward, so the per-example gradient that
the DP callback clips is the prompt's, once (``lit_dprl.rollout.pack_completions``). Under ``rloo``/``grpo``
there is no value head: the whole clipping budget goes to the policy. The policy is the stage-1 model (dropout
off) with a fresh LoRA adapter; the reference is the same body with the adapter disabled (no second copy).
Settings that use batch statistics (advantage whitening, the adaptive KL controller, permutation minibatches)
are available for non-private runs and listed by ``privacy_hazards`` so that a DP run refuses them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from lit_dprl.data.imdb import load_public_sources
from lit_dprl.models import (
    add_lora,
    check_context,
    check_data_matches_model,
    load_causal_lm,
    load_tokenizer,
    merged_copy,
)
from lit_dprl.privacy.report import export_after_fit
from lit_dprl.rewards import (
    RewardFunction,
    SequenceClassifierReward,
    load_reward_callable,
    read_input_report,
    reward_source_hazards,
    score_responses,
)
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
    assign_minibatches,
    completion_logprobs,
    completion_seeds,
    disable_dropout,
    group_advantages,
    group_loss,
    prompt_keys,
    rollout_metrics,
    sample_completions,
    update_metrics,
)
from lit_dprl.steering import (
    add_steering,
    class_mean_directions,
    merged_steering_copy,
    steering_disabled,
    steering_modules,
)


class PPOModule(L.LightningModule):
    """PPO / RLOO / GRPO for a causal LM with a frozen reference and a pluggable reward.

    Args:
        model: Stage-1 model source (an SFT export directory, "tiny", "smollm2", a .gguf path).
        reward_function: A Python callable ``"package.module:function"`` taking
            ``(prompts: list[str], responses: list[str])`` and returning one float per response. It is called
            with one response at a time (see ``lit_dprl.rewards``).
        reward_classifier: A local Hugging Face sequence-classifier directory (public, e.g. sentiment).
        reward_classifier_label: The classifier's label (index or name) whose score is the reward.
        reward_classifier_output: "logit" or "probability" of that label.
        reward_classifier_is_public: Declare the classifier trained on public data only, even if its
            ``privacy.json`` reports a non-private run.
        reward_model: A stage-2 reward-model export directory.
        reward_model_is_public: Declare a reward model public (trained without private data); without
            this, a DP run needs the reward model's ``privacy.json`` with a finite ε.
        advantage_estimator: "gae" (PPO with a value head), "rloo" or "grpo" (critic-free, group baselines).
        samples_per_prompt: Completions per prompt G (1 for "gae"; at least 2 for "rloo"/"grpo").
        kl_in_loss: Put β·KL(π‖π_ref) (k3 estimator, per token) in the loss (TRL GRPO's ``beta``) instead of a
            per-token penalty in the reward.
        rollout_seed: Seed of the per-prompt sampling and minibatch streams. None (default): a secret random
            seed, as the DP guarantee assumes; fix it for reproducible tests only. It is saved in checkpoints.
        use_lora: Train a fresh LoRA adapter (the reference is the adapter-disabled body); otherwise
            train the whole policy and keep a frozen copy as reference.
        lora_r: LoRA rank (paper: 4).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout (refused under DP: its masks come from the shared torch RNG).
        lora_target_modules: Modules to adapt (None: peft's default for the architecture).
        steering_layers: Train a public-subspace steering adapter instead of LoRA (``lit_dprl.steering``): after
            each listed decoder layer add ``α_ℓ · v_ℓ``, where ``v_ℓ`` is the class-mean difference of public
            labelled texts (``steering_source``) and only the α's (one per layer) are trained. Under DP the
            noise grows with √d, so a handful of parameters learns where thousands drown on a CPU budget.
        steering_source: Public labelled texts for the directions ("imdb_public", "rotten_tomatoes" or both
            joined by "+"; label 1 = the direction's positive end).
        steering_examples: Public texts used for the directions.
        steering_max_coefficient: After every optimizer step each α is clipped to ``[-bound, bound]`` (a
            projection of the noisy update: post-processing, no privacy cost). Choose the bound on public
            data, e.g. the largest α whose continuations of public prompts stay fluent; None: unbounded.
        learning_rate: AdamW learning rate (paper, DPPPO on GPT-2: 3e-3).
        weight_decay: AdamW weight decay.
        ppo_epochs: Passes over each rollout batch (T_PPO; the paper uses 1 under DP).
        num_mini_batches: Optimizer steps per pass (paper: 4096 / 256 = 16).
        minibatch_assignment: "independent" (each prompt picks its minibatch from its own stream; DP-safe) or
            "permutation" (TRL's equal split; non-private only).
        kl_coef: β of the KL term (initial value if adaptive).
        kl_estimator: "k1" (logp − logp_ref) or "k3" for the KL penalty in the reward.
        adaptive_kl: Ziegler et al.'s adaptive β driven by the batch's mean KL (non-private only).
        kl_target: Target KL of the adaptive controller.
        kl_horizon: Horizon of the adaptive controller.
        whiten_advantages: Normalise advantages with the batch's mean and std (non-private only).
        gamma: GAE discount γ.
        lam: GAE λ.
        cliprange: PPO ratio clip ε.
        cliprange_value: Value clip.
        vf_coef: Weight of the value loss ("gae"). Under DP the value head shares each prompt's clipping budget
            with the policy; on SmolLM2 its gradient is ~30x the policy's at vf_coef 0.1 and takes nearly
            all of it, so DP configs use a small weight (configs/smollm2/ppo.yaml: 0.005,
            configs/cpu-small/ppo.yaml: 0.0002). Adam still learns the value head: its update does not scale with it.
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
        reward_classifier_is_public: bool = False,
        reward_model: str | None = None,
        reward_model_is_public: bool = False,
        advantage_estimator: Literal["gae", "rloo", "grpo"] = "gae",
        samples_per_prompt: int = 1,
        kl_in_loss: bool = False,
        rollout_seed: int | None = None,
        use_lora: bool = True,
        lora_r: int = 4,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        steering_layers: list[int] | None = None,
        steering_source: str = "imdb_public+rotten_tomatoes",
        steering_examples: int = 256,
        steering_max_coefficient: float | None = None,
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
        if advantage_estimator not in ("gae", "rloo", "grpo"):
            raise ValueError(
                f"advantage_estimator must be 'gae', 'rloo' or 'grpo', got {advantage_estimator!r}"
            )
        if advantage_estimator == "gae" and samples_per_prompt != 1:
            raise ValueError(
                f"advantage_estimator='gae' samples one completion per prompt, got samples_per_prompt="
                f"{samples_per_prompt}; use advantage_estimator='rloo' or 'grpo' for several"
            )
        if advantage_estimator != "gae" and samples_per_prompt < 2:
            raise ValueError(
                f"advantage_estimator={advantage_estimator!r} needs samples_per_prompt >= 2 (the group baseline), "
                f"got {samples_per_prompt}"
            )
        if minibatch_assignment not in ("independent", "permutation"):
            raise ValueError(
                f"minibatch_assignment must be 'independent' or 'permutation', got {minibatch_assignment!r}"
            )
        if ppo_epochs < 1 or num_mini_batches < 1:
            raise ValueError("ppo_epochs and num_mini_batches must be >= 1")
        if not 1 <= min_new_tokens <= max_new_tokens:
            raise ValueError(
                f"need 1 <= min_new_tokens <= max_new_tokens, got {min_new_tokens}, {max_new_tokens}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if steering_max_coefficient is not None and (steering_max_coefficient <= 0 or not steering_layers):
            raise ValueError(
                f"steering_max_coefficient bounds the steering coefficients: it needs steering_layers and a "
                f"positive value, got {steering_max_coefficient} with steering_layers={steering_layers}"
            )
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model)
        body = load_causal_lm(model, self.tokenizer, seed=seed)
        disable_dropout(body)
        self.reference = None
        if steering_layers:
            self.policy = self._steered(body, steering_layers, steering_source, steering_examples)
        elif use_lora:
            self.policy = add_lora(
                body, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules
            )
        else:
            self.policy = body
            self.reference = copy.deepcopy(body).requires_grad_(False).eval()
        self.value_head = None
        if advantage_estimator == "gae":
            self.value_head = torch.nn.Linear(body.config.hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        self.kl_controller = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon)
            if adaptive_kl
            else FixedKLController(kl_coef)
        )
        self.reward = self._build_reward()
        self.input_reports = {
            name: read_input_report(source)
            for name, source in (("model", model), ("reward_model", reward_model), ("reward_classifier", reward_classifier))
            if name == "model" or source is not None
        }  # fmt: skip
        self.rollout_seed = rollout_seed if rollout_seed is not None else secrets.randbits(62)
        self.rollout_batches = 0
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
        if hp.use_lora and hp.lora_dropout > 0:
            hazards.append(
                f"lora_dropout={hp.lora_dropout} draws dropout masks from the shared torch RNG, so one prompt "
                "changes the masks of the others; set lora_dropout=0"
            )
        hazards += reward_source_hazards(
            self.input_reports,
            {"reward_model": hp.reward_model_is_public, "reward_classifier": hp.reward_classifier_is_public},
        )
        return hazards

    def privacy_metadata(self) -> dict[str, Any]:
        """What ``privacy.json`` records of this stage: its reuse of each batch, the estimator, the rollout
        randomness, and the privacy reports of the models it starts from and is rewarded by (None: no report)."""
        hp = self.hparams
        return {
            "ppo_epochs": hp.ppo_epochs,
            "num_mini_batches": hp.num_mini_batches,
            "minibatch_assignment": hp.minibatch_assignment,
            "advantage_estimator": hp.advantage_estimator,
            "samples_per_prompt": hp.samples_per_prompt,
            "kl_in_loss": hp.kl_in_loss,
            "adapter": (
                f"steering along public class-mean directions of {hp.steering_source!r} at layers "
                f"{hp.steering_layers} (the directions are public; only their coefficients are trained"
                f"{f', each within ±{hp.steering_max_coefficient:g}' if hp.steering_max_coefficient else ''})"
                if hp.steering_layers
                else ("LoRA" if hp.use_lora else "full fine-tuning")
            ),
            "privacy_unit": f"one prompt, with its {hp.samples_per_prompt} completion(s), rewards and baseline",
            "secret_rollout_randomness": hp.rollout_seed is None,
            "declared_public": {k: hp[f"{k}_is_public"] for k in self.input_reports if k != "model"},
            "inputs": self.input_reports,
        }

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

    def _steered(
        self, body: torch.nn.Module, layers: list[int], source: str, examples: int
    ) -> torch.nn.Module:
        """``body`` with a steering adapter along public class-mean directions at ``layers``."""
        public = load_public_sources(source).shuffle(seed=0)
        public = public.select(range(min(examples, len(public))))
        directions = class_mean_directions(
            body.eval(), self.tokenizer, public["text"], public["label"], layers, max_length=32
        )
        return add_steering(body, dict(zip(layers, directions, strict=True)))

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
        adapter_off = None
        if reference and self.reference is None:
            adapter_off = (
                steering_disabled(self.policy)
                if self.hparams.steering_layers
                else self.policy.disable_adapter()
            )
        with adapter_off or contextlib.nullcontext():
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

    # ---------------------------------------------------------------- training
    def minibatch_loss(
        self, rollout: Rollout, rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mean_p loss_p`` over prompts ``rows`` (``rollout.group_loss``), and per-completion diagnostics."""
        hp = self.hparams
        logprobs, values = self.completion_logprobs(rollout.packed, rows, rollout.responses[rows])
        losses, stats = group_loss(
            logprobs, values, rollout, rows,
            cliprange=hp.cliprange, cliprange_value=hp.cliprange_value, vf_coef=hp.vf_coef,
            kl_coef_in_loss=self.kl_controller.value if hp.kl_in_loss else None,
        )  # fmt: skip
        return losses.mean(), stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        started = time.perf_counter()
        rollout = self.rollout(batch)
        optimizer = self.optimizers()
        stats: dict[str, list[torch.Tensor]] = {}
        hp = self.hparams
        minibatches = assign_minibatches(
            hp.minibatch_assignment, self.rollout_seed, self.rollout_batches, rollout.keys,
            hp.num_mini_batches, hp.ppo_epochs,
        )  # fmt: skip
        for epoch in minibatches:
            for rows in epoch:
                optimizer.zero_grad()
                if len(rows) > 0:  # an empty minibatch still steps (noise only under DP)
                    loss, row_stats = self.minibatch_loss(rollout, rows.to(self.device))
                    self.manual_backward(loss)
                    for key, value in row_stats.items():
                        stats.setdefault(key, []).append(value)
                optimizer.step()
                self._project_steering()
        completions = rollout.mask.shape[0] * rollout.mask.shape[1]
        self.kl_controller.update(rollout.kl.sum(-1).mean().item(), completions)
        self.rollout_batches += 1
        self.episodes += completions
        self._log_training(rollout, stats, completions / (time.perf_counter() - started))

    @torch.no_grad()
    def _project_steering(self) -> None:
        """Clip each steering coefficient to ``[-steering_max_coefficient, steering_max_coefficient]``."""
        bound = self.hparams.steering_max_coefficient
        if bound is not None:
            for module in steering_modules(self.policy):
                module.alpha.clamp_(-bound, bound)

    def _log_training(
        self, rollout: Rollout, stats: dict[str, list[torch.Tensor]], episodes_per_second: float
    ) -> None:
        metrics = rollout_metrics(rollout, self.kl_controller.value) | update_metrics(stats)
        metrics |= {
            "episodes_per_second": torch.tensor(episodes_per_second),
            "episode": torch.tensor(float(self.episodes)),
        }
        for layer, module in zip(
            self.hparams.steering_layers or [], steering_modules(self.policy), strict=True
        ):
            metrics |= {f"steering/alpha_{layer}_{j}": a.detach() for j, a in enumerate(module.alpha)}
        batch_size = rollout.scores.numel()
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/reward", rollout.scores.mean(), prog_bar=True, on_step=True, batch_size=batch_size)

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
            "rollout_batches": self.rollout_batches,
            "rollout_seed": self.rollout_seed,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["ppo"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.episodes = state["episodes"]
        self.rollout_batches = state["rollout_batches"]
        self.rollout_seed = state["rollout_seed"]

    def export(self, directory: str | Path) -> Path:
        """Write the policy (adapter merged) and tokenizer as a plain ``transformers`` directory."""
        directory = Path(directory)
        merged = (
            merged_steering_copy(self.policy) if self.hparams.steering_layers else merged_copy(self.policy)
        )
        merged.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.value_head is not None:
            torch.save(
                {k: v.cpu() for k, v in self.value_head.state_dict().items()}, directory / "value_head.pt"
            )
        return directory

    def on_fit_end(self) -> None:
        export_after_fit(self, self.hparams.export_dir or None)

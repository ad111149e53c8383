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

import secrets
import time
from pathlib import Path
from typing import Any, Literal

import torch

from lit_dprl.models import load_causal_lm, load_tokenizer
from lit_dprl.privacy.report import export_after_fit
from lit_dprl.rewards import read_input_report
from lit_dprl.rl import AdaptiveKLController, FixedKLController
from lit_dprl.rollout import (
    Rollout,
    assign_minibatches,
    disable_dropout,
    group_loss,
    rollout_metrics,
    update_metrics,
)
from lit_dprl.stages.ppo.policy import build_reward, merged_policy, policy_and_reference
from lit_dprl.stages.ppo.rollouts import PolicyRollouts
from lit_dprl.stages.ppo.settings import check_settings, privacy_hazards, privacy_metadata
from lit_dprl.steering import steering_modules


class PPOModule(PolicyRollouts):
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
            each listed decoder layer add ``α_ℓ · v_ℓ``, where ``v_ℓ`` is a direction computed from public
            labelled texts (``steering_source``, ``steering_direction``) and only the α's (one per layer) are trained. Under DP the
            noise grows with √d, so a handful of parameters learns where thousands drown on a CPU budget.
        steering_source: Public labelled texts for the directions ("imdb_public", "rotten_tomatoes" or both
            joined by "+"; label 1 = the direction's positive end).
        steering_examples: Public texts used for class-mean directions (token log-odds use all of the source).
        steering_direction: "class_mean" (mean hidden state of positive minus negative public texts: a semantic
            direction) or "token_log_odds" (the shift whose effect on the logits best matches each token's
            public class log-odds: a lexical direction, α ≈ nats of logit bias per unit of log-odds).
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
            all of it, so DP configs use a small weight (configs/smollm2/ppo.yaml: 0.005). Adam still learns the value head: its update does not scale with it.
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
        steering_direction: Literal["class_mean", "token_log_odds"] = "class_mean",
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
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model)
        body = load_causal_lm(model, self.tokenizer, seed=seed)
        disable_dropout(body)
        self.policy, self.reference = policy_and_reference(body, self.tokenizer, self.hparams)
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
        self.reward = build_reward(self.hparams)
        self.input_reports = {
            name: read_input_report(source)
            for name, source in (("model", model), ("reward_model", reward_model), ("reward_classifier", reward_classifier))
            if name == "model" or source is not None
        }  # fmt: skip
        self.rollout_seed = rollout_seed if rollout_seed is not None else secrets.randbits(62)
        self.rollout_batches = 0
        self.episodes = 0

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
        """Settings under which one prompt's loss depends on other prompts (``settings.privacy_hazards``)."""
        return privacy_hazards(self.hparams, self.input_reports)

    def privacy_metadata(self) -> dict[str, Any]:
        """What ``privacy.json`` records of this stage (``settings.privacy_metadata``)."""
        return privacy_metadata(self.hparams, self.input_reports)

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
        merged_policy(self.policy, bool(self.hparams.steering_layers)).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.value_head is not None:
            torch.save(
                {k: v.cpu() for k, v in self.value_head.state_dict().items()}, directory / "value_head.pt"
            )
        return directory

    def on_fit_end(self) -> None:
        export_after_fit(self, self.hparams.export_dir or None)

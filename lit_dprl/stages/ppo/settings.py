"""What PPOModule's hyperparameters allow and what they declare: the checks of its arguments, the settings that
would couple prompts under DP (``privacy_hazards``) and the description ``privacy.json`` records of the stage.

Every function reads the module's saved hyperparameters (``PPOModule.hparams``) and nothing else.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.data import AttributeDict

from lit_dprl.rewards import reward_source_hazards

ESTIMATORS = ("gae", "rloo", "grpo")
MINIBATCH_ASSIGNMENTS = ("independent", "permutation")
STEERING_DIRECTIONS = {"class_mean": "class-mean directions", "token_log_odds": "token log-odds directions"}


def check_settings(hp: AttributeDict) -> None:
    """Raise ``ValueError`` naming the first argument combination PPOModule cannot train with."""
    sources = [s for s in (hp.reward_function, hp.reward_classifier, hp.reward_model) if s is not None]
    if len(sources) != 1:
        raise ValueError(
            "give exactly one reward source: reward_function ('package.module:function'), "
            "reward_classifier (a local sequence-classifier directory) or reward_model (a stage-2 export)"
        )
    if hp.advantage_estimator not in ESTIMATORS:
        raise ValueError(
            f"advantage_estimator must be 'gae', 'rloo' or 'grpo', got {hp.advantage_estimator!r}"
        )
    if hp.advantage_estimator == "gae" and hp.samples_per_prompt != 1:
        raise ValueError(
            f"advantage_estimator='gae' samples one completion per prompt, got samples_per_prompt="
            f"{hp.samples_per_prompt}; use advantage_estimator='rloo' or 'grpo' for several"
        )
    if hp.advantage_estimator != "gae" and hp.samples_per_prompt < 2:
        raise ValueError(
            f"advantage_estimator={hp.advantage_estimator!r} needs samples_per_prompt >= 2 (the group "
            f"baseline), got {hp.samples_per_prompt}"
        )
    if hp.minibatch_assignment not in MINIBATCH_ASSIGNMENTS:
        raise ValueError(
            f"minibatch_assignment must be 'independent' or 'permutation', got {hp.minibatch_assignment!r}"
        )
    if hp.ppo_epochs < 1 or hp.num_mini_batches < 1:
        raise ValueError("ppo_epochs and num_mini_batches must be >= 1")
    if not 1 <= hp.min_new_tokens <= hp.max_new_tokens:
        raise ValueError(
            f"need 1 <= min_new_tokens <= max_new_tokens, got {hp.min_new_tokens}, {hp.max_new_tokens}"
        )
    if hp.temperature <= 0:
        raise ValueError(f"temperature must be positive, got {hp.temperature}")
    if hp.steering_direction not in STEERING_DIRECTIONS:
        raise ValueError(
            f"steering_direction must be one of {', '.join(STEERING_DIRECTIONS)}, got {hp.steering_direction!r}"
        )
    bound = hp.steering_max_coefficient
    if bound is not None and (bound <= 0 or not hp.steering_layers):
        raise ValueError(
            f"steering_max_coefficient bounds the steering coefficients: it needs steering_layers and a "
            f"positive value, got {bound} with steering_layers={hp.steering_layers}"
        )


def privacy_hazards(hp: AttributeDict, input_reports: dict[str, dict[str, Any] | None]) -> list[str]:
    """Settings under which one prompt's loss depends on other prompts, or on private data beyond D3."""
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
        input_reports,
        {"reward_model": hp.reward_model_is_public, "reward_classifier": hp.reward_classifier_is_public},
    )
    return hazards


def adapter_description(hp: AttributeDict) -> str:
    """What is trained: public-direction steering coefficients, a LoRA adapter or the whole policy."""
    if not hp.steering_layers:
        return "LoRA" if hp.use_lora else "full fine-tuning"
    bound = f", each within ±{hp.steering_max_coefficient:g}" if hp.steering_max_coefficient else ""
    return (
        f"steering along public {STEERING_DIRECTIONS[hp.steering_direction]} of {hp.steering_source!r} at layers "
        f"{hp.steering_layers} (the directions are public; only their coefficients are trained{bound})"
    )


def privacy_metadata(hp: AttributeDict, input_reports: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """What ``privacy.json`` records of the stage: its reuse of each batch, the estimator, the rollout
    randomness, and the privacy reports of the models it starts from and is rewarded by (None: no report)."""
    return {
        "ppo_epochs": hp.ppo_epochs,
        "num_mini_batches": hp.num_mini_batches,
        "minibatch_assignment": hp.minibatch_assignment,
        "advantage_estimator": hp.advantage_estimator,
        "samples_per_prompt": hp.samples_per_prompt,
        "kl_in_loss": hp.kl_in_loss,
        "adapter": adapter_description(hp),
        "privacy_unit": f"one prompt, with its {hp.samples_per_prompt} completion(s), rewards and baseline",
        "secret_rollout_randomness": hp.rollout_seed is None,
        "declared_public": {k: hp[f"{k}_is_public"] for k in input_reports if k != "model"},
        "inputs": input_reports,
    }

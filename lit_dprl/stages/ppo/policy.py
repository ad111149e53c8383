"""PPOModule's models: the trained policy over the stage-1 body (a LoRA adapter, a public-direction steering
adapter or the whole model), its frozen reference, the reward source, and the merged policy it exports.

The reference is the body with the adapter disabled (no second copy) unless the whole policy is trained; then it
is a frozen copy taken before training.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from lightning.fabric.utilities.data import AttributeDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_dprl.data.imdb import load_public_sources
from lit_dprl.models import add_lora, merged_copy
from lit_dprl.rewards import RewardFunction, SequenceClassifierReward, load_reward_callable
from lit_dprl.steering import (
    add_steering,
    class_mean_directions,
    merged_steering_copy,
    steering_disabled,
    token_log_odds_direction,
)

STEERING_DIRECTION_MAX_LENGTH = 32


def steered(
    body: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: list[int],
    source: str,
    examples: int,
    direction: str = "class_mean",
) -> PreTrainedModel:
    """``body`` with a steering adapter at ``layers`` along public directions from ``source``: class-mean
    directions of its first ``examples`` texts (shuffled with seed 0), or token log-odds directions from all of
    its texts (``lit_dprl.steering``)."""
    public = load_public_sources(source).shuffle(seed=0)
    body.eval()
    if direction == "token_log_odds":
        texts, labels = list(public["text"]), list(public["label"])
        directions = [
            token_log_odds_direction(
                body, tokenizer, texts, labels, layer, max_length=STEERING_DIRECTION_MAX_LENGTH
            )
            for layer in layers
        ]
    else:
        public = public.select(range(min(examples, len(public))))
        directions = class_mean_directions(
            body, tokenizer, public["text"], public["label"], layers, max_length=STEERING_DIRECTION_MAX_LENGTH
        )
    return add_steering(body, dict(zip(layers, directions, strict=True)))


def policy_and_reference(
    body: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, hp: AttributeDict
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """``(policy, reference)``: the adapted body and None (the reference is the adapter-disabled body), or with
    ``use_lora=False`` and no steering the body itself and a frozen copy of it."""
    if hp.steering_layers:
        policy = steered(
            body,
            tokenizer,
            hp.steering_layers,
            hp.steering_source,
            hp.steering_examples,
            hp.steering_direction,
        )
        return policy, None
    if hp.use_lora:
        lora = add_lora(
            body,
            r=hp.lora_r,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            target_modules=hp.lora_target_modules,
        )
        return lora, None
    return body, copy.deepcopy(body).requires_grad_(False).eval()


def reference_mode(
    policy: torch.nn.Module, reference: torch.nn.Module | None, steering: bool
) -> contextlib.AbstractContextManager:
    """While entered, ``policy`` computes the reference (its adapter disabled); nothing to do with a frozen copy."""
    if reference is not None:
        return contextlib.nullcontext()
    return steering_disabled(policy) if steering else policy.disable_adapter()


def merged_policy(policy: torch.nn.Module, steering: bool) -> PreTrainedModel:
    """A plain ``transformers`` copy of the policy with its adapter merged into the weights."""
    return merged_steering_copy(policy) if steering else merged_copy(policy)


def build_reward(hp: AttributeDict) -> RewardFunction:
    """The one reward source the hyperparameters name: a callable, a sequence classifier or a reward model."""
    if hp.reward_function is not None:
        return load_reward_callable(hp.reward_function)
    if hp.reward_classifier is not None:
        return SequenceClassifierReward(
            hp.reward_classifier, label=hp.reward_classifier_label, output=hp.reward_classifier_output
        )
    from lit_dprl.rewards import RewardModelScorer

    return RewardModelScorer(hp.reward_model)

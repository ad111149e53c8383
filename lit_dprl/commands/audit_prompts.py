"""Canaries of the RL stage (``ppo``, with the ``gae``, ``rloo`` or ``grpo`` estimator) for ``lit-dprl audit``.

The private data of the RL stage are prompts, and a prompt reaches the weights only through the responses
sampled for it and their rewards. A canary therefore plants a secret in the reward: canary ``i`` is a prompt
``x_i`` of random tokens with a secret target set ``T_i``, a uniformly random half of the *target universe*
U (the plain tokens ``t`` with ``encode(decode(t)) = [t]``, so that a response's first token can be read back
from its text). The audit wraps the stage's reward (``PlantedReward``, installed from outside the stage):

    reward(x_i, y) = +1 if the first token of y is in T_i, −1 if it is in U ∖ T_i, 0 outside U;
    other prompts: the stage's reward.

Averaged over the random T_i every token's canary reward is 0, so the canaries reward no global shift (such
as "emit tokens of U"), only the prompt-specific T_i.

Only a run that samples ``x_i`` can learn ``T_i``. Statistic: ``log π(T_i | x_i)``, the log-probability that
the first response token falls in ``T_i`` under the policy's sampling distribution (temperature and blocked
tokens as in ``lit_dprl.generation``); the score is its gain over training. With a byte-level tokenizer (the
``tiny`` model) the first token is read back exactly; with BPE merges the re-encoded first token can differ
from the sampled one, which only weakens the signal (the audit stays valid for any reward).
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from datasets import Dataset, concatenate_datasets

from lit_dprl.commands.audit_canaries import batched, plain_vocabulary, random_tokens
from lit_dprl.data.prompts import PromptDataModule, collate_prompts
from lit_dprl.generation import block_disallowed_
from lit_dprl.models import position_ids_from_mask
from lit_dprl.rewards import RewardFunction

CANARY_PROMPT_TOKENS = 4
CONTROL_PROMPTS = 32
HIT_REWARD = 1.0
MISS_REWARD = -1.0
OUTSIDE_REWARD = 0.0


def target_universe(tokenizer) -> np.ndarray:
    """Plain token ids ``t`` whose text re-encodes to exactly ``[t]`` (a first token readable from the text)."""
    return np.array(
        [
            t
            for t in plain_vocabulary(tokenizer)
            if tokenizer(tokenizer.decode([int(t)]), add_special_tokens=False)["input_ids"] == [int(t)]
        ]
    )


def first_token(tokenizer, response: str) -> int | None:
    """The first token id of ``response`` re-encoded (None for an empty response)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids[0] if ids else None


class PlantedReward:
    """The stage's reward, except on canary prompts: ``HIT_REWARD`` if the response's first token is in the
    prompt's secret target set, ``MISS_REWARD`` if it is in the rest of ``universe``, ``OUTSIDE_REWARD``
    otherwise. Each score depends on its own (prompt, response) only, as ``lit_dprl.rewards.RewardFunction``
    requires; the stage's reward sees the other rows, in order."""

    def __init__(
        self,
        reward: RewardFunction,
        tokenizer,
        targets: Mapping[str, frozenset[int]],
        universe: frozenset[int],
    ) -> None:
        self.reward, self.tokenizer, self.targets, self.universe = reward, tokenizer, dict(targets), universe

    def canary_reward(self, prompt: str, response: str) -> float:
        """The planted reward of ``response`` to canary ``prompt`` (module docstring)."""
        token = first_token(self.tokenizer, response)
        if token in self.targets[prompt]:
            return HIT_REWARD
        return MISS_REWARD if token in self.universe else OUTSIDE_REWARD

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        ordinary = [i for i, prompt in enumerate(prompts) if prompt not in self.targets]
        scores = [
            self.canary_reward(prompt, response) if prompt in self.targets else OUTSIDE_REWARD
            for prompt, response in zip(prompts, responses, strict=True)
        ]
        if ordinary:
            values = list(self.reward([prompts[i] for i in ordinary], [responses[i] for i in ordinary]))
            if len(values) != len(ordinary):
                raise ValueError(
                    f"the stage's reward returned {len(values)} values for {len(ordinary)} responses"
                )
            for i, value in zip(ordinary, values, strict=True):
                scores[i] = float(value)
        return scores

    def to(self, device: torch.device | str) -> PlantedReward:
        """Move the stage's reward (when it is a model) to ``device``."""
        if hasattr(self.reward, "to"):
            self.reward.to(device)
        return self


def first_token_logprobs(module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``log q(· | x_b)`` ``[B, V]``: the policy's first-token sampling distribution, ``softmax(logits /
    temperature)`` with PAD (and EOS before ``min_new_tokens``) blocked, as in ``lit_dprl.generation``."""
    hp = module.hparams
    mask = batch["attention_mask"]
    logits = module.policy(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    ).logits
    scores = logits[:, -1:].float() / hp.temperature
    block_disallowed_(scores, module.tokenizer, hp.min_new_tokens)
    return torch.log_softmax(scores[:, 0], dim=-1)


def contrast_statistic(
    canary_logq: torch.Tensor, control_logq: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``s_i = log π(T_i | x_i) − (1/K) Σ_k log π(T_i | c_k)`` ``[m]``, with ``log π(T | x) = logsumexp_{t ∈ T}
    log q(t | x)``, canary distributions ``canary_logq`` ``[m, V]``, control distributions ``control_logq``
    ``[K, V]`` and ``targets`` ``[m, V]`` marking ``T_i``. The control term removes what training did to
    ``T_i`` on every prompt (a global drift toward some tokens), which is the same for member and non-member."""
    blocked = float("-inf")
    own = torch.logsumexp(canary_logq.masked_fill(~targets, blocked), dim=-1)
    controls = torch.logsumexp(control_logq[None].masked_fill(~targets[:, None], blocked), dim=-1)
    return own - controls.mean(dim=-1)


class PromptCanaries:
    """RL-stage canaries: random prompts with a secret half ``T`` of the target universe (module docstring),
    and ``CONTROL_PROMPTS`` random control prompts that are never trained on."""

    score_name = (
        "gain over training of log π(T | canary prompt) − mean log π(T | control prompt), T the canary's "
        "secret first-token targets"
    )
    statistic_name = "log π(T | canary prompt) − mean log π(T | control prompt)"

    def __init__(self, datamodule: PromptDataModule, module: pl.LightningModule) -> None:
        if not (hasattr(module, "policy") and hasattr(module, "reward")):
            raise TypeError(
                f"prompt canaries need an RL module with policy and reward, got {type(module).__name__}"
            )
        self.datamodule, self.module = datamodule, module
        self.tokenizer = datamodule.tokenizer
        self.universe = target_universe(self.tokenizer)
        if len(self.universe) < 2:
            raise ValueError(
                f"the tokenizer has {len(self.universe)} tokens whose text re-encodes to themselves; prompt "
                "canaries need at least 2 to plant a target set"
            )
        self.controls: list[dict[str, list[int]]] = []

    def key(self, input_ids: list[int]) -> str:
        """The prompt as the reward sees it (``PPOModule`` decodes prompts without special tokens)."""
        return self.tokenizer.decode(input_ids, skip_special_tokens=True)

    def make(self, rng: np.random.Generator, count: int) -> list[dict[str, list[int]]]:
        """``count`` canary prompts and ``CONTROL_PROMPTS`` control prompts of ``min(CANARY_PROMPT_TOKENS,
        max_prompt_tokens)`` tokens of U, each canary with a random half of U as targets. The canaries' last
        tokens run through random permutations of U, so that no two of the first |U| canaries end alike (the
        last token is what a small model's first response token depends on most). A prompt whose text equals a
        training prompt's or an earlier drawn prompt's is drawn again."""
        length = min(CANARY_PROMPT_TOKENS, self.datamodule.hparams.max_prompt_tokens)
        rounds = -(-(count + CONTROL_PROMPTS) // len(self.universe))
        last_tokens = np.concatenate([rng.permutation(self.universe) for _ in range(rounds)])
        taken = {self.key(row["input_ids"]) for row in self.datamodule.train_set}
        prompts = []
        while len(prompts) < count + CONTROL_PROMPTS:
            prompt = [*random_tokens(rng, self.universe, length - 1), int(last_tokens[len(prompts)])]
            if self.key(prompt) not in taken:
                taken.add(self.key(prompt))
                prompts.append(prompt)
        self.controls = [{"input_ids": prompt} for prompt in prompts[count:]]
        half = len(self.universe) // 2
        return [
            {
                "input_ids": prompt,
                "targets": sorted(int(t) for t in rng.choice(self.universe, half, replace=False)),
            }
            for prompt in prompts[:count]
        ]

    def insert(self, rows: list[dict[str, list[int]]]) -> None:
        """Add the prompts to the training set and plant their targets in the module's reward."""
        train = self.datamodule.train_set
        extra = Dataset.from_dict({"input_ids": [row["input_ids"] for row in rows]}).cast(train.features)
        self.datamodule.train_set = concatenate_datasets([train, extra]).with_format("python")
        targets = {self.key(row["input_ids"]): frozenset(row["targets"]) for row in rows}
        universe = frozenset(int(t) for t in self.universe)
        self.module.reward = PlantedReward(self.module.reward, self.tokenizer, targets, universe)

    def first_token_logq(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        """``first_token_logprobs`` of the prompts of ``rows``, ``[len(rows), V]``."""
        batch = collate_prompts(rows, self.tokenizer.pad_token_id)
        return first_token_logprobs(self.module, {k: v.to(self.module.device) for k, v in batch.items()})

    def statistic_tensor(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        """``contrast_statistic`` of each canary of ``rows`` against the control prompts, ``[len(rows)]``."""
        canary_logq = self.first_token_logq(rows)
        targets = torch.zeros_like(canary_logq, dtype=torch.bool)
        for i, row in enumerate(rows):
            targets[i, row["targets"]] = True
        return contrast_statistic(canary_logq, self.first_token_logq(self.controls), targets)

    def statistic(self, rows: list[dict[str, list[int]]]) -> np.ndarray:
        return batched(self.module, rows, self.statistic_tensor)

"""Canaries of the supervised stages for ``lit-dprl audit``: DP-SFT, the reward model and DP-DPO.

Each kind makes random canaries, inserts the included ones into the stage's training set, and computes a
membership statistic per canary (higher = the model fits the canary better). ``statistic_tensor`` computes it
differentiably (the white-box audit takes its gradient); ``statistic`` is the same code under no_grad, in chunks
(the black-box audit's score is the statistic after training minus the statistic before).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from datasets import Dataset, concatenate_datasets

from lit_dprl.data.preferences import PreferenceDataModule, PreferenceDataset, collate_preference_batch
from lit_dprl.data.text import TextDataModule
from lit_dprl.stages.dpo import response_masks

SCORING_BATCH = 64
PROMPT_TOKENS = 16
RESPONSE_TOKENS = 32


class Canaries(Protocol):
    """A stage's canary kind: ``make`` draws canaries, ``insert`` adds the included ones to the training set,
    ``statistic_tensor`` is the per-canary membership statistic (higher = fits the canary better) as a tensor
    with grad, ``statistic`` the same as float64 numbers, computed in chunks without grad."""

    score_name: str  # the black-box score in words
    statistic_name: str  # the statistic s in symbols

    def make(self, rng: np.random.Generator, count: int) -> list[dict[str, list[int]]]: ...

    def insert(self, rows: list[dict[str, list[int]]]) -> None: ...

    def statistic_tensor(self, rows: list[dict[str, list[int]]]) -> torch.Tensor: ...

    def statistic(self, rows: list[dict[str, list[int]]]) -> np.ndarray: ...


def random_tokens(rng: np.random.Generator, vocabulary: np.ndarray, length: int) -> list[int]:
    """``length`` token ids drawn uniformly (with replacement) from ``vocabulary``."""
    return [int(t) for t in rng.choice(vocabulary, size=length)]


def plain_vocabulary(tokenizer) -> np.ndarray:
    """Every token id of ``tokenizer`` except its special tokens (EOS, PAD, ...)."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special])


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) inside the block, its own mode restored after."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


@torch.no_grad()
def batched(module: pl.LightningModule, rows: list, statistic: Callable[[list], torch.Tensor]) -> np.ndarray:
    """``statistic`` of ``rows`` in chunks of ``SCORING_BATCH``, as float64, with the module in eval mode."""
    with evaluating(module):
        values = [statistic(rows[i : i + SCORING_BATCH]) for i in range(0, len(rows), SCORING_BATCH)]
    return torch.cat(values).double().cpu().numpy()


class TextCanaries:
    """DP-SFT canaries: random-token rows of the data's ``max_length``, every token after the first a target.

    Statistic: minus the row's mean NLL (``SFTModule.sequence_losses``)."""

    score_name = "loss drop: mean NLL at initialisation − after training"
    statistic_name = "−(mean NLL)"

    def __init__(self, datamodule: TextDataModule, module: pl.LightningModule) -> None:
        if not hasattr(module, "sequence_losses"):
            raise TypeError(
                f"a TextDataModule audit needs an SFT-style module with sequence_losses(), got {type(module).__name__}"
            )
        self.datamodule, self.module = datamodule, module

    def make(self, rng: np.random.Generator, count: int) -> list[dict[str, list[int]]]:
        length = self.datamodule.hparams.max_length
        vocabulary = plain_vocabulary(self.datamodule.tokenizer)
        return [
            {"input_ids": random_tokens(rng, vocabulary, length), "loss_mask": [0] + [1] * (length - 1)}
            for _ in range(count)
        ]

    def insert(self, rows: list[dict[str, list[int]]]) -> None:
        extra = Dataset.from_dict({key: [row[key] for row in rows] for key in ("input_ids", "loss_mask")})
        train = self.datamodule.train_set
        self.datamodule.train_set = concatenate_datasets([train, extra.cast(train.features)])

    def statistic_tensor(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        """``−(mean NLL)`` of each row, ``[len(rows)]``."""
        batch = {k: v.to(self.module.device) for k, v in self.datamodule.collate()(rows).items()}
        return -self.module.sequence_losses(batch)

    def statistic(self, rows: list[dict[str, list[int]]]) -> np.ndarray:
        return batched(self.module, rows, self.statistic_tensor)


class PreferenceCanaries:
    """Reward-model canaries: a random prompt and two random responses, the first planted as chosen.

    Statistic: the margin r(prompt + chosen) − r(prompt + rejected) (``RewardModule.pair_rewards``)."""

    score_name = "margin gain: r(chosen) − r(rejected) after training − at initialisation"
    statistic_name = "r(chosen) − r(rejected)"
    required_method = "pair_rewards"

    def __init__(self, datamodule: PreferenceDataModule, module: pl.LightningModule) -> None:
        if not hasattr(module, self.required_method):
            raise TypeError(
                f"{type(self).__name__} need a module with {self.required_method}(), got {type(module).__name__}"
            )
        if datamodule.max_length < PROMPT_TOKENS + RESPONSE_TOKENS:
            raise ValueError(
                f"preference canaries need max_length >= {PROMPT_TOKENS + RESPONSE_TOKENS}, got "
                f"{datamodule.max_length}; raise --data.init_args.max_length"
            )
        self.datamodule, self.module = datamodule, module

    def make(self, rng: np.random.Generator, count: int) -> list[dict[str, list[int]]]:
        vocabulary = plain_vocabulary(self.datamodule.tokenizer)
        rows = []
        for _ in range(count):
            prompt = random_tokens(rng, vocabulary, PROMPT_TOKENS)
            chosen, rejected = (random_tokens(rng, vocabulary, RESPONSE_TOKENS) for _ in range(2))
            rows.append({"chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected})
        return rows

    def insert(self, rows: list[dict[str, list[int]]]) -> None:
        train = self.datamodule.train_dataset
        user_ids = None
        if train.user_ids is not None:
            user_ids = [*train.user_ids, *(f"audit-canary-{i}" for i in range(len(rows)))]
        self.datamodule.train_dataset = PreferenceDataset(
            [*train.chosen_ids, *(row["chosen_input_ids"] for row in rows)],
            [*train.rejected_ids, *(row["rejected_input_ids"] for row in rows)],
            user_ids,
        )

    def margin(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``r(chosen) − r(rejected)`` per pair, ``[B]``."""
        chosen, rejected = self.module.pair_rewards(batch)
        return chosen - rejected

    def statistic_tensor(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        """``margin`` of each canary pair, ``[len(rows)]``."""
        batch = collate_preference_batch(rows, self.datamodule.tokenizer.pad_token_id)
        return self.margin({k: v.to(self.module.device) for k, v in batch.items()})

    def statistic(self, rows: list[dict[str, list[int]]]) -> np.ndarray:
        return batched(self.module, rows, self.statistic_tensor)


class DPOCanaries(PreferenceCanaries):
    """DP-DPO canaries: the reward model's canaries (random prompt, random chosen, random rejected), scored by
    the DPO implicit reward margin

        β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]

    with the response tokens of ``lit_dprl.stages.dpo.response_masks`` and ``DPOModule.pair_logprobs``."""

    score_name = "implicit reward margin gain: β·(Δ_chosen − Δ_rejected) after training − at initialisation"
    statistic_name = "β·(Δ_chosen − Δ_rejected)"
    required_method = "pair_logprobs"

    def margin(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        masks = response_masks(
            batch["chosen_input_ids"],
            batch["chosen_attention_mask"],
            batch["rejected_input_ids"],
            batch["rejected_attention_mask"],
        )
        with self.module.reference_model() as reference:
            reference_chosen, reference_rejected = self.module.pair_logprobs(reference, batch, masks)
        policy_chosen, policy_rejected = self.module.pair_logprobs(self.module.model, batch, masks)
        ratio_gap = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
        return self.module.hparams.beta * ratio_gap

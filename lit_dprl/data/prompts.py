"""Prompts for DP-PPO (stage 3): the private prompt set D3, one prompt = one privacy unit.

For the IMDb task a prompt is the first few words of a review (TRL's gpt2-sentiment recipe and the
paper's sample prefixes use 2–8 tokens); the policy continues it and a public sentiment reward scores it.
"""

from __future__ import annotations

import functools

import lightning as L
import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_dprl.data.files import file_dataset_name, load_local_dataset, require_columns, text_column
from lit_dprl.data.imdb import PUBLIC_FRACTION, imdb_provenance, load_imdb_reviews, split_imdb
from lit_dprl.data.padding import left_pad
from lit_dprl.data.plumbing import after_setup, batch_loader, model_tokenizer
from lit_dprl.data.splits import UNIT_COLUMN, holdout, keyed_choice, split_key

IMDB = "imdb"


PROMPT_WORDS_PURPOSE = "prompt_words"


def first_words(
    texts: list[str], unit_ids: list[str], min_words: int, max_words: int, key: bytes
) -> list[str]:
    """Each text cut to its first k words, ``k = min_words + keyed_choice(key, unit, "prompt_words",
    max_words − min_words + 1)``: k depends on that text's own unit id only, not on its position."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    if len(texts) != len(unit_ids):
        raise ValueError(f"{len(texts)} texts but {len(unit_ids)} unit ids")
    span = max_words - min_words + 1
    counts = [min_words + keyed_choice(key, unit, PROMPT_WORDS_PURPOSE, span) for unit in unit_ids]
    return [" ".join(text.split()[:k]) for text, k in zip(texts, counts, strict=True)]


def keep_last_tokens(rows: list[list[int]], limit: int, what: str) -> list[list[int]]:
    """Each row cut to its last ``limit`` tokens, with a warning that counts the rows ``what`` that were cut."""
    cut = sum(len(row) > limit for row in rows)
    if cut:
        rank_zero_warn(
            f"{cut} of {len(rows)} {what} are longer than max_prompt_tokens={limit} and were cut to their last "
            f"{limit} tokens; raise max_prompt_tokens to keep them whole (max_prompt_tokens + max_new_tokens must "
            "fit the model's context)"
        )
    return [row[-limit:] for row in rows]


def collate_prompts(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch: ``input_ids`` and ``attention_mask``, ``[B, T]``."""
    input_ids, attention_mask = left_pad([row["input_ids"] for row in rows], pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class PromptDataModule(L.LightningDataModule):
    """Private training prompts (D3) and held-out evaluation prompts.

    Args:
        tokenizer: Model source whose tokenizer to use: the policy's. Unset, ``lit-dprl fit`` sets it to
            ``model.init_args.model``; in Python, pass it.
        source: "imdb" (prompts = first words of reviews: training from the private PPO set D3 of
            ``lit_dprl.data.imdb.split_imdb``, validation from its held-out test split) or a local
            .jsonl/.json/.csv/.parquet file with a ``prompt_field`` column (split by ``user_id`` if present).
        prompt_field: Column holding prompts in a local file.
        min_prompt_words: Fewest words of a review kept as an IMDb prompt.
        max_prompt_words: Most words of a review kept as an IMDb prompt.
        max_prompt_tokens: Prompts are cut to their last this-many tokens (with a warning that counts them).
        batch_size: Prompts per rollout batch (the expected batch under DP's Poisson sampling).
        max_train_prompts: Keep only this many training prompts (the first in keyed-hash order).
        max_val_prompts: Keep only this many held-out prompts (the first in keyed-hash order).
        val_fraction: Share of a local file held out for evaluation.
        seed: The public split key ``split_key(seed)`` of the keyed-hash splits and of each prompt's word
            count; keep it equal across stages so D1/D2/D3 stay disjoint.
        num_workers: DataLoader worker processes.
        reward_fraction: Share of the private IMDb reviews set aside as the reward model's set D2 (the
            rest is halved into D1 and D3); give every stage of a pipeline the same value.
        public_fraction: Share of the non-test IMDb reviews declared public (``split_imdb``); give every
            stage of a pipeline the same value.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        source: str = IMDB,
        prompt_field: str = "prompt",
        min_prompt_words: int = 2,
        max_prompt_words: int = 6,
        max_prompt_tokens: int = 32,
        batch_size: int = 16,
        max_train_prompts: int | None = None,
        max_val_prompts: int | None = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        reward_fraction: float = 0.0,
        public_fraction: float = PUBLIC_FRACTION,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_prompt_tokens < 1:
            raise ValueError(
                f"max_prompt_tokens must be >= 1 (prompts keep their last this-many tokens), got {max_prompt_tokens}"
            )
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._provenance: dict | None = None

    @property
    def dataset_size(self) -> int:
        """Number of training prompts (privacy units), known after ``setup``."""
        return len(after_setup(self.train_set, "PromptDataModule.dataset_size"))

    def split_provenance(self) -> dict:
        """Where the training prompts come from (``lit_dprl.data.splits.split_provenance``); after ``setup``."""
        return after_setup(self._provenance, "PromptDataModule.split_provenance()")

    def raw_prompts(self) -> tuple[list[str], list[str]]:
        """Untokenized ``(train, validation)`` prompts."""
        hp = self.hparams
        key = split_key(hp.seed)
        if hp.source == IMDB:
            fractions = {"reward_fraction": hp.reward_fraction, "public_fraction": hp.public_fraction}
            splits = split_imdb(load_imdb_reviews(), seed=hp.seed, **fractions)
            self._provenance = imdb_provenance("ppo", seed=hp.seed, **fractions)
            train, val = splits["ppo"], splits["test"]
            train, val = self._limit(train, hp.max_train_prompts), self._limit(val, hp.max_val_prompts)
            words = functools.partial(
                first_words, min_words=hp.min_prompt_words, max_words=hp.max_prompt_words, key=key
            )
            return words(train["text"], train[UNIT_COLUMN]), words(val["text"], val[UNIT_COLUMN])
        dataset = load_local_dataset(hp.source, [hp.prompt_field])
        require_columns(dataset, [hp.prompt_field], hp.source)
        parts, self._provenance = holdout(dataset, hp.val_fraction, key, file_dataset_name(hp.source), False)
        train = self._limit(parts["train"], hp.max_train_prompts)
        val = self._limit(parts["validation"], hp.max_val_prompts)
        where = f"{hp.source}"
        return text_column(train, hp.prompt_field, where), text_column(val, hp.prompt_field, where)

    @staticmethod
    def _limit(rows: Dataset, limit: int | None) -> Dataset:
        return rows if limit is None else rows.select(range(min(limit, len(rows))))

    def _encode(self, prompts: list[str], name: str) -> Dataset:
        if not prompts or (name == "training" and len(prompts) < self.hparams.batch_size):
            raise ValueError(
                f"the {name} prompts number {len(prompts)}, fewer than batch_size={self.hparams.batch_size}; "
                "lower batch_size or add prompts"
            )
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        ids = keep_last_tokens(ids, self.hparams.max_prompt_tokens, f"{name} prompts")
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(f"{len(empty)} {name} prompts are empty (rows {empty[:10]}); remove them")
        return Dataset.from_dict({"input_ids": ids})

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenize once."""
        if self.train_set is not None:
            return
        self.tokenizer = model_tokenizer(self.hparams.tokenizer, type(self).__name__)
        train, val = self.raw_prompts()
        self.train_set = self._encode(train, "training").with_format("python")
        self.val_set = self._encode(val, "validation").with_format("python")

    def _collate(self):
        return functools.partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        """Shuffled rollout batches; the DP callback rebuilds it with Poisson sampling."""
        return batch_loader(
            self.train_set, self._collate(), self.hparams.batch_size, self.hparams.num_workers, shuffle=True
        )

    def val_dataloader(self) -> DataLoader:
        """Held-out prompts, in order."""
        return batch_loader(
            self.val_set, self._collate(), self.hparams.batch_size, self.hparams.num_workers, shuffle=False
        )

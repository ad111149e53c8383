"""Pairwise preference data for the reward model (stage 2): encoding, batching and the data module.

One pair ``(prompt, chosen, rejected)`` is one privacy unit; files are read and checked by
``lit_dprl.data.preference_files``. A sequence is ``prompt tokens + response tokens``, each text tokenized on its
own without special tokens, cut to ``max_length`` by :func:`truncate_prompt_response` and padded on the LEFT, so
the reward is read at the last position.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_dprl.data.files import file_dataset_name
from lit_dprl.data.imdb import PUBLIC_FRACTION, imdb_provenance
from lit_dprl.data.labelled_pairs import imdb_preference_pairs
from lit_dprl.data.padding import left_pad
from lit_dprl.data.plumbing import after_setup, batch_loader, model_tokenizer
from lit_dprl.data.preference_files import PreferenceDataError, read_preference_file
from lit_dprl.data.splits import (
    HOLDOUT_PURPOSE,
    assign_units,
    split_key,
    split_provenance,
    unit_id,
    unit_kind,
)


class Truncated(NamedTuple):
    """One encoded ``prompt + response`` and which of its parts lost tokens."""

    input_ids: list[int]
    prompt_truncated: bool
    response_truncated: bool


def truncate_prompt_response(prompt_ids: list[int], response_ids: list[int], max_length: int) -> Truncated:
    """``prompt_ids + response_ids`` cut to at most ``max_length`` tokens.

    The prompt loses tokens from its LEFT (its end, next to the response, is kept); the response is
    cut (from the right, to ``max_length`` tokens, dropping the whole prompt) only if it alone is
    longer than ``max_length``.
    """
    if len(response_ids) > max_length:
        return Truncated(response_ids[:max_length], bool(prompt_ids), True)
    room = max_length - len(response_ids)
    kept_prompt = prompt_ids[len(prompt_ids) - room :] if room > 0 else []
    return Truncated(kept_prompt + response_ids, len(kept_prompt) < len(prompt_ids), False)


def encode_prompt_responses(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> list[Truncated]:
    """Tokenize prompts and responses separately (no special tokens) and truncate each concatenation."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [truncate_prompt_response(p, r, max_length) for p, r in zip(prompt_ids, response_ids, strict=True)]


def collate_preference_batch(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch pairs as left-padded ``chosen_input_ids/chosen_attention_mask/rejected_input_ids/rejected_attention_mask``."""
    chosen_ids, chosen_mask = left_pad([row["chosen_input_ids"] for row in rows], pad_token_id)
    rejected_ids, rejected_mask = left_pad([row["rejected_input_ids"] for row in rows], pad_token_id)
    return {
        "chosen_input_ids": chosen_ids,
        "chosen_attention_mask": chosen_mask,
        "rejected_input_ids": rejected_ids,
        "rejected_attention_mask": rejected_mask,
    }


class PreferenceDataset(Dataset):
    """Encoded pairs; item ``i`` is ``{"chosen_input_ids": [...], "rejected_input_ids": [...]}``."""

    def __init__(
        self, chosen_ids: list[list[int]], rejected_ids: list[list[int]], user_ids: list | None = None
    ) -> None:
        self.chosen_ids = chosen_ids
        self.rejected_ids = rejected_ids
        self.user_ids = user_ids

    def __len__(self) -> int:
        return len(self.chosen_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"chosen_input_ids": self.chosen_ids[index], "rejected_input_ids": self.rejected_ids[index]}


class TruncationCount(NamedTuple):
    """Sequences encoded, sequences longer than ``max_length``, and those whose response alone was longer."""

    sequences: int
    truncated: int
    response_truncated: int


def encode_pairs(
    tokenizer, rows: Sequence[dict], max_length: int
) -> tuple[PreferenceDataset, TruncationCount]:
    """Encode ``prompt + chosen`` and ``prompt + rejected`` of every row; count the truncations."""
    prompts = [row["prompt"] for row in rows]
    chosen = encode_prompt_responses(tokenizer, prompts, [row["chosen"] for row in rows], max_length)
    rejected = encode_prompt_responses(tokenizer, prompts, [row["rejected"] for row in rows], max_length)
    encoded = chosen + rejected
    count = TruncationCount(
        sequences=len(encoded),
        truncated=sum(e.prompt_truncated or e.response_truncated for e in encoded),
        response_truncated=sum(e.response_truncated for e in encoded),
    )
    user_ids = [row.get("user_id") for row in rows]
    dataset = PreferenceDataset(
        [e.input_ids for e in chosen],
        [e.input_ids for e in rejected],
        user_ids if any(u is not None for u in user_ids) else None,
    )
    return dataset, count


IMDB = "imdb"


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from local files, tokenized for the reward model and batched with left padding.

    Args:
        train_file: Local .jsonl/.json/.csv/.parquet file with ``prompt``, ``chosen``, ``rejected``
            (optional ``user_id``), or OpenAI summarize_from_feedback comparisons. Nothing is downloaded.
            ``"imdb"``: pairs built by ``lit_dprl.data.labelled_pairs.pairs_from_labelled_texts`` from the bundled IMDb reviews of the
            private reward set D2 of ``split_imdb`` (validation pairs from its held-out test split).
        tokenizer: Model source whose tokenizer is used (``lit_dprl.models.load_tokenizer``): the
            model's source. Unset, ``lit-dprl fit`` sets it to ``model.init_args.model``; in Python, pass it.
        val_file: Local validation file in the same layouts; if None, a share ``val_fraction`` of
            ``train_file`` is held out by keyed hash of each pair's unit (its ``user_id``, else its content).
        val_fraction: Fraction of ``train_file`` held out for validation when ``val_file`` is None.
        max_length: Longest sequence (prompt + response) in tokens; longer prompts lose tokens from the
            left, a response alone longer than this is cut. At most the model's context length.
        batch_size: Pairs per training batch (the expected batch size under Poisson sampling).
        val_batch_size: Pairs per validation batch; None uses ``batch_size``.
        seed: The public split key ``split_key(seed)`` of the train/validation split, of the IMDb split and
            of the IMDb pairs' partners; keep it equal across stages.
        num_workers: DataLoader worker processes.
        reward_fraction: With ``train_file="imdb"``: the share of the private IMDb reviews that forms D2;
            give every stage of a pipeline the same value so D1, D2 and D3 stay disjoint.
        public_fraction: With ``train_file="imdb"``: the share of the non-test IMDb reviews declared public
            (the pairs' partners come from it); give every stage of a pipeline the same value.
    """

    def __init__(
        self,
        train_file: str,
        tokenizer: str | None = None,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        max_length: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        reward_fraction: float = 0.2,
        public_fraction: float = PUBLIC_FRACTION,
    ) -> None:
        super().__init__()
        if val_file is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) when no val_file is given, got {val_fraction}")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1, got {max_length} and {batch_size}")
        self.save_hyperparameters()
        self.train_file = train_file
        self.tokenizer_source = tokenizer
        self.val_file = val_file
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.reward_fraction = reward_fraction
        self.public_fraction = public_fraction
        self.tokenizer = None
        self.train_dataset: PreferenceDataset | None = None
        self.val_dataset: PreferenceDataset | None = None
        self.truncations: TruncationCount | None = None
        self._provenance: dict | None = None

    def split_provenance(self) -> dict:
        """Where the training pairs come from (``lit_dprl.data.splits.split_provenance``); after ``setup``."""
        return after_setup(self._provenance, "PreferenceDataModule.split_provenance()")

    def _file_rows(self) -> tuple[list[dict], list[dict]]:
        """``(train, validation)`` pairs of the local files; sets the provenance."""
        key = split_key(self.seed)
        train_rows = read_preference_file(self.train_file)
        name = file_dataset_name(self.train_file)
        units = [unit_id(row) for row in train_rows]
        if self.val_file is not None:
            self._provenance = split_provenance(name, "all", {"all": 1.0}, key, unit_kind(units), False)
            return train_rows, read_preference_file(self.val_file)
        fractions = {"train": 1.0 - self.val_fraction, "validation": self.val_fraction}
        names = assign_units(units, fractions, key, HOLDOUT_PURPOSE)
        self._provenance = split_provenance(
            name, "train", fractions, key, unit_kind(units), False, HOLDOUT_PURPOSE
        )
        val_rows = [row for row, split in zip(train_rows, names, strict=True) if split == "validation"]
        train_rows = [row for row, split in zip(train_rows, names, strict=True) if split == "train"]
        if not val_rows or not train_rows:
            raise PreferenceDataError(
                f"{self.train_file} has {len(units)} pair(s): the keyed split with val_fraction="
                f"{self.val_fraction} left {len(train_rows)} for training and {len(val_rows)} for validation; "
                "add pairs, change val_fraction or pass a val_file."
            )
        return train_rows, val_rows

    def setup(self, stage: str | None = None) -> None:
        """Load, check, split and encode the files (once)."""
        if self.train_dataset is not None:
            return
        self.tokenizer = model_tokenizer(self.tokenizer_source, type(self).__name__)
        if self.train_file == IMDB:
            fractions = {"reward_fraction": self.reward_fraction, "public_fraction": self.public_fraction}
            train_rows, val_rows = imdb_preference_pairs(self.seed, **fractions)
            self._provenance = imdb_provenance("reward", seed=self.seed, **fractions)
        else:
            train_rows, val_rows = self._file_rows()
        if len(train_rows) < self.batch_size:
            raise PreferenceDataError(
                f"the training split has {len(train_rows)} pairs, fewer than batch_size={self.batch_size}; "
                "lower batch_size or provide more pairs."
            )
        self.train_dataset, train_count = encode_pairs(self.tokenizer, train_rows, self.max_length)
        self.val_dataset, val_count = encode_pairs(self.tokenizer, val_rows, self.max_length)
        self.truncations = TruncationCount(*(a + b for a, b in zip(train_count, val_count, strict=True)))
        if self.truncations.truncated:
            rank_zero_warn(
                f"{self.truncations.truncated} of {self.truncations.sequences} sequences (prompt + response) "
                f"were longer than max_length={self.max_length} tokens: their prompts were truncated from the "
                f"left; in {self.truncations.response_truncated} of them the response alone was longer and was cut."
            )

    @property
    def dataset_size(self) -> int:
        """Number of training pairs (loads the data on first use)."""
        self.setup("fit")
        return len(self.train_dataset)

    def _collate(self):
        return functools.partial(collate_preference_batch, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return batch_loader(
            self.train_dataset, self._collate(), self.batch_size, self.num_workers, shuffle=True
        )

    def val_dataloader(self) -> DataLoader:
        return batch_loader(
            self.val_dataset, self._collate(), self.val_batch_size, self.num_workers, shuffle=False
        )

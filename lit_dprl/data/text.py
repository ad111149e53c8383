"""Text data for supervised fine-tuning (stage 1): tokenized once, left-padded batches with a loss mask.

One row is one privacy unit. A row is either a plain text (every token after the first is a target) or a prompt
plus a completion (TL;DR-style post + summary: only the completion tokens are targets).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import lightning as L
import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_dprl.data.files import load_public_or_local, require_columns, text_column
from lit_dprl.data.imdb import (
    PUBLIC_FRACTION,
    imdb_provenance,
    is_public_source,
    load_imdb_reviews,
    split_imdb,
)
from lit_dprl.data.padding import left_pad
from lit_dprl.data.plumbing import after_setup, batch_loader, check_sizes, model_tokenizer
from lit_dprl.data.splits import holdout, split_key
from lit_dprl.data.tldr import COMPLETION_COLUMN, PROMPT_COLUMN, tldr_sft_dataset

IMDB = "imdb"


def build_example(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_token_id: int, max_length: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of ``prompt + completion + [EOS]`` within ``max_length`` tokens.

    The completion keeps its first tokens and gets EOS only when it fits whole; with a non-empty prompt
    one prompt token is always kept, so the first completion token is a target too. The prompt keeps its
    last tokens (those next to the completion). ``loss_mask`` is 1 on completion tokens, 0 on the prompt
    and on the row's first token: nothing precedes that one (after left padding a pad token would, and
    the loss would then depend on the padding).
    """
    budget = max_length - 1 if prompt_ids else max_length
    target = [*completion_ids, eos_token_id]
    if len(target) > budget:
        target = list(completion_ids[:budget])
    prompt = list(prompt_ids[max(0, len(prompt_ids) - (max_length - len(target))) :])
    loss_mask = [0] * len(prompt) + [1] * len(target)
    loss_mask[0] = 0
    return prompt + target, loss_mask


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    completions: list[str],
    prompts: list[str] | None,
    max_length: int,
) -> Dataset:
    """Tokenize with one batched call per field; columns ``input_ids``, ``loss_mask`` (see ``build_example``)."""
    # One token past the limit is enough to tell whether a completion (plus EOS) fits.
    if prompts is None:
        completion_ids = tokenizer(completions, truncation=True, max_length=max_length + 1)["input_ids"]
        prompt_ids = [[] for _ in completions]
    else:
        completion_ids = tokenizer(
            completions, add_special_tokens=False, truncation=True, max_length=max_length + 1
        )["input_ids"]
        side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
        try:
            prompt_ids = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
        finally:
            tokenizer.truncation_side = side
    rows = [
        build_example(prompt, completion, tokenizer.eos_token_id, max_length)
        for prompt, completion in zip(prompt_ids, completion_ids, strict=True)
    ]
    return Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "loss_mask": [mask for _, mask in rows]})


def drop_blank_texts(rows: Dataset, column: str, where: str) -> Dataset:
    """``rows`` without those whose ``column`` is empty or only whitespace (a warning counts them): they hold
    nothing to learn. ``ValueError`` when every row is blank."""
    texts = text_column(rows, column, where)
    keep = [index for index, text in enumerate(texts) if text.strip()]
    if texts and not keep:
        raise ValueError(
            f"{where}: every {column!r} is empty, so there is nothing to learn (blank and whitespace-only texts "
            "count as empty); check text_field and the file"
        )
    if len(keep) == len(texts):
        return rows
    rank_zero_warn(
        f"{where}: dropped {len(texts) - len(keep)} of {len(texts)} rows whose {column!r} is empty or only "
        "whitespace (nothing to learn from them)"
    )
    return rows.select(keep)


def collate_left_padded(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad rows to the batch's longest: ``input_ids``, ``attention_mask``, ``loss_mask``, each ``[B, T]``."""
    input_ids, attention_mask = left_pad([example["input_ids"] for example in examples], pad_token_id)
    loss_mask, _ = left_pad([example["loss_mask"] for example in examples], pad_token_id=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class TextDataModule(L.LightningDataModule):
    """Plain texts or prompt/completion pairs for DP supervised fine-tuning.

    Args:
        tokenizer: Model source whose tokenizer to use ("tiny", "smollm2", a .gguf path or a local model
            directory): the model's. Unset, ``lit-dprl fit`` sets it to ``model.init_args.model``; in
            Python, pass it.
        source: "imdb" for the bundled IMDb reviews (training on the private SFT set D1 of
            ``lit_dprl.data.imdb.split_imdb``, validating on its held-out test split); bundled PUBLIC data
            for public pretraining (``val_fraction`` held out): "rotten_tomatoes" (the Rotten Tomatoes
            sentences), "imdb_public" (the public split of the IMDb reviews) or both joined by "+"; or a
            path to a local .jsonl/.json/.csv/.parquet file. Hub datasets are not downloaded.
        format: "plain": rows are read through ``text_field`` / ``prompt_field``. "tldr": a local file of
            Reddit TL;DR posts with reference summaries, in OpenAI's layout (``subreddit``, ``title``,
            ``post``, ``summary``) or CarperAI's (``prompt``, ``label``); prompt = the TL;DR query,
            completion = " " + summary (see ``lit_dprl.data.tldr``); the field arguments are then unused.
        text_field: Column with the text to learn; with ``prompt_field`` set, the completion.
        prompt_field: Column with a prompt (e.g. a TL;DR post) that conditions the text but carries no loss.
        max_length: Tokens per row (prompt + completion + EOS); longer rows are cut.
        batch_size: Rows per batch (the expected batch size under DP's Poisson sampling).
        max_train_examples: Keep only this many training rows (the first in keyed-hash order).
        max_val_examples: Keep only this many validation rows (the first in keyed-hash order).
        val_fraction: Share of a local file or public source held out for validation (by ``user_id`` when
            that column exists, else by row); ignored for "imdb".
        seed: The public split key ``split_key(seed)`` of the keyed-hash splits (``lit_dprl.data.splits``).
            Keep it the same in every stage so that the stages' private sets are provably disjoint.
        num_workers: DataLoader worker processes.
        reward_fraction: Share of the private IMDb reviews set aside as the reward model's set D2 (the
            rest is halved into D1 and D3); give every stage of a pipeline the same value.
        public_fraction: Share of the non-test IMDb reviews declared public (``split_imdb``); give every
            stage of a pipeline the same value.
        public_data: Declare the local file ``source`` public data (you vouch that publishing it harms no
            one), so that a pipeline stage training on it may be left out of the privacy report.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        source: str = IMDB,
        format: Literal["plain", "tldr"] = "plain",
        text_field: str = "text",
        prompt_field: str | None = None,
        max_length: int = 64,
        batch_size: int = 8,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        reward_fraction: float = 0.0,
        public_fraction: float = PUBLIC_FRACTION,
        public_data: bool = False,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a context token and a target), got {max_length}")
        check_sizes(
            batch_size, val_fraction, max_train_examples=max_train_examples, max_val_examples=max_val_examples
        )
        if format == "tldr" and (source == IMDB or is_public_source(source)):
            raise ValueError(
                f"format='tldr' reads a local TL;DR file; pass its path as source (not {source!r})"
            )
        if public_data and (source == IMDB or is_public_source(source)):
            raise ValueError(
                f"public_data declares a local file public; source={source!r} is bundled data whose "
                "status is fixed ('imdb' is private, 'rotten_tomatoes' and 'imdb_public' are public)"
            )
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._provenance: dict | None = None

    @property
    def dataset_size(self) -> int:
        """Number of training rows (privacy units), known after ``setup``."""
        return len(after_setup(self.train_set, "TextDataModule.dataset_size"))

    def split_provenance(self) -> dict:
        """Where the training rows come from (``lit_dprl.data.splits.split_provenance``); after ``setup``."""
        return after_setup(self._provenance, "TextDataModule.split_provenance()")

    def raw_splits(self) -> tuple[Dataset, Dataset]:
        """Untokenized ``(train, validation)`` rows before the example limits."""
        hp = self.hparams
        source = hp.source
        if source == IMDB:
            fractions = {"reward_fraction": hp.reward_fraction, "public_fraction": hp.public_fraction}
            splits = split_imdb(load_imdb_reviews(), seed=hp.seed, **fractions)
            self._provenance = imdb_provenance("sft", seed=hp.seed, **fractions)
            return splits["sft"], splits["test"]
        dataset, name, public = load_public_or_local(
            source,
            hp.seed,
            hp.public_fraction,
            hp.public_data,
            "Or use source='imdb' for the bundled IMDb reviews (or 'rotten_tomatoes' / 'imdb_public' for "
            "public text).",
            text_columns=[] if hp.format == "tldr" else [c for c in self.fields() if c],
        )
        if hp.format == "tldr":
            dataset = tldr_sft_dataset(dataset, source)
        parts, self._provenance = holdout(dataset, hp.val_fraction, split_key(hp.seed), name, public)
        return parts["train"], parts["validation"]

    def fields(self) -> tuple[str, str | None]:
        """``(completion column, prompt column or None)`` of the raw rows."""
        if self.hparams.format == "tldr":
            return COMPLETION_COLUMN, PROMPT_COLUMN
        return self.hparams.text_field, self.hparams.prompt_field

    def prepare_split(self, rows: Dataset, name: str, limit: int | None) -> Dataset:
        """Check columns, drop blank texts, keep the first ``limit`` rows, check the size, tokenize."""
        where = f"{self.hparams.source} ({name} split)"
        text_field, prompt_field = self.fields()
        require_columns(rows, [text_field] if prompt_field is None else [text_field, prompt_field], where)
        rows = drop_blank_texts(rows, text_field, where)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        if len(rows) < self.hparams.batch_size:
            problem = "is empty" if len(rows) == 0 else f"has {len(rows)} rows"
            raise ValueError(
                f"{where} {problem}, fewer than batch_size={self.hparams.batch_size}: lower batch_size, "
                "raise the example limit or val_fraction, or add data."
            )
        completions = text_column(rows, text_field, where)
        prompts = None if prompt_field is None else text_column(rows, prompt_field, where)
        return tokenize_examples(self.tokenizer, completions, prompts, self.hparams.max_length)

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenize once (later calls do nothing)."""
        if self.train_set is not None:
            return
        self.tokenizer = model_tokenizer(self.hparams.tokenizer, type(self).__name__)
        train_rows, val_rows = self.raw_splits()
        self.val_set = self.prepare_split(val_rows, "validation", self.hparams.max_val_examples)
        self.train_set = self.prepare_split(train_rows, "training", self.hparams.max_train_examples)

    def collate(self) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
        """The batch builder ``collate_left_padded`` bound to this tokenizer's pad id (picklable for workers)."""
        return functools.partial(collate_left_padded, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        """Shuffled fixed-size batches; the DP callback rebuilds it with Poisson sampling."""
        return batch_loader(
            self.train_set, self.collate(), self.hparams.batch_size, self.hparams.num_workers, shuffle=True
        )

    def val_dataloader(self) -> DataLoader:
        """Validation rows in a fixed order."""
        return batch_loader(
            self.val_set, self.collate(), self.hparams.batch_size, self.hparams.num_workers, shuffle=False
        )

"""TextDataModule: local files and bundled IMDb, tokenization, left-padded batches, input errors."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from lit_dprl.data.classification import LabelledTextDataModule
from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
from lit_dprl.data.preferences import PreferenceDataModule
from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.data.text import TextDataModule, build_example, collate_left_padded, tokenize_examples
from lit_dprl.models import build_tiny_tokenizer

EOS = 99


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def pairs(n):
    return [
        {"post": f"post number {i} about a film", "summary": f"summary {i}", "user_id": i % 20}
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("prompt", "completion", "max_length", "expected_ids", "expected_mask"),
    [
        ([], [1, 2, 3], 5, [1, 2, 3, EOS], [0, 1, 1, 1]),  # fits: EOS appended; first token is no target
        ([], [1, 2, 3, 4, 5], 5, [1, 2, 3, 4, 5], [0, 1, 1, 1, 1]),  # fills the window: no EOS
        ([7, 8], [1, 2], 5, [7, 8, 1, 2, EOS], [0, 0, 1, 1, 1]),
        ([6, 7, 8], [1, 2], 4, [8, 1, 2, EOS], [0, 1, 1, 1]),  # prompt keeps its last tokens
        ([7, 8], [1, 2, 3, 4, 5], 4, [8, 1, 2, 3], [0, 1, 1, 1]),  # one prompt token always kept
    ],
)
def test_build_example(prompt, completion, max_length, expected_ids, expected_mask):
    assert build_example(prompt, completion, EOS, max_length) == (expected_ids, expected_mask)


def test_collate_left_pads_and_masks():
    examples = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}]
    batch = collate_left_padded(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_tokenize_examples_masks_prompt_tokens():
    tokenizer = build_tiny_tokenizer()
    rows = tokenize_examples(tokenizer, ["ab"], ["xyz"], max_length=16)
    eos = tokenizer.eos_token_id
    assert rows[0]["input_ids"] == [*tokenizer("xyz")["input_ids"], *tokenizer("ab")["input_ids"], eos]
    assert rows[0]["loss_mask"] == [0, 0, 0, 1, 1, 1]
    assert tokenizer.truncation_side == "right"  # restored after the left-truncated prompt call


def test_local_jsonl_with_prompts(tmp_path):
    path = write_jsonl(tmp_path / "tldr.jsonl", pairs(40))
    dm = TextDataModule(
        tokenizer="tiny",
        source=path,
        text_field="summary",
        prompt_field="post",
        max_length=24,
        batch_size=4,
        val_fraction=0.25,
    )
    train, validation = dm.raw_splits()
    assert not set(train["user_id"]) & set(validation["user_id"])  # users are held out whole
    dm.setup("fit")
    assert dm.dataset_size == len(dm.train_set) == 30  # 5 of the 20 users (10 rows) held out
    assert dm.dataset_size + len(dm.val_set) == 40
    assert dm.split_provenance()["unit"].startswith("user") and not dm.split_provenance()["public"]
    loader = dm.train_dataloader()
    assert type(loader) is DataLoader and loader.batch_size == 4 and loader.collate_fn is not None
    batch = next(iter(loader))
    assert batch["input_ids"].shape[1] <= 24
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()
    first_row_tokens = batch["attention_mask"][0].sum()
    assert 0 < batch["loss_mask"][0].sum() < first_row_tokens  # prompt tokens carry no loss
    assert (batch["input_ids"][:, -1] == dm.tokenizer.eos_token_id).all()


def test_local_csv_and_parquet_load_the_same_rows(tmp_path):
    rows = Dataset.from_list([{"text": f"a review {i}"} for i in range(30)])
    rows.to_csv(tmp_path / "reviews.csv", index=False)
    rows.to_parquet(tmp_path / "reviews.parquet")
    texts = []
    for name in ("reviews.csv", "reviews.parquet"):
        dm = TextDataModule(
            tokenizer="tiny", source=str(tmp_path / name), batch_size=2, val_fraction=0.2, seed=5
        )
        dm.setup("fit")
        texts.append(dm.train_set["input_ids"])
    assert texts[0] == texts[1] and len(texts[0]) == 24


def test_imdb_source_uses_the_sft_and_test_splits():
    dm = TextDataModule(
        tokenizer="tiny",
        source="imdb",
        max_length=16,
        batch_size=4,
        max_train_examples=12,
        max_val_examples=8,
    )
    dm.setup("fit")
    assert (dm.dataset_size, len(dm.val_set)) == (12, 8)
    splits = split_imdb(load_imdb_reviews(), seed=0)
    tokenizer = dm.tokenizer
    expected = tokenizer(splits["sft"]["text"][:12], truncation=True, max_length=16)["input_ids"]
    assert dm.train_set["input_ids"] == expected
    expected_val = tokenizer(splits["test"]["text"][:8], truncation=True, max_length=16)["input_ids"]
    assert dm.val_set["input_ids"] == expected_val
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    assert (
        torch.equal(batch["loss_mask"][:, 1:], batch["attention_mask"][:, 1:])
        and not batch["loss_mask"][:, 0].any()
    )


@pytest.mark.parametrize(
    "module",
    [
        TextDataModule,
        LabelledTextDataModule,
        PromptDataModule,
        functools.partial(PreferenceDataModule, "imdb"),
    ],
)
def test_a_data_module_without_tokenizer_asks_for_one_at_setup(module):
    """Only ``lit-dprl fit`` fills in the model's tokenizer; in Python there is no silent default."""
    with pytest.raises(ValueError, match=r"has no tokenizer: pass tokenizer=<the model's source>"):
        module().setup("fit")


def test_dataset_size_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        _ = TextDataModule(tokenizer="tiny").dataset_size


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_field": "body"}, r"has no column 'body'; its columns are \['post', 'summary', 'user_id'\]"),
        ({"text_field": "summary", "prompt_field": "title"}, "no column 'title'"),
        (
            {"text_field": "user_id", "batch_size": 2},
            r"rows\.jsonl, line 1: column 'user_id' holds \d+, not text",
        ),
        (
            {"text_field": "summary", "val_fraction": 0.5, "max_train_examples": 3, "batch_size": 4},
            r"\(training split\) has 3 rows, fewer than batch_size=4",
        ),
        (
            {"text_field": "summary", "max_val_examples": 2, "batch_size": 3},
            r"\(validation split\) has 2 rows",
        ),
        ({"text_field": "summary", "val_fraction": 0.01}, r"\(validation split\) is empty"),
    ],
)
def test_bad_columns_and_sizes(tmp_path, kwargs, message):
    dm = TextDataModule(tokenizer="tiny", source=write_jsonl(tmp_path / "rows.jsonl", pairs(40)), **kwargs)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("empty.jsonl", b"", ValueError, "is empty"),
        ("header.csv", b"text\n", ValueError, "holds no rows"),
        ("list.json", b"[]", ValueError, "holds no rows"),
        ("latin1.jsonl", b'{"text": "caf\xe9 au lait"}\n', ValueError, r"not valid UTF-8 \(byte 13"),
        ("latin1.csv", b"text\ncaf\xe9\n", ValueError, "not valid UTF-8"),
        ("broken.jsonl", b'{"text": \n', ValueError, "could not read rows"),
        ("rows.txt", b"hello\n", ValueError, "unsupported file type '.txt'"),
    ],
)
def test_bad_files(tmp_path, name, content, error, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message):
        TextDataModule(tokenizer="tiny", source=str(tmp_path / name), batch_size=1).setup("fit")


def test_hub_names_and_directories_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Hub datasets are not downloaded.*source='imdb'"):
        TextDataModule(tokenizer="tiny", source="stanfordnlp/imdb").setup("fit")
    with pytest.raises(ValueError, match="is a directory"):
        TextDataModule(tokenizer="tiny", source=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 1}, "max_length must be >= 2"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_train_examples": 0}, "max_train_examples must be >= 1"),
        ({"val_fraction": 1.0}, "val_fraction must be in"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(tokenizer="tiny", **kwargs)


def test_rotten_tomatoes_source_is_the_public_sentences_with_a_held_out_share():
    data = TextDataModule(tokenizer="tiny", source="rotten_tomatoes", max_length=32, val_fraction=0.1)
    train, validation = data.raw_splits()
    assert len(train) + len(validation) == 8530
    assert 0.08 < len(validation) / 8530 < 0.12
    assert not set(train["text"]) & set(validation["text"])
    imdb = set(load_imdb_reviews()["text"])
    assert not imdb & set(train["text"])  # public pretraining never sees a (private) IMDb review


def test_only_public_sources_and_declared_files_report_public_data(tmp_path):
    public = TextDataModule(tokenizer="tiny", source="imdb_public", val_fraction=0.1)
    train, validation = public.raw_splits()
    assert public.split_provenance()["public"] and len(train) + len(validation) > 6_000
    assert not set(train["text"]) & set(split_imdb(load_imdb_reviews(), seed=0)["test"]["text"])
    private = TextDataModule(tokenizer="tiny", source="imdb")
    private.raw_splits()
    assert not private.split_provenance()["public"] and private.split_provenance()["split"] == "sft"
    path = write_jsonl(tmp_path / "rows.jsonl", pairs(40))
    for declared in (False, True):
        data = TextDataModule(tokenizer="tiny", source=path, text_field="summary", public_data=declared)
        data.raw_splits()
        assert data.split_provenance()["public"] is declared
        assert data.split_provenance()["dataset"].startswith(f"file {tmp_path / 'rows.jsonl'} (sha256 ")
    with pytest.raises(ValueError, match="public_data declares a local file public"):
        TextDataModule(tokenizer="tiny", source="imdb", public_data=True)


def test_a_malformed_jsonl_line_is_reported_by_its_file_line(tmp_path):
    from lit_dprl.data.files import load_local_dataset

    path = tmp_path / "reviews.jsonl"
    rows = [json.dumps({"text": f"review {i}"}) for i in range(30)]
    rows[17] = '{"text": "cut short'
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"reviews.jsonl as json: line 18, column \d+: "):
        load_local_dataset(path)
    rows[17] = "[1, 2]"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="line 18: a JSON list, not an object"):
        load_local_dataset(path)


def test_a_row_without_text_is_reported_by_its_file_line_before_any_split(tmp_path):
    from lit_dprl.data.files import load_local_dataset

    path = tmp_path / "reviews.jsonl"
    rows = [json.dumps({"text": f"review {i}"}) for i in range(30)]
    rows[23] = json.dumps({"text": None})
    path.write_text("\n\n".join(rows) + "\n")  # blank lines between rows: the line number still counts them
    with pytest.raises(ValueError, match=r"reviews\.jsonl, line 47: column 'text' holds None, not text"):
        load_local_dataset(path, ["text"])
    assert len(load_local_dataset(path)) == 30  # without text columns to check, the row loads


def test_blank_texts_are_dropped_with_a_warning_and_a_file_of_only_blank_texts_is_refused(tmp_path):
    rows = [{"text": ["", " \n", "\t"][i % 3] if i % 2 else f"review {i}"} for i in range(60)]
    data = TextDataModule(
        tokenizer="tiny", source=write_jsonl(tmp_path / "rows.jsonl", rows), batch_size=2, val_fraction=0.25
    )
    with pytest.warns(UserWarning, match=r"dropped \d+ of \d+ rows whose 'text' is empty or only whitespace"):
        data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 30
    assert all(sum(row["loss_mask"]) >= 2 for row in data.train_set)  # a text token and EOS to learn
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": " " * (i % 3)} for i in range(40)])
    with pytest.raises(ValueError, match=r"blank\.jsonl \(validation split\): every 'text' is empty"):
        TextDataModule(tokenizer="tiny", source=blank, batch_size=2, val_fraction=0.25).setup("fit")

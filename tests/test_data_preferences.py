import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
from lit_dprl.data.labelled_pairs import imdb_preference_pairs, pairs_from_labelled_texts
from lit_dprl.data.preference_files import (
    PreferenceDataError,
    read_preference_file,
    summarize_from_feedback_to_pair,
)
from lit_dprl.data.preferences import PreferenceDataModule, truncate_prompt_response
from lit_dprl.data.splits import UNIT_COLUMN, split_key

FIXTURES = Path(__file__).parent / "fixtures"
COMPARISONS = FIXTURES / "summarize_from_feedback_comparisons.jsonl"
IMDB_PAIRS = Path(__file__).parents[1] / "lit_dprl" / "data" / "fixtures" / "imdb_preferences.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pair(i: int) -> dict:
    return {"prompt": f"Question {i}:", "chosen": f" a helpful answer {i}", "rejected": f" no {i}"}


def test_summarize_from_feedback_parser_on_fixture_rows():
    rows = [json.loads(line) for line in COMPARISONS.read_text().splitlines()]
    first = summarize_from_feedback_to_pair(rows[0])
    assert first["prompt"] == (
        "SUBREDDIT: r/relationship_advice\n\n"
        "TITLE: Roommate works from home and our electric bill doubled, how do I ask her to pay more?\n\n"
        f"POST: {rows[0]['info']['post']}\n\nTL;DR:"
    )
    assert first["chosen"] == " " + rows[0]["summaries"][0]["text"].strip()
    assert first["rejected"] == " I have a roommate and we pay rent."
    assert first["user_id"] == "worker_a"
    second = summarize_from_feedback_to_pair(rows[1])  # choice 1, and a summary without a leading space
    assert second["chosen"].startswith(" Knee pain on longer")
    assert second["rejected"] == " New runner, knees hurt."


def test_summarize_from_feedback_parser_rejects_bad_choice():
    row = json.loads(COMPARISONS.read_text().splitlines()[0])
    with pytest.raises(PreferenceDataError, match="'choice' must be 0 or 1"):
        summarize_from_feedback_to_pair({**row, "choice": 2})


def test_summarize_from_feedback_file_loads_through_datasets():
    rows = read_preference_file(COMPARISONS)
    assert [row["user_id"] for row in rows] == ["worker_a", "worker_b", "worker_a"]
    assert all(row["prompt"].endswith("\n\nTL;DR:") for row in rows)
    assert (
        rows[2]["chosen"] == " Got grandma's sewing machine, total beginner, looking for easy first projects."
    )


def test_missing_field_names_present_fields_and_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "y", "answer": "z"}])
    with pytest.raises(PreferenceDataError, match=r"lacks the field\(s\) \['rejected'\]") as err:
        read_preference_file(path)
    assert "fields present: ['answer', 'chosen', 'prompt']" in str(err.value)
    assert str(path) in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_preference_file(path)


def test_identical_chosen_and_rejected_counts_and_lines(tmp_path):
    rows = [pair(i) for i in range(5)]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = rows[3]["chosen"]
    with pytest.raises(
        PreferenceDataError, match=r"2 row\(s\) have chosen identical to rejected.*line 2, line 4"
    ):
        read_preference_file(write_jsonl(tmp_path / "p.jsonl", rows))


def test_csv_line_numbers_count_the_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\nq,same,same\n")
    with pytest.raises(PreferenceDataError, match=r"1 row\(s\) have chosen identical to rejected.*line 3"):
        read_preference_file(path)


def test_empty_response_is_refused(tmp_path):
    rows = [pair(0), {**pair(1), "chosen": ""}]
    with pytest.raises(
        PreferenceDataError, match=r"1 row\(s\) have an empty chosen or rejected response: line 2"
    ):
        read_preference_file(write_jsonl(tmp_path / "p.jsonl", rows))


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        (json.dumps(pair(0)) + "\n").encode()
        + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"latin1.jsonl is not valid UTF-8 \(byte \d+"):
        read_preference_file(path)


def test_hub_name_is_not_downloaded():
    with pytest.raises(FileNotFoundError, match="Hub datasets are not downloaded"):
        read_preference_file("openai/summarize_from_feedback")


def test_split_smaller_than_batch_size(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(i) for i in range(10)])
    datamodule = PreferenceDataModule(str(path), tokenizer="tiny", val_fraction=0.2, batch_size=9)
    with pytest.raises(PreferenceDataError, match="training split has 8 pairs, fewer than batch_size=9"):
        datamodule.setup("fit")


def test_truncation_keeps_the_response_and_the_end_of_the_prompt():
    assert truncate_prompt_response([1, 2, 3, 4], [5, 6], max_length=4) == ([3, 4, 5, 6], True, False)
    assert truncate_prompt_response([1, 2], [5, 6], max_length=4) == ([1, 2, 5, 6], False, False)
    assert truncate_prompt_response([1, 2], [5, 6, 7, 8], max_length=4) == ([5, 6, 7, 8], True, False)
    assert truncate_prompt_response([1, 2], [5, 6, 7, 8, 9], max_length=4) == ([5, 6, 7, 8], True, True)


def test_truncations_are_counted_and_reported_once(tmp_path):
    rows = [{"prompt": "p" * 30, "chosen": " yes", "rejected": f" n{i}"} for i in range(8)]
    rows += [{"prompt": "short", "chosen": " " + "y" * 40, "rejected": f" n{i}"} for i in range(8, 10)]
    datamodule = PreferenceDataModule(  # distinct pairs (a duplicate is the same unit); 2 of 10 held out
        str(write_jsonl(tmp_path / "p.jsonl", rows)),
        tokenizer="tiny",
        max_length=20,
        batch_size=2,
        val_fraction=0.2,
    )
    with pytest.warns(UserWarning, match=r"18 of 20 sequences .* in 2 of them the response alone") as record:
        datamodule.setup("fit")
    assert len([w for w in record if "max_length" in str(w.message)]) == 1
    assert datamodule.truncations == (20, 18, 2)
    for chosen in datamodule.train_dataset.chosen_ids + datamodule.val_dataset.chosen_ids:
        assert len(chosen) == 20
        text = datamodule.tokenizer.decode(chosen)
        assert text.endswith("p yes") or text == " " + "y" * 19


def test_datamodule_batches_are_left_padded_pairs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(i) for i in range(20)])
    datamodule = PreferenceDataModule(str(path), tokenizer="tiny", val_fraction=0.25, batch_size=4, seed=3)
    assert datamodule.dataset_size == 13  # the keyed hash holds out 7 of the 20 pairs
    assert len(datamodule.val_dataset) == 7
    loader = datamodule.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.batch_size == 4 and loader.collate_fn is not None
    batch = next(iter(loader))
    assert set(batch) == {
        "chosen_input_ids",
        "chosen_attention_mask",
        "rejected_input_ids",
        "rejected_attention_mask",
    }
    pad = datamodule.tokenizer.pad_token_id
    for side in ("chosen", "rejected"):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        assert ids.shape[0] == 4 and torch.all(mask[:, -1] == 1)
        assert torch.equal(ids == pad, mask == 0)
    decoded = datamodule.tokenizer.decode(batch["chosen_input_ids"][0], skip_special_tokens=True)
    assert decoded.startswith("Question ") and " a helpful answer " in decoded


def test_pairs_from_labelled_texts():
    positives = [f"great film number {i} with a lovely wonderful ending" for i in range(4)]
    negatives = [f"bad film number {i} with a dull awful ending" for i in range(5)]
    texts, labels = [*positives, *negatives, "too short"], [1] * 4 + [0] * 5 + [1]
    units = [f"unit {i}" for i in range(len(texts))]
    public = [
        f"public {word} review {i} with a {word} middle part" for i in range(3) for word in ("good", "poor")
    ]
    public_labels = [1, 0] * 3

    def build(key=b"k"):
        return pairs_from_labelled_texts(
            texts, labels, units, public, public_labels, 3, key, response_words=4
        )

    pairs = build()
    assert len(pairs) == 9  # one pair per text with a continuation
    assert pairs == build()
    for text, row in zip(texts, pairs, strict=False):
        good = text.startswith("great")
        assert row["unit_id"] == units[texts.index(text)]
        own = " " + " ".join(text.split()[3:7])
        assert row["chosen" if good else "rejected"] == own
        other = row["rejected" if good else "chosen"]
        assert other.split()[1:] == ["with", "a", "poor" if good else "good"]
        assert row["prompt"].split()[0] in {"great", "bad", "public"} and len(row["prompt"].split()) == 3
    openings = {row["prompt"].split()[0] for key in (b"a", b"b", b"c") for row in build(key)}
    assert openings == {"great", "bad", "public"}  # either side's opening may be the prompt


def test_removing_an_interior_review_changes_no_other_imdb_pair():
    """D2 pairs: one private review = one pair against a public partner; removing an interior review of
    D2 removes its own pair and leaves every other pair (prompt, chosen, rejected) unchanged."""
    splits = split_imdb(load_imdb_reviews(), seed=0, reward_fraction=0.2)
    d2, public = splits["reward"], splits["public"]

    def pairs(part):
        rows = pairs_from_labelled_texts(
            part["text"],
            part["label"],
            part[UNIT_COLUMN],
            public["text"],
            public["label"],
            8,
            split_key(0),
            24,
        )
        return {row["unit_id"]: row for row in rows}

    full = pairs(d2)
    removed = len(d2) // 2
    less = pairs(d2.select([i for i in range(len(d2)) if i != removed]))
    assert set(full) - set(less) == {d2[removed][UNIT_COLUMN]}
    assert all(less[unit] == full[unit] for unit in less)
    train, _ = imdb_preference_pairs(seed=0, reward_fraction=0.2)
    assert {row["unit_id"]: row for row in train} == full


def test_removing_an_interior_pair_keeps_every_other_pairs_split(tmp_path):
    rows = [pair(i) for i in range(60)]
    full = PreferenceDataModule(
        str(write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer="tiny", val_fraction=0.3, batch_size=2
    )
    less = PreferenceDataModule(
        str(write_jsonl(tmp_path / "b.jsonl", rows[:30] + rows[31:])),
        tokenizer="tiny",
        val_fraction=0.3,
        batch_size=2,
    )
    full_train, full_val = full._file_rows()
    less_train, less_val = less._file_rows()
    gone = {rows[30]["prompt"]}
    assert {r["prompt"] for r in full_train} - gone == {r["prompt"] for r in less_train}
    assert {r["prompt"] for r in full_val} - gone == {r["prompt"] for r in less_val}
    assert full.split_provenance()["split"] == "train" and not full.split_provenance()["public"]


def test_bundled_imdb_pairs_load():
    rows = read_preference_file(IMDB_PAIRS)
    assert len(rows) == 500 and IMDB_PAIRS.stat().st_size < 200_000
    assert all(len(row["prompt"].split()) == 8 and len(row["chosen"].split()) <= 24 for row in rows)

"""TL;DR SFT layouts (OpenAI summarize_from_feedback and CarperAI) and TextDataModule(format="tldr")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from lit_dprl.data.text import TextDataModule
from lit_dprl.data.tldr import carper_tldr_example, openai_tldr_example, tldr_sft_dataset

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI = FIXTURES / "tldr_openai_sft.jsonl"
CARPER = FIXTURES / "tldr_carper_sft.jsonl"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_layout_gives_the_reward_models_query_and_a_spaced_summary():
    row = rows(OPENAI)[0]
    example = openai_tldr_example(row)
    assert example["prompt"] == (
        "SUBREDDIT: r/relationships\n\nTITLE: My (24F) boyfriend (25M) forgets every plan we make\n\n"
        f"POST: {row['post']}\n\nTL;DR:"
    )
    assert (
        example["completion"]
        == " boyfriend keeps forgetting our plans, I feel like I'm not a priority. How do I bring it up?"
    )
    second = openai_tldr_example(rows(OPENAI)[1])  # summary without a leading space gets exactly one
    assert (
        second["completion"] == " New job, 6% car loan, $5k savings, 4% 401k match: pay the loan or invest?"
    )


def test_carper_layout_keeps_the_prompt_and_strips_the_label():
    first, second = rows(CARPER)
    assert carper_tldr_example(first) == {
        "prompt": first["prompt"],
        "completion": " boyfriend keeps forgetting our plans, I feel like I'm not a priority.",
    }
    assert (
        carper_tldr_example(second)["completion"] == " Knees hurt on long and downhill runs. Rest or stretch?"
    )


def test_layout_is_recognised_and_user_id_kept():
    openai = Dataset.from_list([{**row, "user_id": f"u{i}"} for i, row in enumerate(rows(OPENAI))])
    converted = tldr_sft_dataset(openai, "openai rows")
    assert converted.column_names == ["prompt", "completion", "user_id"]
    assert converted["user_id"] == ["u0", "u1", "u2"]
    assert tldr_sft_dataset(Dataset.from_list(rows(CARPER)), "carper rows").column_names == [
        "prompt",
        "completion",
    ]


def test_unknown_layout_names_both_layouts():
    with pytest.raises(ValueError, match=r"no TL;DR SFT layout.*'summary'.*'label'"):
        tldr_sft_dataset(Dataset.from_list([{"post": "p", "tldr": "s"}]), "x.jsonl")


@pytest.mark.parametrize(
    ("fixture", "field", "value", "message"),
    [
        (OPENAI, "summary", "  ", "summary must be non-empty"),
        (OPENAI, "post", None, "post must be non-empty"),
        (CARPER, "label", None, "summary must be non-empty"),
        (CARPER, "prompt", "", "prompt must be non-empty"),
    ],
)
def test_bad_rows_are_named(fixture, field, value, message):
    data = rows(fixture)
    data[1][field] = value
    with pytest.raises(ValueError, match=rf"bad.jsonl, row 1: the {message}"):
        tldr_sft_dataset(Dataset.from_list(data), "bad.jsonl")


@pytest.mark.parametrize("fixture", [OPENAI, CARPER])
def test_text_data_module_reads_tldr_files_and_learns_only_the_summary(fixture):
    dm = TextDataModule(  # seed 7: a split key that leaves rows in both parts of these 2- and 3-row files
        tokenizer="tiny",
        source=str(fixture),
        format="tldr",
        max_length=512,
        batch_size=1,
        val_fraction=0.4,
        seed=7,
    )
    dm.setup("fit")
    expected = {
        example["completion"]
        for example in map(openai_tldr_example if fixture == OPENAI else carper_tldr_example, rows(fixture))
    }
    eos = dm.tokenizer.eos_token
    for example in [*dm.train_set, *dm.val_set]:
        targets = [
            token
            for token, in_loss in zip(example["input_ids"], example["loss_mask"], strict=True)
            if in_loss
        ]
        assert dm.tokenizer.decode(targets).removesuffix(eos) in expected
    assert len(dm.train_set) + len(dm.val_set) == len(rows(fixture))


def test_tldr_format_needs_a_local_file():
    with pytest.raises(ValueError, match="format='tldr' reads a local TL;DR file"):
        TextDataModule(tokenizer="tiny", source="imdb", format="tldr")

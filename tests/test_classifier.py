"""The public sentiment classifier: labelled-text data, training, export to SequenceClassifierReward, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lit_dprl.commands.fit import main
from lit_dprl.data.classification import LabelledTextDataModule, collate_labelled, tokenize_labelled
from lit_dprl.models import build_tiny_tokenizer
from lit_dprl.rewards import SequenceClassifierReward
from lit_dprl.stages.classifier import ClassifierModule

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """Label 1 iff the text ends in "great" (else "awful"), after a random filler of common words."""
    rng = random.Random(seed)
    words = ["the", "film", "plot", "was", "really", "quite", "a", "cast", "and"]
    rows = []
    for i in range(n):
        label = i % 2
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        rows.append({"text": f"{filler} {'great' if label else 'awful'}", "label": label})
    return rows


def trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


@pytest.mark.parametrize("source", ["imdb", "imdb_test"])
def test_private_imdb_reviews_are_refused_as_training_data(source):
    with pytest.raises(ValueError, match="private IMDb data"):
        LabelledTextDataModule(tokenizer="tiny", source=source)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "a", "score": 1}] * 8, r"has no column 'label'"),
        (
            [{"text": "a", "label": "positive"}] * 8,
            r"holds 'positive' at row 0; labels must be class indices",
        ),
        ([{"text": "a", "label": -1}] * 8, r"holds -1 at row 0"),
        ([{"text": "a", "label": 1}] * 4 + [{"text": "  ", "label": 0}] * 4, r"empty text\(s\)"),
        ([{"text": "a", "label": 1}] * 3, r"fewer than batch_size=2"),
    ],
)
def test_bad_local_files_get_clear_errors(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        LabelledTextDataModule(tokenizer="tiny", source=path, batch_size=2, val_fraction=0.5).setup("fit")


def test_missing_file_points_at_the_bundled_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="source='rotten_tomatoes'"):
        LabelledTextDataModule(tokenizer="tiny", source=str(tmp_path / "none.jsonl")).setup("fit")


def test_rotten_tomatoes_batches_are_left_padded():
    dm = LabelledTextDataModule(
        tokenizer="tiny", max_length=16, batch_size=8, max_train_examples=16, max_val_examples=8
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16
    assert batch["attention_mask"][:, -1].all()  # left padding: every row ends at the last position
    assert set(batch["labels"].tolist()) <= {0, 1}


def test_long_texts_keep_their_last_tokens():
    tokenizer = build_tiny_tokenizer()
    rows = tokenize_labelled(tokenizer, ["x" * 30 + "END"], [1], max_length=16)
    assert tokenizer.decode(rows[0]["input_ids"]) == "x" * 13 + "END"
    assert tokenizer.truncation_side == "right"  # restored


def test_labels_beyond_num_labels_are_refused(tmp_path):
    rows = [{"text": f"text {i}", "label": i % 3} for i in range(12)]
    dm = LabelledTextDataModule(
        tokenizer="tiny", source=write_jsonl(tmp_path / "r.jsonl", rows), batch_size=2, val_fraction=0.5
    )
    with pytest.raises(ValueError, match="label 2 but the classifier has num_labels=2"):
        trainer(1).fit(ClassifierModule(), dm)


def test_padded_rows_score_as_they_do_alone():
    module = ClassifierModule().eval()
    dm = LabelledTextDataModule(
        tokenizer="tiny", max_length=32, batch_size=4, max_train_examples=4, max_val_examples=4
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))
    with torch.no_grad():
        together = module(batch["input_ids"], batch["attention_mask"])
        for row in range(4):
            keep = batch["attention_mask"][row].bool()
            alone = module(batch["input_ids"][row, keep][None], batch["attention_mask"][row, keep][None])
            torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained on a separable toy labelling, with its data module."""
    path = write_jsonl(tmp_path_factory.mktemp("toy") / "toy.jsonl", toy_rows(160))
    dm = LabelledTextDataModule(tokenizer="tiny", source=path, max_length=32, batch_size=16, val_fraction=0.2)
    module = ClassifierModule(learning_rate=2e-2)
    fit = trainer(40)
    fit.fit(module, dm)
    return module, dm, fit


def test_classifier_learns_a_separable_labelling(trained):
    _, _, fit = trained
    metrics = fit.callback_metrics
    assert metrics["val/accuracy"] == 1.0
    assert metrics["val/loss"] < 0.2


def test_export_loads_as_a_plain_classifier_and_as_the_reward(trained, tmp_path):
    module, dm, _ = trained
    module.export(tmp_path / "cls")
    texts = [row["text"] for row in toy_rows(6, seed=1)]
    batch = collate_labelled(
        [{"input_ids": dm.tokenizer(t)["input_ids"], "label": 0} for t in texts], dm.tokenizer.pad_token_id
    )
    with torch.no_grad():
        expected = torch.softmax(module.eval()(batch["input_ids"], batch["attention_mask"]), -1)[:, 1]
    reward = SequenceClassifierReward(str(tmp_path / "cls"), label="positive", output="probability")
    scores = reward([""] * len(texts), texts)
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=1e-5)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert plain.config.id2label == {0: "negative", 1: "positive"}


def test_tiny_config_runs_through_the_cli(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/tiny/classifier.yaml"),
            "--trainer.max_steps=3",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.export_dir={tmp_path / 'model'}",
            "--data.init_args.max_train_examples=96",
            "--data.init_args.imdb_eval_examples=32",
        ]
    )
    assert (tmp_path / "model" / "model.safetensors").is_file()
    metrics = (tmp_path / "classifier" / "version_0" / "metrics.csv").read_text()
    assert "val/accuracy" in metrics and "val/imdb_accuracy" in metrics

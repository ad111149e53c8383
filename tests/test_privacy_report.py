"""privacy.json describes the model next to it: atomic exports, ε = ∞ without DPCallback, what a report holds."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_dprl.data.text import collate_left_padded
from lit_dprl.privacy import DPCallback
from lit_dprl.privacy.report import (
    EXPORT_MARKER,
    MODEL_CARD_NAME,
    REPORT_NAME,
    is_export,
    model_card,
    non_private_report,
    write_export,
)
from lit_dprl.stages.sft import SFTModule
from tests.toy_modules import ToyClassifier

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")


def fit(module: pl.LightningModule, tmp_path, callbacks, data=None, max_steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    return trainer


class TinyText(pl.LightningDataModule):
    def __init__(self, tokenizer):
        super().__init__()
        texts = ["a short one", "a much longer review of a film", "mid sized text here", "x y z"] * 8
        self.rows = [{"input_ids": tokenizer(t)["input_ids"], "loss_mask": [1] * len(tokenizer(t)["input_ids"])} for t in texts]  # fmt: skip
        self.pad = tokenizer.pad_token_id

    def train_dataloader(self):
        return DataLoader(
            self.rows, batch_size=8, shuffle=True, collate_fn=lambda b: collate_left_padded(b, self.pad)
        )


def read_report(directory) -> dict:
    return json.loads((directory / REPORT_NAME).read_text())


def test_non_private_export_over_a_dp_export_reports_infinite_epsilon(tmp_path):
    export = tmp_path / "model"
    torch.manual_seed(0)
    private = SFTModule(model="tiny", learning_rate=1e-2, export_dir=str(export))
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    fit(private, tmp_path / "dp", [cb], TinyText(private.tokenizer))
    dp_report = read_report(export)
    assert dp_report["differentially_private"] is True and math.isfinite(dp_report["epsilon"])
    assert dp_report == read_report(tmp_path / "dp")  # the export holds the callback's report
    weights = (export / "model.safetensors").read_bytes()

    public = SFTModule(model="tiny", learning_rate=1e-2, export_dir=str(export))
    fit(public, tmp_path / "plain", [], TinyText(public.tokenizer))
    report = read_report(export)
    assert report["epsilon"] == math.inf and report["differentially_private"] is False
    assert "Infinity" in (export / REPORT_NAME).read_text()
    assert (export / "model.safetensors").read_bytes() != weights  # the new model, with its own report
    assert is_export(export) and not list(tmp_path.glob(".model.*"))  # no staging left behind


def test_a_failed_export_leaves_the_old_export_intact(tmp_path):
    export = tmp_path / "model"
    write_export(export, lambda d: (d / "weights.bin").write_bytes(b"old"), {"epsilon": 2.0})
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    def crash_half_way(directory):
        (directory / "weights.bin").write_bytes(b"new, half written")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_export(export, crash_half_way, non_private_report())
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert [p for p in tmp_path.iterdir() if p != export] == []  # no half export anywhere
    assert read_report(export)["epsilon"] == 2.0


def test_a_stage_whose_save_fails_keeps_the_old_export(tmp_path, monkeypatch):
    export = tmp_path / "model"
    module = SFTModule(model="tiny", learning_rate=1e-2, export_dir=str(export))
    fit(module, tmp_path / "first", [], TinyText(module.tokenizer))
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    def fail_after_weights(self, directory):
        self.merged_model().save_pretrained(directory)
        raise RuntimeError("killed while saving the tokenizer")

    monkeypatch.setattr(SFTModule, "export", fail_after_weights)
    second = SFTModule(model="tiny", learning_rate=1e-1, export_dir=str(export))
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    with pytest.raises(RuntimeError, match="killed"):
        fit(second, tmp_path / "second", [cb], TinyText(second.tokenizer))
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before  # old weights with their old report
    assert read_report(export)["epsilon"] == math.inf
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]


def test_a_run_that_diverged_exports_nothing(tmp_path):
    export = tmp_path / "model"
    module = SFTModule(model="tiny", learning_rate=1e-2, export_dir=str(export))
    fit(module, tmp_path / "first", [], TinyText(module.tokenizer))
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    diverged = SFTModule(model="tiny", learning_rate=float("inf"), export_dir=str(export))
    with pytest.raises(FloatingPointError, match=r"non-finite weights.*nothing was exported"):
        fit(diverged, tmp_path / "second", [], TinyText(diverged.tokenizer))
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before  # the earlier export is untouched


def test_write_export_orders_weights_report_marker_and_refuses_foreign_directories(tmp_path):
    written = []

    def save(directory):
        written.append(sorted(p.name for p in directory.iterdir()))
        (directory / "weights.bin").write_bytes(b"w")

    target = write_export(tmp_path / "m", save, non_private_report())
    assert written == [[]]  # the model is written first, into an empty staging directory
    assert {p.name for p in target.iterdir()} == {"weights.bin", REPORT_NAME, MODEL_CARD_NAME, EXPORT_MARKER}
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        write_export(foreign, save, non_private_report())
    assert (foreign / "notes.txt").read_text() == "mine"


def test_the_callback_writes_its_report_only_into_the_log_dir(tmp_path):
    class WithExportDir(ToyClassifier):
        export_dir = str(tmp_path / "export")

    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    fit(WithExportDir(), tmp_path, [cb])
    assert (tmp_path / REPORT_NAME).is_file()
    assert not (tmp_path / "export").exists()  # exports (with their report) are the stage's job


def test_a_stale_report_in_the_log_dir_is_removed_when_a_run_starts(tmp_path):
    (tmp_path / REPORT_NAME).write_text(json.dumps({"epsilon": 8.0}))

    class Crash(pl.Callback):
        def on_train_batch_start(self, *args):
            raise RuntimeError("killed")

    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    with pytest.raises(RuntimeError, match="killed"):
        fit(ToyClassifier(), tmp_path, [Crash(), cb])
    assert read_report(tmp_path)["steps"] == 0  # the interrupted run's own report, not the stale one


def test_report_names_the_unit_the_batch_reuse_and_the_stage(tmp_path):
    class Described(ToyClassifier):
        def privacy_metadata(self):
            return {"inputs": {"policy": {"epsilon": 1.0}}, "ppo_epochs": 1}

    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    fit(Described(), tmp_path, [cb])
    report = read_report(tmp_path)
    assert report["stage"] == {"inputs": {"policy": {"epsilon": 1.0}}, "ppo_epochs": 1}
    assert report["epochs_per_batch"] == 1 and report["minibatches_per_batch"] == 1
    assert report["privacy_unit"].startswith("one training example")
    assert report["accounting_history"] == [
        {"batch_noise_multiplier": 1.0, "sample_rate": report["sample_rate"], "batches": 2}
    ]


def test_the_model_card_states_the_guarantee_the_data_and_how_to_load(tmp_path):
    export = tmp_path / "model"
    module = SFTModule(model="tiny", learning_rate=1e-1, export_dir=str(export))
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    fit(module, tmp_path / "dp", [cb], TinyText(module.tokenizer))
    card = (export / MODEL_CARD_NAME).read_text()
    report = read_report(export)
    assert f"ε = {report['epsilon']:.4g}" in card and report["privacy_unit"] in card
    assert 'AutoModelForCausalLM.from_pretrained("model")' in card
    infinite = model_card(non_private_report(), "m")
    assert "ε = ∞" in infinite and "no differential-privacy guarantee" in infinite
    split = {**non_private_report(), "data_split": {"split": "D1"}}
    assert '"split": "D1"' in model_card(split, "m")

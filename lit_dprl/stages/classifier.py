"""A PUBLIC sequence classifier: the IMDb task's sentiment reward, trained non-privately on public text.

The paper's IMDb reward is a public sentiment classifier, independent of the private data D1/D3. This
stage trains one on public labelled text (``lit_dprl.data.classification.LabelledTextDataModule``,
Rotten Tomatoes sentences by default): a causal-LM body with a linear head over the classes, read at the
last non-pad token (``...ForSequenceClassification``), LoRA + head trained with cross-entropy. No DP is
needed or attached: the training data are public. The export loads with plain
``AutoModelForSequenceClassification.from_pretrained`` and as
``lit_dprl.rewards.SequenceClassifierReward(directory, label="positive")`` in stage 3.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_dprl.losses import training_output
from lit_dprl.models import (
    add_lora,
    check_data_matches_model,
    load_tokenizer,
    merged_copy,
    position_ids_from_mask,
    sequence_classifier_from_causal_lm,
)
from lit_dprl.privacy.report import export_after_fit

SENTIMENT_LABELS = ("negative", "positive")


class ClassifierModule(L.LightningModule):
    """Sequence classifier trained with per-example cross-entropy on ``input_ids``/``attention_mask``/``labels``.

    Loss over a batch of ``B`` texts: ``(1/B) · sum_i -log softmax(logits_i)[y_i]``. Logs ``train/loss``
    per step and per validation epoch ``val/loss`` and ``val/accuracy`` (torchmetrics) on the held-out
    split of the training source, plus ``val/imdb_loss`` and ``val/imdb_accuracy`` when the data module
    adds held-out IMDb reviews as a second validation set.

    Args:
        model: Backbone source: "tiny", "smollm2", a .gguf path, or a local causal-LM directory.
        num_labels: Number of classes.
        label_names: Class names stored in the export's ``config.id2label`` (used by
            ``SequenceClassifierReward(label="positive")``). None: "negative", "positive" for two
            classes, else "LABEL_0", "LABEL_1", ...
        use_lora: Train LoRA adapters plus the classification head; False trains every weight.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: Dropout on the LoRA input (0 keeps training deterministic).
        lora_target_modules: Modules to adapt; None picks the architecture's attention projections.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        export_dir: Directory the merged classifier and its tokenizer are written to at the end of ``fit``
            (None: no export).
        seed: Seed of the head and LoRA initialisation (and of the "tiny" body).
    """

    def __init__(
        self,
        model: str = "tiny",
        num_labels: int = 2,
        label_names: list[str] | None = None,
        use_lora: bool = True,
        lora_r: int = 4,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        export_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2 for a classifier, got {num_labels}")
        if label_names is None:
            label_names = (
                list(SENTIMENT_LABELS) if num_labels == 2 else [f"LABEL_{i}" for i in range(num_labels)]
            )
        if len(label_names) != num_labels or len(set(label_names)) != num_labels:
            raise ValueError(f"label_names must be {num_labels} distinct names, got {label_names}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model)
        backbone = sequence_classifier_from_causal_lm(model, self.tokenizer, label_names, seed=seed).train()
        if use_lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                backbone = add_lora(backbone, lora_r, lora_alpha, lora_dropout, lora_target_modules)
            backbone.get_base_model().score.requires_grad_(True)
        self.model = backbone
        self.val_loss = torch.nn.ModuleList([MeanMetric(), MeanMetric()])
        self.val_accuracy = torch.nn.ModuleList(
            [MulticlassAccuracy(num_labels, average="micro") for _ in range(2)]
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_labels]`` of left-padded rows (the head at the last position)."""
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).logits

    def example_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, K], per-example cross-entropy [B])``."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        return logits, F.cross_entropy(logits, batch["labels"], reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Mean over the batch of per-example cross-entropies, and those cross-entropies."""
        _, losses = self.example_losses(batch)
        output = training_output(losses)
        self.log("train/loss", output["loss"], prog_bar=True, batch_size=losses.shape[0])
        return output

    def on_validation_epoch_start(self) -> None:
        """Start the epoch's metrics afresh (see ``SFTModule.on_validation_epoch_start``)."""
        for metric in (*self.val_loss, *self.val_accuracy):
            metric.reset()

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Accumulate loss and accuracy of validation set ``dataloader_idx`` (0: source split, 1: IMDb)."""
        logits, losses = self.example_losses(batch)
        self.val_loss[dataloader_idx].update(losses)
        self.val_accuracy[dataloader_idx].update(logits, batch["labels"])
        prefix = "val/" if dataloader_idx == 0 else "val/imdb_"
        metrics = {
            f"{prefix}loss": self.val_loss[dataloader_idx],
            f"{prefix}accuracy": self.val_accuracy[dataloader_idx],
        }
        self.log_dict(metrics, prog_bar=True, batch_size=losses.shape[0], add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (LoRA adapters and head when ``use_lora``)."""
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return torch.optim.AdamW(
            trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    def setup(self, stage: str) -> None:
        """Check that the data module uses this model's tokenizer, fits its context, and has valid labels."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        check_data_matches_model(datamodule, self.tokenizer, self.hparams.model, self.model.config)
        if (
            getattr(datamodule, "train_set", None) is not None
            and datamodule.max_label >= self.hparams.num_labels
        ):
            raise ValueError(
                f"the data has label {datamodule.max_label} but the classifier has num_labels="
                f"{self.hparams.num_labels}; raise num_labels or fix the labels."
            )

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the merged classifier and its tokenizer to ``directory`` (plain ``transformers`` format)."""
        directory = Path(directory)
        merged_copy(self.model).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def on_fit_end(self) -> None:
        """Export with its ``privacy.json`` to ``export_dir`` (global rank zero only) when it is set."""
        export_after_fit(self, self.hparams.export_dir)

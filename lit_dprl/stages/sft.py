"""Stage 1: supervised fine-tuning of a causal LM on D1 (DP comes from ``lit_dprl.privacy.DPCallback``).

The training loss is the batch mean of per-sequence next-token NLLs, so one row is one privacy unit.
The module holds no DP code; attach the callback to make it DP-SGD.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lit_dprl.losses import causal_lm_sequence_loss, training_output
from lit_dprl.models import (
    add_lora,
    check_data_matches_model,
    load_causal_lm,
    load_tokenizer,
    merged_copy,
    position_ids_from_mask,
)
from lit_dprl.privacy.report import export_after_fit
from lit_dprl.sharding import full_state_dict, shard_model


class SFTModule(L.LightningModule):
    """Causal-LM fine-tuning on text batches (``input_ids``, ``attention_mask``, ``loss_mask``).

    Logs ``train/loss`` per step, and per validation epoch ``val/loss`` (mean over sequences of the
    per-sequence mean NLL, the training objective) and ``val/perplexity`` = exp(token-weighted mean NLL
    over all validation target tokens), both from torchmetrics ``MeanMetric`` (the latter weighted by
    each row's number of target tokens).

    Args:
        model: Model source: "tiny", "smollm2", a .gguf path, or a local Hugging Face model directory
            (e.g. a local GPT-2 directory, as in the paper).
        use_lora: Train a LoRA adapter only (the paper's setting); False trains every weight.
        lora_r: LoRA rank (paper: 4).
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: Dropout on the LoRA input; keep 0 (dropout is off everywhere in this package).
        lora_target_modules: Module names to adapt. None lets peft choose: ``c_attn`` on GPT-2, which is
            the fused query/key/value projection (the paper's query/value-only LoRA would need a split
            projection), and ``q_proj``/``v_proj`` on Llama-style models such as SmolLM2.
        learning_rate: AdamW learning rate (paper, DP SFT: 3e-4, constant).
        weight_decay: AdamW weight decay (paper: 0.01).
        export_dir: When set, the merged model and tokenizer are written here at the end of ``fit``.
        seed: Seed of the random parts of the model (the tiny model's weights, LoRA's initial A).
    """

    def __init__(
        self,
        model: str = "tiny",
        use_lora: bool = True,
        lora_r: int = 4,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.01,
        export_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model)
        # train mode for every source (from_pretrained returns eval mode); dropout is already off
        self.model = load_causal_lm(model, self.tokenizer, seed=seed).train()
        if use_lora:
            self.model = self.with_lora(self.model)
        self.val_loss = MeanMetric()
        self.val_token_nll = MeanMetric()
        self._gathered: dict[str, torch.Tensor] | None = (
            None  # a sharded model's full weights, for the export
        )

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard the model with FSDP2, block by block (``sharding.shard_model``)."""
        shard_model(self.model, self.device_mesh)

    def with_lora(self, model: PreTrainedModel) -> torch.nn.Module:
        """``model`` wrapped with this module's LoRA settings; A is drawn from ``seed`` (global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.seed)
            return add_lora(
                model,
                r=self.hparams.lora_r,
                alpha=self.hparams.lora_alpha,
                dropout=self.hparams.lora_dropout,
                target_modules=self.hparams.lora_target_modules,
            )

    def setup(self, stage: str) -> None:
        """Refuse a data module whose tokenizer is not this model's or whose max_length exceeds its context."""
        if self.trainer.datamodule is not None:
            check_data_matches_model(
                self.trainer.datamodule, self.tokenizer, self.hparams.model, self.model.config
            )

    def sequence_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-row mean NLL of the ``loss_mask`` targets, shape ``[B]`` (see ``causal_lm_sequence_loss``)."""
        attention_mask = batch["attention_mask"]
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits
        return causal_lm_sequence_loss(logits, batch["input_ids"], batch["loss_mask"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Mean over the batch of per-sequence losses (one row = one privacy unit), and those losses."""
        output = training_output(self.sequence_losses(batch))
        self.log("train/loss", output["loss"], prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return output

    def on_validation_epoch_start(self) -> None:
        """Start the epoch's metrics afresh, as tensors of the current grad mode: states reset under
        ``trainer.validate``'s inference mode could not be updated in place by ``fit``'s validation."""
        self.val_loss.reset()
        self.val_token_nll.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate per-sequence losses and token-weighted NLL over the validation epoch."""
        losses = self.sequence_losses(batch)
        self.val_loss.update(losses)
        self.val_token_nll.update(losses, weight=batch["loss_mask"][:, 1:].sum(-1))
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=losses.shape[0])

    def on_validation_epoch_end(self) -> None:
        """Log ``val/perplexity`` = exp(token-weighted mean NLL over the epoch)."""
        self.log("val/perplexity", torch.exp(self.val_token_nll.compute()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (the LoRA adapter when ``use_lora``)."""
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return torch.optim.AdamW(
            trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    def merged_model(self) -> PreTrainedModel:
        """A CPU copy of the current weights as a plain ``transformers`` model, LoRA merged (see ``merged_copy``)."""
        return merged_copy(self.model, self._gathered)

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the merged model and the tokenizer to ``directory``, loadable by ``AutoModelForCausalLM`` and
        ``AutoTokenizer.from_pretrained``; returns the directory."""
        directory = Path(directory)
        self.merged_model().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def on_fit_end(self) -> None:
        """Export the merged model with its ``privacy.json`` to ``export_dir`` (global rank zero) when it is set;
        a sharded model's weights are gathered first, on every rank."""
        if self.hparams.export_dir is not None:
            self._gathered = full_state_dict(self.model)
        export_after_fit(self, self.hparams.export_dir)
        self._gathered = None

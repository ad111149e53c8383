"""Stage 2: the reward model ``r(x, y)``, trained with the pairwise Bradley–Terry loss on preference pairs.

The model is a causal-LM body with a linear scalar head (Hugging Face ``...ForSequenceClassification``
with ``num_labels=1``), initialised from the stage-1 model or any local causal LM. The reward of a
``prompt + response`` sequence is the head's output at its last non-pad token; sequences are padded
on the left, so that is the last position. One preference pair is one privacy unit: differential
privacy comes only from attaching ``lit_dprl.privacy.DPCallback``; this module has no DP code.

The exported directory loads with plain ``transformers`` (``lit_dprl.rewards.load_reward_model``) and is read
by stage 3 and the pipeline's evaluation through ``lit_dprl.rewards.RewardModelScorer``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torchmetrics

from lit_dprl.data.files import load_local_dataset, require_columns
from lit_dprl.losses import bradley_terry_loss, training_output
from lit_dprl.models import (
    add_lora,
    check_data_matches_model,
    context_length,
    load_tokenizer,
    merged_copy,
    sequence_classifier_from_causal_lm,
)
from lit_dprl.privacy.report import export_after_fit
from lit_dprl.rewards import RewardModelScorer, reward_model_scores, write_reward_config

REFERENCE_FIELDS = ("prompt", "response")


class MeanStd(torchmetrics.Metric):
    """Running mean and population standard deviation: ``mean = S1/n``, ``std = sqrt(max(0, S2/n - mean²))``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("total", "total_squares", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double()
        self.total += values.sum()
        self.total_squares += values.square().sum()
        self.count += values.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.total / self.count
        std = (self.total_squares / self.count - mean.square()).clamp(min=0.0).sqrt()
        return {"mean": mean.float(), "std": std.float()}


class PairwiseRewardMetrics(torch.nn.Module):
    """Pairwise accuracy ``mean[r_c > r_r]``, mean margin ``mean[r_c - r_r]``, mean/std of ``r_c`` and of ``r_r``."""

    def __init__(self) -> None:
        super().__init__()
        self.accuracy = torchmetrics.MeanMetric()
        self.margin = torchmetrics.MeanMetric()
        self.reward_chosen = MeanStd()
        self.reward_rejected = MeanStd()

    def forward(self, reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        """Accumulate a batch and return the batch's own values."""
        reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
        return self._named(
            self.accuracy((reward_chosen > reward_rejected).float()),
            self.margin(reward_chosen - reward_rejected),
            self.reward_chosen(reward_chosen),
            self.reward_rejected(reward_rejected),
        )

    def compute_and_reset(self) -> dict[str, torch.Tensor]:
        """Values over everything accumulated since the last reset, then reset."""
        metrics = (self.accuracy, self.margin, self.reward_chosen, self.reward_rejected)
        values = self._named(*(metric.compute() for metric in metrics))
        for metric in metrics:
            metric.reset()
        return values

    @staticmethod
    def _named(accuracy, margin, chosen: dict, rejected: dict) -> dict[str, torch.Tensor]:
        return {
            "accuracy": accuracy,
            "margin": margin,
            **{f"reward_chosen_{k}": v for k, v in chosen.items()},
            **{f"reward_rejected_{k}": v for k, v in rejected.items()},
        }


class RewardModule(L.LightningModule):
    """Reward model trained on preference pairs with the per-pair Bradley–Terry loss.

    Loss over a batch of ``B`` pairs: ``(1/B) · sum_i -log σ(r(x_i, y_i^chosen) - r(x_i, y_i^rejected))``.
    Logged metrics (``train/*`` per step and per epoch, ``val/*`` per epoch) are computed on the
    training / validation pairs and are therefore NOT differentially private.

    Args:
        model: Model source of the backbone: a stage-1 export directory, any local causal-LM directory,
            a .gguf file, "tiny" or "smollm2" (see ``lit_dprl.models``).
        use_lora: Train LoRA adapters plus the reward head; False trains every weight.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: Dropout on the LoRA input (0 keeps training deterministic).
        lora_target_modules: Modules to adapt; None picks the architecture's attention projections.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        export_dir: Directory the merged reward model is written to at the end of ``fit`` (None: no export).
        public_reference_file: Optional local file of PUBLIC ``prompt``/``response`` rows. After training,
            the mean reward of these rows is stored as the export's ``bias`` and subtracted by
            :class:`RewardModelScorer`, so that reference responses score 0 (the N+ recipe). It must be
            data you may publish: the bias is a statistic of it and is released with the model. The
            private training pairs are never used for it.
        seed: Seed of the reward-head and LoRA initialisation (and of the "tiny" body).
    """

    def __init__(
        self,
        model: str = "tiny",
        use_lora: bool = True,
        lora_r: int = 4,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.01,
        export_dir: str | None = None,
        public_reference_file: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.export_dir = export_dir
        self.public_reference_file = public_reference_file
        self.tokenizer = load_tokenizer(model)
        backbone = sequence_classifier_from_causal_lm(model, self.tokenizer, seed=seed)
        if use_lora:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                backbone = add_lora(backbone, lora_r, lora_alpha, lora_dropout, lora_target_modules)
            backbone.get_base_model().score.requires_grad_(True)
        self.model = backbone
        self.max_length = context_length(backbone.config)
        self.train_metrics = PairwiseRewardMetrics()
        self.val_metrics = PairwiseRewardMetrics()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards of left-padded ``prompt + response`` rows, shape ``[B]``."""
        return reward_model_scores(self.model, input_ids, attention_mask)

    def pair_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_chosen, r_rejected)``, each ``[B]``, from two separate forwards.

        Row ``i`` of both forwards is pair ``i``. With per-sample gradients (Opacus hooks), the gradient
        of row ``i`` then sums the contributions of both forwards: it is the gradient of pair ``i``'s
        loss, clipped once as a whole, so one pair moves the clipped sum by at most C (one pair = one
        privacy unit). Concatenating chosen and rejected into ONE forward of ``2B`` rows would instead
        clip each response on its own: sensitivity ``2C`` per pair. Do not merge these two forwards.
        """
        reward_chosen = self(batch["chosen_input_ids"], batch["chosen_attention_mask"])
        reward_rejected = self(batch["rejected_input_ids"], batch["rejected_attention_mask"])
        return reward_chosen, reward_rejected

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Mean over the batch of per-pair Bradley-Terry losses (one pair = one privacy unit), and those losses."""
        reward_chosen, reward_rejected = self.pair_rewards(batch)
        output = training_output(bradley_terry_loss(reward_chosen, reward_rejected))
        batch_size = reward_chosen.shape[0]
        self.log(
            "train/loss", output["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        metrics = self.train_metrics(reward_chosen, reward_rejected)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, batch_size=batch_size)
        return output

    def on_train_epoch_end(self) -> None:
        if self.train_metrics.accuracy.update_count:
            epoch = self.train_metrics.compute_and_reset()
            self.log_dict({f"train/epoch_{k}": v for k, v in epoch.items()})

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        reward_chosen, reward_rejected = self.pair_rewards(batch)
        loss = bradley_terry_loss(reward_chosen, reward_rejected).mean()
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=reward_chosen.shape[0])
        self.val_metrics(reward_chosen, reward_rejected)

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics.accuracy.update_count:
            epoch = self.val_metrics.compute_and_reset()
            self.log_dict({f"val/{k}": v for k, v in epoch.items()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.learning_rate, weight_decay=self.weight_decay)

    def setup(self, stage: str) -> None:
        """Check that the attached data module uses this model's tokenizer and fits its context."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        data_max_length = check_data_matches_model(datamodule, self.tokenizer, self.source, self.model.config)
        if data_max_length is not None:
            self.max_length = data_max_length

    def on_fit_end(self) -> None:
        export_after_fit(self, self.export_dir)

    def export(self, directory: str | Path) -> Path:
        """Write the merged reward model, its tokenizer and ``reward_config.json`` to ``directory``.

        Plain ``AutoModelForSequenceClassification.from_pretrained(directory)`` and
        ``AutoTokenizer.from_pretrained(directory)`` load it (see ``lit_dprl.rewards.load_reward_model``). If
        ``public_reference_file`` is set, the mean reward of its rows is stored as ``bias``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        merged_copy(self.model).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        write_reward_config(directory, max_length=self.max_length, bias=0.0, bias_source=None)
        if self.public_reference_file is not None:
            references = load_local_dataset(self.public_reference_file)
            require_columns(
                references, REFERENCE_FIELDS, f"public reference file {self.public_reference_file}"
            )
            scorer = RewardModelScorer(directory).to(self.device)
            scores = scorer(list(references["prompt"]), list(references["response"]))
            write_reward_config(
                directory,
                max_length=self.max_length,
                bias=sum(scores) / len(scores),
                bias_source=f"mean reward of {len(scores)} public reference rows in {self.public_reference_file}",
            )
        return directory

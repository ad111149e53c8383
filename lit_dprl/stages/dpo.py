"""Stage ``dpo``: direct preference optimisation of the stage-1 policy on preference pairs.

No reward model and no rollouts: the policy is trained so that its log-probability ratio to a frozen
reference ranks the chosen response of each pair above the rejected one (Rafailov et al. 2023). The
policy is the stage-1 model with a fresh LoRA adapter, and the reference is the same body with the
adapter disabled (no second copy); with ``use_lora=False`` every weight trains and a frozen copy is
the reference.

One preference pair is one privacy unit. The chosen and the rejected sequences go through the policy
in two separate, row-aligned forwards and the loss is the batch mean of per-pair losses, so under
per-example gradients (``lit_dprl.privacy.DPCallback``) row ``i`` of both forwards adds up to ONE
gradient for pair ``i``, clipped as a whole. This module holds no DP code.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import PreTrainedModel

from lit_dprl.losses import dpo_sigmoid_loss, ipo_loss, robust_dpo_loss, sequence_logprob, training_output
from lit_dprl.models import (
    add_lora,
    check_data_matches_model,
    load_causal_lm,
    load_tokenizer,
    merged_copy,
    position_ids_from_mask,
)
from lit_dprl.privacy.report import export_after_fit
from lit_dprl.rewards import read_input_report

LossType = Literal["sigmoid", "ipo", "robust"]
LOSS_TYPES = ("sigmoid", "ipo", "robust")


def preference_loss(
    loss_type: LossType, margin: torch.Tensor, beta: float, label_smoothing: float
) -> torch.Tensor:
    """Per-pair loss of ``loss_type`` at margin ``h`` (see ``lit_dprl.losses``), shape ``[B]``."""
    if loss_type == "ipo":
        return ipo_loss(margin, beta)
    if loss_type == "robust":
        return robust_dpo_loss(margin, beta, label_smoothing)
    return dpo_sigmoid_loss(margin, beta, label_smoothing)


def left_aligned(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """Left-padded rows moved to start at column 0, ``[B, width]``; columns past a row's length hold -1."""
    length = attention_mask.sum(-1, keepdim=True)
    columns = torch.arange(width, device=input_ids.device).expand(input_ids.shape[0], width)
    source = (columns + input_ids.shape[1] - length).clamp(max=input_ids.shape[1] - 1)
    return input_ids.gather(1, source).masked_fill(columns >= length, -1)


def response_masks(
    chosen_ids: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_ids: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the tokens each response adds to its pair's shared start, ``[B, T_c]`` and ``[B, T_r]``.

    Rows are left-padded ``prompt + response`` sequences. ``L_b`` is the length of the longest common
    prefix of pair ``b``'s two sequences (its prompt, and any tokens both responses start with); a token
    counts iff its position in its own sequence is ``>= max(L_b, 1)``. Tokens of the common prefix have
    the same context in both sequences, so their log-ratios cancel in the DPO margin ``h``: summing from
    ``L_b`` gives exactly the margin of a sum over response tokens, without knowing where the prompt ends.
    """
    width = max(chosen_ids.shape[1], rejected_ids.shape[1])
    chosen = left_aligned(chosen_ids, chosen_mask, width)
    rejected = left_aligned(rejected_ids, rejected_mask, width)
    shared = ((chosen == rejected) & (chosen >= 0)).long().cumprod(-1).sum(-1, keepdim=True).clamp(min=1)
    return (
        chosen_mask.bool() & (position_ids_from_mask(chosen_mask) >= shared),
        rejected_mask.bool() & (position_ids_from_mask(rejected_mask) >= shared),
    )


def preference_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics, batch means: ``rewards/chosen`` = β(log π(y_c) - log π_ref(y_c)), ``rewards/rejected``
    likewise, ``rewards/accuracies`` = [r_c > r_r], ``rewards/margins`` = r_c - r_r, ``logps/chosen`` and
    ``logps/rejected`` = log π of the responses."""
    reward_chosen = beta * (policy_chosen - reference_chosen).detach()
    reward_rejected = beta * (policy_rejected - reference_rejected).detach()
    return {
        "rewards/chosen": reward_chosen.mean(),
        "rewards/rejected": reward_rejected.mean(),
        "rewards/accuracies": (reward_chosen > reward_rejected).float().mean(),
        "rewards/margins": (reward_chosen - reward_rejected).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


class DPOModule(L.LightningModule):
    """DPO / IPO / robust DPO on batches of ``PreferenceDataModule`` (left-padded chosen/rejected rows).

    With ``Δ = log π(y|x) - log π_ref(y|x)`` summed over a response's tokens (see :func:`response_masks`),
    the margin of a pair is ``h = Δ_c - Δ_r`` (for ``ipo``, as in TRL, ``h = Δ_c/|y_c| - Δ_r/|y_r|``, where
    ``|y|`` counts the tokens after the pair's shared start: TRL's completion lengths when the two responses
    begin with different tokens) and its loss, for ``loss_type``:

    - ``sigmoid``: ``-(1-ε)·log σ(βh) - ε·log σ(-βh)`` (DPO; ε = ``label_smoothing`` > 0 is conservative DPO);
    - ``ipo``: ``(h - 1/(2β))²``;
    - ``robust``: ``(-(1-ε)·log σ(βh) + ε·log σ(-βh)) / (1-2ε)``.

    The training loss is the batch mean of per-pair losses. Reference log-probabilities are computed per
    batch under ``no_grad`` (a function of that pair only). Logged metrics (``train/*``, ``val/*``: loss
    and TRL's ``rewards/*``, ``logps/*``) are computed on the pairs and are NOT differentially private.

    Args:
        model: Model source of the policy: a stage-1 export directory, any local causal-LM directory, a
            .gguf file, "tiny" or "smollm2" (see ``lit_dprl.models``).
        use_lora: Train a fresh LoRA adapter (reference: adapter disabled); False trains every weight
            (reference: a frozen copy of the initial model).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: Dropout on the LoRA input (keep 0: dropout is off everywhere in this package).
        lora_target_modules: Modules to adapt; None picks the architecture's attention projections.
        loss_type: "sigmoid", "ipo" or "robust" (formulas above).
        beta: β > 0, the strength of the tie to the reference (τ of IPO).
        label_smoothing: ε in [0, 0.5): the assumed rate of flipped preference labels (``sigmoid``,
            ``robust``); must be 0 for ``ipo``.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        export_dir: Directory the merged policy, its tokenizer and ``privacy.json`` are written to at the
            end of ``fit`` (None: no export).
        seed: Seed of LoRA's initialisation (and of the "tiny" body).
    """

    def __init__(
        self,
        model: str = "tiny",
        use_lora: bool = True,
        lora_r: int = 4,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        loss_type: LossType = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_loss_settings(loss_type, beta, label_smoothing)
        self.save_hyperparameters()
        self.input_reports = {"model": read_input_report(model)}
        self.tokenizer = load_tokenizer(model)
        policy = load_causal_lm(model, self.tokenizer, seed=seed).train()
        self.reference: PreTrainedModel | None = None
        if use_lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                policy = add_lora(policy, lora_r, lora_alpha, lora_dropout, lora_target_modules)
        else:
            self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.model = policy

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The reference policy π_ref under ``no_grad``: the body with the adapter disabled, or the frozen copy."""
        with torch.no_grad():
            if self.reference is not None:
                yield self.reference
            else:
                with self.model.disable_adapter():
                    yield self.model

    @staticmethod
    def response_logprob(
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``log π(y|x)`` per row, shape ``[B]``: the sum of the log-probabilities of the ``response_mask`` tokens."""
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).logits
        return sequence_logprob(logits, input_ids, response_mask)

    def pair_logprobs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], masks: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log π(y_c|x), log π(y_r|x))``, each ``[B]``, from two separate forwards.

        Row ``i`` of both forwards is pair ``i``: with per-sample gradients (Opacus hooks) the gradient of
        row ``i`` sums both forwards' contributions, i.e. it is pair ``i``'s gradient, clipped once as a
        whole (one pair moves the clipped sum by at most C). One forward over chosen and rejected
        concatenated (2B rows) would clip each response on its own: sensitivity 2C per pair. Keep them apart.
        """
        chosen = self.response_logprob(
            model, batch["chosen_input_ids"], batch["chosen_attention_mask"], masks[0]
        )
        rejected = self.response_logprob(
            model, batch["rejected_input_ids"], batch["rejected_attention_mask"], masks[1]
        )
        return chosen, rejected

    def pair_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses ``[B]`` and the batch's TRL metrics."""
        masks = response_masks(
            batch["chosen_input_ids"],
            batch["chosen_attention_mask"],
            batch["rejected_input_ids"],
            batch["rejected_attention_mask"],
        )
        with self.reference_model() as reference:
            reference_chosen, reference_rejected = self.pair_logprobs(reference, batch, masks)
        policy_chosen, policy_rejected = self.pair_logprobs(self.model, batch, masks)
        hp = self.hparams
        ratio_chosen, ratio_rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
        if hp.loss_type == "ipo":  # length-normalised, as in TRL
            ratio_chosen = ratio_chosen / masks[0].sum(-1).clamp(min=1)
            ratio_rejected = ratio_rejected / masks[1].sum(-1).clamp(min=1)
        losses = preference_loss(hp.loss_type, ratio_chosen - ratio_rejected, hp.beta, hp.label_smoothing)
        metrics = preference_metrics(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, hp.beta
        )
        return losses, metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Mean over the batch of per-pair losses (one pair = one privacy unit), and those losses."""
        losses, metrics = self.pair_losses(batch)
        output = training_output(losses)
        batch_size = losses.shape[0]
        self.log(
            "train/loss", output["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        self.log_dict(
            {f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=True, batch_size=batch_size
        )
        return output

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation loss and metrics, averaged over the epoch's pairs."""
        losses, metrics = self.pair_losses(batch)
        batch_size = losses.shape[0]
        self.log("val/loss", losses.mean(), on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_epoch=True, batch_size=batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (the LoRA adapter when ``use_lora``)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    def setup(self, stage: str) -> None:
        """Check that the data module uses this model's tokenizer and fits its context; warn about cut prompts."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        check_data_matches_model(datamodule, self.tokenizer, self.hparams.model, self.model.config)
        truncations = getattr(datamodule, "truncations", None)
        if truncations is not None and truncations.truncated:
            rank_zero_warn(
                f"DPO: {truncations.truncated} sequences were cut to max_length; a pair whose two prompts lost "
                "different numbers of tokens has no common prompt, so its prompt tokens count in both log-probs. "
                "Raise max_length so that prompts stay whole."
            )

    def privacy_metadata(self) -> dict[str, Any]:
        """What ``privacy.json`` records of this stage (under ``"stage"``): the loss, the reference, what one
        row is, and the privacy report of the starting model (None: it has none)."""
        hp = self.hparams
        return {
            "stage": "dpo",
            "loss_type": hp.loss_type,
            "beta": hp.beta,
            "label_smoothing": hp.label_smoothing,
            "reference": "the policy with its LoRA adapter disabled"
            if self.reference is None
            else "frozen copy",
            "privacy_unit": "one preference pair: chosen and rejected in one per-example gradient, clipped together",
            "inputs": self.input_reports,
        }

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the merged policy and its tokenizer to ``directory`` (``AutoModelForCausalLM`` loads it)."""
        directory = Path(directory)
        merged_copy(self.model).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def on_fit_end(self) -> None:
        """Export the merged policy with its ``privacy.json`` to ``export_dir`` (global rank zero) when it is set."""
        export_after_fit(self, self.hparams.export_dir)


def check_loss_settings(loss_type: str, beta: float, label_smoothing: float) -> None:
    """Refuse an unknown loss, β <= 0, or a label smoothing the loss cannot use."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if loss_type == "ipo" and label_smoothing != 0:
        raise ValueError(
            f"loss_type='ipo' has no label smoothing; set label_smoothing=0 (got {label_smoothing})"
        )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing is the assumed rate of flipped labels and must be in [0, 0.5), got {label_smoothing}"
        )

"""SFTModule: per-sequence loss, a short non-private fit, validation metrics, export of the merged model."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_dprl.data.text import TextDataModule, build_example, collate_left_padded
from lit_dprl.stages.sft import SFTModule

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_data() -> TextDataModule:
    return TextDataModule(
        tokenizer="tiny", max_length=32, batch_size=16, max_train_examples=64, max_val_examples=16
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA SFT run on real IMDb rows that exports its merged model at the end of fit."""
    export_dir = tmp_path_factory.mktemp("sft") / "model"
    module, data = SFTModule(learning_rate=1e-2, export_dir=str(export_dir)), tiny_data()
    data.setup("fit")
    trainer = L.Trainer(
        max_steps=16,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loss_before = trainer.validate(module, data, verbose=False)[0]["val/loss"]  # then fit: must still work
    trainer.fit(module, data)
    batch = next(iter(data.val_dataloader()))
    return {"module": module, "data": data, "trainer": trainer, "batch": batch, "loss_before": loss_before}


def test_sequence_loss_matches_a_manual_unpadded_computation():
    module = SFTModule()
    torch.nn.init.normal_(module.model.base_model.model.transformer.h[0].attn.c_attn.lora_B.default.weight)
    eos = module.tokenizer.eos_token_id
    prompt_row, plain_row, long_row = (
        build_example([5, 17], [99, 3, 42], eos, max_length=16),
        build_example([], [61, 7, 250], eos, max_length=16),
        build_example([], list(range(1, 13)), eos, max_length=16),
    )
    rows = [{"input_ids": ids, "loss_mask": mask} for ids, mask in (prompt_row, plain_row)]
    batch = collate_left_padded(rows, pad_token_id=module.tokenizer.pad_token_id)
    with torch.no_grad():
        losses = module.sequence_losses(batch)
        for (ids, mask), loss in zip((prompt_row, plain_row), losses, strict=True):
            ids, targets = torch.tensor([ids]), torch.tensor(mask, dtype=torch.bool)
            logits = module.model(input_ids=ids).logits[0]  # one row, no padding, default positions
            manual = F.cross_entropy(logits[:-1][targets[1:]], ids[0, 1:][targets[1:]])
            torch.testing.assert_close(loss, manual, rtol=0, atol=1e-5)
        # a longer row adds left padding to both rows (with another pad id: it must not matter either)
        more_padding = collate_left_padded([*rows, {"input_ids": long_row[0], "loss_mask": long_row[1]}], 0)
        torch.testing.assert_close(module.sequence_losses(more_padding)[:2], losses, rtol=0, atol=1e-5)


def test_only_lora_weights_are_trainable_and_optimized():
    module = SFTModule()
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}
    full = SFTModule(use_lora=False)
    assert all(parameter.requires_grad for parameter in full.parameters())


def test_hyperparameters_are_saved():
    module = SFTModule(lora_r=2, learning_rate=1e-3)
    assert module.hparams.lora_r == 2 and module.hparams.learning_rate == 1e-3
    assert module.hparams.model == "tiny" and module.hparams.export_dir is None


def test_short_fit_lowers_the_loss(trained):
    assert {"train/loss", "val/loss", "val/perplexity"} <= set(trained["trainer"].callback_metrics)
    assert trained["trainer"].callback_metrics["val/loss"] < trained["loss_before"] - 0.1


def test_validation_metrics_match_their_definitions(trained):
    module, data = trained["module"], trained["data"]
    sequence_losses, token_nll, tokens = [], 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            losses = module.sequence_losses(batch)
            counts = batch["loss_mask"][:, 1:].sum(-1)
            sequence_losses.append(losses)
            token_nll += (losses * counts).sum().item()
            tokens += counts.sum().item()
    metrics = trained["trainer"].validate(module, data, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(torch.cat(sequence_losses).mean().item(), abs=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(torch.tensor(token_nll / tokens).exp().item(), rel=1e-5)


def test_export_reloads_with_plain_transformers(trained):
    module, batch = trained["module"], trained["batch"]
    export_dir = module.hparams.export_dir
    model = AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    assert tokenizer("a review").input_ids == module.tokenizer("a review").input_ids
    assert (tokenizer.pad_token_id, tokenizer.padding_side) == (module.tokenizer.pad_token_id, "left")
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
    }
    with torch.no_grad():
        reloaded = model(**inputs).logits
        assert torch.equal(reloaded, module.merged_model()(**inputs).logits)
        torch.testing.assert_close(reloaded, module.model(**inputs).logits, rtol=0, atol=1e-5)
    lora_b = module.model.base_model.model.transformer.h[0].attn.c_attn.lora_B.default.weight
    assert lora_b.requires_grad and lora_b.abs().sum() > 0  # the live model is still the unmerged adapter


@pytest.mark.parametrize("config", ["tiny", "smollm2", "paper-imdb"])
def test_sft_configs_name_real_constructor_arguments(config):
    sections = yaml.safe_load((CONFIGS / config / "sft.yaml").read_text())
    for section in ("model", "data"):
        module_name, class_name = sections[section]["class_path"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        inspect.signature(cls).bind(**sections[section]["init_args"])


def test_gpt2_tokenizer_is_the_real_bpe_with_a_distinct_pad():
    from lit_dprl.models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.padding_side == "left"

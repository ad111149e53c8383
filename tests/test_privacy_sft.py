"""DP on the SFT model: Opacus per-example gradients equal a per-example autograd loop, LoRA really trains."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from torch.utils.data import DataLoader

from lit_dprl.data.text import collate_left_padded
from lit_dprl.privacy import DPCallback
from lit_dprl.stages.sft import SFTModule


def left_padded_batch(module: SFTModule) -> dict[str, torch.Tensor]:
    texts = ["a short one", "a much longer review of a film that went on", "mid sized text here", "x"]
    rows = []
    for text in texts:
        ids = module.tokenizer(text)["input_ids"] + [module.tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)})
    return collate_left_padded(rows, module.tokenizer.pad_token_id)


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("use_lora", [True, False])
def test_per_example_gradients_equal_a_per_example_loop(use_lora):
    torch.manual_seed(0)
    module = SFTModule(model="tiny", use_lora=use_lora, lora_r=4)
    if use_lora:  # make LoRA B non-zero so that every adapter weight has a gradient
        with torch.no_grad():
            for p in trainable(module):
                p.add_(0.1 * torch.randn_like(p))
    batch = left_padded_batch(module)
    assert (batch["attention_mask"] == 0).any(dim=1).sum() >= 2  # several rows are left-padded
    hooks = GradSampleHooks(module, loss_reduction="mean")
    module.sequence_losses(batch).mean().backward()
    per_example = [p.grad_sample.clone() for p in trainable(module)]
    hooks.cleanup()
    for row in range(batch["input_ids"].shape[0]):
        module.zero_grad()
        length = int(batch["attention_mask"][row].sum())
        single = {k: v[row : row + 1, -length:] for k, v in batch.items()}  # the row alone, unpadded
        module.sequence_losses(single).mean().backward()
        for p, grad_sample in zip(trainable(module), per_example, strict=True):
            torch.testing.assert_close(grad_sample[row], p.grad, rtol=1e-4, atol=1e-6)


def test_dp_step_changes_the_lora_weights(tmp_path):
    """Guards against opacus#820 (LoRA weights never updated while ε accrues)."""
    torch.manual_seed(0)
    module = SFTModule(model="tiny", use_lora=True, learning_rate=1e-2)
    batch = left_padded_batch(module)
    rows = [
        {"input_ids": ids[m.bool()].tolist(), "loss_mask": lm[m.bool()].tolist()}
        for ids, m, lm in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], strict=True)
    ] * 16

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(
                rows,
                batch_size=8,
                shuffle=True,
                collate_fn=lambda b: collate_left_padded(b, module.tokenizer.pad_token_id),
            )

    before = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    cb = DPCallback(noise_multiplier=0.5, sampling_seed=0, noise_seed=0)
    pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(module, Data())
    after = dict(module.named_parameters())
    assert before and all(not torch.equal(after[n], b) for n, b in before.items())
    assert cb.steps == 3 and cb.epsilon > 0

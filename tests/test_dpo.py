"""DPO stage: the losses by hand, one clipped gradient per preference pair, neighbouring pairs, learning, ε."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import dp_accounting
import lightning as L
import pytest
import torch
from dp_accounting import pld
from opacus.grad_sample import GradSampleHooks
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_dprl.commands.fit import main
from lit_dprl.data.preferences import PreferenceDataModule, PreferenceDataset, collate_preference_batch
from lit_dprl.losses import dpo_sigmoid_loss, ipo_loss, robust_dpo_loss
from lit_dprl.models import build_tiny_gpt2, build_tiny_tokenizer
from lit_dprl.privacy import DPCallback
from lit_dprl.stages.dpo import DPOModule, response_masks
from tests.test_reward import TEXTS, encode_rows, randomise_lora_b, rule_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
LONG_PAIR = (
    "A much longer prompt that changes how wide the padded batch is",
    " a fine film",
    " a waste of time",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("margin", [-3.0, 0.0, 0.7, 5.0])
def test_losses_equal_a_hand_computation(margin):
    beta, smoothing, h = 0.5, 0.2, torch.tensor([margin])
    sigmoid = -(1 - smoothing) * log_sigmoid(beta * margin) - smoothing * log_sigmoid(-beta * margin)
    robust = (-(1 - smoothing) * log_sigmoid(beta * margin) + smoothing * log_sigmoid(-beta * margin)) / (
        1 - 2 * smoothing
    )
    assert dpo_sigmoid_loss(h, beta).item() == pytest.approx(-log_sigmoid(beta * margin), rel=1e-6)
    assert dpo_sigmoid_loss(h, beta, smoothing).item() == pytest.approx(sigmoid, rel=1e-6)
    assert robust_dpo_loss(h, beta, smoothing).item() == pytest.approx(robust, rel=1e-6)
    assert robust_dpo_loss(h, beta, 0.0).item() == pytest.approx(-log_sigmoid(beta * margin), rel=1e-6)
    assert ipo_loss(h, beta).item() == pytest.approx((margin - 1 / (2 * beta)) ** 2, rel=1e-6)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"loss_type": "hinge"}, "loss_type must be one of"),
        ({"beta": 0.0}, "beta must be positive"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "'ipo' has no label smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"must be in \[0, 0.5\)"),
    ],
)
def test_bad_loss_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        DPOModule(**settings)


@pytest.fixture(scope="module")
def lora_module():
    module = DPOModule(seed=1, beta=0.5)
    randomise_lora_b(module)  # policy != reference, and every adapter weight gets a gradient
    return module


def batch_of(module: DPOModule, texts=TEXTS) -> dict[str, torch.Tensor]:
    return collate_preference_batch(encode_rows(module.tokenizer, texts), module.tokenizer.pad_token_id)


def test_response_masks_keep_what_follows_the_shared_start(lora_module):
    batch = batch_of(lora_module)
    chosen, rejected = response_masks(
        batch["chosen_input_ids"],
        batch["chosen_attention_mask"],
        batch["rejected_input_ids"],
        batch["rejected_attention_mask"],
    )
    decode = lora_module.tokenizer.decode
    # byte tokens: the prompt and the responses' shared start (" was ", or just " ") are left out
    assert [decode(batch["chosen_input_ids"][i][chosen[i]]) for i in range(3)] == [
        "great and the actors good",
        "yes",
        "lovely",
    ]
    assert decode(batch["rejected_input_ids"][0][rejected[0]]) == "bad"
    assert (
        decode(batch["rejected_input_ids"][1][rejected[1]])
        == "absolutely not, and here is a much longer reason why"
    )


def test_margin_equals_the_margin_over_response_tokens(lora_module):
    """Shared-start tokens cancel: the margin from ``response_masks`` is the margin over the responses alone."""
    batch = batch_of(lora_module)
    tokens = [
        len(lora_module.tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt, _, _ in TEXTS
    ]

    def prompt_excluded(mask: torch.Tensor) -> torch.Tensor:
        positions = mask.cumsum(-1) - 1
        return mask.bool() & (positions >= torch.tensor(tokens)[:, None])

    masks = response_masks(
        batch["chosen_input_ids"],
        batch["chosen_attention_mask"],
        batch["rejected_input_ids"],
        batch["rejected_attention_mask"],
    )
    explicit = (
        prompt_excluded(batch["chosen_attention_mask"]),
        prompt_excluded(batch["rejected_attention_mask"]),
    )
    margins = []
    for m in (masks, explicit):
        with lora_module.reference_model() as reference:
            ref_chosen, ref_rejected = lora_module.pair_logprobs(reference, batch, m)
        with torch.no_grad():
            chosen, rejected = lora_module.pair_logprobs(lora_module.model, batch, m)
        margins.append((chosen - ref_chosen) - (rejected - ref_rejected))
    assert margins[0].abs().min() > 1e-3  # the policy really differs from the reference
    torch.testing.assert_close(margins[0], margins[1], atol=1e-5, rtol=1e-5)


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def per_pair_loop(module: DPOModule, rows: list[dict]) -> list[torch.Tensor]:
    """The flattened gradient of each pair's loss, one pair (unpadded) at a time."""
    grads = []
    for row in rows:
        module.zero_grad()
        losses, _ = module.pair_losses(collate_preference_batch([row], module.tokenizer.pad_token_id))
        losses.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainable(module)]))
    module.zero_grad()
    return grads


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_per_pair_gradients_match_a_loop_over_pairs(use_lora, loss_type):
    module = DPOModule(
        use_lora=use_lora, loss_type=loss_type, label_smoothing=0.1 * (loss_type != "ipo"), seed=2
    )
    randomise_lora_b(module)
    rows = encode_rows(module.tokenizer)
    expected = per_pair_loop(module, rows)
    hooks = GradSampleHooks(module, loss_reduction="mean")
    try:
        losses, _ = module.pair_losses(collate_preference_batch(rows, module.tokenizer.pad_token_id))
        losses.mean().backward()
        assert all(p.grad_sample.shape[0] == len(rows) for p in trainable(module))  # one per PAIR
        per_pair = torch.cat([p.grad_sample.flatten(1) for p in trainable(module)], dim=1)
    finally:
        hooks.cleanup()
    assert all(g.norm() > 0 for g in expected)
    for i, grad in enumerate(expected):
        torch.testing.assert_close(per_pair[i], grad, atol=1e-5, rtol=1e-4)


class Pairs(L.LightningDataModule):
    """One DataLoader over ``dataset``; with q = batch_size / N = 1 the Poisson batch is all of it, in order."""

    def __init__(self, dataset, batch_size: int, pad_token_id: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.pad_token_id = dataset, batch_size, pad_token_id

    def train_dataloader(self) -> DataLoader:
        collate = functools.partial(collate_preference_batch, pad_token_id=self.pad_token_id)
        return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate)


class LastGradient(L.Callback):
    """The (noisy, clipped, averaged) gradient the DP optimizer applied in the batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.grad = torch.cat([p.grad.flatten() for p in trainable(pl_module)]).clone()


def make_module(use_lora: bool = True) -> DPOModule:
    module = DPOModule(seed=3, beta=0.5, use_lora=use_lora)
    randomise_lora_b(module)
    return module


def dp_step_gradient(dataset, noise_multiplier: float, max_grad_norm: float, tmp_path, use_lora=True, **dp):
    """The gradient of one DPCallback step over all of ``dataset`` (fixed model, sampling and noise seeds)."""
    module = make_module(use_lora)
    capture = LastGradient()
    callback = DPCallback(
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, sampling_seed=0, noise_seed=0, **dp
    )
    units = len(set(dataset.user_ids)) if dp.get("privacy_unit") == "user" else len(dataset)
    L.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[callback, capture],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(module, Pairs(dataset, units, module.tokenizer.pad_token_id))
    return capture.grad


def clipped(grad: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    return grad * min(1.0, max_grad_norm / (grad.norm().item() + 1e-6))


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_dp_step_clips_each_pair_once_as_a_whole(tmp_path, use_lora):
    """σ = 0: the DP gradient is (1/B)·Σ_i clip_C(g_i) over the per-pair gradients of a loop. Clipping each
    response on its own (chosen and rejected in one forward of 2B rows) gives another sum and fails here."""
    module = make_module(use_lora)
    rows = encode_rows(module.tokenizer)
    loop = per_pair_loop(module, rows)
    max_grad_norm = 0.5 * min(g.norm().item() for g in loop)  # clipping binds for every pair
    expected = sum(clipped(g, max_grad_norm) for g in loop) / len(rows)
    got = dp_step_gradient(rows, 0.0, max_grad_norm, tmp_path, use_lora)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_replacing_one_interior_pair_changes_only_its_clipped_contribution(tmp_path):
    """Neighbouring datasets D, D' (pair 1 of 3 replaced by a longer one: the batch pads wider), same model,
    sampling and noise seeds, σ = 1: the DP gradients differ by exactly (clip(g_1) - clip(g'_1)) / B."""
    module = make_module()
    rows = encode_rows(module.tokenizer)
    neighbour = rows[:1] + encode_rows(module.tokenizer, [LONG_PAIR]) + rows[2:]
    loop = per_pair_loop(module, rows + neighbour[1:2])
    max_grad_norm = 0.5 * min(g.norm().item() for g in loop)
    expected = (clipped(loop[1], max_grad_norm) - clipped(loop[3], max_grad_norm)) / len(rows)
    difference = dp_step_gradient(rows, 1.0, max_grad_norm, tmp_path) - dp_step_gradient(
        neighbour, 1.0, max_grad_norm, tmp_path
    )
    torch.testing.assert_close(difference, expected, atol=1e-6, rtol=1e-4)
    assert difference.norm().item() <= 2 * max_grad_norm / len(rows) * (1 + 1e-4)


def test_user_level_dp_clips_the_mean_of_each_users_pair_gradients(tmp_path):
    """privacy_unit="user", σ = 0: pairs 0 and 1 are one user's, pair 2 another's; the DP gradient is
    (clip_C(mean(g_0, g_1)) + clip_C(g_2)) / (expected users = 2)."""
    module = make_module()
    rows = encode_rows(module.tokenizer)
    loop = per_pair_loop(module, rows)
    users = [(loop[0] + loop[1]) / 2, loop[2]]
    max_grad_norm = 0.5 * min(g.norm().item() for g in users)
    dataset = PreferenceDataset(
        [r["chosen_input_ids"] for r in rows], [r["rejected_input_ids"] for r in rows], ["a", "a", "b"]
    )
    got = dp_step_gradient(dataset, 0.0, max_grad_norm, tmp_path, privacy_unit="user")
    torch.testing.assert_close(got, sum(clipped(g, max_grad_norm) for g in users) / 2, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("epsilon", [None, 8.0], ids=["non_private", "dp_eps8"])
def test_dpo_learns_a_public_preference_rule(tmp_path, epsilon):
    """LoRA DPO, 2 epochs over 500 rule pairs; held-out implicit-reward accuracy and margin rise from 0."""
    datamodule = PreferenceDataModule(
        write_jsonl(tmp_path / "train.jsonl", rule_pairs(500, seed=0)),
        tokenizer="tiny",
        val_file=write_jsonl(tmp_path / "val.jsonl", rule_pairs(100, seed=1)),
        max_length=96,
        batch_size=50,
    )
    L.seed_everything(0)
    module = DPOModule(learning_rate=1e-2, beta=0.5, export_dir=str(tmp_path / "dpo"))
    # Fixed sampling/noise seeds make the test reproducible; real runs keep the default secret seeds.
    callbacks = [] if epsilon is None else [DPCallback(target_epsilon=epsilon, sampling_seed=0, noise_seed=0)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    before = trainer.validate(module, datamodule, verbose=False)[0]
    trainer.fit(module, datamodule)
    after = {k: v.item() for k, v in trainer.callback_metrics.items()}
    print(f"\nε={epsilon or 'inf'}: held-out rewards/accuracies {before['val/rewards/accuracies']:.3f} -> "
          f"{after['val/rewards/accuracies']:.3f}, margins {after['val/rewards/margins']:.3f}")  # fmt: skip
    assert (
        before["val/rewards/accuracies"] == 0.0 and before["val/rewards/margins"] == 0.0
    )  # policy = reference
    assert after["val/rewards/accuracies"] >= 0.8 and after["val/rewards/margins"] > 0.1
    report = json.loads((tmp_path / "dpo" / "privacy.json").read_text())
    assert report["stage"]["loss_type"] == "sigmoid" and report["stage"]["beta"] == 0.5
    assert report["epsilon"] <= epsilon if epsilon is not None else report["epsilon"] == math.inf


def test_export_is_the_policy_as_a_plain_causal_lm(tmp_path, lora_module):
    lora_module.export(tmp_path)
    batch = batch_of(lora_module)
    masks = response_masks(
        batch["chosen_input_ids"],
        batch["chosen_attention_mask"],
        batch["rejected_input_ids"],
        batch["rejected_attention_mask"],
    )
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = lora_module.pair_logprobs(lora_module.model, batch, masks)
        exported = lora_module.pair_logprobs(plain, batch, masks)
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=1e-5)


def test_tiny_config_through_the_cli_spends_the_epsilon_of_dp_accounting(tmp_path):
    export = tmp_path / "dpo" / "model"
    main(["fit", "--config", str(ROOT / "configs/tiny/dpo.yaml"), "--trainer.max_steps=3",
          f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.export_dir={export}", "--trainer.limit_val_batches=1"])  # fmt: skip
    report = json.loads((export / "privacy.json").read_text())
    assert (export / "model.safetensors").is_file() and report["steps"] == 3
    assert report["accountant"] == "prv" and report["stage"]["loss_type"] == "sigmoid"
    event = dp_accounting.PoissonSampledDpEvent(
        report["sample_rate"], dp_accounting.GaussianDpEvent(report["noise_multiplier"])
    )
    independent = pld.PLDAccountant().compose(event, 3).get_epsilon(report["delta"])
    assert report["epsilon"] == pytest.approx(independent, rel=0.03)


def test_starts_from_a_stage1_export_and_records_its_privacy_report(tmp_path):
    tokenizer = build_tiny_tokenizer()
    stage1 = build_tiny_gpt2(tokenizer, seed=7)
    stage1.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    stage1_report = {"differentially_private": True, "epsilon": 4.0, "delta": 1e-5}
    (tmp_path / "privacy.json").write_text(json.dumps(stage1_report))
    module = DPOModule(model=str(tmp_path), use_lora=False)
    for trained in (module.model, module.reference):
        assert all(torch.equal(trained.state_dict()[k], v) for k, v in stage1.state_dict().items())
    assert not any(p.requires_grad for p in module.reference.parameters())
    metadata = module.privacy_metadata()
    assert metadata["inputs"]["model"] == stage1_report and metadata["reference"] == "frozen copy"
    assert DPOModule().privacy_metadata()["inputs"]["model"] is None  # "tiny" has no report

import json
import math
import random

import lightning as L
import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lit_dprl.data.preferences import PreferenceDataModule, collate_preference_batch
from lit_dprl.losses import bradley_terry_loss
from lit_dprl.models import build_tiny_gpt2, build_tiny_tokenizer, position_ids_from_mask
from lit_dprl.privacy import DPCallback
from lit_dprl.rewards import RewardModelScorer
from lit_dprl.stages.reward import PairwiseRewardMetrics, RewardModule

TEXTS = [
    ("Review: the plot", " was great and the actors good", " was bad"),
    ("Q:", " yes", " absolutely not, and here is a much longer reason why"),
    ("A longer prompt about a film that goes on for a while", " lovely", " boring music"),
]

POSITIVE = ["great", "good", "love", "wonderful", "superb"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible"]
FILLER = ["the", "movie", "was", "plot", "actors", "story", "and", "really", "quite", "film", "music"]


def rule_pairs(n: int, seed: int) -> list[dict]:
    """Pairs preferred by a public rule: the same filler sentence with one positive word (chosen) or one
    negative word (rejected) inserted at the same random place."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, where = rng.choices(FILLER, k=6), rng.randrange(7)
        rows.append(
            {
                "prompt": "Review: " + " ".join(rng.choices(FILLER, k=3)),
                "chosen": " " + " ".join([*words[:where], rng.choice(POSITIVE), *words[where:]]),
                "rejected": " " + " ".join([*words[:where], rng.choice(NEGATIVE), *words[where:]]),
            }
        )
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def encode_rows(tokenizer, texts=TEXTS) -> list[dict]:
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [
        {"chosen_input_ids": ids(prompt) + ids(chosen), "rejected_input_ids": ids(prompt) + ids(rejected)}
        for prompt, chosen, rejected in texts
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_module():
    return RewardModule(seed=1)


def test_bt_loss_is_log2_when_chosen_equals_rejected(lora_module):
    rows = [
        {"chosen_input_ids": r["chosen_input_ids"], "rejected_input_ids": r["chosen_input_ids"]}
        for r in encode_rows(lora_module.tokenizer)
    ]
    reward_chosen, reward_rejected = lora_module.pair_rewards(
        collate_preference_batch(rows, lora_module.tokenizer.pad_token_id)
    )
    losses = bradley_terry_loss(reward_chosen, reward_rejected)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0)))


def test_metrics_accuracy_is_one_when_rewards_are_separated():
    metrics = PairwiseRewardMetrics()
    reward_rejected = torch.tensor([-1.0, 0.5, 2.0, 3.0])
    metrics(reward_rejected + 1.0, reward_rejected)
    metrics(torch.tensor([10.0]), torch.tensor([9.0]))
    values = metrics.compute_and_reset()
    assert values["accuracy"] == 1.0 and values["margin"] == pytest.approx(1.0)
    everything = torch.tensor([-1.0, 0.5, 2.0, 3.0, 9.0])
    assert values["reward_rejected_mean"] == pytest.approx(everything.mean().item())
    assert values["reward_rejected_std"] == pytest.approx(everything.std(unbiased=False).item())
    metrics(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert metrics.compute_and_reset()["accuracy"] == 0.5


def test_reward_is_invariant_to_left_padding(lora_module):
    rows = encode_rows(lora_module.tokenizer)
    pad = lora_module.tokenizer.pad_token_id
    batch = collate_preference_batch(rows, pad)
    assert batch["chosen_attention_mask"].eq(0).any(dim=1).sum() == 2  # two of three rows are padded
    with torch.no_grad():
        batched = lora_module(batch["chosen_input_ids"], batch["chosen_attention_mask"])
        singles = [collate_preference_batch([row], pad) for row in rows]
        alone = torch.cat([lora_module(b["chosen_input_ids"], b["chosen_attention_mask"]) for b in singles])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def trainable_parameters(module):
    return [p for p in module.parameters() if p.requires_grad]


def randomise_lora_b(module, seed=0):
    """LoRA starts with B = 0, which makes every lora_A gradient 0; give B values so both are tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_per_pair_gradients_match_a_loop_over_pairs(use_lora):
    module = RewardModule(use_lora=use_lora, seed=2)
    randomise_lora_b(module)
    rows, pad = encode_rows(module.tokenizer), module.tokenizer.pad_token_id
    params = trainable_parameters(module)
    expected = []
    for row in rows:
        module.zero_grad()
        reward_chosen, reward_rejected = module.pair_rewards(collate_preference_batch([row], pad))
        bradley_terry_loss(reward_chosen, reward_rejected).mean().backward()
        expected.append([p.grad.clone() for p in params])
    module.zero_grad()
    hooks = GradSampleHooks(module, loss_reduction="mean")
    try:
        reward_chosen, reward_rejected = module.pair_rewards(collate_preference_batch(rows, pad))
        bradley_terry_loss(reward_chosen, reward_rejected).mean().backward()
        for j, p in enumerate(params):
            assert p.grad_sample.shape[0] == len(rows)  # one gradient per PAIR, not per response
            for i in range(len(rows)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][j], atol=1e-5, rtol=1e-4)
    finally:
        hooks.cleanup()


def clipped_gradient_sum(module, rows, max_grad_norm):
    """``sum_i g_i · min(1, C / ||g_i||)`` over per-pair gradients ``g_i`` from Opacus hooks, and the norms."""
    module.zero_grad()
    hooks = GradSampleHooks(module, loss_reduction="mean")
    try:
        reward_chosen, reward_rejected = module.pair_rewards(
            collate_preference_batch(rows, module.tokenizer.pad_token_id)
        )
        bradley_terry_loss(reward_chosen, reward_rejected).mean().backward()
        per_pair = torch.cat([p.grad_sample.flatten(1) for p in trainable_parameters(module)], dim=1)
    finally:
        hooks.cleanup()
    norms = per_pair.norm(dim=1)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return (factors[:, None] * per_pair).sum(0), norms


def test_removing_one_pair_moves_the_clipped_sum_by_at_most_c():
    module = RewardModule(seed=3)
    randomise_lora_b(module)
    rows = encode_rows(module.tokenizer)
    _, norms = clipped_gradient_sum(module, rows, max_grad_norm=1e9)
    max_grad_norm = 0.5 * norms.min().item()  # clipping binds for every pair
    full, _ = clipped_gradient_sum(module, rows, max_grad_norm)
    for k in range(len(rows)):
        without_k, _ = clipped_gradient_sum(module, rows[:k] + rows[k + 1 :], max_grad_norm)
        assert (full - without_k).norm().item() == pytest.approx(max_grad_norm, rel=1e-4)


@pytest.mark.parametrize("epsilon", [None, 8.0], ids=["non_private", "dp_eps8"])
def test_reward_model_learns_a_public_preference_rule(tmp_path, epsilon):
    """LoRA reward model, 2 epochs over 1,000 rule pairs, accuracy on 200 held-out pairs (chance 0.5)."""
    datamodule = PreferenceDataModule(
        write_jsonl(tmp_path / "train.jsonl", rule_pairs(1000, seed=0)),
        tokenizer="tiny",
        val_file=write_jsonl(tmp_path / "val.jsonl", rule_pairs(200, seed=1)),
        max_length=96,
        batch_size=100,
    )
    L.seed_everything(0)
    module = RewardModule(learning_rate=1e-2, export_dir=str(tmp_path / "rm"))
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
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule)
    accuracy = trainer.callback_metrics["val/accuracy"].item()
    print(f"\nheld-out pairwise accuracy, epsilon={epsilon or 'inf'}: {accuracy:.3f} (chance 0.5)")
    assert accuracy >= 0.7
    if epsilon is not None:
        assert json.loads((tmp_path / "rm" / "privacy.json").read_text())["epsilon"] <= epsilon
    val = rule_pairs(200, seed=1)
    scorer = RewardModelScorer(tmp_path / "rm", batch_size=100)
    prompts = [row["prompt"] for row in val]
    chosen, rejected = (
        scorer(prompts, [r["chosen"] for r in val]),
        scorer(prompts, [r["rejected"] for r in val]),
    )
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(val) == pytest.approx(accuracy)


def test_export_then_plain_transformers_gives_identical_scores(tmp_path):
    module = RewardModule(seed=4)
    batch = collate_preference_batch(encode_rows(module.tokenizer), module.tokenizer.pad_token_id)
    optimizer = module.configure_optimizers()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    bradley_terry_loss(*module.pair_rewards(batch)).mean().backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in module.named_parameters() if p.requires_grad)

    module.export(tmp_path)
    with torch.no_grad():
        expected = module(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.padding_side == "left"
    encoded = tokenizer([prompt + chosen for prompt, chosen, _ in TEXTS], padding=True, return_tensors="pt")
    assert torch.equal(encoded["input_ids"], batch["chosen_input_ids"])
    with torch.no_grad():
        plain = model(**encoded, position_ids=position_ids_from_mask(encoded["attention_mask"])).logits[:, 0]
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    scorer = RewardModelScorer(tmp_path, batch_size=2)
    scores = scorer([prompt for prompt, _, _ in TEXTS], [chosen for _, chosen, _ in TEXTS])
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "reward_config.json").read_text())
    assert config["bias"] == 0.0 and config["padding_side"] == "left" and config["max_length"] == 256


def test_public_reference_bias_centres_reference_rewards(tmp_path):
    references = [{"prompt": prompt, "response": chosen} for prompt, chosen, _ in TEXTS]
    module = RewardModule(seed=5, public_reference_file=write_jsonl(tmp_path / "public.jsonl", references))
    module.export(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    batch = collate_preference_batch(encode_rows(module.tokenizer), module.tokenizer.pad_token_id)
    with torch.no_grad():
        raw = module(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    assert config["bias"] == pytest.approx(raw.mean().item(), abs=1e-5)
    assert "3 public reference rows" in config["bias_source"]
    scores = RewardModelScorer(tmp_path / "rm")(
        [r["prompt"] for r in references], [r["response"] for r in references]
    )
    assert sum(scores) == pytest.approx(0.0, abs=1e-5)


def test_max_length_beyond_the_model_context_is_refused(tmp_path):
    datamodule = PreferenceDataModule(
        write_jsonl(tmp_path / "p.jsonl", rule_pairs(80, 0)), tokenizer="tiny", max_length=512, batch_size=4
    )
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        trainer.fit(RewardModule(), datamodule)


def test_backbone_body_is_copied_from_a_stage1_export(tmp_path):
    tokenizer = build_tiny_tokenizer()
    causal_lm = build_tiny_gpt2(tokenizer, seed=7)
    causal_lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = RewardModule(model=str(tmp_path), use_lora=False, seed=1)
    body = module.model.transformer.state_dict()
    assert body.keys() == causal_lm.transformer.state_dict().keys()
    assert all(torch.equal(body[k], v) for k, v in causal_lm.transformer.state_dict().items())
    assert module.model.config.num_labels == 1 and module.model.config.pad_token_id == tokenizer.pad_token_id

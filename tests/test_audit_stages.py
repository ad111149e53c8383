"""The audit of the DP-DPO and RL (PPO/GRPO) stages: their canaries and statistics, and the command end to end."""

import math

import numpy as np
import pytest
import torch

from lit_dprl.commands.audit import canaries_for
from lit_dprl.commands.audit import main as audit_main
from lit_dprl.commands.audit_canaries import DPOCanaries, PreferenceCanaries
from lit_dprl.commands.audit_prompts import (
    HIT_REWARD,
    MISS_REWARD,
    OUTSIDE_REWARD,
    PlantedReward,
    contrast_statistic,
    target_universe,
)
from lit_dprl.data.preferences import PreferenceDataModule, collate_preference_batch
from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.models import build_tiny_tokenizer
from lit_dprl.stages.dpo import DPOModule

DP_FIXED_NOISE = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=0",
    "--trainer.max_steps=2",
    "--trainer.callbacks.init_args.target_delta=1e-5",
    "--trainer.callbacks.init_args.target_epsilon=null",  # a fixed σ: calibrating it takes the accountant longer
    "--trainer.callbacks.init_args.noise_multiplier=1.0",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def check_dp_audit(audit: dict, canaries: int) -> None:
    """The fields every DP audit has, and the claim it must not exceed."""
    included = np.array(audit["canary_included"])
    assert audit["canaries"] == len(included) == len(audit["canary_scores"]) == canaries
    assert audit["included"] == included.sum() and audit["delta"] == 1e-5
    assert audit["differentially_private"] and audit["planted_bug"] is None and audit["mode"] == "black-box"
    assert audit["privacy_report"]["noise_multiplier"] == 1.0 and audit["privacy_report"]["steps"] == 2
    assert audit["epsilon_claimed"] == pytest.approx(audit["privacy_report"]["epsilon"])
    assert 0 < audit["epsilon_claimed"] < math.inf
    assert 0 <= audit["epsilon_lower_bound"] <= audit["epsilon_claimed"] and not audit["violation"]
    assert np.all(np.isfinite(audit["canary_scores"])) and np.ptp(audit["canary_scores"]) > 0


# ---------------------------------------------------------------------------------------------- DPO
def test_canaries_for_picks_the_statistic_by_the_module():
    data = PreferenceDataModule(
        "lit_dprl/data/fixtures/imdb_preferences.jsonl", tokenizer="tiny", max_length=64
    )
    dpo = DPOModule()
    assert (
        type(canaries_for(data, dpo)) is DPOCanaries
    )  # a DPO module on preference data: not the reward margin

    class RewardLike(torch.nn.Module):
        def pair_rewards(self, batch):
            raise AssertionError("not called")

    assert type(canaries_for(data, RewardLike())) is PreferenceCanaries
    with pytest.raises(ValueError, match=r"DPOModule is audited with DPOCanaries.*PromptDataModule"):
        canaries_for(PromptDataModule(tokenizer="tiny"), dpo)
    with pytest.raises(ValueError, match="supports the sft, reward, dpo and ppo stages"):
        canaries_for(data, torch.nn.Linear(1, 1))


def test_dpo_canary_statistic_is_the_implicit_reward_margin():
    """β[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))], the same as DPO's own rewards/margins."""
    data = PreferenceDataModule(
        "lit_dprl/data/fixtures/imdb_preferences.jsonl", tokenizer="tiny", max_length=64
    )
    data.setup("fit")
    module = DPOModule(beta=0.5)
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: the policy differs from the reference
    kind = canaries_for(data, module)
    rows = kind.make(np.random.default_rng(0), 6)
    margins = kind.statistic(rows)
    _, metrics = module.pair_losses(collate_preference_batch(rows, data.tokenizer.pad_token_id))
    assert np.abs(margins).min() > 0
    assert margins.mean() == pytest.approx(metrics["rewards/margins"].item(), rel=1e-4)


def test_dpo_audit_end_to_end(tmp_path):
    audit = audit_main(["--config", "configs/tiny/dpo.yaml", "--canaries", "16", "--seed", "3", "--out", str(tmp_path),
                        "--", *DP_FIXED_NOISE, "--data.init_args.val_fraction=0.9", "--data.init_args.max_length=64",
                        f"--model.init_args.export_dir={tmp_path / 'model'}"])  # fmt: skip
    check_dp_audit(audit, 16)
    assert audit["stage"] == "lit_dprl.stages.dpo.DPOModule" and "implicit reward margin" in audit["score"]
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------------- RL
def test_target_universe_of_the_byte_tokenizer_is_the_ascii_bytes():
    tokenizer = build_tiny_tokenizer()
    universe = target_universe(tokenizer)
    assert sorted(tokenizer.decode([int(t)]) for t in universe) == [chr(b) for b in range(128)]


def test_planted_reward_scores_canaries_by_their_first_token_and_passes_other_prompts_on():
    tokenizer = build_tiny_tokenizer()
    a, b, high = (tokenizer.convert_tokens_to_ids(c) for c in ("a", "b", "Ã"))  # "Ã": byte 0xC3, outside U
    seen = []

    def stage_reward(prompts, responses):
        seen.append((prompts, responses))
        return [len(r) / 10 for r in responses]

    reward = PlantedReward(stage_reward, tokenizer, {"xyz": frozenset({a})}, universe=frozenset({a, b}))
    prompts = ["xyz", "review", "xyz", "xyz", "film"]
    responses = ["ab", "good", "ba", "é!", "bad"]  # "é" re-encodes to bytes C3 A9: first token outside U
    assert tokenizer("é!", add_special_tokens=False)["input_ids"][0] == high
    assert reward(prompts, responses) == [HIT_REWARD, 0.4, MISS_REWARD, OUTSIDE_REWARD, 0.3]
    assert seen == [(["review", "film"], ["good", "bad"])]  # the stage's reward sees the ordinary rows only
    broken = PlantedReward(lambda p, r: [1.0], tokenizer, {}, universe=frozenset({a}))
    with pytest.raises(ValueError, match="returned 1 values for 2 responses"):
        broken(["p", "q"], ["r", "s"])


def test_contrast_statistic_subtracts_the_mean_over_control_prompts():
    """s_i = log π(T_i | x_i) − mean_k log π(T_i | c_k), log π(T | x) = log Σ_{t ∈ T} q(t | x)."""
    canary = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]).log()
    control = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]]).log()
    targets = torch.tensor([[True, False, False], [False, True, True]])
    expected = [
        math.log(0.7) - (math.log(0.5) + math.log(0.2)) / 2,
        math.log(0.9) - (math.log(0.5) + math.log(0.8)) / 2,
    ]
    assert contrast_statistic(canary, control, targets).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("config", ["configs/tiny/grpo.yaml", "configs/tiny/ppo.yaml"])
def test_rl_audit_end_to_end(tmp_path, config):
    audit = audit_main(["--config", config, "--canaries", "16", "--seed", "4", "--out", str(tmp_path), "--",
                        *DP_FIXED_NOISE, "--data.init_args.max_train_prompts=32", "--data.init_args.batch_size=16",
                        "--model.init_args.min_new_tokens=1", "--model.init_args.max_new_tokens=1",
                        f"--model.init_args.export_dir={tmp_path / 'model'}"])  # fmt: skip
    check_dp_audit(audit, 16)
    assert audit["stage"] == "lit_dprl.stages.ppo.PPOModule" and "log π(T | canary prompt)" in audit["score"]
    assert audit["training_rows"] == 32 + audit["included"]
    assert not (tmp_path / "model").exists()

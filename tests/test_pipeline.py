"""The pipeline: artifacts, per-stage ε against the accountant, reuse, composition, held-out evaluation."""

from __future__ import annotations

import json

import pytest

from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.pipeline import Evaluation, combined_privacy_report, held_out_prompts, main
from lit_dprl.privacy.accounting import epsilon_after


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline")
    result = main(["--config", "configs/pipeline/tiny.yaml", f"--run_dir={run_dir}"])
    return run_dir, result


def test_pipeline_writes_every_artifact(tiny_run):
    run_dir, result = tiny_run
    for stage in ("sft", "ppo"):
        assert (run_dir / stage / "model" / "config.json").is_file()
        assert (run_dir / stage / "model" / "privacy.json").is_file()
    for name in ("privacy_report.json", "evaluation.json", "evaluation.md", "samples.md", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert set(result["evaluation"]) == {"pretrained", "sft", "aligned"}
    assert result["evaluation"]["sft"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)


def test_stage_epsilon_matches_the_accountant(tiny_run):
    run_dir, result = tiny_run
    for stage in ("sft", "ppo"):
        report = json.loads((run_dir / stage / "model" / "privacy.json").read_text())
        recomputed = epsilon_after(
            accountant=report["accountant"], batch_noise=report["batch_noise_multiplier"],
            sample_rate=report["sample_rate"], batches=report["steps"], delta=report["delta"],
        )  # fmt: skip
        assert report["epsilon"] == pytest.approx(recomputed, rel=1e-6)
        assert report["epsilon"] <= 8.0
    privacy = result["privacy"]
    assert privacy["composition"].startswith("parallel")
    assert privacy["epsilon"] == max(s["epsilon"] for s in privacy["stages"].values())


def test_finished_stages_are_reused(tiny_run, capsys):
    run_dir, _ = tiny_run
    before = (run_dir / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    main(["--config", "configs/pipeline/tiny.yaml", f"--run_dir={run_dir}", "--evaluation=null"])
    assert "sft: reusing" in capsys.readouterr().out
    assert (run_dir / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_evaluation_prompts_are_held_out():
    splits = split_imdb(load_imdb_reviews(), seed=0)
    evaluation = Evaluation(max_prompts=200)
    prompts = held_out_prompts(evaluation)
    test_reviews = splits["test"]["text"][:200]
    assert all(review.startswith(prompt) for prompt, review in zip(prompts, test_reviews, strict=True))
    private = set(splits["sft"]["text"]) | set(splits["ppo"]["text"])
    assert not private & set(test_reviews)
    # the PPO stage's training prompts are prefixes of D3 reviews, its validation prompts of test reviews
    data = PromptDataModule(tokenizer="tiny", max_train_prompts=200, max_val_prompts=50)
    train, val = data.raw_prompts()
    assert all(r.startswith(p) for p, r in zip(train, splits["ppo"]["text"][:200], strict=True))
    assert all(r.startswith(p) for p, r in zip(val, splits["test"]["text"][:50], strict=True))


def test_overlapping_users_compose_sequentially():
    report = {"epsilon": 2.0, "delta": 1e-5, "steps": 100, "sample_rate": 0.01, "noise_multiplier": 1.0,
              "batch_noise_multiplier": 1.0, "accountant": "rdp"}  # fmt: skip
    parallel = combined_privacy_report({"a": report, "b": report}, overlapping_users=False)
    sequential = combined_privacy_report({"a": report, "b": report}, overlapping_users=True)
    assert parallel["epsilon"] == 2.0
    both = epsilon_after(accountant="rdp", batch_noise=1.0, sample_rate=0.01, batches=200, delta=1e-5)
    assert sequential["epsilon"] == pytest.approx(both, rel=1e-6)
    assert sequential["composition"].startswith("sequential")


def test_rlhf_path_runs_three_dp_stages_on_disjoint_imdb_sets(tmp_path):
    result = main(["--config", "configs/pipeline/imdb_rlhf_tiny.yaml", f"--run_dir={tmp_path}"])
    assert set(result["privacy"]["stages"]) == {"sft", "reward", "ppo"}
    assert all(s["epsilon"] <= 8.0 for s in result["privacy"]["stages"].values())
    assert (tmp_path / "reward" / "model" / "reward_config.json").is_file()
    assert "aligned" in result["evaluation"]


def test_reward_pairs_come_from_d2_only():
    from lit_dprl.data.preferences import imdb_preference_pairs

    splits = split_imdb(load_imdb_reviews(), seed=0, reward_fraction=0.2)
    train, val = imdb_preference_pairs(seed=0, reward_fraction=0.2)
    d2 = " ".join(" ".join(text.split()) for text in splits["reward"]["text"])
    test = " ".join(" ".join(text.split()) for text in splits["test"]["text"])
    assert all(row["chosen"].strip() in d2 and row["rejected"].strip() in d2 for row in train[:200])
    assert all(row["chosen"].strip() in test for row in val[:200])
    d1_d3 = set(splits["sft"]["text"]) | set(splits["ppo"]["text"])
    assert not d1_d3 & (set(splits["reward"]["text"]) | set(splits["test"]["text"]))

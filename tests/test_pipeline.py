"""The pipeline: artifacts, per-stage ε against the accountant, reuse, composition, held-out evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from lit_dprl.commands.pipeline import main, print_summary, run_pipeline
from lit_dprl.commands.pipeline_evaluation import Evaluation, held_out_prompts
from lit_dprl.commands.pipeline_privacy import stage_report
from lit_dprl.commands.pipeline_stages import DATA_SPLIT_FILE, Stage
from lit_dprl.data.imdb import imdb_provenance, load_imdb_reviews, split_imdb
from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.privacy.accounting import epsilon_after
from lit_dprl.privacy.composition import combined_privacy_report
from lit_dprl.privacy.report import EXPORT_MARKER


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline")
    result = main(["--config", "configs/tiny/pipeline.yaml", f"--run_dir={run_dir}"])
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
    assert all(r["fluency_perplexity"] > 1 for r in result["evaluation"].values())
    assert "perplexity under tiny" in (run_dir / "evaluation.md").read_text()


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
    assert privacy["composition"].startswith("parallel")  # proven from the recorded data splits
    assert privacy["epsilon"] == max(s["epsilon"] for s in privacy["stages"].values())
    splits = {name: stage["data_split"] for name, stage in privacy["stages"].items()}
    assert (splits["sft"]["split"], splits["ppo"]["split"]) == ("sft", "ppo")
    assert splits["sft"]["key_fingerprint"] == splits["ppo"]["key_fingerprint"]


def test_finished_stages_are_reused(tiny_run, capsys):
    run_dir, _ = tiny_run
    before = (run_dir / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    main(["--config", "configs/tiny/pipeline.yaml", f"--run_dir={run_dir}", "--evaluation=null"])
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


def dp_report(split: str, epsilon: float = 2.0, **fractions) -> dict:
    return {"epsilon": epsilon, "delta": 1e-5, "steps": 100, "sample_rate": 0.01, "noise_multiplier": 1.0,
            "batch_noise_multiplier": 1.0, "accountant": "rdp",
            "data_split": imdb_provenance(split, **fractions)}  # fmt: skip


def test_parallel_composition_only_when_the_provenance_proves_disjoint_splits():
    parallel = combined_privacy_report(
        {"a": dp_report("sft"), "b": dp_report("ppo")}, overlapping_users=False
    )
    assert parallel["composition"].startswith("parallel") and parallel["epsilon"] == 2.0
    both = epsilon_after(accountant="rdp", batch_noise=1.0, sample_rate=0.01, batches=200, delta=1e-5)
    unproven = {
        "same split": {"a": dp_report("sft"), "b": dp_report("sft")},
        "different fractions": {"a": dp_report("sft"), "b": dp_report("ppo", reward_fraction=0.2)},
        "different key": {"a": dp_report("sft"), "b": dp_report("ppo", seed=1)},
        "no provenance": {"a": dp_report("sft"), "b": {**dp_report("ppo"), "data_split": None}},
    }
    for why, reports in unproven.items():
        sequential = combined_privacy_report(reports, overlapping_users=False)
        assert sequential["composition"].startswith("sequential"), why
        assert sequential["epsilon"] == pytest.approx(both, rel=1e-6), why
    forced = combined_privacy_report({"a": dp_report("sft"), "b": dp_report("ppo")}, overlapping_users=True)
    assert forced["composition"].startswith("sequential") and forced["epsilon"] == pytest.approx(
        both, rel=1e-6
    )


def test_a_stage_without_dp_on_private_data_makes_epsilon_infinite(tmp_path):
    non_private = {**dp_report("ppo", epsilon=math.inf), "differentially_private": False}
    for overlapping in (False, True):
        report = combined_privacy_report({"sft": dp_report("sft"), "ppo": non_private}, overlapping)
        assert report["epsilon"] == math.inf and report["differentially_private"] is False
        assert "ε = ∞: ppo trained on private data without DP" in report["composition"]
    export = tmp_path / "model"
    export.mkdir()
    (export / DATA_SPLIT_FILE).write_text(json.dumps(imdb_provenance("ppo")))
    assert stage_report(export)["epsilon"] == math.inf  # no privacy.json at all
    (export / "privacy.json").write_text(json.dumps({"epsilon": 3.0, "differentially_private": False}))
    assert stage_report(export)["epsilon"] == math.inf
    (export / "privacy.json").write_text(json.dumps({**dp_report("sft")}))
    with pytest.raises(ValueError, match="does not describe this model"):
        stage_report(export)  # the report names another split than the stage trained on


class FakeData:
    def __init__(self, provenance):
        self.provenance = provenance

    def split_provenance(self):
        return self.provenance


def fake_train(provenance_of: dict[str, dict]):
    """Stands in for lit-dprl fit: writes the export, and a DP report unless the callbacks are emptied."""

    def train(args):
        export = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--model.init_args.export_dir=")))
        export.mkdir(parents=True, exist_ok=True)
        (export / "config.json").write_text("{}")
        (export / EXPORT_MARKER).write_text("{}")  # real stages write it last (privacy.report.write_export)
        split = provenance_of[args[2]]
        if "--trainer.callbacks=[]" not in args:
            (export / "privacy.json").write_text(
                json.dumps({**dp_report(split["split"]), "data_split": split})
            )
        return SimpleNamespace(datamodule=FakeData(split))

    return train


def test_pipeline_composes_non_private_stages_as_infinity_and_drops_stale_reports(
    tmp_path, monkeypatch, capsys
):
    provenance = {"sft.yaml": imdb_provenance("sft"), "ppo.yaml": imdb_provenance("ppo")}
    monkeypatch.setattr("lit_dprl.commands.fit.main", fake_train(provenance))
    stages = [Stage("sft", "sft.yaml"), Stage("ppo", "ppo.yaml")]
    private = run_pipeline(str(tmp_path), stages)["privacy"]
    assert private["epsilon"] == 2.0 and private["composition"].startswith("parallel")
    no_dp = Stage("ppo", "ppo.yaml", args=["--trainer.callbacks=[]"])
    result = run_pipeline(str(tmp_path), [stages[0], no_dp], rerun=["ppo"])  # the old DP report must go
    assert (
        result["privacy"]["epsilon"] == math.inf and result["privacy"]["stages"]["ppo"]["epsilon"] == math.inf
    )
    assert json.loads((tmp_path / "privacy_report.json").read_text())["epsilon"] == math.inf
    print_summary(result)
    assert "(ε=∞," in capsys.readouterr().out


def test_rerun_of_a_stage_reruns_every_stage_that_consumed_it(tmp_path, monkeypatch, capsys):
    provenance = {
        c: imdb_provenance(s) for c, s in [("sft.yaml", "sft"), ("ppo.yaml", "ppo"), ("rm.yaml", "reward")]
    }
    monkeypatch.setattr("lit_dprl.commands.fit.main", fake_train(provenance))
    stages = [
        Stage("sft", "sft.yaml"),
        Stage("reward", "rm.yaml"),
        Stage("ppo", "ppo.yaml", inputs={"model.init_args.model": "sft"}),
    ]
    run_pipeline(str(tmp_path), stages)
    capsys.readouterr()
    run_pipeline(str(tmp_path), stages, rerun=["sft"])
    out = capsys.readouterr().out
    assert "reward: reusing" in out  # does not consume sft
    assert "ppo: reusing" not in out and "ppo: lit-dprl fit" in out  # trained from the old sft export


def test_a_stage_marked_public_must_train_on_public_data(tmp_path, monkeypatch):
    provenance = {"classifier.yaml": imdb_provenance("public"), "leaky.yaml": imdb_provenance("sft")}
    monkeypatch.setattr("lit_dprl.commands.fit.main", fake_train(provenance))
    args = ["--trainer.callbacks=[]"]
    result = run_pipeline(str(tmp_path), [Stage("classifier", "classifier.yaml", args=args, public=True)])
    assert result["privacy"]["public_stages"]["classifier"]["split"] == "public"
    assert result["privacy"]["epsilon"] == 0.0  # nothing private was trained on
    with pytest.raises(ValueError, match=r"stage 'leaky' is marked public: true, but its data is not public"):
        run_pipeline(str(tmp_path), [Stage("leaky", "leaky.yaml", args=args, public=True)])


def test_rlhf_path_runs_three_dp_stages_on_disjoint_imdb_sets(tmp_path):
    result = main(["--config", "configs/tiny/pipeline_rlhf.yaml", f"--run_dir={tmp_path}"])
    assert set(result["privacy"]["stages"]) == {"sft", "reward", "ppo"}
    assert result["privacy"]["composition"].startswith("parallel")  # D1, D2, D3 of one keyed partition
    assert all(s["epsilon"] <= 8.0 for s in result["privacy"]["stages"].values())
    assert (tmp_path / "reward" / "model" / "reward_config.json").is_file()
    assert "aligned" in result["evaluation"]


def test_dpo_path_runs_dp_sft_then_dp_dpo_on_the_rlhf_paths_d2(tmp_path):
    result = main(["--config", "configs/tiny/pipeline_dpo.yaml", f"--run_dir={tmp_path}"])
    stages = result["privacy"]["stages"]
    assert set(stages) == {"sft", "dpo"} and result["privacy"]["composition"].startswith("parallel")
    assert stages["dpo"]["data_split"]["split"] == "reward"  # D2: the pairs the RLHF path's reward model uses
    assert stages["sft"]["data_split"]["split"] == "sft"
    assert all(s["epsilon"] <= 8.0 for s in stages.values())
    assert (tmp_path / "dpo" / "model" / "README.md").is_file()  # the model card
    assert set(result["evaluation"]) == {"sft", "aligned"}


def test_reward_pairs_come_from_d2_and_public_partners_only():
    from lit_dprl.data.labelled_pairs import imdb_preference_pairs

    splits = split_imdb(load_imdb_reviews(), seed=0, reward_fraction=0.2)
    train, val = imdb_preference_pairs(seed=0, reward_fraction=0.2)
    joined = {name: " ".join(part["text"]) for name, part in splits.items()}
    d2_units = set(splits["reward"]["unit_id"])
    assert len(train) > 3000 and {row["unit_id"] for row in train} <= d2_units  # one pair per D2 review
    for row in train[:200]:
        sides = [row["chosen"].strip(), row["rejected"].strip()]
        assert sorted(name for side in sides for name in ("reward", "public") if side in joined[name]) == [
            "public",
            "reward",
        ]
        assert not any(side in joined[name] for side in sides for name in ("sft", "ppo", "test"))
    assert {row["unit_id"] for row in val} <= set(splits["test"]["unit_id"])


def test_held_out_prompts_from_a_local_file(tmp_path):
    path = tmp_path / "test_posts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"POST: {i}\n\nTL;DR:", "label": "x"}) + "\n" for i in range(5))
    )
    assert held_out_prompts(Evaluation(source=str(path), max_prompts=2)) == [
        "POST: 0\n\nTL;DR:",
        "POST: 1\n\nTL;DR:",
    ]
    with pytest.raises(ValueError, match="has no column 'query'"):
        held_out_prompts(Evaluation(source=str(path), prompt_field="query"))

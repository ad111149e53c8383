"""The privacy-utility table's arithmetic and the sweep's DP override."""

import json
import math

import pytest
import yaml

from lit_dprl.commands.sweep import dp_callbacks_arg, plot, summarise, write_table


def evaluation(pretrained, sft, aligned, epsilon=1.0):
    """One pipeline result: its evaluation and the ε its privacy report gives."""
    return {
        "evaluation": {
            "pretrained": {"reward_mean": pretrained},
            "sft": {"reward_mean": sft},
            "aligned": {"reward_mean": aligned, "kl_to_reference": 0.5},
        },
        "privacy": {"epsilon": epsilon},
    }


def test_table_reports_the_share_of_the_non_private_gain(tmp_path):
    results = {
        1.0: [evaluation(-0.3, 0.0, 0.6, 0.98), evaluation(-0.3, 0.1, 0.5, 0.99)],
        math.inf: [evaluation(-0.3, 0.2, 1.2, math.inf), evaluation(-0.3, 0.2, 1.2, math.inf)],
    }
    rows = summarise(results)
    assert rows["1"]["gain_kept"] == pytest.approx(0.5 / 1.0)
    assert rows["inf"]["gain_kept"] == pytest.approx(1.0)
    assert rows["0"]["aligned"][0] == pytest.approx(-0.3)
    assert rows["1"]["aligned"] == pytest.approx((0.55, math.sqrt(0.005)))
    table = write_table(rows, tmp_path)
    assert "| 1 | 0.990 | 0.050 ± 0.071 | 0.550 ± 0.071 | 0.500 | 50 % | 2 |" in table
    assert "| ∞ (non-private) | ∞ | 0.200 ± 0.000 | 1.200 ± 0.000 |" in table  # private data, no DP: ε = ∞
    plot(rows, tmp_path)
    assert (tmp_path / "reward_vs_epsilon.png").stat().st_size > 0


def test_dp_override_per_epsilon():
    assert dp_callbacks_arg(math.inf, 1.0) == "--trainer.callbacks=[]"
    callbacks = json.loads(dp_callbacks_arg(4.0, 0.5).split("=", 1)[1])
    assert callbacks == [
        {
            "class_path": "lit_dprl.privacy.DPCallback",
            "init_args": {"target_epsilon": 4.0, "max_grad_norm": 0.5},
        }
    ]


def test_tiny_sweep_runs_private_and_non_private_pipelines(tmp_path):
    from lit_dprl.commands.sweep import main

    clip = "--max_grad_norm={sft: 1.0, ppo: 0.25}"  # one clipping norm per private stage
    rows = main(["--config", "configs/tiny/sweep.yaml", f"--run_dir={tmp_path}", clip])
    assert set(rows) == {"0", "4", "inf"}
    private = json.loads((tmp_path / "eps-4_seed-0" / "privacy_report.json").read_text())
    assert private["epsilon"] <= 4.0 and set(private["stages"]) == {"sft", "ppo"}
    for stage, norm in (("sft", 1.0), ("ppo", 0.25)):
        report = next((tmp_path / "eps-4_seed-0" / stage).rglob("privacy.json"))
        assert json.loads(report.read_text())["max_grad_norm"] == norm
    non_private = json.loads((tmp_path / "eps-inf_seed-0" / "privacy_report.json").read_text())
    assert non_private["epsilon"] == math.inf and set(non_private["stages"]) == {"sft", "ppo"}
    assert "ε = ∞: sft, ppo trained on private data without DP" in non_private["composition"]
    assert "| ∞ (non-private) | ∞ |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "table.md").is_file() and (tmp_path / "reward_vs_epsilon.png").is_file()


def test_sweep_refuses_a_clipping_norm_map_that_misses_a_private_stage(tmp_path):
    from lit_dprl.commands.sweep import main

    with pytest.raises(ValueError, match=r"no clipping norm for the private stage\(s\) \['ppo'\]"):
        main(["--config", "configs/tiny/sweep.yaml", f"--run_dir={tmp_path}", "--max_grad_norm={sft: 1.0}"])
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_sweep_refuses_to_share_a_private_stage(tmp_path):
    from lit_dprl.commands.sweep import main

    with pytest.raises(ValueError, match=r"shared stage\(s\) \['sft'\] are not public"):
        main(["--config", "configs/tiny/sweep.yaml", f"--run_dir={tmp_path}", "--shared_stages=[sft]"])
    assert not any(tmp_path.iterdir())


def test_shared_public_stages_feed_every_run_and_its_baselines(tmp_path):
    """A public pretraining stage shared by all runs: SFT starts from it, the evaluation's "pretrained" row is it."""
    from lit_dprl.commands.sweep import main

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        """
run_dir: unused
stages:
  - {name: pretrain, config: configs/tiny/pretrain.yaml, public: true}
  - name: sft
    config: configs/tiny/sft.yaml
    args: ["--trainer.max_steps=2"]
    inputs: {model.init_args.model: pretrain}
  - name: ppo
    config: configs/tiny/ppo.yaml
    args: ["--trainer.max_steps=2"]
    inputs: {model.init_args.model: sft}
evaluation:
  policy: ppo
  baselines: {pretrained: pretrain, sft: sft}
  reward_function: lit_dprl.rewards:vowel_fraction
  max_prompts: 8
  max_new_tokens: 6
"""
    )
    args = ["--pipeline", str(pipeline), f"--run_dir={tmp_path / 'sweep'}", "--epsilons=[4.0]", "--seeds=[0]"]
    rows = main([*args, "--shared_stages=[pretrain]"])
    assert set(rows) == {"0", "4"}
    run = tmp_path / "sweep" / "eps-4_seed-0"
    shared = tmp_path / "sweep" / "shared" / "pretrain" / "model"
    assert (shared / "config.json").is_file() and not (run / "pretrain").exists()
    sft_config = yaml.safe_load(next((run / "sft").rglob("hparams.yaml")).read_text())
    assert sft_config["model"] == str(shared)
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["pretrained"]["policy"] == str(shared)


def with_gain(result, seed, gain, stderr, points):
    """``result`` with its seed and the evaluation's paired gain of aligned over SFT."""
    result["evaluation"]["aligned"]["gain"] = {
        "over": "sft",
        "reward": gain,
        "reward_stderr": stderr,
        "positive_share_points": points,
    }
    return {**result, "seed": seed}


def test_table_lists_each_seeds_gain_with_its_paired_standard_error(tmp_path):
    results = {
        1.0: [
            with_gain(evaluation(-0.3, 0.0, 0.6), 0, 0.6, 0.05, 20.0),
            with_gain(evaluation(-0.3, 0.1, 0.5), 1, 0.4, 0.06, 12.5),
        ],
        math.inf: [with_gain(evaluation(-0.3, 0.2, 1.2, math.inf), 0, 1.0, 0.07, 30.0)],
    }
    table = write_table(summarise(results), tmp_path)
    assert "| 1 | 0 | +0.600 ± 0.050 | +20.0 |" in table
    assert "| 1 | 1 | +0.400 ± 0.060 | +12.5 |" in table
    assert "| ∞ | 0 | +1.000 ± 0.070 | +30.0 |" in table


def test_table_only_rebuilds_the_table_from_finished_runs(tmp_path):
    from lit_dprl.commands.sweep import main

    finished = with_gain(evaluation(-0.3, 0.0, 0.6, 0.99), 0, 0.6, 0.05, 20.0)
    (tmp_path / "eps-1_seed-0").mkdir()
    (tmp_path / "eps-1_seed-0" / "summary.json").write_text(json.dumps(finished))
    rows = main(["--run_dir", str(tmp_path), "--pipeline", "unused.yaml", "--epsilons", "[1.0, 4.0]",
                 "--seeds", "[0, 1]", "--table_only", "true"])  # fmt: skip
    assert list(rows) == ["0", "1"] and rows["1"]["seeds"] == 1  # ε = 4 and seed 1 never ran
    assert "| 1 | 0 | +0.600 ± 0.050 | +20.0 |" in (tmp_path / "table.md").read_text()
    with pytest.raises(FileNotFoundError, match="no finished run"):
        main(["--run_dir", str(tmp_path / "empty"), "--pipeline", "unused.yaml", "--table_only", "true"])

"""The whole pipeline from one YAML: stage 1 → 2 → 3 (each a ``train.py`` config), a combined privacy
report and the evaluation of the aligned policy on held-out prompts.

    python pipeline.py --config configs/pipeline/imdb_demo.yaml
    python pipeline.py --config configs/pipeline/imdb_demo.yaml --rerun '[ppo]'   # redo one stage

Each stage exports its model to ``<run_dir>/<stage>/model`` (with its ``privacy.json``); a later stage takes
an earlier stage's export through ``inputs`` (e.g. PPO's ``model.init_args.model`` ← ``sft``). A finished
stage (its export exists) is reused unless named in ``rerun``.

Privacy: the stages' private sets are disjoint by user when they come from the same seeded split
(``lit_dprl.data.splits``), so the guarantee is the parallel composition of the stages: the largest ε and
δ of any stage (Wu et al. §4). With ``overlapping_users: true`` (one user may be in several stages) the
stages compose sequentially instead: one accountant over all stages' mechanisms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_dprl.evaluation import evaluate_policy, save_json, write_markdown_samples
from lit_dprl.privacy.accounting import make_accountant

PRIVACY_FILE = "privacy.json"


@dataclass
class Stage:
    """One training stage.

    Args:
        name: Stage name; its model is exported to ``<run_dir>/<name>/model``.
        config: A ``train.py fit`` YAML.
        args: Extra command-line overrides for that config (e.g. ``--trainer.max_steps=10``).
        inputs: Config keys set to an earlier stage's exported model, e.g.
            ``{model.init_args.model: sft, data.init_args.tokenizer: sft}``, or to a model directory path.
        public: The stage trains on public data only (no DP; not part of the privacy report).
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    public: bool = False


@dataclass
class Evaluation:
    """Evaluation of the final policy and baselines on held-out prompts.

    Args:
        policy: Stage whose exported model is the aligned policy.
        baselines: Extra rows: label → a stage name or a model source (e.g. ``pretrained: smollm2``).
        reference: Stage (or model source) for the KL column, normally the SFT model.
        reward_stage: Stage (or directory) of a public sequence classifier used as the reward.
        reward_label: The classifier's label whose logit is the reward.
        reward_function: Or a Python callable ``package.module:function`` as the reward.
        reward_model: Or a stage (or directory) of a stage-2 reward model (RLHF path).
        source: Held-out prompts: "imdb" (first words of reviews of the IMDb test split).
        max_prompts: Number of held-out prompts.
        min_prompt_words: Fewest words per IMDb prompt.
        max_prompt_words: Most words per IMDb prompt.
        seed: The data-split seed of the stages (fixes which reviews are held out).
        temperature: Sampling temperature.
        min_new_tokens: Fewest response tokens.
        max_new_tokens: Most response tokens.
    """

    policy: str = "ppo"
    baselines: dict[str, str] = field(default_factory=dict)
    reference: str | None = "sft"
    reward_stage: str | None = None
    reward_label: int = 1
    reward_function: str | None = None
    reward_model: str | None = None
    source: str = "imdb"
    max_prompts: int = 64
    min_prompt_words: int = 2
    max_prompt_words: int = 6
    seed: int = 0
    temperature: float = 1.0
    min_new_tokens: int = 4
    max_new_tokens: int = 16


def stage_dir(run_dir: Path, name: str) -> Path:
    return run_dir / name / "model"


def is_finished(run_dir: Path, stage: Stage) -> bool:
    """A stage is finished once its export (and, for a private stage, its privacy report) exists."""
    export = stage_dir(run_dir, stage.name)
    return (export / "config.json").is_file() and (stage.public or (export / PRIVACY_FILE).is_file())


def stage_command(run_dir: Path, stage: Stage, stages: dict[str, Stage]) -> list[str]:
    """The ``train.py`` arguments that run ``stage`` inside ``run_dir``."""
    args = ["fit", "--config", stage.config, *stage.args]
    for key, source in stage.inputs.items():
        if source not in stages and not Path(source).is_dir():
            raise ValueError(
                f"stage {stage.name!r}: input {key}={source!r} is neither a stage nor a directory"
            )
        args.append(f"--{key}={resolve_model(run_dir, source, stages)}")
    args += [
        f"--model.init_args.export_dir={stage_dir(run_dir, stage.name)}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--trainer.logger.init_args.name={stage.name}",
    ]
    return args


def combined_privacy_report(reports: dict[str, dict[str, Any]], overlapping_users: bool) -> dict[str, Any]:
    """The pipeline's guarantee from the stages' ``privacy.json`` reports.

    Disjoint users: parallel composition, (max ε, max δ). Overlapping users: sequential composition of
    every stage's Poisson-sampled Gaussian steps in one accountant (the first stage's), at the smallest δ.
    """
    if not reports:
        return {"composition": "none", "epsilon": 0.0, "delta": 0.0, "stages": {}}
    summary = {
        name: {k: r[k] for k in ("epsilon", "delta", "steps", "sample_rate", "noise_multiplier")}
        for name, r in reports.items()
    }
    if not overlapping_users:
        return {
            "composition": "parallel (stages train on disjoint users)",
            "epsilon": max(r["epsilon"] for r in reports.values()),
            "delta": max(r["delta"] for r in reports.values()),
            "stages": summary,
        }
    accountant_name = next(iter(reports.values()))["accountant"]
    accountant = make_accountant(accountant_name)
    accountant.history = [
        (r["batch_noise_multiplier"], r["sample_rate"], r["steps"]) for r in reports.values()
    ]
    delta = min(r["delta"] for r in reports.values())
    return {
        "composition": f"sequential (users may appear in several stages; {accountant_name} accountant)",
        "epsilon": float(accountant.get_epsilon(delta=delta)),
        "delta": delta,
        "stages": summary,
    }


def held_out_prompts(evaluation: Evaluation) -> list[str]:
    """Prompts from the held-out test split only (never a training example of any stage)."""
    if evaluation.source != "imdb":
        raise ValueError(f"evaluation.source {evaluation.source!r} is not supported; use 'imdb'")
    from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
    from lit_dprl.data.prompts import first_words

    test = split_imdb(load_imdb_reviews(), seed=evaluation.seed)["test"]
    texts = test["text"][: evaluation.max_prompts]
    return first_words(
        list(texts), evaluation.min_prompt_words, evaluation.max_prompt_words, seed=evaluation.seed + 1
    )


def resolve_model(run_dir: Path, name_or_source: str, stages: dict[str, Stage]) -> str:
    return str(stage_dir(run_dir, name_or_source)) if name_or_source in stages else name_or_source


def evaluate(run_dir: Path, evaluation: Evaluation, stages: dict[str, Stage]) -> dict[str, Any]:
    """Evaluate the policy and the baselines; write ``evaluation.json`` and Markdown tables."""
    from lit_dprl.rewards import SequenceClassifierReward, load_reward_callable

    if evaluation.reward_stage is not None:
        classifier = resolve_model(run_dir, evaluation.reward_stage, stages)
        reward = SequenceClassifierReward(classifier, label=evaluation.reward_label)
    elif evaluation.reward_function is not None:
        reward = load_reward_callable(evaluation.reward_function)
    elif evaluation.reward_model is not None:
        from lit_dprl.stages.reward import RewardModelScorer

        reward = RewardModelScorer(resolve_model(run_dir, evaluation.reward_model, stages))
    else:
        raise ValueError("evaluation needs reward_stage, reward_function or reward_model")
    prompts = held_out_prompts(evaluation)
    reference = resolve_model(run_dir, evaluation.reference, stages) if evaluation.reference else None
    rows = {**evaluation.baselines, "aligned": evaluation.policy}
    results = {}
    for label, model in rows.items():
        results[label] = evaluate_policy(
            resolve_model(run_dir, model, stages),
            prompts,
            reward,
            reference=reference,
            temperature=evaluation.temperature,
            min_new_tokens=evaluation.min_new_tokens,
            max_new_tokens=evaluation.max_new_tokens,
            seed=evaluation.seed,
        )
    save_json(results, run_dir / "evaluation.json")
    lines = ["| model | mean reward | std | KL to reference |", "|---|---|---|---|"]
    for label, r in results.items():
        kl = f"{r['kl_to_reference']:.3f}" if "kl_to_reference" in r else "–"
        lines.append(f"| {label} | {r['reward_mean']:.3f} | {r['reward_std']:.3f} | {kl} |")
    (run_dir / "evaluation.md").write_text("\n".join(lines) + "\n")
    write_markdown_samples(results["aligned"], run_dir / "samples.md")
    return results


def run_pipeline(
    run_dir: str,
    stages: list[Stage],
    evaluation: Evaluation | None = None,
    overlapping_users: bool = False,
    rerun: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every stage, then write the privacy report and the evaluation into ``run_dir``."""
    from lit_dprl.cli import main as train

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise ValueError("stage names must be unique")
    rerun = set(rerun or [])
    unknown = rerun - set(by_name)
    if unknown:
        raise ValueError(f"rerun names unknown stages {sorted(unknown)}; stages are {list(by_name)}")
    for stage in stages:
        if is_finished(root, stage) and stage.name not in rerun:
            print(f"[pipeline] {stage.name}: reusing {stage_dir(root, stage.name)}")
            continue
        print(f"[pipeline] {stage.name}: python train.py {' '.join(stage_command(root, stage, by_name))}")
        train(stage_command(root, stage, by_name))
        if not is_finished(root, stage):
            raise RuntimeError(
                f"stage {stage.name!r} ended without writing {stage_dir(root, stage.name)}"
                + ("" if stage.public else f" and its {PRIVACY_FILE} (is a DPCallback attached?)")
            )
    reports = {
        s.name: json.loads((stage_dir(root, s.name) / PRIVACY_FILE).read_text())
        for s in stages
        if not s.public
    }
    privacy = combined_privacy_report(reports, overlapping_users)
    save_json(privacy, root / "privacy_report.json")
    result: dict[str, Any] = {"privacy": privacy}
    if evaluation is not None:
        result["evaluation"] = evaluate(root, evaluation, by_name)
    save_json(result, root / "summary.json")
    return result


def print_summary(result: dict[str, Any]) -> None:
    privacy = result["privacy"]
    print(
        f"\n[pipeline] privacy: (ε={privacy['epsilon']:.3f}, δ={privacy['delta']:.3g})-DP, {privacy['composition']}"
    )
    for name, stage in privacy["stages"].items():
        print(
            f"[pipeline]   {name}: ε={stage['epsilon']:.3f}, δ={stage['delta']:.3g}, {stage['steps']} steps"
        )
    for label, r in result.get("evaluation", {}).items():
        kl = f", KL to reference {r['kl_to_reference']:.3f}" if "kl_to_reference" in r else ""
        print(f"[pipeline] {label}: mean reward {r['reward_mean']:.3f} ± {r['reward_std']:.3f}{kl}")


def parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Run the lit_dprl pipeline (stages, privacy report, evaluation) from one YAML."
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument(
        "--run_dir", type=str, required=True, help="Folder for every stage's outputs and the reports."
    )
    p.add_argument("--stages", type=list[Stage], required=True, help="Stages in order.")
    p.add_argument("--evaluation", type=Evaluation | None, default=None, help="Evaluation settings.")
    p.add_argument(
        "--overlapping_users", type=bool, default=False, help="Users may appear in several stages."
    )
    p.add_argument("--rerun", type=list[str], default=[], help="Stages to run again even if finished.")
    return p


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``pipeline.py``."""
    p = parser()
    init = p.instantiate_classes(p.parse_args(args))
    result = run_pipeline(init.run_dir, init.stages, init.evaluation, init.overlapping_users, init.rerun)
    print_summary(result)
    return result

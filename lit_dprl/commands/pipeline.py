"""The whole pipeline from one YAML: stage 1 → 2 → 3 (each a ``lit-dprl fit`` config), a combined privacy
report and the evaluation of the aligned policy on held-out prompts.

    lit-dprl pipeline --config configs/smollm2/pipeline.yaml
    lit-dprl pipeline --config configs/smollm2/pipeline.yaml --rerun '[grpo]'  # redo a stage and the stages it feeds

Each stage exports its model to ``<run_dir>/<stage>/model`` (with its ``privacy.json``, and the pipeline's
``data_split.json``: the data module's ``split_provenance()``); a later stage takes an earlier stage's export
through ``inputs`` (e.g. PPO's ``model.init_args.model`` ← ``sft``). A finished stage (its export and
``data_split.json`` exist) is reused unless named in ``rerun``, fed by a stage that is, or trained from inputs
whose content changed since (``inputs.json`` records each input export's content hash). An interrupted stage
resumes from its last checkpoint (``<run_dir>/<stage>/checkpoints/last.ckpt``, ``lit-dprl fit --ckpt_path last``);
a rerun stage starts over.

Privacy (``privacy_report.json``):
- A stage marked ``public: true`` is left out of the composition only if its data module reports public
  data (bundled public sources, or a local file declared public); otherwise the pipeline refuses it.
- Every other stage trains on private data. Without DP (no ``privacy.json``, or one that says
  ``"differentially_private": false`` / ``"epsilon": Infinity``) its ε is ∞, and so is the pipeline's.
- Parallel composition (the largest ε and δ of any stage, Wu et al. §4) only when the provenance proves the
  private sets disjoint: every private stage splits the same dataset with the same key, fractions, unit
  and assignment, and no two train on the same split. Otherwise, or with ``overlapping_users: true``, the
  stages compose sequentially (one accountant over all stages' mechanisms), and the report says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_dprl.data.splits import PROVENANCE_KEY
from lit_dprl.evaluation import (
    evaluate_policy,
    format_epsilon,
    paired_gain,
    save_json,
    write_markdown_samples,
)
from lit_dprl.privacy.accounting import make_accountant
from lit_dprl.privacy.report import REPORT_NAME, export_content_hash, is_export

DATA_SPLIT_FILE = "data_split.json"
INPUTS_FILE = "inputs.json"
STAGE_FIELDS = ("epsilon", "delta", "steps", "sample_rate", "noise_multiplier")
DISJOINT_FIELDS = ("dataset", "key_fingerprint", "fractions", "unit", "assignment")


@dataclass
class Stage:
    """One training stage.

    Args:
        name: Stage name; its model is exported to ``<run_dir>/<name>/model``.
        config: A ``lit-dprl fit`` YAML.
        args: Extra command-line overrides for that config (e.g. ``--trainer.max_steps=10``).
        inputs: Config keys set to an earlier stage's exported model, e.g.
            ``{model.init_args.model: sft, data.init_args.tokenizer: sft}``, or to a model directory path.
        public: The stage trains on public data only (no DP; left out of the composition). Checked: its
            data module must report public data (``split_provenance()["public"]``).
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
        source: Held-out prompts: "imdb" (first words of reviews of the IMDb test split), or a local file of
            prompts that no stage trains on (e.g. TL;DR test posts).
        prompt_field: The prompt column of a local ``source``.
        max_prompts: Number of held-out prompts.
        min_prompt_words: Fewest words per IMDb prompt.
        max_prompt_words: Most words per IMDb prompt.
        seed: The data seed (split key) of the stages: fixes which reviews are held out and each prompt's
            word count.
        temperature: Sampling temperature.
        min_new_tokens: Fewest response tokens.
        max_new_tokens: Most response tokens.
        num_samples: Held-out prompts whose continuations go into ``samples.md`` (every model side by side).
        fluency: A fixed model source (e.g. the pretrained model) under which each model's continuations get a
            perplexity: a reward gained by text the pretrained model finds implausible is reward hacking.
    """

    policy: str = "ppo"
    baselines: dict[str, str] = field(default_factory=dict)
    reference: str | None = "sft"
    reward_stage: str | None = None
    reward_label: int = 1
    reward_function: str | None = None
    reward_model: str | None = None
    source: str = "imdb"
    prompt_field: str = "prompt"
    max_prompts: int = 64
    min_prompt_words: int = 2
    max_prompt_words: int = 6
    seed: int = 0
    temperature: float = 1.0
    min_new_tokens: int = 4
    max_new_tokens: int = 16
    num_samples: int = 8
    fluency: str | None = None


def stage_dir(run_dir: Path, name: str) -> Path:
    return run_dir / name / "model"


def is_finished(run_dir: Path, stage: Stage) -> bool:
    """A stage is finished once its export is complete (its marker, written last) and its data split recorded."""
    export = stage_dir(run_dir, stage.name)
    return is_export(export) and (export / DATA_SPLIT_FILE).is_file()


def record_data_split(datamodule: Any, export: Path) -> None:
    """Write the data module's ``split_provenance()`` (or a note that it has none) to ``data_split.json``."""
    if hasattr(datamodule, "split_provenance"):
        provenance = datamodule.split_provenance()
    else:
        provenance = {"public": False, "note": f"{type(datamodule).__name__} reports no split_provenance()"}
    export.mkdir(parents=True, exist_ok=True)
    save_json(provenance, export / DATA_SPLIT_FILE)


def stage_report(export: Path) -> dict[str, Any]:
    """The privacy report of a private stage with its data split under ``"data_split"``.

    ε = ∞ (``"differentially_private": false``) when the export has no ``privacy.json`` or its report says
    the stage ran without DP. A report that records a different data split than the pipeline saw is refused.
    """
    split = json.loads((export / DATA_SPLIT_FILE).read_text())
    path = export / REPORT_NAME
    if path.is_file():
        report = json.loads(path.read_text())
    else:
        report = {
            "epsilon": math.inf,
            "note": f"no {REPORT_NAME}: trained on private data without DPCallback",
        }
    if report.get(PROVENANCE_KEY, split) != split:
        raise ValueError(
            f"{path} records the data split {report[PROVENANCE_KEY]} but the stage trained on {split}: the "
            "report does not describe this model; rerun the stage."
        )
    if report.get("differentially_private") is False or math.isinf(report["epsilon"]):
        report = {**report, "epsilon": math.inf, "differentially_private": False}
    return {**report, PROVENANCE_KEY: split}


def public_data_split(export: Path, name: str) -> dict[str, Any]:
    """The data split of a stage marked public; ``ValueError`` unless its data module reports public data."""
    split = json.loads((export / DATA_SPLIT_FILE).read_text())
    if split.get("public") is not True:
        raise ValueError(
            f"stage {name!r} is marked public: true, but its data is not public ({split}). Train it on a "
            "public source ('rotten_tomatoes', 'imdb_public', or a local file with public_data: true), or "
            "drop public: true so that the privacy report composes it (ε = ∞ without DP)."
        )
    return split


def input_hashes(run_dir: Path, stage: Stage, stages: dict[str, Stage]) -> dict[str, str | None]:
    """Each input's content hash (``export_content_hash``; None for a model source that is not an export)."""
    return {
        key: export_content_hash(Path(resolve_model(run_dir, source, stages)))
        for key, source in stage.inputs.items()
    }


def inputs_changed(run_dir: Path, stage: Stage, stages: dict[str, Stage]) -> bool:
    """Whether a finished stage was trained from other inputs than those there now (or did not record them)."""
    if not stage.inputs:
        return False
    try:
        recorded = json.loads((stage_dir(run_dir, stage.name) / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        return True
    return recorded != input_hashes(run_dir, stage, stages)


def stage_command(run_dir: Path, stage: Stage, stages: dict[str, Stage], resume: bool = True) -> list[str]:
    """The ``lit-dprl fit`` arguments that run ``stage`` inside ``run_dir``: resuming its last checkpoint if it
    has one, else from the start, replacing what an unfinished or rerun stage left."""
    args = ["fit", "--config", stage.config, *stage.args, "--overwrite=true"]
    if resume:
        args.append("--ckpt_path=last")
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


def disjointness_problem(reports: dict[str, dict[str, Any]]) -> str | None:
    """Why the stages' private sets cannot be shown disjoint from their ``"data_split"`` provenance, or None.

    Disjoint: every stage records the same dataset, key fingerprint, fractions, unit and assignment (one
    keyed-hash partition) and no two stages train on the same split of it.
    """
    splits = {name: report.get(PROVENANCE_KEY) or {} for name, report in reports.items()}
    missing = [
        name for name, split in splits.items() if not all(k in split for k in (*DISJOINT_FIELDS, "split"))
    ]
    if missing:
        return f"no keyed-hash split provenance for {missing}"
    for key in DISJOINT_FIELDS:
        values = {name: split[key] for name, split in splits.items()}
        if len({json.dumps(value, sort_keys=True) for value in values.values()}) > 1:
            return f"the stages' data splits differ in {key}: {values}"
    owner: dict[str, str] = {}
    for name, split in splits.items():
        if split["split"] in owner:
            return f"stages {owner[split['split']]!r} and {name!r} both train on split {split['split']!r}"
        owner[split["split"]] = name
    return None


def combined_privacy_report(reports: dict[str, dict[str, Any]], overlapping_users: bool) -> dict[str, Any]:
    """The pipeline's guarantee from the private stages' reports (``stage_report``).

    Provably disjoint private sets (``disjointness_problem``): parallel composition, (max ε, max δ).
    Otherwise, or with ``overlapping_users``: sequential composition of every stage's Poisson-sampled
    Gaussian steps in one accountant (the first stage's), at the smallest δ. A stage without DP makes ε = ∞.
    """
    if not reports:
        return {
            "composition": "none: no stage trains on private data",
            "epsilon": 0.0,
            "delta": 0.0,
            "stages": {},
        }
    summary = {
        name: {**{k: r.get(k) for k in STAGE_FIELDS}, PROVENANCE_KEY: r.get(PROVENANCE_KEY)}
        for name, r in reports.items()
    }
    infinite = [name for name, r in reports.items() if math.isinf(r["epsilon"])]
    deltas = [r["delta"] for r in reports.values() if r.get("delta") is not None]
    if len(reports) == 1:
        problem, composition = None, "one private stage: its own guarantee"
    else:
        problem = "overlapping_users: true" if overlapping_users else disjointness_problem(reports)
        composition = (
            "parallel: the private stages train on disjoint splits of one keyed-hash partition"
            if problem is None
            else f"sequential: the private stages' data cannot be shown disjoint ({problem})"
        )
    if problem is None:
        epsilon, delta = max(r["epsilon"] for r in reports.values()), max(deltas, default=0.0)
    elif infinite:
        epsilon, delta = math.inf, min(deltas, default=0.0)
    else:
        accountant_name = next(iter(reports.values()))["accountant"]
        accountant = make_accountant(accountant_name)
        accountant.history = [
            (entry["batch_noise_multiplier"], entry["sample_rate"], entry["batches"])
            for r in reports.values()
            for entry in r.get("accounting_history")
            or [
                {
                    "batch_noise_multiplier": r["batch_noise_multiplier"],
                    "sample_rate": r["sample_rate"],
                    "batches": r["steps"],
                }
            ]
        ]  # every (σ_batch, q) setting of every stage, resumes with other settings included
        delta = min(deltas)
        epsilon = float(accountant.get_epsilon(delta=delta))
        composition += f"; {accountant_name} accountant"
    if infinite:
        composition += f"; ε = ∞: {', '.join(infinite)} trained on private data without DP"
    return {
        "composition": composition,
        "epsilon": epsilon,
        "delta": delta,
        "differentially_private": not infinite,
        "stages": summary,
    }


def held_out_prompts(evaluation: Evaluation) -> list[str]:
    """Prompts from the held-out test split only (never a training example of any stage)."""
    if (
        evaluation.source != "imdb"
    ):  # a local file of held-out prompts, kept out of every stage's data by the user
        from lit_dprl.data.files import load_local_dataset

        rows = load_local_dataset(evaluation.source, [evaluation.prompt_field])
        if evaluation.prompt_field not in rows.column_names:
            raise ValueError(
                f"evaluation.source {evaluation.source} has no column {evaluation.prompt_field!r} (its columns: "
                f"{rows.column_names}); set evaluation.prompt_field, or use source 'imdb'"
            )
        return rows[evaluation.prompt_field][: evaluation.max_prompts]
    from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
    from lit_dprl.data.prompts import first_words
    from lit_dprl.data.splits import UNIT_COLUMN, split_key

    test = split_imdb(load_imdb_reviews(), seed=evaluation.seed)["test"]
    test = test.select(range(min(evaluation.max_prompts, len(test))))
    return first_words(
        test["text"], test[UNIT_COLUMN], evaluation.min_prompt_words, evaluation.max_prompt_words,
        key=split_key(evaluation.seed),
    )  # fmt: skip


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
            num_samples=evaluation.num_samples,
            fluency=resolve_model(run_dir, evaluation.fluency, stages) if evaluation.fluency else None,
        )
    baseline = "sft" if "sft" in results else next(iter(evaluation.baselines), None)
    if baseline is not None:
        gain, stderr = paired_gain(results["aligned"]["rewards"], results[baseline]["rewards"])
        results["aligned"]["gain"] = {
            "over": baseline,
            "reward": gain,
            "reward_stderr": stderr,
            "positive_share_points": 100
            * (results["aligned"]["positive_share"] - results[baseline]["positive_share"]),
            "distinct_2_ratio": results["aligned"]["distinct_2"] / max(results[baseline]["distinct_2"], 1e-9),
        }
    save_json(results, run_dir / "evaluation.json")
    lines = [
        f"Held-out IMDb test prompts: {len(prompts)}; reward = {evaluation.reward_function or evaluation.reward_stage or evaluation.reward_model}.",
        "",
        "| model | mean reward ± s.e. | positive | distinct-2 | KL to reference | perplexity under "
        f"{evaluation.fluency or '–'} |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        kl = f"{r['kl_to_reference']:.3f}" if "kl_to_reference" in r else "–"
        ppl = f"{r['fluency_perplexity']:.1f}" if "fluency_perplexity" in r else "–"
        lines.append(
            f"| {label} | {r['reward_mean']:.3f} ± {r['reward_stderr']:.3f} | {100 * r['positive_share']:.1f} % "
            f"| {r['distinct_2']:.3f} | {kl} | {ppl} |"
        )
    if "gain" in results["aligned"]:
        g = results["aligned"]["gain"]
        lines += [
            "",
            f"aligned − {g['over']}: reward {g['reward']:+.3f} ± {g['reward_stderr']:.3f} (paired s.e.), "
            f"positive {g['positive_share_points']:+.1f} points, distinct-2 ratio {g['distinct_2_ratio']:.2f}",
        ]
    (run_dir / "evaluation.md").write_text("\n".join(lines) + "\n")
    write_markdown_samples(results, run_dir / "samples.md")
    return results


def stages_to_rerun(stages: list[Stage], named: set[str]) -> set[str]:
    """``named`` and every stage that consumes one of them through ``inputs``, directly or through another
    (a stage trained from an old export must not be reused next to the new one)."""
    rerun = set(named)
    for stage in stages:  # stages come in order: inputs name earlier stages only
        if rerun & set(stage.inputs.values()):
            rerun.add(stage.name)
    return rerun


def run_pipeline(
    run_dir: str,
    stages: list[Stage],
    evaluation: Evaluation | None = None,
    overlapping_users: bool = False,
    rerun: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every stage, then write the privacy report and the evaluation into ``run_dir``."""
    from lit_dprl.commands.fit import main as train

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise ValueError("stage names must be unique")
    rerun = set(rerun or [])
    unknown = rerun - set(by_name)
    if unknown:
        raise ValueError(f"rerun names unknown stages {sorted(unknown)}; stages are {list(by_name)}")
    rerun = stages_to_rerun(stages, rerun)
    public: dict[str, dict[str, Any]] = {}
    for stage in stages:
        export = stage_dir(root, stage.name)
        finished = is_finished(root, stage)
        if finished and stage.name not in rerun and inputs_changed(root, stage, by_name):
            print(f"[pipeline] {stage.name}: its inputs changed since it was trained; running it again")
            rerun = stages_to_rerun(stages, rerun | {stage.name})
        if finished and stage.name not in rerun:
            print(f"[pipeline] {stage.name}: reusing {export}")
        else:
            for stale in (
                REPORT_NAME,
                DATA_SPLIT_FILE,
                INPUTS_FILE,
            ):  # never an old record beside a new model
                (export / stale).unlink(missing_ok=True)
            command = stage_command(root, stage, by_name, resume=stage.name not in rerun)
            print(f"[pipeline] {stage.name}: lit-dprl {' '.join(command)}")
            cli = train(command)
            record_data_split(cli.datamodule, export)
            save_json(input_hashes(root, stage, by_name), export / INPUTS_FILE)
            if not is_finished(root, stage):
                raise RuntimeError(f"stage {stage.name!r} ended without writing its export {export}")
        if stage.public:  # checked before any later stage consumes it
            public[stage.name] = public_data_split(export, stage.name)
    reports = {s.name: stage_report(stage_dir(root, s.name)) for s in stages if not s.public}
    privacy = {**combined_privacy_report(reports, overlapping_users), "public_stages": public}
    save_json(privacy, root / "privacy_report.json")
    result: dict[str, Any] = {"privacy": privacy}
    if evaluation is not None:
        result["evaluation"] = evaluate(root, evaluation, by_name)
    save_json(result, root / "summary.json")
    return result


def print_summary(result: dict[str, Any]) -> None:
    privacy = result["privacy"]
    print(
        f"\n[pipeline] privacy: (ε={format_epsilon(privacy['epsilon'])}, δ={privacy['delta']:.3g}), "
        f"{privacy['composition']}"
    )
    for name, stage in privacy["stages"].items():
        steps = "no DP" if math.isinf(stage["epsilon"]) else f"δ={stage['delta']:.3g}, {stage['steps']} steps"
        split = stage[PROVENANCE_KEY] or {}
        print(
            f"[pipeline]   {name}: ε={format_epsilon(stage['epsilon'])}, {steps}, data: "
            f"{split.get('dataset', '?')} / split {split.get('split', '?')!r}"
        )
    for name, split in privacy.get("public_stages", {}).items():
        print(f"[pipeline]   {name}: public data ({split['dataset']} / split {split['split']!r})")
    for label, r in result.get("evaluation", {}).items():
        kl = f", KL to reference {r['kl_to_reference']:.3f}" if "kl_to_reference" in r else ""
        ppl = f", perplexity {r['fluency_perplexity']:.1f}" if "fluency_perplexity" in r else ""
        print(
            f"[pipeline] {label}: mean reward {r['reward_mean']:.3f} ± {r['reward_stderr']:.3f} (s.e.), "
            f"positive {100 * r['positive_share']:.1f} %, distinct-2 {r['distinct_2']:.3f}{kl}{ppl}"
        )
        if "gain" in r:
            g = r["gain"]
            print(
                f"[pipeline] aligned − {g['over']}: reward {g['reward']:+.3f} ± {g['reward_stderr']:.3f}, positive "
                f"{g['positive_share_points']:+.1f} points, distinct-2 ratio {g['distinct_2_ratio']:.2f}"
            )


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
    """Entry point of ``lit-dprl pipeline``."""
    p = parser()
    init = p.instantiate_classes(p.parse_args(args))
    result = run_pipeline(init.run_dir, init.stages, init.evaluation, init.overlapping_users, init.rerun)
    print_summary(result)
    return result

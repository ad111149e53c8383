"""The whole pipeline from one YAML: stage 1 → 2 → 3 (each a ``lit-dprl fit`` config), a combined privacy
report and the evaluation of the aligned policy on held-out prompts.

    lit-dprl pipeline --config configs/smollm2/pipeline.yaml
    lit-dprl pipeline --config configs/smollm2/pipeline.yaml --rerun '[grpo]'  # redo a stage and the stages it feeds

Stages, their exports and when a finished one is reused: ``pipeline_stages``. The privacy report
(``privacy_report.json``) and when stages compose in parallel: ``pipeline_privacy`` and ``lit_dprl.privacy.composition``. The held-out evaluation:
``pipeline_evaluation``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_dprl.commands.pipeline_evaluation import Evaluation, evaluate
from lit_dprl.commands.pipeline_privacy import public_data_split, stage_report
from lit_dprl.commands.pipeline_stages import (
    DATA_SPLIT_FILE,
    INPUTS_FILE,
    Stage,
    input_hashes,
    inputs_changed,
    is_finished,
    record_data_split,
    stage_command,
    stage_dir,
    stages_to_rerun,
)
from lit_dprl.data.splits import PROVENANCE_KEY
from lit_dprl.evaluation import format_epsilon, save_json
from lit_dprl.privacy.composition import combined_privacy_report
from lit_dprl.privacy.report import REPORT_NAME


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

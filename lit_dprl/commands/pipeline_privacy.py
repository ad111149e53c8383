"""The pipeline's privacy report: each stage's guarantee (``privacy.json`` checked against the data split the
pipeline recorded) and their composition.

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
from pathlib import Path
from typing import Any

from lit_dprl.commands.pipeline_stages import DATA_SPLIT_FILE
from lit_dprl.data.splits import PROVENANCE_KEY
from lit_dprl.privacy.accounting import make_accountant
from lit_dprl.privacy.report import REPORT_NAME

STAGE_FIELDS = ("epsilon", "delta", "steps", "sample_rate", "noise_multiplier")
DISJOINT_FIELDS = ("dataset", "key_fingerprint", "fractions", "unit", "assignment")


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

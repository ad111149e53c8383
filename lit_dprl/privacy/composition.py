"""Composition of several stages' guarantees into one (the pipeline's ``privacy_report.json``).

- A stage without DP (``"differentially_private": false`` / ``"epsilon": Infinity``) makes ε = ∞.
- Parallel composition (the largest ε and δ of any stage, Wu et al. §4) only when the stages' data-split
  provenance (each report's ``"data_split"``) proves the private sets disjoint: every private stage splits the
  same dataset with the same key, fractions, unit and assignment, and no two train on the same split.
  Otherwise, or with ``overlapping_users``, the stages compose sequentially (one accountant over all stages'
  Poisson-sampled Gaussian mechanisms), and the report says why.
"""

from __future__ import annotations

import json
import math
from typing import Any

from lit_dprl.privacy.accounting import make_accountant
from lit_dprl.privacy.report import DATA_SPLIT_KEY

STAGE_FIELDS = ("epsilon", "delta", "steps", "sample_rate", "noise_multiplier")
DISJOINT_FIELDS = ("dataset", "key_fingerprint", "fractions", "unit", "assignment")


def disjointness_problem(reports: dict[str, dict[str, Any]]) -> str | None:
    """Why the stages' private sets cannot be shown disjoint from their ``"data_split"`` provenance, or None.

    Disjoint: every stage records the same dataset, key fingerprint, fractions, unit and assignment (one
    keyed-hash partition) and no two stages train on the same split of it.
    """
    splits = {name: report.get(DATA_SPLIT_KEY) or {} for name, report in reports.items()}
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
        name: {**{k: r.get(k) for k in STAGE_FIELDS}, DATA_SPLIT_KEY: r.get(DATA_SPLIT_KEY)}
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

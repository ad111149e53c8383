"""Each stage's guarantee as the pipeline reads it from the stage's export (``privacy.json`` checked against
the data split the pipeline recorded); ``lit_dprl.privacy.composition`` composes them.

- A stage marked ``public: true`` is left out of the composition only if its data module reports public
  data (bundled public sources, or a local file declared public); otherwise the pipeline refuses it.
- Every other stage trains on private data. Without DP (no ``privacy.json``, or one that says
  ``"differentially_private": false`` / ``"epsilon": Infinity``) its ε is ∞, and so is the pipeline's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lit_dprl.commands.pipeline_stages import DATA_SPLIT_FILE
from lit_dprl.data.splits import PROVENANCE_KEY
from lit_dprl.privacy.report import REPORT_NAME


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

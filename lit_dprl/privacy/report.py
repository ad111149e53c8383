"""The privacy report (``privacy.json``) and exports whose report always describes the model next to it.

Every stage exports through ``write_export``: the weights, the tokenizer and the report are written
into a temporary directory beside the target, the report after the weights and a completion marker
last; only then does the new directory replace the old export, which is removed after the swap. A
failure part-way leaves the previous export as it was, and a directory without the marker is not an
export. The report is the attached ``DPCallback``'s, or, for a run without one, ``non_private_report``
(ε = ∞): never an old report, never none. This module imports no Opacus, so stages may use it.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

REPORT_NAME = "privacy.json"
EXPORT_MARKER = "export_complete.json"
DATA_SPLIT_KEY = "data_split"  # where a report carries the data module's split_provenance()
ROW_UNIT = "one training example (one row of the training dataset)"


def user_unit(user_id_field: str, max_rows_per_user: int | None) -> str:
    """The words for the user-level privacy unit."""
    rows = "all of its rows" if max_rows_per_user is None else f"its first {max_rows_per_user} rows"
    return f"one user: every row with the same {user_id_field!r} ({rows} in dataset order)"


def non_private_report(
    reason: str = (
        "trained without DPCallback (no per-example clipping, no noise): if its training data are private, "
        "the model has no privacy guarantee"
    ),
    privacy_unit: str = ROW_UNIT,
) -> dict[str, Any]:
    """The report of a model trained without differential privacy: ε = ∞ (δ = 0 is then vacuous)."""
    return {
        "differentially_private": False,
        "epsilon": math.inf,
        "delta": 0.0,
        "privacy_unit": privacy_unit,
        "reason": reason,
        "steps": None,
        "sample_rate": None,
        "noise_multiplier": None,
    }


def stage_metadata(pl_module: pl.LightningModule) -> dict[str, Any] | None:
    """``pl_module.privacy_metadata()`` when the module defines it (what the stage consumed and how)."""
    metadata = getattr(pl_module, "privacy_metadata", None)
    return metadata() if callable(metadata) else None


def trainer_report(trainer: pl.Trainer) -> dict[str, Any]:
    """The report for the model ``trainer`` trained: the DPCallback's if one is attached, else ε = ∞."""
    callback_module = sys.modules.get("lit_dprl.privacy.callback")  # no DPCallback exists unless it is loaded
    callbacks = [] if callback_module is None else [
        cb for cb in trainer.callbacks if isinstance(cb, callback_module.DPCallback)
    ]  # fmt: skip
    if callbacks and callbacks[0].delta is not None:
        report = callbacks[0].report()
    else:
        report = non_private_report()
        metadata = stage_metadata(trainer.lightning_module)
        if metadata is not None:
            report["stage"] = metadata
    provenance = getattr(trainer.datamodule, "split_provenance", None)
    if callable(provenance):
        report[DATA_SPLIT_KEY] = provenance()  # which split of which keyed partition the stage trained on
    return report


def report_text(report: dict[str, Any]) -> str:
    """The report as JSON; ε = ∞ is written as ``Infinity`` (Python's json reads it back as inf)."""
    return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=True) + "\n"


def write_json_atomic(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report_text(report))
    tmp.replace(path)


def is_export(directory: Path) -> bool:
    """Whether ``directory`` holds a completed export (its marker, written last, is there)."""
    return (directory / EXPORT_MARKER).is_file()


def write_export(directory: str | Path, save_model: Callable[[Path], Any], report: dict[str, Any]) -> Path:
    """Export a model with its report, replacing an earlier export only once the new one is complete.

    ``save_model(path)`` writes the weights and tokenizer into ``path``; then ``privacy.json``, then the
    marker ``export_complete.json`` are written, and the directory is swapped into place. An existing
    ``directory`` must be an earlier export (or empty), so that no other files are deleted.
    """
    target = Path(directory)
    if target.exists() and not _replaceable(target):
        raise FileExistsError(
            f"export directory {target} exists and holds files that are not an earlier export; choose a new "
            "or empty export_dir (an earlier export is replaced as a whole)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        save_model(staging)
        write_json_atomic(staging / REPORT_NAME, report)
        marker = {"completed": datetime.now(UTC).isoformat(), "report": REPORT_NAME}
        write_json_atomic(staging / EXPORT_MARKER, marker)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _replaceable(target: Path) -> bool:
    """An empty directory, a completed export, or an export written before the marker existed."""
    if not target.is_dir():
        return False
    names = {p.name for p in target.iterdir()}
    return not names or EXPORT_MARKER in names or "config.json" in names or REPORT_NAME in names


def export_after_fit(pl_module: pl.LightningModule, export_dir: str | Path | None) -> Path | None:
    """A stage's ``on_fit_end``: on global rank zero, ``write_export`` of ``pl_module.export`` (which writes the
    weights and tokenizer into a directory) with the trainer's report; nothing when ``export_dir`` is None."""
    if export_dir is None or not pl_module.trainer.is_global_zero:
        return None
    return write_export(export_dir, pl_module.export, trainer_report(pl_module.trainer))

"""The privacy report (``privacy.json``) and exports whose report always describes the model next to it.

Every stage exports through ``write_export``: the weights, the tokenizer and the report are written
into a temporary directory beside the target, the report after the weights and a completion marker
last; only then does the new directory replace the old export, which is removed after the swap. A
failure part-way leaves the previous export as it was, and a directory without the marker is not an
export. The report is the attached ``DPCallback``'s, or, for a run without one, ``non_private_report``
(ε = ∞): never an old report, never none. This module imports no Opacus, so stages may use it.
"""

from __future__ import annotations

import hashlib
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
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor

REPORT_NAME = "privacy.json"
EXPORT_MARKER = "export_complete.json"
MODEL_CARD_NAME = "README.md"
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

    ``save_model(path)`` writes the weights and tokenizer into ``path``; then ``privacy.json``, the model card
    ``README.md`` and the marker ``export_complete.json`` are written, and the directory is swapped into place. An existing
    ``directory`` must be an earlier export (or empty), so that no other files are deleted.
    """
    target = check_export_dir(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        save_model(staging)
        write_json_atomic(staging / REPORT_NAME, report)
        (staging / MODEL_CARD_NAME).write_text(model_card(report, target.name, _architecture(staging)))
        marker = {
            "completed": datetime.now(UTC).isoformat(),
            "report": REPORT_NAME,
            "files": _file_hashes(staging),
        }
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


def _file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by relative path."""
    hashes = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return hashes


def export_content_hash(directory: Path) -> str | None:
    """One SHA-256 over the current contents of a completed export's files (weights, tokenizer, report, card;
    not the marker); None for a directory that is not a completed export."""
    if not is_export(Path(directory)):
        return None
    files = {k: v for k, v in _file_hashes(Path(directory)).items() if k != EXPORT_MARKER}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _architecture(directory: Path) -> str | None:
    """The ``architectures[0]`` of the exported ``config.json`` (None without one)."""
    try:
        return json.loads((directory / "config.json").read_text())["architectures"][0]
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return None


def _loader(architecture: str | None) -> str:
    """The ``transformers`` auto class that loads ``architecture``."""
    from transformers.models.auto import modeling_auto as auto

    tasks = {
        "AutoModelForCausalLM": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForSequenceClassification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }
    for loader, names in tasks.items():
        if architecture in names.values():
            return loader
    return "AutoModel"


def model_card(report: dict[str, Any], name: str, architecture: str | None = None) -> str:
    """The export's ``README.md``: what the model is, the guarantee in words, the data it saw, how to load it."""
    epsilon, delta = report.get("epsilon", math.inf), report.get("delta", 0.0)
    unit = report.get("privacy_unit", ROW_UNIT)
    if report.get("differentially_private") and math.isfinite(epsilon):
        guarantee = (
            f"**(ε = {epsilon:.4g}, δ = {delta:.3g})-differential privacy** with respect to adding or removing "
            f"{unit} of its training data. Mechanism: {report.get('mechanism', 'DP-SGD')}; accountant "
            f"{report.get('accountant')}, {report.get('steps')} accounted steps at sample rate "
            f"{report.get('sample_rate')}, σ = {report.get('noise_multiplier')}, C = {report.get('max_grad_norm')}."
        )
    else:
        guarantee = f"**ε = ∞: no differential-privacy guarantee.** {report.get('reason', '')}".rstrip()
    lines = [
        f"# {name}",
        "",
        f"Exported by lit_dprl ({architecture or 'model'}).",
        "",
        "## Privacy",
        "",
        guarantee,
    ]
    split = report.get(DATA_SPLIT_KEY)
    if split:
        lines += [
            "",
            "## Training data",
            "",
            "```json",
            json.dumps(split, indent=2, ensure_ascii=False),
            "```",
        ]
    inputs = (report.get("stage") or {}).get("inputs") or {}
    if inputs:
        lines += ["", "## Models it was built from", ""]
        lines += [f"- {role}: ε = {(r or {}).get('epsilon', 'no report')}" for role, r in inputs.items()]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    lines += [
        "", "## Not covered by the guarantee", "",
        "Values logged during training (losses, rewards, batch sizes, counters) and hyper-parameters chosen by runs "
        "on private data. The full record, with every parameter needed to recompute ε, is `privacy.json`.",
        "", "## Load", "", "```python", f"from transformers import AutoTokenizer, {_loader(architecture)}", "",
        f'model = {_loader(architecture)}.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def check_export_dir(directory: str | Path) -> Path:
    """Refuse, before any training, an export directory that ``write_export`` could not fill: one that holds files
    other than an earlier export, or whose parent cannot be created or written. Returns it as a ``Path``."""
    target = Path(directory)
    if target.exists() and not _replaceable(target):
        raise FileExistsError(
            f"export directory {target} exists and holds files that are not an earlier export; choose a new "
            "or empty export_dir (an earlier export is replaced as a whole)"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as error:
        raise PermissionError(
            f"cannot write the export directory {target} ({error.strerror or error}); choose a writable "
            "export_dir before the run spends its privacy budget"
        ) from error
    return target


def _replaceable(target: Path) -> bool:
    """An empty directory, a completed export, or an export written before the marker existed."""
    if not target.is_dir():
        return False
    names = {p.name for p in target.iterdir()}
    return not names or EXPORT_MARKER in names or "config.json" in names or REPORT_NAME in names


def export_after_fit(pl_module: pl.LightningModule, export_dir: str | Path | None) -> Path | None:
    """A stage's ``on_fit_end``: on global rank zero, ``write_export`` of ``pl_module.export`` (which writes the
    weights and tokenizer into a directory) with the trainer's report; nothing when ``export_dir`` is None. Under
    FSDP the finiteness check reads rank zero's shards (reading the others would be a collective)."""
    if export_dir is None or not pl_module.trainer.is_global_zero:
        return None
    broken = [
        name
        for name, p in pl_module.named_parameters()
        if p.requires_grad and not (p.to_local() if isinstance(p, DTensor) else p).isfinite().all()
    ]
    if broken:
        raise FloatingPointError(
            f"training produced non-finite weights ({len(broken)} tensors, e.g. {broken[0]}); nothing was exported "
            f"to {export_dir}. Lower the learning rate or use 32-true / bf16-mixed precision"
        )
    target = write_export(export_dir, pl_module.export, trainer_report(pl_module.trainer))
    rank_zero_info(
        f"{type(pl_module).__name__}: model exported to {target} (with {REPORT_NAME} and a model card)"
    )
    return target

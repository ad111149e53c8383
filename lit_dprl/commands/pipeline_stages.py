"""A pipeline's stages as runs of ``lit-dprl fit``: where each exports, when a finished stage is reused, and the
command line that runs one.

Each stage exports its model to ``<run_dir>/<stage>/model`` (with its ``privacy.json``, and the pipeline's
``data_split.json``: the data module's ``split_provenance()``); a later stage takes an earlier stage's export
through ``inputs`` (e.g. PPO's ``model.init_args.model`` ← ``sft``). A finished stage (its export and
``data_split.json`` exist) is reused unless named in ``rerun``, fed by a stage that is, or trained from inputs
whose content changed since (``inputs.json`` records each input export's content hash). An interrupted stage
resumes from its last checkpoint (``<run_dir>/<stage>/checkpoints/last.ckpt``, ``lit-dprl fit --ckpt_path last``);
a rerun stage starts over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_dprl.evaluation import save_json
from lit_dprl.privacy.report import export_content_hash, is_export

DATA_SPLIT_FILE = "data_split.json"
INPUTS_FILE = "inputs.json"


@dataclass
class Stage:
    """One training stage.

    Args:
        name: Stage name; its model is exported to ``<run_dir>/<name>/model``.
        config: A ``lit-dprl fit`` YAML.
        args: Extra command-line overrides for that config (e.g. ``--trainer.max_steps=10``).
        inputs: Config keys set to an earlier stage's exported model, e.g. ``{model.init_args.model: sft}``
            (the data module's tokenizer follows the model), or to a model directory path.
        public: The stage trains on public data only (no DP; left out of the composition). Checked: its
            data module must report public data (``split_provenance()["public"]``).
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    public: bool = False


def stage_dir(run_dir: Path, name: str) -> Path:
    """Where stage ``name`` exports its model: ``<run_dir>/<name>/model``."""
    return run_dir / name / "model"


def resolve_model(run_dir: Path, name_or_source: str, stages: dict[str, Stage]) -> str:
    """A stage's export directory if ``name_or_source`` names a stage, else the model source as given."""
    return str(stage_dir(run_dir, name_or_source)) if name_or_source in stages else name_or_source


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


def stages_to_rerun(stages: list[Stage], named: set[str]) -> set[str]:
    """``named`` and every stage that consumes one of them through ``inputs``, directly or through another
    (a stage trained from an old export must not be reused next to the new one)."""
    rerun = set(named)
    for stage in stages:  # stages come in order: inputs name earlier stages only
        if rerun & set(stage.inputs.values()):
            rerun.add(stage.name)
    return rerun

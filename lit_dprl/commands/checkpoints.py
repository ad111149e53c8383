"""Crash-safe runs: ``lit-dprl fit`` saves ``<save_dir>/<name>/checkpoints/last.ckpt`` every N optimizer steps, at
the end of training and on SIGTERM, and resumes from it with ``--ckpt_path last``.

The folder does not depend on the logger's version, so the same command finds the checkpoint of an interrupted
run. A checkpoint holds the trainable weights, the optimizer, the loops' progress and every callback's state (the
DP accountant's history included); frozen weights are left out (they come from the model source and are
checked on load by a fingerprint), so a LoRA checkpoint of a 135 M-parameter model is megabytes, not half a GB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

LAST = "last"
FROZEN_KEY = "lit_dprl_frozen_fingerprint"


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """``<save_dir>/<name>/checkpoints`` of the trainer's logger (no version), else ``<default_root_dir>/checkpoints``."""
    logger = trainer.logger
    if logger is not None and logger.save_dir is not None:
        return Path(logger.save_dir) / str(logger.name or "") / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"


def last_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``--ckpt_path last`` would resume from, or None."""
    path = directory / f"{LAST}.ckpt"
    return path if path.is_file() else None


def resume_callbacks(directory: Path, every_n_steps: int) -> list[Callback]:
    """The callbacks that make a run resumable: periodic and final ``last.ckpt``, SIGTERM, compact weights."""
    periodic = ModelCheckpoint(
        dirpath=directory,
        every_n_train_steps=every_n_steps,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )
    return [periodic, SaveOnInterrupt(directory), CompactCheckpoint()]


class SaveOnInterrupt(Callback):
    """Save ``last.ckpt`` at the end of training (so resuming a finished run trains and spends nothing more) and
    when the run is stopped by SIGTERM (SLURM pre-emption; Lightning raises at the end of the current batch) or
    Ctrl-C. Other exceptions save nothing: the state they leave may be the fault's."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / f"{LAST}.ckpt"
        self.saved_on_interrupt: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException | KeyboardInterrupt) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            self.saved_on_interrupt = self.path


class CompactCheckpoint(Callback):
    """Leave frozen parameters out of checkpoints, with a fingerprint of them that a resumed run must match."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.strict_loading = (
            False  # the frozen weights are missing on purpose; trainable ones are checked
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        frozen = _frozen_parameters(pl_module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint[FROZEN_KEY] = _fingerprint(frozen)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        trainable = {
            name for name, p in pl_module.named_parameters(remove_duplicate=False) if p.requires_grad
        }
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trainable parameters of this model (e.g. {missing[0]}): it "
                "was written by a different model or adapter configuration; resume with the run's own config"
            )
        saved = checkpoint.get(FROZEN_KEY)
        if saved is not None and not _same_fingerprint(saved, _fingerprint(_frozen_parameters(pl_module))):
            raise ValueError(
                "the frozen weights of this model differ from those of the checkpoint's run (another model "
                "source or base model): resume with the model the run started from"
            )


def _frozen_parameters(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {name: p for name, p in pl_module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _fingerprint(parameters: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per frozen tensor: its sum and the sum of its absolute values, in float64."""
    return {
        name: [float(p.detach().double().sum()), float(p.detach().double().abs().sum())]
        for name, p in parameters.items()
    }


def _same_fingerprint(saved: dict[str, list[float]], current: dict[str, list[float]]) -> bool:
    """Same names, and sums equal up to float reordering (another device sums in another order)."""
    if saved.keys() != current.keys():
        return False
    for name, (total, magnitude) in saved.items():
        tolerance = 1e-6 * max(1.0, magnitude)
        if abs(total - current[name][0]) > tolerance or abs(magnitude - current[name][1]) > tolerance:
            return False
    return True

"""The command line: ``lit-dprl fit --config configs/<task>/<stage>.yaml``.

A thin ``LightningCLI``: any LightningModule/DataModule by ``class_path``, ``DPCallback`` under
``trainer.callbacks``; the data module's tokenizer, unless given, is the model's. After ``fit`` it prints the
privacy guarantee and, with ``--validate_before_fit=true``, the validation metrics before and after training.

Interrupted runs: ``fit`` saves ``<save_dir>/<name>/checkpoints/last.ckpt`` every ``--checkpoint_every`` optimizer
steps, at the end of training and on SIGTERM (``checkpoints.py``); the same command with ``--ckpt_path last``
resumes it with the accountant's history, and the command line's paths win over the checkpoint's. A new run
never silently replaces an earlier run's export or checkpoint: it is refused unless ``--overwrite true``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from lit_dprl.commands.checkpoints import checkpoint_dir, last_checkpoint, resume_callbacks
from lit_dprl.privacy import DPCallback
from lit_dprl.privacy.report import check_export_dir, is_export

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Every stage's trainer defaults (a YAML overrides them): one CPU or GPU process, a CSV log under
# ``<save_dir>/<name>``, no Lightning checkpoints unless a recipe asks for them.
TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "enable_checkpointing": False,
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items()) if k.startswith("val"))


class LitDPRLCLI(LightningCLI):
    """LightningCLI with a privacy summary after ``fit``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: the stages define no ``test_step`` or ``predict_step``."""
        return {
            name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")
        }

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--validate_before_fit",
            type=bool,
            default=False,
            help="Run validation before fit so the summary shows metrics before and after training.",
        )
        parser.add_argument(
            "--checkpoint_every",
            type=int,
            default=20,
            help="Save <save_dir>/<name>/checkpoints/last.ckpt every this many optimizer steps, at the end and on SIGTERM "
            "(0: none); resume an interrupted run with --ckpt_path last.",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Start a new run even where an earlier run left an export or a checkpoint (they are replaced).",
        )

    def before_instantiate_classes(self) -> None:
        """The data module's tokenizer is its model's: ``data.init_args.tokenizer`` left unset takes
        ``model.init_args.model``; one given is kept (and refused at setup if it is not the model's)."""
        config = self.config.get(str(self.subcommand), self.config)
        model_args, data_args = config.get("model.init_args"), config.get("data.init_args")
        if model_args is None or data_args is None or "model" not in model_args:
            return
        if "tokenizer" in data_args and data_args.tokenizer is None:
            data_args.tokenizer = model_args.model

    def _parse_ckpt_path(self) -> None:
        """Resuming keeps the command line's arguments (LightningCLI would replace them with the checkpoint's, the
        export directory included); differences other than output paths are warned about."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        given = self.config[self.config.subcommand].model.get("init_args") or {}
        changed = sorted(k for k, v in saved.items() if k in given and k != "export_dir" and given[k] != v)
        if changed:
            rank_zero_warn(
                f"resuming {ckpt_path} with arguments that differ from the checkpoint's: "
                + ", ".join(f"{k} (checkpoint {saved[k]!r}, now {given[k]!r})" for k in changed)
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        every = self._get(self.config, "checkpoint_every", default=0) if self.subcommand == "fit" else 0
        if every and every > 0:
            trainer.callbacks.extend(resume_callbacks(checkpoint_dir(trainer), every))
        return trainer

    def _refuse_overwrite(self) -> None:
        """A new run (no checkpoint to resume) must not replace an earlier run's export or checkpoint silently."""
        config = self.config[self.subcommand]
        checkpoint = last_checkpoint(checkpoint_dir(self.trainer))
        if config.get("ckpt_path") not in (None, "last") or (
            config.get("ckpt_path") == "last" and checkpoint
        ):
            return  # resuming
        export_dir = getattr(self.model, "hparams", {}).get("export_dir")
        earlier = [checkpoint] if checkpoint else []
        if export_dir and is_export(Path(export_dir)):
            earlier.append(Path(export_dir))
        if earlier and not config.get("overwrite"):
            raise FileExistsError(
                f"an earlier run left {', '.join(map(str, earlier))}: resume it with --ckpt_path last, choose "
                "another export_dir and logger save_dir/name, or pass --overwrite true to start over (a second "
                "run on the same data spends its privacy budget again)"
            )
        if checkpoint:
            shutil.rmtree(checkpoint.parent, ignore_errors=True)

    def before_fit(self) -> None:
        if str(self.trainer.precision) in ("16-true", "16"):
            raise ValueError(
                f"precision {self.trainer.precision!r} trains in float16 without loss scaling: the loss turns "
                "non-finite and the export would be NaN; use 'bf16-mixed', '16-mixed' (GPU) or '32-true'"
            )
        export_dir = getattr(self.model, "hparams", {}).get("export_dir")
        if self.trainer.is_global_zero:
            self._refuse_overwrite()
            if export_dir:
                check_export_dir(export_dir)  # fail now, not after the budget is spent
        self._before = None
        if self.config.get(self.subcommand, {}).get("validate_before_fit"):
            results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._before = results[0] if results else None

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        after = {k: v for k, v in self.trainer.callback_metrics.items() if k.startswith("val")}
        if self._before:
            print(f"validation before fit: {_format_metrics(self._before)}")
        if after:
            print(f"validation after fit:  {_format_metrics(after)}")
        for callback in self.trainer.callbacks:
            if isinstance(callback, DPCallback) and callback.delta is not None and callback.noise_multiplier:
                print(
                    f"privacy: (ε={callback.epsilon:.3f}, δ={callback.delta:.3g})-DP after {callback.steps} "
                    f"Poisson batches (q={callback.sample_rate:.4g}, σ={callback.noise_multiplier:.4g}, "
                    f"C={callback.max_grad_norm:g}, {callback.accountant_name.upper()} accountant); "
                    f"report: {getattr(callback, 'report_path', 'not written')}"
                )


def main(args: list[str] | None = None, run: bool = True) -> LitDPRLCLI:
    """Entry point of ``lit-dprl fit|validate``; ``run=False`` only builds the trainer, model and
    data (``args`` then has no subcommand), as the audit does before it inserts its canaries. Given ``args``
    (the pipeline, the audit, tests), the process's own command line is not read."""
    own_argv = sys.argv[:1] if args is not None else sys.argv
    with mock.patch.object(sys, "argv", own_argv):
        return LitDPRLCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"exit_on_error": False},  # errors raise: lit-dprl prints them on one line
            args=args,
            run=run,
        )

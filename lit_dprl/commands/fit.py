"""The command line: ``lit-dprl fit --config configs/<task>/<stage>.yaml``.

A thin ``LightningCLI``: any LightningModule/DataModule by ``class_path``, ``DPCallback`` under
``trainer.callbacks``. After ``fit`` it prints the privacy guarantee and, with
``--validate_before_fit=true``, the validation metrics before and after training.
"""

from __future__ import annotations

import os
import sys
from unittest import mock

from lightning.pytorch.cli import LightningCLI

from lit_dprl.privacy import DPCallback
from lit_dprl.privacy.report import check_export_dir

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

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--validate_before_fit",
            type=bool,
            default=False,
            help="Run validation before fit so the summary shows metrics before and after training.",
        )

    def before_fit(self) -> None:
        if str(self.trainer.precision) in ("16-true", "16"):
            raise ValueError(
                f"precision {self.trainer.precision!r} trains in float16 without loss scaling: the loss turns "
                "non-finite and the export would be NaN; use 'bf16-mixed', '16-mixed' (GPU) or '32-true'"
            )
        export_dir = getattr(self.model, "hparams", {}).get("export_dir")
        if export_dir and self.trainer.is_global_zero:
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
            if isinstance(callback, DPCallback) and callback.delta is not None:
                print(
                    f"privacy: (ε={callback.epsilon:.3f}, δ={callback.delta:.3g})-DP after {callback.steps} "
                    f"Poisson batches (q={callback.sample_rate:.4g}, σ={callback.noise_multiplier:.4g}, "
                    f"C={callback.max_grad_norm:g}, {callback.accountant_name.upper()} accountant); "
                    f"report: {getattr(callback, 'report_path', 'not written')}"
                )


def main(args: list[str] | None = None, run: bool = True) -> LitDPRLCLI:
    """Entry point of ``lit-dprl fit|validate|test|predict``; ``run=False`` only builds the trainer, model and
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

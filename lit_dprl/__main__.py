"""The ``lit-dprl`` command (also ``python -m lit_dprl``): one entry point for every command.

- ``fit`` / ``validate`` / ``test`` / ``predict``: train or evaluate one stage (``lit_dprl.cli``, LightningCLI);
- ``pipeline``: every stage of a pipeline YAML (``lit_dprl.pipeline``);
- ``sweep``: the privacy-utility sweep (``lit_dprl.sweep``);
- ``audit``: the empirical privacy audit of one stage (``lit_dprl.audit``).

Everything runs offline: the Hugging Face hub and datasets are set offline unless the environment says
otherwise.
"""

from __future__ import annotations

import importlib
import os
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = {
    **dict.fromkeys(LIGHTNING_COMMANDS, "lit_dprl.cli"),
    "pipeline": "lit_dprl.pipeline",
    "sweep": "lit_dprl.sweep",
    "audit": "lit_dprl.audit",
}
USAGE = f"usage: lit-dprl {{{','.join(COMMANDS)}}} [--help] ...\n\n" + (__doc__ or "")


def main(args: list[str] | None = None) -> None:
    """Run ``lit-dprl COMMAND ...``; the command's own ``--help`` lists its arguments. Returns None, so that the
    console script's ``sys.exit(main())`` exits with 0 (the commands' own ``main`` return their results)."""
    argv = sys.argv[1:] if args is None else list(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = argv[0]
    if command not in COMMANDS:
        sys.exit(
            f"lit-dprl: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (see lit-dprl --help)"
        )
    entry = importlib.import_module(COMMANDS[command]).main
    if command in LIGHTNING_COMMANDS:  # LightningCLI reads the subcommand itself (from sys.argv unless given)
        entry(None if args is None else argv)
    else:
        entry(argv[1:])


if __name__ == "__main__":
    main()

"""The ``lit-dprl`` command (also ``python -m lit_dprl``): one entry point for every command.

- ``fit`` / ``validate``: train or validate one stage (``lit_dprl.commands.fit``, LightningCLI);
- ``pipeline``: every stage of a pipeline YAML (``lit_dprl.commands.pipeline``);
- ``sweep``: the privacy-utility sweep (``lit_dprl.commands.sweep``);
- ``audit``: the empirical privacy audit of one stage (``lit_dprl.commands.audit``).

Everything runs offline: the Hugging Face hub and datasets are set offline unless the environment says
otherwise. A user error (a bad value, a missing or malformed file, a model that is not available offline, a DP
refusal) ends with one line, ``error: <what was wrong and what to do>``, and exit status 2; set
``LIT_DPRL_DEBUG=1`` for the whole traceback. A run stopped by SIGTERM saves its checkpoint at the end of the
current batch, says how to resume, and exits with status 143.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

LIGHTNING_COMMANDS = ("fit", "validate")  # the stages define no test_step / predict_step
COMMANDS = {
    **dict.fromkeys(LIGHTNING_COMMANDS, "lit_dprl.commands.fit"),
    "pipeline": "lit_dprl.commands.pipeline",
    "sweep": "lit_dprl.commands.sweep",
    "audit": "lit_dprl.commands.audit",
}
# exception types that mean "the input was wrong", not "the program is wrong" (the latter keep their traceback)
USER_ERRORS = (
    ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
    argparse.ArgumentError, FloatingPointError,
)  # fmt: skip
PACKAGE = str(Path(__file__).resolve().parent)
USAGE = f"usage: lit-dprl {{{','.join(COMMANDS)}}} [--help] ...\n\n" + (__doc__ or "")


def flush_denormals() -> None:
    """Treat denormal floats (|x| < 1.2e-38 in float32) as zero on the CPU. A LoRA adapter starts with B = 0, and
    a non-private run's first updates then carry denormals, which x86 CPUs process many times slower (measured:
    non-private GRPO with LoRA on SmolLM2 8x slower); no value that training or DP depends on is that small."""
    import torch

    torch.set_flush_denormal(True)


def main(args: list[str] | None = None) -> None:
    """Run ``lit-dprl COMMAND ...``; the command's own ``--help`` lists its arguments. Returns None, so that the
    console script's ``sys.exit(main())`` exits with 0 (the commands' own ``main`` return their results)."""
    argv = sys.argv[1:] if args is None else list(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    flush_denormals()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = argv[0]
    if command not in COMMANDS:
        sys.exit(
            f"lit-dprl: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (see lit-dprl --help)"
        )
    entry = importlib.import_module(COMMANDS[command]).main
    try:
        if (
            command in LIGHTNING_COMMANDS
        ):  # LightningCLI reads the subcommand itself (from sys.argv unless given)
            entry(None if args is None else argv)
        else:
            entry(argv[1:])
    except USER_ERRORS as error:
        if os.environ.get("LIT_DPRL_DEBUG"):
            raise
        sys.stderr.write(f"error: {one_line(own_cause(error))} (LIT_DPRL_DEBUG=1 shows the traceback)\n")
        sys.exit(2)
    except SystemExit as stop:
        if (
            type(stop).__name__ != "SIGTERMException"
        ):  # Lightning's, raised at the end of a batch after SIGTERM
            raise
        sys.stderr.write(
            "interrupted by SIGTERM: the run saved <save_dir>/<name>/checkpoints/last.ckpt; run the same command "
            "with --ckpt_path last to resume it (a pipeline resumes its interrupted stage by itself)\n"
        )
        sys.exit(143)


def own_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain raised by lit_dprl itself (jsonargparse wraps a stage's own
    message in its union noise), else ``error`` (e.g. jsonargparse's own "Parser key ...: expected ...")."""
    found, current = error, error
    while current is not None:
        frames = traceback.extract_tb(current.__traceback__)
        if frames and frames[-1].filename.startswith(PACKAGE):
            found = current
        current = current.__cause__ or current.__context__
    return found


def one_line(error: BaseException) -> str:
    """``error``'s message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    main()

"""The grid of ``benchmarks/audit_table.py``: its stages and runs, the ``lit-dprl audit`` command of each, and
running it or reusing a complete earlier run (``OUT/STAGE/RUN``)."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUDIT_NAME = "audit.json"  # lit_dprl.commands.audit.AUDIT_NAME (not imported: the runs are subprocesses)
LOG_NAME = "audit.log"
META_NAME = "table_run.json"
QUICK_STEPS = 4
BREAK_FACTOR = 100.0
REQUIRED_KEYS = (
    "epsilon_lower_bound",
    "epsilon_claimed",
    "confidence",
    "delta",
    "canaries",
    "included",
    "guesses",
    "correct",
    "epsilon_max_detectable",
    "violation",
    "arguments",
    "mode",
)
# every run: no progress output, no validation (the audit scores its canaries itself), δ well below 1/(2m)
COMMON = (
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=0",
    "--trainer.callbacks.init_args.target_delta=1e-5",
)
PAIRS_POWER = (  # reward model and DPO: 100 steps over 50 real pairs + the canaries, every weight trained
    "--trainer.max_steps=100",
    "--trainer.max_epochs=-1",
    "--data.init_args.val_fraction=0.9",
    "--data.init_args.max_length=64",
    "--model.init_args.use_lora=false",
    "--model.init_args.learning_rate=3e-3",
)


@dataclass(frozen=True)
class Stage:
    """One stage config of the table and the overrides it is audited with."""

    key: str
    config: str
    setting: str  # the training the overrides give, in words
    overrides: tuple[str, ...]
    runs: tuple[str, ...] = ("eps1", "eps4", "eps8", "non-private", "broken")


@dataclass(frozen=True)
class Run:
    """One column of the grid: a claimed ε, no DP, or the planted noise bug."""

    key: str
    label: str
    epsilon: float | None  # the target ε of the DPCallback (None: not set, the run is not private)
    non_private: bool = False
    break_noise: float | None = None


STAGES = {
    stage.key: stage
    for stage in (
        Stage(
            "sft",
            "configs/tiny/sft.yaml",
            "README's overrides: 100 steps over 64 reviews (32 tokens), every weight, learning rate 3e-3",
            (
                "--trainer.max_steps=100",
                "--data.init_args.max_train_examples=64",
                "--data.init_args.max_length=32",
                "--model.init_args.use_lora=false",
                "--model.init_args.learning_rate=3e-3",
            ),
        ),
        Stage(
            "reward",
            "configs/tiny/reward.yaml",
            "100 steps over 50 pairs (64 tokens), every weight, learning rate 3e-3",
            PAIRS_POWER,
        ),
        Stage(
            "dpo",
            "configs/tiny/dpo.yaml",
            "as the reward model: 100 steps over 50 pairs (64 tokens), every weight (frozen reference copy), "
            "learning rate 3e-3",
            PAIRS_POWER,
        ),
        Stage(
            "dpo-lora",
            "configs/tiny/dpo.yaml",
            "the config's own training: LoRA adapter (r = 4), 2 epochs over 400 pairs (256 tokens), "
            "learning rate 2e-3",
            (),
            ("eps8", "non-private"),
        ),
        Stage(
            "grpo",
            "configs/tiny/grpo.yaml",
            "the audit docstring's overrides: 30 rollout batches of 64 of the 256 prompts + canaries, "
            "one response token",
            (
                "--trainer.max_steps=30",
                "--data.init_args.batch_size=64",
                "--model.init_args.min_new_tokens=1",
                "--model.init_args.max_new_tokens=1",
            ),
        ),
    )
}
RUNS = {
    run.key: run
    for run in (
        Run("eps1", "ε = 1", 1.0),
        Run("eps4", "ε = 4", 4.0),
        Run("eps8", "ε = 8", 8.0),
        Run("non-private", "non-private", None, non_private=True),
        Run("broken", f"broken (noise ÷ {BREAK_FACTOR:g}, ε = 1 reported)", 1.0, break_noise=BREAK_FACTOR),
    )
}


@dataclass
class Row:
    """A finished (or failed) run of the grid: its audit (None if it failed) and how it was produced."""

    stage: Stage
    run: Run
    command: list[str]
    folder: Path
    audit: dict[str, Any] | None
    wall_s: float | None


def config_args(stage: Stage, run: Run, quick: bool) -> list[str]:
    """The LightningCLI arguments of one run, as ``audit.json`` records them under ``arguments``."""
    args = ["--config", stage.config, *COMMON, *stage.overrides]
    if quick:
        args.append(f"--trainer.max_steps={QUICK_STEPS}")
    if run.epsilon is not None:
        args.append(f"--trainer.callbacks.init_args.target_epsilon={run.epsilon:g}")
    return args


def audit_command(
    stage: Stage, run: Run, canaries: int, folder: Path, quick: bool, mode: str = "black-box"
) -> list[str]:
    """``python -m lit_dprl audit ...`` for one run (the interpreter is the running one)."""
    flags = ["--canaries", str(canaries), "--out", str(folder)]
    if mode != "black-box":
        flags += ["--mode", mode]
    if run.non_private:
        flags.append("--non-private")
    if run.break_noise is not None:
        flags += ["--break-noise", f"{run.break_noise:g}"]
    args = config_args(stage, run, quick)
    return [sys.executable, "-m", "lit_dprl", "audit", args[0], args[1], *flags, "--", *args[2:]]


def shown(command: list[str]) -> str:
    """A command as a shell line, with ``python`` for the interpreter's path."""
    return shlex.join(["python", *command[1:]])


def reusable(
    folder: Path, expected_args: list[str], canaries: int, mode: str = "black-box"
) -> tuple[dict[str, Any], float] | None:
    """The audit and wall time of a complete earlier run of the same arguments and mode in ``folder``, else
    None."""
    try:
        audit = json.loads((folder / AUDIT_NAME).read_text())
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    complete = all(key in audit for key in REQUIRED_KEYS) and "wall_s" in meta
    same = audit["arguments"] == expected_args and audit["canaries"] == canaries and audit["mode"] == mode
    if not complete or not same:
        return None
    return audit, float(meta["wall_s"])


def execute(command: list[str], folder: Path, threads: int) -> tuple[dict[str, Any] | None, float]:
    """Run one audit, its output to ``audit.log``; the audit (None if it failed) and the wall time."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / AUDIT_NAME).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    with (folder / LOG_NAME).open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall_s = time.perf_counter() - start
    if code != 0:
        return None, wall_s
    meta = {"command": shown(command), "wall_s": wall_s, "finished": now().isoformat(timespec="seconds")}
    (folder / META_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return json.loads((folder / AUDIT_NAME).read_text()), wall_s


def now() -> datetime.datetime:
    """The current UTC time."""
    return datetime.datetime.now(datetime.UTC)


def run_folder(out: Path, stage: Stage, run: Run, mode: str) -> Path:
    """``OUT/STAGE/RUN``, with a ``-white-box`` suffix for a white-box run."""
    return out / stage.key / (run.key if mode == "black-box" else f"{run.key}-{mode}")


def run_grid(
    stages: list[Stage],
    canaries: int,
    out: Path,
    quick: bool,
    rerun: bool,
    threads: int,
    mode: str = "black-box",
    only: set[str] | None = None,
) -> list[Row]:
    """Every run of ``stages`` (those of ``only`` if given) in ``mode``, reusing complete earlier runs unless
    ``rerun``."""
    rows = []
    for stage in stages:
        for run in (RUNS[key] for key in stage.runs if only is None or key in only):
            folder = run_folder(out, stage, run, mode)
            command = audit_command(stage, run, canaries, folder, quick, mode)
            earlier = None if rerun else reusable(folder, config_args(stage, run, quick), canaries, mode)
            audit, wall_s = earlier or execute(command, folder, threads)
            status = "reused" if earlier else ("done" if audit else f"FAILED (see {folder / LOG_NAME})")
            bound = f"ε_emp = {audit['epsilon_lower_bound']:.2f}" if audit else ""
            print(f"{stage.key:>9} {run.key:>11}: {status} {bound} ({wall_s:.0f} s)", flush=True)
            rows.append(Row(stage, run, command, folder, audit, wall_s))
    return rows

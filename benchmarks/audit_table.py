"""The measured audit table of docs/audit.md: ε claimed vs the empirical lower bound ε_emp, DP and non-DP.

    python benchmarks/audit_table.py                                  # the full grid -> docs/audit.md
    python benchmarks/audit_table.py --stages sft,reward --quick      # smoke check -> runs/audit-table/audit.md
    python benchmarks/audit_table.py --stages sft,grpo --runs non-private,eps1 --mode white-box --doc OUT.md

Every row is one ``python -m lit_dprl audit`` run (a subprocess, secret canary coins) of a tiny stage config
with the overrides that give the audit power where it has any (many passes over a small private set, every
weight trained, δ = 1e-5), at ε ∈ {1, 4, 8}, without DP (the power check: a stage whose canaries are not
detected even then says nothing with its DP rows) and with a planted bug (``--break-noise 100`` at ε = 1: the
noise is divided by 100 while ε = 1 is still reported, which the audit must flag). Each run writes
``OUT/STAGE/RUN/audit.json`` (``OUT/STAGE/RUN-white-box/`` with ``--mode white-box``: canaries scored by the
update along their gradient at initialisation instead of by their statistic's change), ``audit.log`` and
``table_run.json`` (command, wall time); a run whose three files are there and whose audit matches the
requested arguments and mode is reused, so an
interrupted table resumes (``--rerun`` runs everything again). The table and a plain reading computed from
the measurements go to ``--doc``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

AUDIT_NAME = "audit.json"  # lit_dprl.commands.audit.AUDIT_NAME (not imported: the runs are subprocesses)
LOG_NAME = "audit.log"
META_NAME = "table_run.json"
DEFAULT_DOC = Path("docs/audit.md")
DEFAULT_CANARIES = 256
QUICK_CANARIES = 16
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


def number(value: float) -> str:
    """ε as the table shows it: two decimals, ∞ for a run without DP."""
    return "∞" if math.isinf(value) else f"{value:.2f}"


def table_line(row: Row) -> str:
    """One Markdown table row (dashes for a failed run)."""
    head = [f"`{row.stage.key}`", row.run.label]
    if row.audit is None:
        return "| " + " | ".join([*head, *["—"] * 9, "failed"]) + " |"
    a = row.audit
    cells = [
        a["mode"],
        number(a["epsilon_claimed"]),
        f"**{number(a['epsilon_lower_bound'])}**",
        str(a["canaries"]),
        str(a["included"]),
        str(a["guesses"]),
        str(a["correct"]),
        number(a["epsilon_max_detectable"]),
        "**yes**" if a["violation"] else "no",
        f"{row.wall_s:.0f} s",
    ]
    return "| " + " | ".join([*head, *cells]) + " |"


def table(rows: list[Row]) -> list[str]:
    """The Markdown table of all rows."""
    confidences = {row.audit["confidence"] for row in rows if row.audit}
    level = "/".join(f"{c:.0%}".replace("%", " %") for c in sorted(confidences)) or "95 %"
    header = (
        f"| stage | run | mode | ε claimed | ε_emp ({level}) | m | included | guesses | correct | max detectable "
        "ε | flagged? (ε_emp > ε claimed) | wall time |"
    )
    return [header, "|" + "---|" * 12, *(table_line(row) for row in rows)]


def power_sentence(public: dict[str, Any] | None) -> str:
    """Whether the canaries are detected at all: the non-private run's ε_emp."""
    if public is None:
        return "no non-private run, so its power is unknown"
    right = f"{public['correct']}/{public['guesses']} guesses right"
    if public["epsilon_lower_bound"] > 0:
        return f"the canaries have power: without DP ε_emp = {public['epsilon_lower_bound']:.2f} ({right})"
    return (
        f"**no power**: ε_emp = 0 even without DP ({right}), so its DP rows only show that the claim is not "
        "contradicted, not that it is tight"
    )


def private_sentences(private: list[tuple[Run, dict[str, Any]]]) -> list[str]:
    """The DP runs' bounds, the flagged ones, and the claims above what the canaries can show."""
    if not private:
        return []
    bounds = ", ".join(f"{run.label}: {audit['epsilon_lower_bound']:.2f}" for run, audit in private)
    flagged = [run.label for run, audit in private if audit["violation"]]
    verdict = f"**flagged** at {', '.join(flagged)}" if flagged else "none exceeds its claim"
    sentences = [f"DP runs ε_emp {bounds} ({verdict})"]
    beyond = [
        run.label for run, audit in private if audit["epsilon_claimed"] > audit["epsilon_max_detectable"]
    ]
    if beyond:
        most = max(audit["epsilon_max_detectable"] for _, audit in private)
        sentences.append(
            f"the claims {', '.join(beyond)} exceed the most these m canaries can ever show ({most:.2f}), so "
            "no leak could contradict them here"
        )
    return sentences


def broken_sentence(broken: dict[str, Any] | None) -> list[str]:
    """Whether the planted noise bug is caught."""
    if broken is None:
        return []
    caught = "is flagged" if broken["violation"] else "is **not** flagged (the audit misses it)"
    return [
        f"the planted bug (noise ÷ {BREAK_FACTOR:g}, ε = {number(broken['epsilon_claimed'])} still claimed) "
        f"{caught}: ε_emp = {broken['epsilon_lower_bound']:.2f}"
    ]


def stage_reading(stage: Stage, rows: list[Row]) -> str:
    """What the measurements of one stage say: power, violations, the planted bug, claims out of reach."""
    done = {row.run.key: row.audit for row in rows if row.audit is not None}
    private = [(RUNS[key], audit) for key, audit in done.items() if key not in ("non-private", "broken")]
    sentences = [
        power_sentence(done.get("non-private")),
        *private_sentences(private),
        *broken_sentence(done.get("broken")),
    ]
    return f"**`{stage.key}`** ({stage.setting}): " + "; ".join(sentences) + "."


def machine_note(threads: int) -> str:
    """CPU, cores, load, threads and library versions of this machine."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return (
        f"{model}, {os.cpu_count()} cores shared with other jobs (niceness "
        f"{os.getpriority(os.PRIO_PROCESS, 0)}), OMP_NUM_THREADS={threads}, no GPU; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {version('torch')}, lightning {version('lightning')}, opacus {version('opacus')}"
    )


def preamble(rows: list[Row], invocation: str, date: str, quick: bool) -> list[str]:
    """How the table was measured: the date, the command, and what its numbers mean."""
    audits = [row.audit for row in rows if row.audit is not None]
    deltas = ", ".join(f"{d:g}" for d in sorted({a["delta"] for a in audits}))
    sizes = ", ".join(str(m) for m in sorted({a["canaries"] for a in audits}))
    scope = "a --quick smoke check: too few steps and canaries to mean anything" if quick else "the grid"
    return [
        f"Measured {date} by `{invocation}` ({scope}), which wrote every row below; rerunning it regenerates "
        "this page.",
        "",
        "Each row is one one-run audit (`lit-dprl audit`; Steinke, Nasr & Jagielski 2023) of a tiny stage "
        "config (random 2-layer GPT-2) with secret canary coins, so a rerun gives other numbers within the "
        "bound's randomness. ε_emp is a lower bound on the ε of the training run that holds with the stated "
        "confidence if the run is as private as it claims; **flagged** means ε_emp > ε claimed, a measured "
        f"violation. δ = {deltas}, m = {sizes} canaries. The trained weights are never exported.",
    ]


def render(rows: list[Row], invocation: str, machine: str, date: str, quick: bool) -> str:
    """docs/audit.md: date, commands, machine, table and the reading, from the rows' audits."""
    failed = [
        f"`{row.stage.key}` {row.run.label} ({row.folder / LOG_NAME})" for row in rows if row.audit is None
    ]
    lines = [
        "# Empirical privacy audit: ε claimed vs ε_emp",
        "",
        *preamble(rows, invocation, date, quick),
        "",
        f"Machine: {machine}. Wall time: one audit run, training and scoring included "
        f"({sum(row.wall_s or 0 for row in rows) / 60:.1f} min for the {len(rows)} runs).",
        "",
        *table(rows),
        "",
        *([f"Failed runs: {', '.join(failed)}.", ""] if failed else []),
        "## Reading",
        "",
        *(
            f"- {stage_reading(stage, [r for r in rows if r.stage is stage])}"
            for stage in unique_stages(rows)
        ),
        "",
        "## Commands",
        "",
        "Each run, as the script ran it (`--out` is the run's folder):",
        "",
        "```bash",
        *(shown(row.command) for row in rows),
        "```",
        "",
    ]
    return "\n".join(lines)


def unique_stages(rows: list[Row]) -> list[Stage]:
    """The stages of ``rows`` in their order of first appearance."""
    return list(dict.fromkeys(row.stage for row in rows))


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"Comma-separated, of {', '.join(STAGES)} (default: all)."
    )
    parser.add_argument("--canaries", type=int, default=None, help=f"m per run (default {DEFAULT_CANARIES}).")
    parser.add_argument("--out", type=Path, default=Path("runs/audit-table"), help="Folder of the runs.")
    parser.add_argument("--doc", type=Path, default=None, help=f"Markdown out (default {DEFAULT_DOC}).")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"Smoke check: {QUICK_STEPS} steps, m = {QUICK_CANARIES}, doc to OUT/audit.md.",
    )
    parser.add_argument(
        "--runs", default=None, help=f"Comma-separated, of {', '.join(RUNS)} (default: each stage's own)."
    )
    parser.add_argument(
        "--mode",
        choices=("black-box", "white-box"),
        default="black-box",
        help="How the audits score their canaries (lit-dprl audit --mode; default black-box).",
    )
    parser.add_argument("--rerun", action="store_true", help="Rerun runs whose audit.json is already there.")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (default 1).")
    ns = parser.parse_args(argv)
    unknown = [key for key in ns.stages.split(",") if key not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    unknown_runs = [key for key in (ns.runs or "").split(",") if key and key not in RUNS]
    if unknown_runs:
        parser.error(f"unknown runs {unknown_runs}; choose from {list(RUNS)}")
    return ns


def main(argv: list[str] | None = None) -> Path:
    """Run (or reuse) the grid and write the Markdown; returns its path."""
    ns = parse(argv)
    stages = [STAGES[key] for key in ns.stages.split(",")]
    canaries = ns.canaries or (QUICK_CANARIES if ns.quick else DEFAULT_CANARIES)
    doc = ns.doc or (ns.out / "audit.md" if ns.quick else DEFAULT_DOC)
    invocation = shlex.join(
        ["python", "benchmarks/audit_table.py", *(sys.argv[1:] if argv is None else argv)]
    )
    machine = machine_note(ns.threads)
    only = set(ns.runs.split(",")) if ns.runs else None
    rows = run_grid(stages, canaries, ns.out, ns.quick, ns.rerun, ns.threads, ns.mode, only)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render(rows, invocation, machine, now().date().isoformat(), ns.quick))
    print(f"wrote {doc}")
    return doc


if __name__ == "__main__":
    main()

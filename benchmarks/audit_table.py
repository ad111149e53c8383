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
import math
import os
import platform
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from audit_runs import (
    BREAK_FACTOR,
    LOG_NAME,
    QUICK_STEPS,
    RUNS,
    STAGES,
    Row,
    Run,
    Stage,
    now,
    run_grid,
    shown,
)

DEFAULT_DOC = Path("docs/audit.md")
DEFAULT_CANARIES = 256
QUICK_CANARIES = 16


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

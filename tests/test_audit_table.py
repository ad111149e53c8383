"""benchmarks/audit_table.py without training: resuming from earlier runs and the Markdown it writes."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def table():
    """The script as a module (benchmarks/ is not a package; the script imports its sibling ``audit_runs``)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("audit_table")
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in ("audit_table", "audit_runs"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def runs(table):
    """The script's grid: stages, runs, and running or reusing them."""
    return sys.modules["audit_runs"]


def fake_run(runs, out: Path, stage: str, run: str, bound: float, claimed: float, canaries: int = 8,
             mode: str = "black-box") -> None:  # fmt: skip
    """An earlier run's audit.json and table_run.json, as the script leaves them."""
    folder = runs.run_folder(out, runs.STAGES[stage], runs.RUNS[run], mode)
    folder.mkdir(parents=True)
    audit = {
        "epsilon_lower_bound": bound,
        "epsilon_claimed": claimed,
        "confidence": 0.95,
        "delta": 1e-5,
        "canaries": canaries,
        "included": 4,
        "guesses": 4,
        "correct": 4 if bound > 0 else 2,
        "epsilon_max_detectable": 2.0,
        "violation": bound > claimed,
        "arguments": runs.config_args(runs.STAGES[stage], runs.RUNS[run], quick=False),
        "mode": mode,
    }
    (folder / runs.AUDIT_NAME).write_text(json.dumps(audit))
    (folder / runs.META_NAME).write_text(json.dumps({"wall_s": 12.0}))


def test_complete_runs_are_reused_and_rendered(table, runs, tmp_path, monkeypatch):
    measured = {"eps1": (0.0, 1.0), "eps4": (0.0, 4.0), "eps8": (0.5, 8.0), "non-private": (1.5, math.inf),
                "broken": (1.8, 1.0)}  # fmt: skip
    for run, (bound, claimed) in measured.items():
        fake_run(runs, tmp_path, "reward", run, bound, claimed)
    fake_run(runs, tmp_path, "grpo", "non-private", 0.0, math.inf)
    fake_run(runs, tmp_path, "grpo", "eps8", 0.0, 8.0, canaries=16)  # another m: not reusable

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run was not reused")

    monkeypatch.setattr(subprocess, "run", no_training)
    rows = runs.run_grid([runs.STAGES["reward"]], 8, tmp_path, quick=False, rerun=False, threads=1)
    assert [row.audit["epsilon_lower_bound"] for row in rows] == [0.0, 0.0, 0.5, 1.5, 1.8]
    assert runs.reusable(tmp_path / "grpo" / "eps8", rows[0].audit["arguments"], 16) is None

    stage, run = runs.STAGES["grpo"], runs.RUNS["non-private"]
    earlier = runs.reusable(tmp_path / "grpo" / "non-private", runs.config_args(stage, run, quick=False), 8)
    grpo = runs.Row(stage, run, ["python"], tmp_path, *earlier)
    text = table.render(
        [*rows, grpo], "python benchmarks/audit_table.py", "a test machine", "2026-12-04", False
    )
    lines = text.splitlines()
    assert "| `reward` | ε = 8 | black-box | 8.00 | **0.50** | 8 | 4 | 4 | 4 | 2.00 | no | 12 s |" in lines
    assert "| `reward` | non-private | black-box | ∞ | **1.50** | 8 | 4 | 4 | 4 | 2.00 | no | 12 s |" in lines
    assert any(line.startswith("| `reward` | broken") and "| **yes** |" in line for line in lines)
    reading = "\n".join(line for line in lines if line.startswith("- "))
    assert "the canaries have power: without DP ε_emp = 1.50" in reading
    assert "the claims ε = 4, ε = 8 exceed the most these m canaries can ever show (2.00)" in reading
    assert "is flagged: ε_emp = 1.80" in reading
    assert "**`grpo`**" in reading and "**no power**" in reading
    assert "Measured 2026-12-04 by `python benchmarks/audit_table.py`" in text and "a test machine" in text


def test_white_box_runs_have_their_own_folders_and_are_not_mixed_up(table, runs, tmp_path, monkeypatch):
    fake_run(runs, tmp_path, "grpo", "non-private", 0.0, math.inf)  # a black-box run only
    fake_run(runs, tmp_path, "grpo", "eps1", 0.7, 1.0, mode="white-box")
    stage = runs.STAGES["grpo"]
    commands = []

    def fake_subprocess(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1)  # fails: no audit.json

    monkeypatch.setattr(subprocess, "run", fake_subprocess)
    rows = runs.run_grid([stage], 8, tmp_path, False, False, 1, "white-box", {"non-private", "eps1"})
    assert [row.run.key for row in rows] == ["eps1", "non-private"]  # the stage's order, only those asked
    assert rows[0].audit["epsilon_lower_bound"] == 0.7 and rows[1].audit is None  # black-box is not reused
    assert rows[1].folder == tmp_path / "grpo" / "non-private-white-box"
    assert len(commands) == 1 and commands[0][commands[0].index("--mode") + 1] == "white-box"
    assert "| `grpo` | ε = 1 | white-box | 1.00 | **0.70** |" in table.table_line(rows[0])

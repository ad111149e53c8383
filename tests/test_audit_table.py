"""benchmarks/audit_table.py without training: resuming from earlier runs and the Markdown it writes."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "audit_table.py"


@pytest.fixture(scope="module")
def table():
    """The script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("audit_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def fake_run(table, out: Path, stage: str, run: str, bound: float, claimed: float, canaries: int = 8,
             mode: str = "black-box") -> None:  # fmt: skip
    """An earlier run's audit.json and table_run.json, as the script leaves them."""
    folder = table.run_folder(out, table.STAGES[stage], table.RUNS[run], mode)
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
        "arguments": table.config_args(table.STAGES[stage], table.RUNS[run], quick=False),
        "mode": mode,
    }
    (folder / table.AUDIT_NAME).write_text(json.dumps(audit))
    (folder / table.META_NAME).write_text(json.dumps({"wall_s": 12.0}))


def test_complete_runs_are_reused_and_rendered(table, tmp_path, monkeypatch):
    measured = {"eps1": (0.0, 1.0), "eps4": (0.0, 4.0), "eps8": (0.5, 8.0), "non-private": (1.5, math.inf),
                "broken": (1.8, 1.0)}  # fmt: skip
    for run, (bound, claimed) in measured.items():
        fake_run(table, tmp_path, "reward", run, bound, claimed)
    fake_run(table, tmp_path, "grpo", "non-private", 0.0, math.inf)
    fake_run(table, tmp_path, "grpo", "eps8", 0.0, 8.0, canaries=16)  # another m: not reusable

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run was not reused")

    monkeypatch.setattr(subprocess, "run", no_training)
    rows = table.run_grid([table.STAGES["reward"]], 8, tmp_path, quick=False, rerun=False, threads=1)
    assert [row.audit["epsilon_lower_bound"] for row in rows] == [0.0, 0.0, 0.5, 1.5, 1.8]
    assert table.reusable(tmp_path / "grpo" / "eps8", rows[0].audit["arguments"], 16) is None

    stage, run = table.STAGES["grpo"], table.RUNS["non-private"]
    earlier = table.reusable(tmp_path / "grpo" / "non-private", table.config_args(stage, run, quick=False), 8)
    grpo = table.Row(stage, run, ["python"], tmp_path, *earlier)
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


def test_white_box_runs_have_their_own_folders_and_are_not_mixed_up(table, tmp_path, monkeypatch):
    fake_run(table, tmp_path, "grpo", "non-private", 0.0, math.inf)  # a black-box run only
    fake_run(table, tmp_path, "grpo", "eps1", 0.7, 1.0, mode="white-box")
    stage = table.STAGES["grpo"]
    commands = []

    def fake_subprocess(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1)  # fails: no audit.json

    monkeypatch.setattr(subprocess, "run", fake_subprocess)
    rows = table.run_grid([stage], 8, tmp_path, False, False, 1, "white-box", {"non-private", "eps1"})
    assert [row.run.key for row in rows] == ["eps1", "non-private"]  # the stage's order, only those asked
    assert rows[0].audit["epsilon_lower_bound"] == 0.7 and rows[1].audit is None  # black-box is not reused
    assert rows[1].folder == tmp_path / "grpo" / "non-private-white-box"
    assert len(commands) == 1 and commands[0][commands[0].index("--mode") + 1] == "white-box"
    assert "| `grpo` | ε = 1 | white-box | 1.00 | **0.70** |" in table.table_line(rows[0])

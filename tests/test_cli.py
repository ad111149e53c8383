"""The lit-dprl command: a user error ends in one line that says what was wrong, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LIT_DPRL_DEBUG": ""}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.model=gpt2", "error: model source 'gpt2' is not available offline"),
        ("--trainer.callbacks.init_args.target_epsilon=0", "error: target_epsilon must be positive, got 0.0"),
        ("--trainer.callbacks.init_args.max_grad_norm=-1", "error: max_grad_norm must be positive"),
        (
            "--data.init_args.source=missing.jsonl",
            "error: data source 'missing.jsonl' is not an existing local file",
        ),
        ("--trainer.max_steps=ten", 'error: Parser key "trainer.max_steps"'),
        ("--trainer.precision=16-true", "error: precision '16-true' trains in float16 without loss scaling"),
    ],
)
def test_a_user_error_is_one_line_with_exit_status_2_and_writes_nothing(tmp_path, override, message):
    export = tmp_path / "sft" / "model"
    done = subprocess.run(
        [sys.executable, "-m", "lit_dprl", "fit", "--config", "configs/tiny/sft.yaml", override,
         f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.export_dir={export}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Union subtypes" not in done.stderr
    assert not export.exists()


def test_an_export_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    foreign = tmp_path / "taken"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for export, message in [
        (foreign, "error: export directory"),
        ("/proc/lit_dprl/model", "error: cannot write the export directory /proc/lit_dprl/model"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "lit_dprl", "fit", "--config", "configs/tiny/sft.yaml",
             f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.export_dir={export}"],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert "Training" not in done.stdout and not list(tmp_path.rglob("metrics.csv"))  # no step was taken
    assert (foreign / "notes.txt").read_text() == "mine"


def test_debug_flag_keeps_the_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lit_dprl", "fit", "--config", "configs/tiny/sft.yaml",
         "--trainer.callbacks.init_args.target_epsilon=0", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        cwd=ROOT, env={**ENV, "LIT_DPRL_DEBUG": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_an_unknown_command_names_the_commands():
    done = subprocess.run(
        [sys.executable, "-m", "lit_dprl", "train"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "unknown command 'train'" in done.stderr and "pipeline" in done.stderr


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        (
            "sft",
            "--data.init_args.tokenizer=smollm2",
            "error: the data module's tokenizer ('smollm2') differs",
        ),
        (
            "sft",
            "--data.init_args.max_length=300",
            "error: data max_length=300 exceeds the model's context of 256",
        ),
        (
            "ppo",
            "--data.init_args.tokenizer=smollm2",
            "error: the data module's tokenizer ('smollm2') differs",
        ),
        (
            "ppo",
            "--data.init_args.max_prompt_tokens=250",
            "error: max_prompt_tokens + max_new_tokens=262 exceeds the model's context of 256 tokens",
        ),
        (
            "sft",
            "--trainer.callbacks.init_args.target_epsilon=0.001",
            "error: target_epsilon=0.001 cannot be reached: for this run (q=0.0625, 20 batches, δ=0.00224) the PRV "
            "accountant certifies no ε below",
        ),
        (
            "dpo",
            "--data.init_args.tokenizer=smollm2",
            "error: the data module's tokenizer ('smollm2') differs",
        ),
        (
            "dpo",
            "--data.init_args.max_length=300",
            "error: data max_length=300 exceeds the model's context of 256",
        ),
        (
            "classifier",
            "--data.init_args.tokenizer=smollm2",
            "error: the data module's tokenizer ('smollm2') differs",
        ),
        ("grpo", "--data.init_args.max_prompt_tokens=0", "error: max_prompt_tokens must be >= 1"),
        ("grpo", "--data.init_args.batch_size=0", "error: batch_size must be >= 1, got 0"),
        (
            "grpo",
            "--data.init_args.batch_size=300",
            "error: the training prompts number 256, fewer than batch_size=300",
        ),
    ],
)
def test_data_that_does_not_fit_the_model_or_a_budget_out_of_reach_is_refused_in_one_line(
    tmp_path, config, override, message
):
    export = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, "-m", "lit_dprl", "fit", "--config", f"configs/tiny/{config}.yaml", override,
         f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.export_dir={export}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), done.stderr[-2000:]
    assert not export.exists() and not list(tmp_path.rglob("*.ckpt"))


def test_an_sft_file_of_empty_texts_is_refused(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("".join(json.dumps({"text": " " * i + "\n" * (i % 3)}) + "\n" for i in range(1, 65)))
    done = subprocess.run(
        [sys.executable, "-m", "lit_dprl", "fit", "--config", "configs/tiny/sft.yaml", f"--data.init_args.source={data}",
         "--data.init_args.val_fraction=0.25", f"--trainer.logger.init_args.save_dir={tmp_path}",
         f"--model.init_args.export_dir={tmp_path / 'model'}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "every 'text' is empty, so there is nothing to learn" in done.stderr, (
        done.stderr[-2000:]
    )
    assert not (tmp_path / "model").exists()

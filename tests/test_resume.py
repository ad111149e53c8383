"""Interrupted runs: ``kill -9`` or SIGTERM mid-run, then the same command with ``--ckpt_path last`` (or the pipeline
rerun) ends with the same ε and number of accounted batches as an uninterrupted run; nothing is silently replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_dprl.commands.pipeline import main as run_pipeline

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LIT_DPRL_DEBUG": ""}


def fit_args(config: str, out: Path, *extra: str) -> list[str]:
    name = Path(config).stem
    return [sys.executable, "-m", "lit_dprl", "fit", "--config", config,
            f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={name}",
            f"--model.init_args.export_dir={out / 'model'}", *extra]  # fmt: skip


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def interrupt_at_first_checkpoint(args: list[str], checkpoint: Path, sig: int) -> tuple[int, str]:
    """Start ``args``, send ``sig`` as soon as ``checkpoint`` exists; the exit status and stderr."""
    log = checkpoint.parents[2] / f"stderr-{sig}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:
        process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        while not checkpoint.exists() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(sig)
        process.wait(timeout=300)
    return process.returncode, log.read_text()


def report(export: Path) -> dict:
    return json.loads((export / "privacy.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted_ppo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("whole")
    done = run(fit_args("configs/tiny/ppo.yaml", out, "--trainer.max_steps=16"))
    assert done.returncode == 0, done.stderr[-3000:]
    return report(out / "model")


def test_a_ppo_run_killed_with_sigkill_resumes_to_the_same_epsilon_and_batches(tmp_path, uninterrupted_ppo):
    args = fit_args("configs/tiny/ppo.yaml", tmp_path, "--trainer.max_steps=16", "--checkpoint_every=2")
    checkpoint = tmp_path / "ppo" / "checkpoints" / "last.ckpt"
    status, _ = interrupt_at_first_checkpoint(args, checkpoint, signal.SIGKILL)
    assert status == -signal.SIGKILL and not (tmp_path / "model").exists()  # killed mid-way
    steps_at_kill = torch.load(checkpoint, weights_only=False)["global_step"]
    assert 0 < steps_at_kill < 16

    again = run(args)  # the same command without resume is refused: it would spend the budget again
    assert again.returncode == 2 and "resume it with --ckpt_path last" in again.stderr, again.stderr[-2000:]
    resumed = run([*args, "--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    final = report(tmp_path / "model")
    assert final["steps"] == uninterrupted_ppo["steps"] == 16
    assert final["noise_multiplier"] == pytest.approx(uninterrupted_ppo["noise_multiplier"], rel=1e-9)
    assert final["epsilon"] == pytest.approx(uninterrupted_ppo["epsilon"], rel=1e-9)


def test_sigterm_saves_a_checkpoint_exits_143_and_the_run_resumes(tmp_path, uninterrupted_ppo):
    args = fit_args("configs/tiny/ppo.yaml", tmp_path, "--trainer.max_steps=16", "--checkpoint_every=4")
    checkpoint = tmp_path / "ppo" / "checkpoints" / "last.ckpt"
    status, stderr = interrupt_at_first_checkpoint(args, checkpoint, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "interrupted by SIGTERM" in stderr and "--ckpt_path last" in stderr
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] >= 4  # the batch that was running when the signal came is in the checkpoint
    ledger = next(v for k, v in saved["callbacks"].items() if k.startswith("DPCallback"))
    assert ledger["batches_drawn"] == saved["global_step"]
    resumed = run([*args, "--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = report(tmp_path / "model")
    assert final["steps"] == 16 and final["epsilon"] == pytest.approx(uninterrupted_ppo["epsilon"], rel=1e-9)


def test_resuming_a_finished_run_spends_nothing_and_keeps_the_command_lines_export_dir(tmp_path):
    args = fit_args("configs/tiny/sft.yaml", tmp_path / "a", "--trainer.max_steps=6", "--checkpoint_every=4")
    assert run(args).returncode == 0
    first = report(tmp_path / "a" / "model")
    resumed = run([*args, "--ckpt_path=last"])  # the final state is in last.ckpt: nothing is trained again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = report(tmp_path / "a" / "model")
    assert again["steps"] == first["steps"] == 6 and again["epsilon"] == first["epsilon"]
    marker = (tmp_path / "a" / "model" / "export_complete.json").read_text()
    checkpoint = tmp_path / "a" / "sft" / "checkpoints" / "last.ckpt"
    other = fit_args(
        "configs/tiny/sft.yaml", tmp_path / "b", "--trainer.max_steps=6", f"--ckpt_path={checkpoint}"
    )
    elsewhere = run(other)  # LightningCLI alone would take export_dir (a/model) from the checkpoint's hparams
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert report(tmp_path / "b" / "model")["steps"] == 6  # the history of the first run is kept
    assert (
        tmp_path / "a" / "model" / "export_complete.json"
    ).read_text() == marker  # its export is untouched


def test_a_second_run_replaces_an_export_only_with_overwrite(tmp_path):
    args = fit_args("configs/tiny/sft.yaml", tmp_path, "--trainer.max_steps=3")
    assert run(args).returncode == 0
    before = (tmp_path / "model" / "export_complete.json").read_text()
    refused = run(args)
    assert refused.returncode == 2 and "--overwrite true" in refused.stderr
    assert (tmp_path / "model" / "export_complete.json").read_text() == before  # nothing replaced
    assert run([*args, "--overwrite=true"]).returncode == 0
    assert (tmp_path / "model" / "export_complete.json").read_text() != before


def test_a_pipeline_killed_inside_its_second_stage_resumes_it_on_rerun(tmp_path, uninterrupted_ppo):
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        (ROOT / "configs/tiny/pipeline.yaml")
        .read_text()
        .replace(
            "config: configs/tiny/ppo.yaml",
            "config: configs/tiny/ppo.yaml\n    args: [--trainer.max_steps=16, --checkpoint_every=2]",
        )
    )
    args = [
        sys.executable,
        "-m",
        "lit_dprl",
        "pipeline",
        "--config",
        str(config),
        f"--run_dir={tmp_path / 'run'}",
    ]
    checkpoint = tmp_path / "run" / "ppo" / "checkpoints" / "last.ckpt"
    status, _ = interrupt_at_first_checkpoint(args, checkpoint, signal.SIGKILL)
    assert status == -signal.SIGKILL and not (tmp_path / "run" / "privacy_report.json").exists()
    result = run_pipeline(["--config", str(config), f"--run_dir={tmp_path / 'run'}"])
    ppo = result["privacy"]["stages"]["ppo"]
    assert ppo["steps"] == 16 and ppo["epsilon"] == pytest.approx(uninterrupted_ppo["epsilon"], rel=1e-9)
    assert result["privacy"]["epsilon"] == pytest.approx(
        max(ppo["epsilon"], result["privacy"]["stages"]["sft"]["epsilon"])
    )


def test_a_stage_whose_input_changed_is_trained_again(tmp_path, capsys):
    args = ["--config", "configs/tiny/pipeline.yaml", f"--run_dir={tmp_path}", "--evaluation=null"]
    run_pipeline(args)
    recorded = json.loads((tmp_path / "ppo" / "model" / "inputs.json").read_text())
    assert set(recorded) == {"model.init_args.model"} and all(recorded.values())
    run_pipeline(args)
    assert "ppo: reusing" in capsys.readouterr().out
    weights = next((tmp_path / "sft" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # not the SFT model PPO started from
    run_pipeline(args)
    out = capsys.readouterr().out
    assert "sft: reusing" in out and "ppo: its inputs changed since it was trained" in out


def test_a_checkpoint_keeps_trainable_weights_only_and_refuses_other_frozen_weights(tmp_path):
    import lightning.pytorch as pl

    from lit_dprl.commands.checkpoints import resume_callbacks
    from tests.toy_modules import ToyClassifier

    def frozen_first_layer(seed: int) -> ToyClassifier:
        torch.manual_seed(seed)
        module = ToyClassifier()
        module.net[0].requires_grad_(False)
        return module

    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=resume_callbacks(tmp_path, every_n_steps=2), default_root_dir=tmp_path)  # fmt: skip

    trainer(4).fit(frozen_first_layer(0))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == {"net.2.weight", "net.2.bias"} and saved["global_step"] == 4
    trainer(6).fit(
        frozen_first_layer(0), ckpt_path=tmp_path / "last.ckpt"
    )  # the same frozen weights: resumes
    with pytest.raises(ValueError, match="frozen weights of this model differ"):
        trainer(8).fit(frozen_first_layer(1), ckpt_path=tmp_path / "last.ckpt")

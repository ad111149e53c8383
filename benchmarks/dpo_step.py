"""Time one DP-DPO step against the same non-private DPO step, and optionally TRL's ``DPOTrainer`` (issue 17).

The non-DP and DP steps alternate in one process (both modules in memory: the peak RSS is theirs
together), so that load from other jobs on a shared machine slows both alike; the DP/non-DP ratio is the
median of the per-round ratios. A step of ``DPOModule`` is: two reference forwards (adapter
disabled, no grad), two policy forwards (chosen and rejected, row-aligned), the mean per-pair sigmoid
loss, one backward, AdamW; the DP step adds Opacus's per-example gradients (hooks), per-pair clipping
and noise through lit_dprl's DP optimizer, as ``DPCallback`` attaches them. The pairs are the first
``--batch`` real IMDb pairs of ``lit_dprl/data/fixtures/imdb_preferences.jsonl``, encoded as stage
``dpo`` encodes them. ``--trl`` also times TRL's ``DPOTrainer`` (non-private: same model, LoRA, β, batch,
pairs and ``max_length``) with the Python of ``.venv-trl`` (create it with ``python -m venv .venv-trl``,
a ``.pth`` file naming this project's site-packages, and ``pip install --no-deps trl``).

    python benchmarks/dpo_step.py                   # SmolLM2-135M, LoRA r=8 on q/v of all layers, 4 pairs
    python benchmarks/dpo_step.py --model tiny --trl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "lit_dprl" / "data" / "fixtures" / "imdb_preferences.jsonl"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
LORA = dict(lora_r=8, lora_alpha=16, lora_target_modules=None)
BETA = 0.1


def pair_rows(batch: int) -> list[dict]:
    """The first ``batch`` pairs of the fixture as ``{prompt, chosen, rejected, user_id}``."""
    from lit_dprl.data.preference_files import read_preference_file

    return read_preference_file(PAIRS)[:batch]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lit_dprl_step(args: argparse.Namespace, dp: bool):
    """A closure that takes one optimizer step of a fresh ``DPOModule`` (with DP-SGD when ``dp``)."""
    import torch
    from opacus.grad_sample import GradSampleHooks

    from lit_dprl.data.preferences import collate_preference_batch, encode_pairs
    from lit_dprl.privacy.optimizers import make_dp_optimizer
    from lit_dprl.stages.dpo import DPOModule

    torch.manual_seed(0)
    module = DPOModule(model=args.model, beta=BETA, **LORA).train()
    dataset, _ = encode_pairs(module.tokenizer, pair_rows(args.batch), args.max_length)
    batch = collate_preference_batch([dataset[i] for i in range(len(dataset))], module.tokenizer.pad_token_id)
    optimizer = module.configure_optimizers()
    if dp:
        GradSampleHooks(module, loss_reduction="mean")
        optimizer = make_dp_optimizer(
            optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=args.batch,
            distributed=False,
            generator=None,
        )

    def step() -> None:
        if dp:
            optimizer.start_batch(args.batch, 1)
        optimizer.zero_grad()
        losses, _ = module.pair_losses(batch)
        losses.mean().backward()
        optimizer.step()

    return step


def run_lit_dprl(args: argparse.Namespace) -> dict:
    """Non-DP and DP steps alternated in one process, so that a machine shared with other jobs slows both alike."""
    steps = {"plain": lit_dprl_step(args, dp=False), "dp": lit_dprl_step(args, dp=True)}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(args.steps):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
    ratios = [dp / plain for dp, plain in zip(times["dp"], times["plain"], strict=True)]
    return {
        "plain": {"median_s": statistics.median(times["plain"])},
        "dp": {"median_s": statistics.median(times["dp"]), "ratio": statistics.median(ratios)},
        "peak_mib": peak_mib(),
    }


def run_trl(args: argparse.Namespace) -> dict:
    """TRL's DPOTrainer (run in .venv-trl): the time of each optimizer step, from a TrainerCallback."""
    import tempfile

    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lit_dprl.models import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, tokenizer)
    rows = pair_rows(args.batch)
    texts = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
    data = datasets.Dataset.from_list(texts * (args.warmup + args.steps))

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.warmup + args.steps,
            learning_rate=5e-4,
            beta=BETA,
            max_length=args.max_length,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            seed=0,
        )
        lora = LoraConfig(
            r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        callback = StepTimes()
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[callback],
        )
        trainer.train()
    return {"median_s": statistics.median(callback.times[args.warmup :]), "peak_mib": peak_mib()}


def subprocess_result(python: str | Path, args: argparse.Namespace, mode: str) -> dict:
    cmd = [str(python), __file__, "--one", mode, "--model", args.model, "--batch", str(args.batch)]
    cmd += ["--max-length", str(args.max_length), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help='model source ("smollm2", "tiny", a local directory)'
    )
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--max-length", type=int, default=96, help="tokens per prompt + response")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (medians reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)"
    )
    parser.add_argument("--trl", action="store_true", help="also time TRL's DPOTrainer with .venv-trl")
    parser.add_argument("--one", choices=["lit_dprl", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_trl(args) if args.one == "trl" else run_lit_dprl(args)))
        return
    ours = subprocess_result(sys.executable, args, "lit_dprl")
    rows = {
        "lit_dprl DPOModule, non-DP": (ours["plain"]["median_s"], 1.0, ours["peak_mib"]),
        "lit_dprl DPOModule + DP-SGD": (ours["dp"]["median_s"], ours["dp"]["ratio"], ours["peak_mib"]),
    }
    if args.trl:
        if not TRL_PYTHON.is_file():
            raise SystemExit(f"--trl needs {TRL_PYTHON}: see this file's docstring")
        trl = subprocess_result(TRL_PYTHON, args, "trl")
        rows["TRL DPOTrainer, non-DP"] = (
            trl["median_s"],
            trl["median_s"] / ours["plain"]["median_s"],
            trl["peak_mib"],
        )
    print(f"DPO step, {args.model}, LoRA r={LORA['lora_r']} on q/v of every layer, {args.batch} pairs, max_length "
          f"{args.max_length}, {args.threads} CPU threads, median of {args.steps} steps")  # fmt: skip
    print("| trainer | step (s) | pairs/s | / lit_dprl non-DP | peak RSS MiB (process) |")
    print("|---|---|---|---|---|")
    for name, (seconds, ratio, peak) in rows.items():
        print(f"| {name} | {seconds:.3f} | {args.batch / seconds:.2f} | {ratio:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()

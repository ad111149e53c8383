"""Ghost clipping against hook-mode DP-SGD and the non-private step (issue 19 benchmark), full fine-tuning.

A random-init GPT-2-small-sized model (124M, tied embeddings) trains every weight; a step is: forward with
explicit position ids, per-sequence causal-LM loss, backward, AdamW step. "hooks" adds Opacus's per-example
gradients, clipping and noise (lit_dprl's DP optimizer); "ghost" is ``DPCallback(grad_sample_mode="ghost")``'s
step: norm pass with Opacus's ghost-norm hooks, backward of Σ c_i ℓ_i, noise once. Each (round, mode) runs in
a fresh subprocess, so peak memory (peak RSS on CPU, peak allocated on CUDA) is the mode's own, and the
rounds alternate the modes, so that load on a shared machine hits all of them alike. The step time is the
median over all rounds' timed steps.

    python benchmarks/ghost_clipping.py                      # GPT-2-small size, batch 8 x 128, 2 rounds x 1 step
    python benchmarks/ghost_clipping.py --model tiny         # seconds: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=2000),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}
MODES = ("plain", "hooks", "ghost")


def run_one(model_name: str, mode: str, batch: int, seq: int, steps: int, device: str) -> dict:
    """Step times (after one warm-up step) and peak memory of ``mode`` in this process."""
    import torch
    from opacus.grad_sample import GradSampleHooks
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_dprl.losses import causal_lm_sequence_loss, training_output
    from lit_dprl.models import position_ids_from_mask
    from lit_dprl.privacy.ghost import ghost_training_step, hook_norms
    from lit_dprl.privacy.optimizers import make_dp_optimizer

    torch.manual_seed(0)
    config = GPT2Config(
        n_positions=max(128, seq), resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **MODELS[model_name]
    )
    model = GPT2LMHeadModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if mode != "plain":
        hooks = hook_norms(model, 1.0) if mode == "ghost" else GradSampleHooks(model, loss_reduction="mean")
        optimizer = make_dp_optimizer(
            optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            distributed=False,
            generator=None,
            ghost=mode == "ghost",
        )
    ids = torch.randint(config.vocab_size, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    mask[:2, :10] = 0  # two left-padded rows

    def training_step(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(
            input_ids=rows["ids"], attention_mask=rows["mask"], position_ids=position_ids_from_mask(mask)
        )
        return training_output(causal_lm_sequence_loss(out.logits, rows["ids"], rows["mask"]))

    def step() -> None:
        optimizer.zero_grad()
        rows = {"ids": ids, "mask": mask}
        output = (
            ghost_training_step(hooks, optimizer, training_step, rows)
            if mode == "ghost"
            else training_step(rows)
        )
        output["loss"].backward()
        optimizer.step()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"mode": mode, "times_s": times, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="gpt2-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per round and mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.model, args.one, args.batch, args.seq, args.steps, args.device)))
        return
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    peaks: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--one", mode, "--model", args.model, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--device", args.device]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            times[mode] += result["times_s"]
            peaks[mode].append(result["peak_mib"])
    plain_time, plain_peak = statistics.median(times["plain"]), max(peaks["plain"])
    print(f"{args.model}, full fine-tuning, batch {args.batch} x {args.seq} tokens, device {args.device}, "
          f"{args.rounds} rounds x {args.steps} timed steps per mode")  # fmt: skip
    print("| mode | step (s), median | x non-DP | every timed step (s), by round | peak MiB | x non-DP |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        step_time, peak = statistics.median(times[mode]), max(peaks[mode])
        every = ", ".join(f"{t:.1f}" for t in times[mode])
        print(
            f"| {mode} | {step_time:.3f} | {step_time / plain_time:.2f} | {every} | {peak:.0f} | "
            f"{peak / plain_peak:.2f} |"
        )


if __name__ == "__main__":
    main()

"""Time one DP-SGD step against the same non-private step (issue 3 benchmark).

Each (model, mode) runs in a fresh subprocess so that peak memory is its own. A step is: forward with
explicit position ids, per-sequence causal-LM loss, backward, AdamW step; the DP step adds Opacus's
per-example gradients (hooks), clipping and noise through lit_dprl's DP optimizer, exactly as
``DPCallback`` attaches them.

    python benchmarks/dp_step.py                 # tiny GPT-2 and GPT-2-small-sized, LoRA r=8, batch 8x64
    python benchmarks/dp_step.py --models tiny   # one model
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


def run_one(model_name: str, mode: str, lora: bool, batch: int, seq: int, steps: int, device: str) -> dict:
    import torch
    from opacus.grad_sample import GradSampleHooks
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_dprl.losses import causal_lm_sequence_loss
    from lit_dprl.models import add_lora, position_ids_from_mask
    from lit_dprl.privacy.optimizers import make_dp_optimizer

    torch.manual_seed(0)
    config = GPT2Config(
        n_positions=max(128, seq), resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **MODELS[model_name]
    )
    model = GPT2LMHeadModel(config).to(device)
    if lora:
        model = add_lora(model, r=8, alpha=16, target_modules=["c_attn"])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if mode == "dp":
        GradSampleHooks(model, loss_reduction="mean")
        optimizer = make_dp_optimizer(
            optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            distributed=False,
            generator=None,
        )
    ids = torch.randint(config.vocab_size, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    mask[:2, :10] = 0  # two left-padded rows

    def step() -> None:
        optimizer.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        causal_lm_sequence_loss(out.logits, ids, mask).mean().backward()
        optimizer.step()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
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
    return {
        "model": model_name,
        "mode": mode,
        "lora": lora,
        "median_s": statistics.median(times),
        "peak_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    lora = not args.full_finetune
    if args.one:
        print(
            json.dumps(run_one(args.one[0], args.one[1], lora, args.batch, args.seq, args.steps, args.device))
        )
        return
    print("| model | LoRA | non-DP step (s) | DP step (s) | DP / non-DP | peak MiB non-DP | peak MiB DP |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        rows = {}
        for mode in ("plain", "dp"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                mode,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
            ]
            if args.full_finetune:
                cmd.append("--full-finetune")
            rows[mode] = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
        plain, dp = rows["plain"], rows["dp"]
        print(
            f"| {name} | {lora} | {plain['median_s']:.4f} | {dp['median_s']:.4f} | "
            f"{dp['median_s'] / plain['median_s']:.2f} | {plain['peak_mib']:.0f} | {dp['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()

"""Signal and noise of one DP-PPO update for a PPO config: how configs/smollm2/ppo.yaml's C, vf_coef and LoRA were
chosen.

    python benchmarks/ppo_dp_snr.py --config configs/smollm2/ppo.yaml \\
        --model runs/demo/sft/model --reward_classifier runs/demo/classifier/model --vf_coef 0.1 0.005

For one rollout batch of held-out prompts (the data module's validation split) it computes every prompt's
gradient exactly (one backward per prompt) and prints, per vf_coef and clipping norm C: the median gradient
norm of the policy (LoRA) part and of the value-head part, and for each part the norm of its share of the mean
clipped gradient (the signal of a DP step) over the norm of the DP noise σ·C·√d / B that lands on it (d its
parameters, B prompts), and for the policy the DP noise over the sampling noise that a non-private step has as
well (the standard error of the batch mean, (Σ_b ‖c_b − c̄‖²)^½ / B over the clipped policy gradients c_b): how
many times noisier a DP update is than a non-private one (1: DP costs little; the "signal" above includes that
sampling noise).
DP-SGD learns when signal/noise, summed over steps, is large; raise it with a C near the gradients' norms, a
small d and a large B. These statistics are not private: run it on prompts you may look at.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch
import yaml

from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.stages.ppo import PPOModule


def per_prompt_gradients(
    module: PPOModule, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt gradients ``[B, d_policy]`` and ``[B, d_value]`` of the first PPO minibatch loss."""
    with torch.no_grad():
        rollout = module.rollout(batch)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    policy_rows, value_rows = [], []
    for row in range(rollout.responses.shape[0]):
        module.zero_grad()
        loss, _ = module.minibatch_loss(rollout, torch.tensor([row]))
        loss.backward()
        grads = {n: p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for n, p in named}
        policy_rows.append(torch.cat([g for n, g in grads.items() if not n.startswith("value_head")]))
        value_rows.append(torch.cat([g for n, g in grads.items() if n.startswith("value_head")]))
    return torch.stack(policy_rows), torch.stack(value_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="A lit-dprl fit PPO YAML (its model and data init_args)."
    )
    parser.add_argument("--model", required=True, help="The stage-1 export (overrides the config's).")
    parser.add_argument("--reward_classifier", required=True, help="The public reward classifier directory.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--noise_multiplier", type=float, default=0.42, help="σ (configs/demo at ε=4: 0.42).")
    parser.add_argument("--max_grad_norm", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--vf_coef", type=float, nargs="+", default=[0.1, 0.005])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    config = yaml.safe_load(Path(args.config).read_text())
    model_args = config["model"]["init_args"] | {
        "model": args.model,
        "reward_classifier": args.reward_classifier,
    }
    data_args = config["data"]["init_args"] | {"tokenizer": args.model, "max_val_prompts": args.batch}
    data = PromptDataModule(**(data_args | {"batch_size": args.batch}))
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    print(
        "| vf_coef | C | median ‖g_policy‖ | median ‖g_value‖ | policy signal / noise | value-head signal / noise "
        "| policy DP noise / sampling noise |"
    )
    print("|---|---|---|---|---|---|---|")
    for vf_coef in args.vf_coef:
        torch.manual_seed(0)
        module = PPOModule(**(model_args | {"vf_coef": vf_coef, "export_dir": None}))
        policy, value = per_prompt_gradients(module, batch)
        scale = torch.cat([policy, value], dim=1).norm(dim=1)
        for clip in args.max_grad_norm:
            factor = (clip / scale).clamp(max=1.0)[:, None]
            ratios = []
            for part in (policy, value):  # the same noise σC/B per coordinate lands on both parts
                signal = (part * factor).mean(0).norm().item()
                ratios.append(signal / (args.noise_multiplier * clip * math.sqrt(part.shape[1]) / len(scale)))
            clipped_policy = policy * factor
            sampling = (clipped_policy - clipped_policy.mean(0)).square().sum().sqrt().item()
            dp_over_sampling = args.noise_multiplier * clip * math.sqrt(policy.shape[1]) / sampling
            print(
                f"| {vf_coef:g} | {clip:g} | {policy.norm(dim=1).median():.3f} | {value.norm(dim=1).median():.3f} | "
                f"{ratios[0]:.3f} | {ratios[1]:.3f} | {dp_over_sampling:.1f} |"
            )
    print(f"policy: {policy.shape[1]} parameters, value head: {value.shape[1]}, B = {len(scale)}")


if __name__ == "__main__":
    main()

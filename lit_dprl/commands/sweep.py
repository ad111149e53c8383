"""The privacy–utility table (Wu et al., Table 1 / Figure 3) at any scale: the pipeline for several ε and seeds.

    lit-dprl sweep --config configs/smollm2/sweep_paths_grpo.yaml

Public stages (the sentiment classifier) run once and are shared. For every seed and ε the private stages
run with ``DPCallback(target_epsilon=ε)`` (ε = inf: no DP, the non-private baseline: still private data, so
the pipeline reports ε = ∞ for it), then the evaluation. Writes ``table.md``, ``table.json`` and
``reward_vs_epsilon.png`` into ``run_dir``: mean reward ± standard deviation over seeds of the pretrained model
(ε = 0), the SFT model and the aligned model per ε, the ε the pipeline reports for the runs (the largest over
seeds), and the fraction of the non-private gain over SFT that each ε keeps:
(R_aligned(ε) − R_sft(ε)) / (R_aligned(∞) − R_sft(∞)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_dprl.commands.pipeline import parser as pipeline_parser
from lit_dprl.commands.pipeline import run_pipeline
from lit_dprl.commands.pipeline_stages import stage_dir
from lit_dprl.evaluation import format_epsilon, save_json


def dp_callbacks_arg(epsilon: float, max_grad_norm: float) -> str:
    """The ``--trainer.callbacks`` override for one ε (an empty list for ε = inf)."""
    if math.isinf(epsilon):
        return "--trainer.callbacks=[]"
    callback = {
        "class_path": "lit_dprl.privacy.DPCallback",
        "init_args": {"target_epsilon": epsilon, "max_grad_norm": max_grad_norm},
    }
    return f"--trainer.callbacks=[{json.dumps(callback)}]"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs_per_epsilon: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    """Rows of the table from ``{ε: [pipeline result per seed]}`` (each with "evaluation" and "privacy")."""
    results = {eps: [run["evaluation"] for run in runs] for eps, runs in runs_per_epsilon.items()}
    rows: dict[str, Any] = {}
    pretrained = [e["pretrained"]["reward_mean"] for runs in results.values() for e in runs]
    rows["0"] = {"aligned": mean_std(pretrained)}
    gains = {
        eps: [e["aligned"]["reward_mean"] - e["sft"]["reward_mean"] for e in runs]
        for eps, runs in results.items()
    }
    reference_gain = statistics.fmean(gains[math.inf]) if math.inf in gains else None
    for eps, runs in results.items():
        row = {
            "sft": mean_std([e["sft"]["reward_mean"] for e in runs]),
            "aligned": mean_std([e["aligned"]["reward_mean"] for e in runs]),
            "kl": mean_std([e["aligned"].get("kl_to_reference", float("nan")) for e in runs]),
            "reported_epsilon": max(run["privacy"]["epsilon"] for run in runs_per_epsilon[eps]),
            "seeds": len(runs),
        }
        if reference_gain is not None and reference_gain > 0:  # a share of a non-positive gain means nothing
            row["gain_kept"] = statistics.fmean(gains[eps]) / reference_gain
        row["per_seed"] = [
            {"seed": run.get("seed", i), **e["aligned"]["gain"]}
            for i, (run, e) in enumerate(zip(runs_per_epsilon[eps], runs, strict=True))
            if "gain" in e["aligned"]
        ]  # aligned − SFT on the same prompts, with its paired standard error (pipeline_evaluation)
        rows["inf" if math.isinf(eps) else f"{eps:g}"] = row
    return rows


def write_table(rows: dict[str, Any], run_dir: Path) -> str:
    lines = [
        "| ε | reported ε | SFT reward | aligned reward | KL to SFT | share of the non-private gain kept | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps, row in rows.items():
        if eps == "0":
            m, s = row["aligned"]
            lines.append(f"| 0 (pretrained) | – | – | {m:.3f} ± {s:.3f} | – | – | |")
            continue
        sft, aligned, kl = row["sft"], row["aligned"], row["kl"]
        kept = f"{100 * row['gain_kept']:.0f} %" if "gain_kept" in row else "–"
        label = "∞ (non-private)" if eps == "inf" else eps
        lines.append(
            f"| {label} | {format_epsilon(row['reported_epsilon'])} | {sft[0]:.3f} ± {sft[1]:.3f} | "
            f"{aligned[0]:.3f} ± {aligned[1]:.3f} | {kl[0]:.3f} | {kept} | {row['seeds']} |"
        )
    per_seed = [(eps, gain) for eps, row in rows.items() for gain in row.get("per_seed", [])]
    if per_seed:
        lines += [
            "",
            "| ε | seed | aligned − SFT ± paired s.e. | positive (points) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {'∞' if eps == 'inf' else eps} | {g['seed']} | {g['reward']:+.3f} ± {g['reward_stderr']:.3f} | "
            f"{g['positive_share_points']:+.1f} |"
            for eps, g in per_seed
        ]
    table = "\n".join(lines) + "\n"
    (run_dir / "table.md").write_text(table)
    return table


def plot(rows: dict[str, Any], run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    x = range(len(labels))
    means = [rows[k]["aligned"][0] for k in labels]
    stds = [rows[k]["aligned"][1] for k in labels]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(x, means, yerr=stds, marker="o", capsize=4, label="aligned (DP-PPO)")
    sft = [(i, rows[k]["sft"][0]) for i, k in enumerate(labels) if "sft" in rows[k]]
    if sft:
        ax.plot([i for i, _ in sft], [m for _, m in sft], "s--", label="SFT")
    ax.set_xticks(list(x), ["0 (pre-trained)" if k == "0" else ("∞" if k == "inf" else k) for k in labels])
    ax.set_xlabel("ε")
    ax.set_ylabel("mean reward on held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "reward_vs_epsilon.png", dpi=120)
    plt.close(fig)


def run_sweep(
    run_dir: str,
    pipeline: str,
    epsilons: list[float],
    seeds: list[int],
    shared_stages: list[str],
    max_grad_norm: float | dict[str, float] = 1.0,
    table_only: bool = False,
) -> dict[str, Any]:
    """Run the pipeline for every (seed, ε) and write the table; ``max_grad_norm`` is one C for every private
    stage or ``{stage name: C}``. ``table_only``: rebuild the table from the runs' ``summary.json`` files."""
    root = Path(run_dir)
    if table_only:
        return table_from_runs(root, epsilons, seeds)
    base_parser = pipeline_parser()
    base = base_parser.instantiate_classes(
        base_parser.parse_args(["--config", pipeline, "--run_dir", str(root)])
    )
    private_shared = [s.name for s in base.stages if s.name in shared_stages and not s.public]
    if private_shared:
        raise ValueError(
            f"shared stage(s) {private_shared} are not public: a private stage shared by every run would be left "
            "out of each run's privacy report. Share only public: true stages."
        )
    private = [s.name for s in base.stages if not s.public and s.name not in shared_stages]
    if isinstance(max_grad_norm, dict) and (missing := sorted(set(private) - set(max_grad_norm))):
        raise ValueError(
            f"max_grad_norm gives no clipping norm for the private stage(s) {missing}: give one value, or "
            f"one per private stage ({', '.join(f'{name}: C' for name in private)})"
        )
    shared_dir = root / "shared"
    shared = [s for s in base.stages if s.name in shared_stages]
    run_pipeline(str(shared_dir), shared)
    shared_paths = {s.name: str(stage_dir(shared_dir, s.name)) for s in shared}
    results: dict[float, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for seed in seeds:
        for eps in epsilons:
            stages = []
            for stage in base.stages:
                if stage.name in shared_stages:
                    continue
                args = [*stage.args, f"--seed_everything={seed}"]
                if not stage.public:
                    clip = max_grad_norm[stage.name] if isinstance(max_grad_norm, dict) else max_grad_norm
                    args.append(dp_callbacks_arg(eps, clip))
                inputs = {k: shared_paths.get(v, v) for k, v in stage.inputs.items()}
                stages.append(dataclasses.replace(stage, args=args, inputs=inputs))
            evaluation = dataclasses.replace(
                base.evaluation,
                reward_stage=shared_paths.get(base.evaluation.reward_stage, base.evaluation.reward_stage),
                baselines={k: shared_paths.get(v, v) for k, v in base.evaluation.baselines.items()},
            )
            name = run_name(eps, seed)
            result = run_pipeline(str(root / name), stages, evaluation)
            results.setdefault(eps, []).append({**result, "seed": seed})
            rows = summarise(results)  # rewritten after every run, so an interrupted sweep keeps its table
            save_json({"rows": rows, "wall_time_s": time.perf_counter() - started}, root / "table.json")
            table = write_table(rows, root)
            plot(rows, root)
    print(table)
    return rows


def run_name(eps: float, seed: int) -> str:
    """The folder of one (ε, seed) run inside the sweep's ``run_dir``."""
    return f"eps-{'inf' if math.isinf(eps) else f'{eps:g}'}_seed-{seed}"


def table_from_runs(root: Path, epsilons: list[float], seeds: list[int]) -> dict[str, Any]:
    """The table and plot of the finished runs (those with a ``summary.json``), nothing retrained or re-evaluated."""
    results: dict[float, list[dict[str, Any]]] = {}
    for seed in seeds:
        for eps in epsilons:
            summary = root / run_name(eps, seed) / "summary.json"
            if summary.is_file():
                results.setdefault(eps, []).append({**json.loads(summary.read_text()), "seed": seed})
    if not results:
        raise FileNotFoundError(f"no finished run (summary.json) under {root}: run the sweep first")
    rows = summarise(results)
    save_json({"rows": rows}, root / "table.json")
    print(write_table(rows, root))
    plot(rows, root)
    return rows


def parser() -> ArgumentParser:
    """The ``lit-dprl sweep`` arguments (a sweep YAML sets them through ``--config``)."""
    p = ArgumentParser(description="Privacy-utility sweep: the pipeline for several ε and seeds.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--run_dir", type=str, required=True, help="Folder of all runs and the table.")
    p.add_argument("--pipeline", type=str, required=True, help="Base pipeline YAML (stages and evaluation).")
    p.add_argument(
        "--epsilons", type=list[float], default=[1.0, 4.0, math.inf], help="ε values (inf: no DP)."
    )
    p.add_argument(
        "--seeds", type=list[int], default=[0, 1], help="Training seeds (the data split stays fixed)."
    )
    p.add_argument("--shared_stages", type=list[str], default=["classifier"], help="Public stages run once.")
    p.add_argument(
        "--max_grad_norm",
        type=float | dict[str, float],
        default=1.0,
        help="Clipping norm C of the private stages: one value, or {stage name: C}.",
    )
    p.add_argument(
        "--table_only",
        type=bool,
        default=False,
        help="Rebuild table.md, table.json and the plot from the finished runs, without training or evaluating.",
    )
    return p


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``lit-dprl sweep``."""
    cfg = parser().parse_args(args)
    return run_sweep(
        cfg.run_dir,
        cfg.pipeline,
        cfg.epsilons,
        cfg.seeds,
        cfg.shared_stages,
        cfg.max_grad_norm,
        cfg.table_only,
    )

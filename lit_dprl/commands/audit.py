"""``python -m lit_dprl audit``: an empirical lower bound ε_emp on a stage's privacy, from one training run.

The stage is built from its YAML by the same LightningCLI as ``fit`` (so the same DPCallback, Poisson
sampler and accountant), m canaries are made, each is added to the stage's private training set
independently with probability ½ (the coins stay secret until scoring), the stage trains, every canary is
scored, and ``lit_dprl.privacy.audit.one_run_audit`` turns the scores into ε_emp (Steinke, Nasr &
Jagielski 2023). Black-box canaries, scored by the change the training made to the model's view of them
(score = statistic after training − statistic at initialisation, higher = more likely a member). The canary
kind is picked by the stage's module (``canaries_for``; the kinds live in ``audit_canaries`` and
``audit_prompts``, the stages hold no audit code):

- DP-SFT (``sequence_losses``, ``TextDataModule``): sequences of uniformly random tokens; statistic =
  −(mean NLL), so the score is the loss drop.
- Reward model (``pair_rewards``, ``PreferenceDataModule``): a random prompt with two random responses, the
  first planted as chosen; statistic = r(chosen) − r(rejected), so the score is the margin gained.
- DP-DPO (``pair_logprobs``, ``PreferenceDataModule``): the same random pairs; statistic = the implicit reward
  margin β[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))].
- RL stage ``ppo`` (``policy``, ``PromptDataModule``; estimators gae, rloo, grpo): a random prompt with a
  secret half T of the tokens whose text re-encodes to themselves; the audit wraps the stage's reward so that a
  canary prompt's response earns +1 if its first token is in T, −1 if it is in the rest of that set, 0
  otherwise (other prompts keep the stage's reward); statistic = log π(T | canary) − mean log π(T | control
  prompts never trained on), at the sampling temperature (``audit_prompts``).

A canary must be sampled often to leave a trace: audit with more steps or epochs (extra LightningCLI
arguments after ``--``, e.g. ``--trainer.max_steps=30 --data.init_args.batch_size=64`` for the RL stage, so
that each canary prompt is drawn about 30·64/N times; ``--model.init_args.max_new_tokens=1`` there, as only
the first response token carries the canary's reward), and at a δ much smaller than 1/(2m) (``--delta``), or
the bound is vacuous. Measured on the tiny configs (random 2-layer GPT-2, m = 128, CPU): neither the RL nor
the DPO canaries reached ε_emp > 0 even without DP (no power), so a DP run's ε_emp = 0 there says nothing
beyond the validity of the bound.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import CSVLogger

from lit_dprl.commands.audit_canaries import Canaries, DPOCanaries, PreferenceCanaries, TextCanaries
from lit_dprl.commands.audit_prompts import PromptCanaries
from lit_dprl.commands.fit import main as lightning_cli
from lit_dprl.data.preferences import PreferenceDataModule
from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.data.text import TextDataModule
from lit_dprl.privacy import DPCallback
from lit_dprl.privacy.accounting import epsilon_after
from lit_dprl.privacy.audit import AuditResult, one_run_audit

AUDIT_NAME = "audit.json"
PLOT_NAME = "audit_scores.png"
LARGE_DELTA_TERM = 0.01  # 2mδ above this weakens the bound noticeably


# (module method that picks the kind, data module it needs, canary kind), tried in order
CANARY_KINDS: tuple[tuple[str, type, type], ...] = (
    ("pair_logprobs", PreferenceDataModule, DPOCanaries),
    ("pair_rewards", PreferenceDataModule, PreferenceCanaries),
    ("sequence_losses", TextDataModule, TextCanaries),
    ("policy", PromptDataModule, PromptCanaries),
)


def canaries_for(datamodule: Any, module: pl.LightningModule) -> Canaries:
    """The canary kind of a stage, chosen by its module: ``pair_logprobs`` (DPO), ``pair_rewards`` (reward
    model), ``sequence_losses`` (SFT) or ``policy`` (RL); the data module must be the one that kind inserts into."""
    for method, data_kind, canary_kind in CANARY_KINDS:
        if hasattr(module, method):
            if not isinstance(datamodule, data_kind):
                raise ValueError(
                    f"{type(module).__name__} is audited with {canary_kind.__name__}, which insert into a "
                    f"{data_kind.__name__}, but the stage's data module is {type(datamodule).__name__}"
                )
            return canary_kind(datamodule, module)
    raise ValueError(
        f"the audit supports the sft, reward, dpo and ppo stages (modules with one of "
        f"{', '.join(method + '()' for method, _, _ in CANARY_KINDS)}), not {type(module).__name__}"
    )


class DivideNoise(pl.Callback):
    """TESTING THE AUDIT ONLY: a planted DP bug. After DPCallback has built its DP optimizers, their noise is
    divided by ``factor`` while the accountant (and so the reported ε) still assumes the full noise."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.strategy.optimizers:
            optimizer.noise_multiplier /= self.factor


def disable_export(module: pl.LightningModule) -> None:
    """The audited weights carry canaries: clear the stage's ``export_dir`` (hyperparameter and attribute)."""
    if "export_dir" in module.hparams:
        module.hparams.export_dir = None
    if hasattr(module, "export_dir"):
        module.export_dir = None


def claimed_epsilon(callback: DPCallback | None, delta: float) -> float:
    """ε the run claims at ``delta``: its accountant's ε (recomputed when δ is not the run's own); ∞ without DP."""
    if callback is None:
        return math.inf
    if delta == callback.delta:
        return callback.epsilon
    report = callback.report()
    return epsilon_after(
        accountant=report["accountant"],
        batch_noise=report["batch_noise_multiplier"],
        sample_rate=report["sample_rate"],
        batches=report["steps"],
        delta=delta,
    )


def plot_scores(
    scores: np.ndarray, included: np.ndarray, result: AuditResult, claimed: float, path: Path
) -> None:
    """Histograms of the scores of included and excluded canaries, with the guess thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(scores, bins=30)
    axes.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({included.sum()})")
    axes.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({(~included).sum()})")
    ordered = np.sort(scores)
    if result.k_plus:
        axes.axvline(ordered[-result.k_plus], color="k", ls="--", lw=1, label="guess 'in' above")
    if result.k_minus:
        axes.axvline(ordered[result.k_minus - 1], color="k", ls=":", lw=1, label="guess 'out' below")
    axes.set_xlabel("canary score (higher = more likely a member)")
    axes.set_ylabel("canaries")
    axes.set_title(
        f"ε_emp ≥ {result.epsilon_lower_bound:.2f} ({result.confidence_text}) vs ε = {claimed:.3g} claimed"
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_audit(
    config_args: list[str],
    out: Path,
    canaries: int = 256,
    non_private: bool = False,
    confidence: float = 0.95,
    delta: float | None = None,
    seed: int | None = None,
    break_noise: float | None = None,
) -> dict[str, Any]:
    """Train the stage of ``config_args`` (LightningCLI arguments, no subcommand) with canaries; write and
    return the audit (see the module docstring)."""
    if canaries < 2:
        raise ValueError(f"--canaries must be at least 2, got {canaries}")
    refusal = "--break-noise plants a bug in DP training: it needs a DPCallback and no --non-private"
    if break_noise is not None and non_private:
        raise ValueError(refusal)
    with warnings.catch_warnings():  # the stage's arguments come from the audit's, not from sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = lightning_cli(config_args, run=False)
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    dp = next((cb for cb in trainer.callbacks if isinstance(cb, DPCallback)), None)
    if break_noise is not None and dp is None:
        raise ValueError(refusal)
    disable_export(module)
    out.mkdir(parents=True, exist_ok=True)
    trainer.logger = CSVLogger(out, name="train")

    datamodule.setup("fit")
    kind = canaries_for(datamodule, module)
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(64))
    rows = kind.make(rng, canaries)
    included = rng.random(canaries) < 0.5
    kind.insert([row for row, keep in zip(rows, included, strict=True) if keep])
    before = kind.statistic(rows)

    configured_delta = dp.target_delta if dp is not None else None
    if non_private and dp is not None:
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not dp]
        dp = None
    if break_noise is not None:
        trainer.callbacks = [*trainer.callbacks, DivideNoise(break_noise)]
    trainer.fit(module, datamodule=datamodule)
    scores = kind.statistic(rows) - before

    if delta is None:
        train_size = len(trainer.train_dataloader.dataset)
        delta = dp.delta if dp is not None else configured_delta or 1.0 / train_size
    result = one_run_audit(scores, included, delta=delta, confidence=confidence)
    claimed = claimed_epsilon(dp, delta)
    report = dp.report() if dp is not None else {"epsilon": math.inf, "differentially_private": False}
    audit = {
        **result.as_dict(),
        "epsilon_claimed": claimed,
        "violation": result.epsilon_lower_bound > claimed,
        "mode": "black-box",
        "score": kind.score_name,
        "stage": f"{type(module).__module__}.{type(module).__name__}",
        "differentially_private": dp is not None,
        "planted_bug": None
        if break_noise is None
        else f"DP optimizer noise divided by {break_noise:g} (test only)",
        "secret_coins": seed is None,
        "training_rows": len(trainer.train_dataloader.dataset),
        "arguments": config_args,
        "privacy_report": report,
        "canary_scores": scores.tolist(),
        "canary_included": included.tolist(),
    }
    (out / AUDIT_NAME).write_text(json.dumps(audit, indent=2, ensure_ascii=False) + "\n")
    plot_scores(scores, included, result, claimed, out / PLOT_NAME)
    delta_term = 2 * canaries * delta
    if delta_term > LARGE_DELTA_TERM:
        print(
            f"audit: 2mδ = {delta_term:.3g} (m = {canaries} canaries, δ = {delta:.3g}) makes the bound weak; audit "
            f"at a smaller δ (--delta 1e-5, or a smaller target_delta after --)"
        )
    claim = "∞" if math.isinf(claimed) else f"{claimed:.3g}"
    verdict = " — VIOLATION: the run leaks more than it claims" if audit["violation"] else ""
    print(
        f"ε_emp ≥ {result.epsilon_lower_bound:.2f} ({result.confidence_text}) vs ε = {claim} claimed "
        f"(δ = {delta:.3g}; {result.correct}/{result.guesses} guesses right, {result.canaries} canaries, "
        f"{result.included} included; at most {result.epsilon_max_detectable:.2f} detectable){verdict}; "
        f"{out / AUDIT_NAME}"
    )
    return audit


def main(args: list[str] | None = None) -> dict[str, Any]:
    """``lit-dprl audit --config STAGE.yaml [--canaries M] [--non-private] [--out DIR] [-- LightningCLI args]``."""
    argv = sys.argv[1:] if args is None else list(args)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="lit-dprl audit",
        description="Empirical privacy audit of one stage (one-run auditing, Steinke et al. 2023). Arguments "
        "after -- go to the stage's LightningCLI, e.g. -- --trainer.max_steps=400.",
    )
    parser.add_argument(
        "--config", action="append", required=True, help="Stage YAML (repeatable, as for fit)."
    )
    parser.add_argument("--canaries", type=int, default=256, help="Number m of canaries (default 256).")
    parser.add_argument("--non-private", action="store_true", help="Drop the DPCallback (the power check).")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/audit"), help="Output folder (default runs/audit)."
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="Confidence of the bound (default 0.95)."
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=None,
        help="δ of the audit (default: the run's δ; the claim is recomputed).",
    )
    parser.add_argument("--seed", type=int, default=None, help="Fix the canaries and coins (tests only).")
    parser.add_argument(
        "--break-noise",
        type=float,
        default=None,
        metavar="FACTOR",
        help="TESTING THE AUDIT ONLY: divide the DP noise by FACTOR while ε is still reported for the full "
        "noise (a planted bug the audit must flag).",
    )
    ns = parser.parse_args(argv[:split])
    config_args = [item for path in ns.config for item in ("--config", path)] + argv[split + 1 :]
    return run_audit(
        config_args,
        ns.out,
        canaries=ns.canaries,
        non_private=ns.non_private,
        confidence=ns.confidence,
        delta=ns.delta,
        seed=ns.seed,
        break_noise=ns.break_noise,
    )

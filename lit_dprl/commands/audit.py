"""``python -m lit_dprl audit``: an empirical lower bound ε_emp on a stage's privacy, from one training run.

The stage is built from its YAML by the same LightningCLI as ``fit`` (so the same DPCallback, Poisson
sampler and accountant), m canaries are made, each is added to the stage's private training set
independently with probability ½ (the coins stay secret until scoring), the stage trains, every canary is
scored, and ``lit_dprl.privacy.audit.one_run_audit`` turns the scores into ε_emp (Steinke, Nasr &
Jagielski 2023). Black-box canaries, scored by the change the training made to the model's view of them
(score = statistic after training − statistic at initialisation, higher = more likely a member):

- DP-SFT (``TextDataModule``): sequences of uniformly random tokens; statistic = −(mean NLL), so the score
  is the loss drop.
- Reward model (``PreferenceDataModule``): a random prompt with two random responses, the first planted as
  chosen; statistic = r(chosen) − r(rejected), so the score is the margin gained toward the planted side.

PPO is not audited: its private data are prompts whose only training signal passes through sampled
responses and a reward model, so a canary would need a planted reward and many on-policy samples.
A canary must be sampled often to leave a trace: audit with more steps or epochs (extra LightningCLI
arguments after ``--``), and at a δ much smaller than 1/(2m) (``--delta``), or the bound is vacuous.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from lightning.pytorch.loggers import CSVLogger

from lit_dprl.commands.fit import main as lightning_cli
from lit_dprl.data.preferences import PreferenceDataModule, PreferenceDataset, collate_preference_batch
from lit_dprl.data.text import TextDataModule
from lit_dprl.privacy import DPCallback
from lit_dprl.privacy.accounting import epsilon_after
from lit_dprl.privacy.audit import AuditResult, one_run_audit

AUDIT_NAME = "audit.json"
PLOT_NAME = "audit_scores.png"
SCORING_BATCH = 64
PROMPT_TOKENS = 16
RESPONSE_TOKENS = 32
LARGE_DELTA_TERM = 0.01  # 2mδ above this weakens the bound noticeably


def random_tokens(rng: np.random.Generator, vocabulary: np.ndarray, length: int) -> list[int]:
    """``length`` token ids drawn uniformly (with replacement) from ``vocabulary``."""
    return [int(t) for t in rng.choice(vocabulary, size=length)]


def plain_vocabulary(tokenizer) -> np.ndarray:
    """Every token id of ``tokenizer`` except its special tokens (EOS, PAD, ...)."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special])


@torch.no_grad()
def batched(module: pl.LightningModule, rows: list, statistic: Callable[[list], torch.Tensor]) -> np.ndarray:
    """``statistic`` of ``rows`` in chunks of ``SCORING_BATCH``, as float64, with the module in eval mode."""
    training = module.training
    module.eval()
    try:
        values = [statistic(rows[i : i + SCORING_BATCH]) for i in range(0, len(rows), SCORING_BATCH)]
    finally:
        module.train(training)
    return torch.cat(values).double().cpu().numpy()


class TextCanaries:
    """DP-SFT canaries: random-token rows of the data's ``max_length``, every token after the first a target.

    Statistic: minus the row's mean NLL (``SFTModule.sequence_losses``)."""

    score_name = "loss drop: mean NLL at initialisation − after training"

    def __init__(self, datamodule: TextDataModule, module: pl.LightningModule) -> None:
        if not hasattr(module, "sequence_losses"):
            raise TypeError(
                f"a TextDataModule audit needs an SFT-style module with sequence_losses(), got {type(module).__name__}"
            )
        self.datamodule, self.module = datamodule, module

    def make(self, rng: np.random.Generator, count: int) -> list[dict[str, list[int]]]:
        length = self.datamodule.hparams.max_length
        vocabulary = plain_vocabulary(self.datamodule.tokenizer)
        return [
            {"input_ids": random_tokens(rng, vocabulary, length), "loss_mask": [0] + [1] * (length - 1)}
            for _ in range(count)
        ]

    def insert(self, rows: list[dict[str, list[int]]]) -> None:
        extra = Dataset.from_dict({key: [row[key] for row in rows] for key in ("input_ids", "loss_mask")})
        train = self.datamodule.train_set
        self.datamodule.train_set = concatenate_datasets([train, extra.cast(train.features)])

    def statistic(self, rows: list[dict[str, list[int]]]) -> np.ndarray:
        collate = self.datamodule.collate()

        def negative_loss(chunk: list) -> torch.Tensor:
            batch = {k: v.to(self.module.device) for k, v in collate(chunk).items()}
            return -self.module.sequence_losses(batch)

        return batched(self.module, rows, negative_loss)


class PreferenceCanaries:
    """Reward-model canaries: a random prompt and two random responses, the first planted as chosen.

    Statistic: the margin r(prompt + chosen) − r(prompt + rejected) (``RewardModule.pair_rewards``)."""

    score_name = "margin gain: r(chosen) − r(rejected) after training − at initialisation"

    def __init__(self, datamodule: PreferenceDataModule, module: pl.LightningModule) -> None:
        if not hasattr(module, "pair_rewards"):
            raise TypeError(
                f"a PreferenceDataModule audit needs a reward module with pair_rewards(), got {type(module).__name__}"
            )
        if datamodule.max_length < PROMPT_TOKENS + RESPONSE_TOKENS:
            raise ValueError(
                f"reward canaries need max_length >= {PROMPT_TOKENS + RESPONSE_TOKENS}, got {datamodule.max_length}"
            )
        self.datamodule, self.module = datamodule, module

    def make(self, rng: np.random.Generator, count: int) -> list[dict[str, list[int]]]:
        vocabulary = plain_vocabulary(self.datamodule.tokenizer)
        rows = []
        for _ in range(count):
            prompt = random_tokens(rng, vocabulary, PROMPT_TOKENS)
            chosen, rejected = (random_tokens(rng, vocabulary, RESPONSE_TOKENS) for _ in range(2))
            rows.append({"chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected})
        return rows

    def insert(self, rows: list[dict[str, list[int]]]) -> None:
        train = self.datamodule.train_dataset
        user_ids = None
        if train.user_ids is not None:
            user_ids = [*train.user_ids, *(f"audit-canary-{i}" for i in range(len(rows)))]
        self.datamodule.train_dataset = PreferenceDataset(
            [*train.chosen_ids, *(row["chosen_input_ids"] for row in rows)],
            [*train.rejected_ids, *(row["rejected_input_ids"] for row in rows)],
            user_ids,
        )

    def statistic(self, rows: list[dict[str, list[int]]]) -> np.ndarray:
        pad = self.datamodule.tokenizer.pad_token_id

        def margin(chunk: list) -> torch.Tensor:
            batch = {k: v.to(self.module.device) for k, v in collate_preference_batch(chunk, pad).items()}
            chosen, rejected = self.module.pair_rewards(batch)
            return chosen - rejected

        return batched(self.module, rows, margin)


def canaries_for(datamodule: Any, module: pl.LightningModule) -> TextCanaries | PreferenceCanaries:
    """The canary kind of a stage, chosen by its data module."""
    if isinstance(datamodule, TextDataModule):
        return TextCanaries(datamodule, module)
    if isinstance(datamodule, PreferenceDataModule):
        return PreferenceCanaries(datamodule, module)
    raise ValueError(
        f"the audit supports the SFT stage (TextDataModule) and the reward stage (PreferenceDataModule), not "
        f"{type(datamodule).__name__}; PPO is not audited (see lit_dprl.commands.audit)"
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

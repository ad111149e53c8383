"""The pipeline's evaluation: the aligned policy and its baselines on held-out prompts, with a reward that no
stage trained on private data, written to ``evaluation.json``, ``evaluation.md`` and ``samples.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_dprl.commands.pipeline_stages import Stage, resolve_model
from lit_dprl.evaluation import evaluate_policy, paired_gain, save_json, write_markdown_samples


@dataclass
class Evaluation:
    """Evaluation of the final policy and baselines on held-out prompts.

    Args:
        policy: Stage whose exported model is the aligned policy.
        baselines: Extra rows: label → a stage name or a model source (e.g. ``pretrained: smollm2``).
        reference: Stage (or model source) for the KL column, normally the SFT model.
        reward_stage: Stage (or directory) of a public sequence classifier used as the reward.
        reward_label: The classifier's label whose logit is the reward.
        reward_function: Or a Python callable ``package.module:function`` as the reward.
        reward_model: Or a stage (or directory) of a stage-2 reward model (RLHF path).
        source: Held-out prompts: "imdb" (first words of reviews of the IMDb test split), or a local file of
            prompts that no stage trains on (e.g. TL;DR test posts).
        prompt_field: The prompt column of a local ``source``.
        max_prompts: Number of held-out prompts.
        min_prompt_words: Fewest words per IMDb prompt.
        max_prompt_words: Most words per IMDb prompt.
        seed: The data seed (split key) of the stages: fixes which reviews are held out and each prompt's
            word count.
        temperature: Sampling temperature.
        min_new_tokens: Fewest response tokens.
        max_new_tokens: Most response tokens.
        num_samples: Held-out prompts whose continuations go into ``samples.md`` (every model side by side).
        fluency: A fixed model source (e.g. the pretrained model) under which each model's continuations get a
            perplexity: a reward gained by text the pretrained model finds implausible is reward hacking.
    """

    policy: str = "ppo"
    baselines: dict[str, str] = field(default_factory=dict)
    reference: str | None = "sft"
    reward_stage: str | None = None
    reward_label: int = 1
    reward_function: str | None = None
    reward_model: str | None = None
    source: str = "imdb"
    prompt_field: str = "prompt"
    max_prompts: int = 64
    min_prompt_words: int = 2
    max_prompt_words: int = 6
    seed: int = 0
    temperature: float = 1.0
    min_new_tokens: int = 4
    max_new_tokens: int = 16
    num_samples: int = 8
    fluency: str | None = None


def held_out_prompts(evaluation: Evaluation) -> list[str]:
    """Prompts from the held-out test split only (never a training example of any stage)."""
    if (
        evaluation.source != "imdb"
    ):  # a local file of held-out prompts, kept out of every stage's data by the user
        from lit_dprl.data.files import load_local_dataset

        rows = load_local_dataset(evaluation.source, [evaluation.prompt_field])
        if evaluation.prompt_field not in rows.column_names:
            raise ValueError(
                f"evaluation.source {evaluation.source} has no column {evaluation.prompt_field!r} (its columns: "
                f"{rows.column_names}); set evaluation.prompt_field, or use source 'imdb'"
            )
        return rows[evaluation.prompt_field][: evaluation.max_prompts]
    from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
    from lit_dprl.data.prompts import first_words
    from lit_dprl.data.splits import UNIT_COLUMN, split_key

    test = split_imdb(load_imdb_reviews(), seed=evaluation.seed)["test"]
    test = test.select(range(min(evaluation.max_prompts, len(test))))
    return first_words(
        test["text"], test[UNIT_COLUMN], evaluation.min_prompt_words, evaluation.max_prompt_words,
        key=split_key(evaluation.seed),
    )  # fmt: skip


def evaluate(run_dir: Path, evaluation: Evaluation, stages: dict[str, Stage]) -> dict[str, Any]:
    """Evaluate the policy and the baselines; write ``evaluation.json`` and Markdown tables."""
    from lit_dprl.rewards import SequenceClassifierReward, load_reward_callable

    if evaluation.reward_stage is not None:
        classifier = resolve_model(run_dir, evaluation.reward_stage, stages)
        reward = SequenceClassifierReward(classifier, label=evaluation.reward_label)
    elif evaluation.reward_function is not None:
        reward = load_reward_callable(evaluation.reward_function)
    elif evaluation.reward_model is not None:
        from lit_dprl.rewards import RewardModelScorer

        reward = RewardModelScorer(resolve_model(run_dir, evaluation.reward_model, stages))
    else:
        raise ValueError("evaluation needs reward_stage, reward_function or reward_model")
    prompts = held_out_prompts(evaluation)
    reference = resolve_model(run_dir, evaluation.reference, stages) if evaluation.reference else None
    rows = {**evaluation.baselines, "aligned": evaluation.policy}
    results = {}
    for label, model in rows.items():
        results[label] = evaluate_policy(
            resolve_model(run_dir, model, stages),
            prompts,
            reward,
            reference=reference,
            temperature=evaluation.temperature,
            min_new_tokens=evaluation.min_new_tokens,
            max_new_tokens=evaluation.max_new_tokens,
            seed=evaluation.seed,
            num_samples=evaluation.num_samples,
            fluency=resolve_model(run_dir, evaluation.fluency, stages) if evaluation.fluency else None,
        )
    baseline = "sft" if "sft" in results else next(iter(evaluation.baselines), None)
    if baseline is not None:
        gain, stderr = paired_gain(results["aligned"]["rewards"], results[baseline]["rewards"])
        results["aligned"]["gain"] = {
            "over": baseline,
            "reward": gain,
            "reward_stderr": stderr,
            "positive_share_points": 100
            * (results["aligned"]["positive_share"] - results[baseline]["positive_share"]),
            "distinct_2_ratio": results["aligned"]["distinct_2"] / max(results[baseline]["distinct_2"], 1e-9),
        }
    save_json(results, run_dir / "evaluation.json")
    lines = [
        f"Held-out IMDb test prompts: {len(prompts)}; reward = {evaluation.reward_function or evaluation.reward_stage or evaluation.reward_model}.",
        "",
        "| model | mean reward ± s.e. | positive | distinct-2 | KL to reference | perplexity under "
        f"{evaluation.fluency or '–'} |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        kl = f"{r['kl_to_reference']:.3f}" if "kl_to_reference" in r else "–"
        ppl = f"{r['fluency_perplexity']:.1f}" if "fluency_perplexity" in r else "–"
        lines.append(
            f"| {label} | {r['reward_mean']:.3f} ± {r['reward_stderr']:.3f} | {100 * r['positive_share']:.1f} % "
            f"| {r['distinct_2']:.3f} | {kl} | {ppl} |"
        )
    if "gain" in results["aligned"]:
        g = results["aligned"]["gain"]
        lines += [
            "",
            f"aligned − {g['over']}: reward {g['reward']:+.3f} ± {g['reward_stderr']:.3f} (paired s.e.), "
            f"positive {g['positive_share_points']:+.1f} points, distinct-2 ratio {g['distinct_2_ratio']:.2f}",
        ]
    (run_dir / "evaluation.md").write_text("\n".join(lines) + "\n")
    write_markdown_samples(results, run_dir / "samples.md")
    return results

"""How the demo's steering layer and the bound on its coefficient were chosen, on PUBLIC data only.

    python benchmarks/steering_sweep.py --model runs/demo/sft/model --layers 12 18 21 24 27 --alphas 0 0.5 1 1.5 2 3
    python benchmarks/steering_sweep.py --model runs/demo/sft/model --direction token_log_odds --layers 29 \
        --alphas 0 2 4 5 6

For each decoder layer and coefficient α it steers the model along a public direction (``--direction``:
class-mean or token log-odds, ``lit_dprl.steering``, the same directions as ``PPOModule(steering_layers=...,
steering_direction=...)``), continues prompts made of the
first words of PUBLIC IMDb reviews (never D1/D3 or the test split), and prints the public reward
(``lit_dprl.sentiment``: mean logit ± s.e., share positive) and the perplexity of the continuations under the
pretrained model (fluency): a steering strength whose reward rises while the perplexity explodes is producing
word salad. Writes the table to ``--out`` (Markdown) as well.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path

import torch

from lit_dprl.data.imdb import load_public_sources
from lit_dprl.evaluation import response_perplexity
from lit_dprl.generation import sample_responses
from lit_dprl.models import load_causal_lm, load_tokenizer
from lit_dprl.rewards import score_responses
from lit_dprl.sentiment import imdb_sentiment
from lit_dprl.stages.ppo.policy import steered
from lit_dprl.steering import steering_modules


def public_prompts(count: int, words: int) -> list[str]:
    """The first ``words`` words of ``count`` public IMDb reviews (not the ones the directions are built from)."""
    reviews = load_public_sources("imdb_public").shuffle(seed=1)
    reviews = reviews.select(range(len(reviews) - count, len(reviews)))
    return [" ".join(text.split()[:words]) for text in reviews["text"]]


def parse_combo(text: str) -> dict[int, float]:
    """``"24=2,27=1"`` -> ``{24: 2.0, 27: 1.0}``."""
    try:
        return {int(layer): float(alpha) for layer, alpha in (item.split("=") for item in text.split(","))}
    except ValueError as err:
        raise SystemExit(f"--combos takes LAYER=ALPHA[,LAYER=ALPHA...], got {text!r}") from err


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="The model to steer (e.g. the demo's DP-SFT export).")
    parser.add_argument("--fluency", default="smollm2", help="Model under which perplexity is measured.")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 18, 21, 24, 27])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument(
        "--combos",
        nargs="*",
        default=[],
        help="Extra settings steering several layers at once, each as LAYER=ALPHA[,LAYER=ALPHA...] (e.g. 24=2,27=1).",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="Continuation length (the demo scores 8-16)."
    )
    parser.add_argument(
        "--direction",
        choices=["class_mean", "token_log_odds"],
        default="class_mean",
        help="Kind of direction.",
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default="runs/steering_sweep.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, tokenizer).eval()
    fluency_tokenizer = load_tokenizer(args.fluency)
    fluency_model = load_causal_lm(args.fluency, fluency_tokenizer).eval()
    combos = [parse_combo(combo) for combo in args.combos]
    layers = sorted(set(args.layers).union(*combos))
    # the directions PPOModule builds (same source, examples and length)
    steered(model, tokenizer, layers, "imdb_public+rotten_tomatoes", 256, args.direction)
    modules = dict(zip(layers, steering_modules(model), strict=True))
    settings = [{layer: alpha} for layer in args.layers for alpha in args.alphas] + combos
    prompts = public_prompts(args.prompts, words=4)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    lines = [
        "| layer | α | reward ± s.e. | positive | perplexity | first continuation |",
        "|---|---|---|---|---|---|",
    ]
    for setting in settings:
        with torch.no_grad():
            for layer, module in modules.items():
                module.alpha.fill_(setting.get(layer, 0.0))
        torch.manual_seed(0)  # the same sampling noise for every setting
        with torch.no_grad():
            tokens = sample_responses(
                model, tokenizer, encoded["input_ids"], encoded["attention_mask"],
                temperature=args.temperature, min_new_tokens=8, max_new_tokens=args.max_new_tokens,
            )  # fmt: skip
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        rewards = score_responses(imdb_sentiment, prompts, texts).tolist()
        stderr = statistics.stdev(rewards) / math.sqrt(len(rewards))
        positive = sum(r > 0 for r in rewards) / len(rewards)
        perplexity = response_perplexity(fluency_model, fluency_tokenizer, prompts, texts)
        sample = texts[0].replace("|", "\\|").replace("\n", " ")
        layer_text = " + ".join(str(layer) for layer in setting)
        alpha_text = " + ".join(f"{alpha:g}" for alpha in setting.values())
        lines.append(
            f"| {layer_text} | {alpha_text} | {statistics.fmean(rewards):+.3f} ± {stderr:.3f} | {100 * positive:.0f} % "
            f"| {perplexity:.1f} | {sample} |"
        )
        print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

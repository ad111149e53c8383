"""Does DP-SFT earn its ε? Paired held-out loss of a DP-SFT export against the model it started from.

    python benchmarks/sft_heldout_loss.py --model runs/demo/sft/model --baseline smollm2 --reviews 512

Scores the first ``--reviews`` reviews of the held-out IMDb test split (``split_imdb``, never trained on) with
both models: per review, the mean token negative log-likelihood of its first ``--max-length`` tokens (the SFT
stage's ``max_length``). Prints each model's mean, the mean paired difference ± its standard error, and the share
of reviews whose loss went down.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch

from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
from lit_dprl.models import load_causal_lm, load_tokenizer, position_ids_from_mask


@torch.no_grad()
def review_losses(source: str, texts: list[str], max_length: int, batch_size: int = 32) -> list[float]:
    """Mean token NLL of each text under the model at ``source``."""
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, tokenizer).eval()
    losses = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        logits = model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=position_ids_from_mask(enc.attention_mask),
        ).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), -1)
        token_logprobs = logprobs.gather(-1, enc.input_ids[:, 1:, None]).squeeze(-1)
        mask = enc.attention_mask[:, 1:].float()
        losses += (-(token_logprobs * mask).sum(1) / mask.sum(1)).tolist()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="The DP-SFT export.")
    parser.add_argument("--baseline", default="smollm2", help="The model it was trained from.")
    parser.add_argument("--reviews", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="The data split seed of the SFT stage.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    test = split_imdb(load_imdb_reviews(), seed=args.seed)["test"]
    texts = list(test.select(range(min(args.reviews, len(test))))["text"])
    base = review_losses(args.baseline, texts, args.max_length)
    tuned = review_losses(args.model, texts, args.max_length)
    diffs = [t - b for b, t in zip(base, tuned, strict=True)]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
    improved = sum(d < 0 for d in diffs) / len(diffs)
    print(
        f"{len(texts)} held-out reviews: {args.baseline} {statistics.fmean(base):.4f}, {args.model} "
        f"{statistics.fmean(tuned):.4f}; difference {statistics.fmean(diffs):+.4f} ± {stderr:.4f} (paired s.e.), "
        f"loss lower on {100 * improved:.0f} % of reviews"
    )


if __name__ == "__main__":
    main()

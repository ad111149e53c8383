"""The public-subspace steering adapter: exact base model at α = 0, lossless export, per-example gradients."""

import math

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from transformers import LlamaConfig, LlamaForCausalLM

from lit_dprl.models import build_tiny_gpt2, build_tiny_tokenizer, position_ids_from_mask
from lit_dprl.steering import (
    _final_norm_weight,
    add_steering,
    class_mean_directions,
    decoder_layers,
    merged_steering_copy,
    steering_disabled,
    steering_modules,
    token_log_odds,
    token_log_odds_direction,
)


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def batch(tokenizer, texts=("a good film", "bad acting, really bad", "fine")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def logits(model, input_ids, attention_mask):
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_alpha_is_base_model_and_export_merges_exactly(family):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_gpt2(tokenizer) if family == "gpt2" else tiny_llama(len(tokenizer))
    ids, mask = batch(tokenizer)
    base = logits(model, ids, mask).detach()
    size = model.config.hidden_size
    add_steering(model, {0: torch.randn(size), 1: torch.randn(2, size)})
    assert [p.numel() for p in model.parameters() if p.requires_grad] == [1, 2]
    torch.testing.assert_close(logits(model, ids, mask), base)  # α = 0: exactly the base model
    with torch.no_grad():
        for module in steering_modules(model):
            module.alpha.normal_()
    steered = logits(model, ids, mask).detach()
    assert not torch.allclose(steered, base, atol=1e-3)
    with steering_disabled(model):
        torch.testing.assert_close(logits(model, ids, mask), base)
    merged = merged_steering_copy(model)
    assert type(merged) is type(model) and not any(hasattr(block, "steering") for block in merged.modules())
    torch.testing.assert_close(logits(merged, ids, mask), steered, atol=1e-5, rtol=1e-5)


def test_directions_are_class_mean_differences():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_gpt2(tokenizer).eval()
    texts, labels = ["good good", "great fun", "awful", "bad bad bad"], [1, 1, 0, 0]
    directions = class_mean_directions(model, tokenizer, texts, labels, layers=[1], batch_size=3)
    captured = []
    handle = model.transformer.h[1].register_forward_hook(
        lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    means = []
    for text in texts:
        ids, mask = batch(tokenizer, [text])
        logits(model, ids, mask)
        means.append(captured.pop().mean(1).squeeze(0))
    handle.remove()
    expected = (means[0] + means[1]) / 2 - (means[2] + means[3]) / 2
    torch.testing.assert_close(directions[0], expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="both classes"):
        class_mean_directions(model, tokenizer, texts[:2], [1, 1], layers=[1])


def test_opacus_per_example_gradients_match_a_loop():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_gpt2(tokenizer).eval()
    add_steering(
        model, {0: torch.randn(2, model.config.hidden_size), 1: torch.randn(model.config.hidden_size)}
    )
    with torch.no_grad():
        for module in steering_modules(model):
            module.alpha.normal_()
    ids, mask = batch(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for row in range(ids.shape[0]):
        loss = logits(model, ids[row : row + 1], mask[row : row + 1])[..., :5].square().mean()
        expected.append(torch.autograd.grad(loss, params))
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        per_row = logits(model, ids, mask)[..., :5].square().mean(dim=(1, 2))
        per_row.mean().backward()
        for index, param in enumerate(params):
            torch.testing.assert_close(
                param.grad_sample / ids.shape[0],  # loss_reduction="mean" scales by the batch size
                torch.stack([grads[index] for grads in expected]) / ids.shape[0],
                atol=1e-6,
                rtol=1e-4,
            )
    finally:
        hooks.cleanup()


def test_token_log_odds_against_a_loop():
    tokenizer = build_tiny_tokenizer()
    texts = ["a good film", "good fun", "a good good cast", "bad film", "a bad cast", "so bad", "a film"]
    labels = [1, 1, 1, 0, 0, 0, 1]
    vocab = len(tokenizer)
    scores, counts = token_log_odds(tokenizer, texts, labels, vocab, min_count=2, clip=5.0)
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    for token in range(vocab):
        pos = sum(token in ids for ids, y in zip(encoded, labels, strict=True) if y == 1)
        neg = sum(token in ids for ids, y in zip(encoded, labels, strict=True) if y == 0)
        expected = (
            math.log((pos + 1) / (neg + 1)) - math.log((n_pos + 1) / (n_neg + 1)) if pos + neg >= 2 else 0.0
        )
        assert scores[token].item() == pytest.approx(max(-5.0, min(5.0, expected)), abs=1e-5)
        assert counts[token].item() == sum(ids.count(token) for ids in encoded)
    good, bad = tokenizer.convert_tokens_to_ids(["g", "b"])  # byte-level: "g" only in good texts, "b" in bad
    assert scores[good] > 0 > scores[bad]
    clipped, _ = token_log_odds(tokenizer, texts, labels, vocab, min_count=2, clip=0.1)
    assert clipped.abs().max() <= 0.1
    with pytest.raises(ValueError, match="both classes"):
        token_log_odds(tokenizer, texts[:3], labels[:3], vocab)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_log_odds_direction_raises_the_logits_of_class_typical_tokens(family):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_gpt2(tokenizer) if family == "gpt2" else tiny_llama(len(tokenizer))
    texts = [
        "a good film",
        "good fun",
        "a good good cast",
        "fine and good",
        "bad film",
        "a bad cast",
        "so bad",
    ]
    labels = [1, 1, 1, 1, 0, 0, 0]
    last = len(decoder_layers(model)) - 1
    direction = token_log_odds_direction(model, tokenizer, texts, labels, last, min_count=2)
    scores, counts = token_log_odds(tokenizer, texts, labels, model.config.vocab_size, min_count=2)
    # the weighted least-squares fit, by its normal equations, times r / g
    unembedding = model.get_output_embeddings().weight.detach().float()
    weight = (counts + 1).sqrt()
    gram = unembedding.T @ (weight[:, None] * unembedding)
    vector = torch.linalg.solve(gram, unembedding.T @ (weight * scores))
    ratio = direction * _final_norm_weight(model) / vector
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-3, atol=1e-3)
    assert ratio[0] > 0
    ids, mask = batch(tokenizer)
    base = logits(model, ids, mask)[:, -1].detach()
    add_steering(model, {last: direction})
    with torch.no_grad():
        steering_modules(model)[0].alpha.fill_(0.5)
    shift = logits(model, ids, mask)[:, -1].detach() - base
    assert ((shift - shift.mean(-1, keepdim=True)) @ (weight * scores) > 0).all()
    with pytest.raises(ValueError, match="min_count"):
        token_log_odds_direction(model, tokenizer, texts, labels, last)  # no token in 20 of 7 texts

"""The public-subspace steering adapter: exact base model at α = 0, lossless export, per-example gradients."""

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from transformers import LlamaConfig, LlamaForCausalLM

from lit_dprl.models import build_tiny_gpt2, build_tiny_tokenizer, position_ids_from_mask
from lit_dprl.steering import (
    add_steering,
    class_mean_directions,
    merged_steering_copy,
    steering_disabled,
    steering_modules,
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

"""Stage-3 rollouts keep each prompt's computation its own: per-prompt random streams, per-prompt minibatches,
one packed row (and one per-example gradient) per prompt, independent of the batch's other prompts and padding."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleHooks

from lit_dprl.data.padding import left_pad
from lit_dprl.generation import response_logprobs
from lit_dprl.models import load_tokenizer
from lit_dprl.rollout import (
    assign_minibatches,
    completion_logprobs,
    completion_seeds,
    minibatch_ids,
    pack_completions,
    prompt_keys,
)
from lit_dprl.stages.ppo import PPOModule

TOKENIZER = load_tokenizer("tiny")
PROMPTS = [
    "the movie",
    "a long and awful plot",
    "great",
    "fun story, good actor",
    "bad scene",
    "the film was",
]
LONG = "a much longer prompt than any other in this batch: it sets the left padding of every row"
SETTINGS = {
    "gae": dict(advantage_estimator="gae"),
    "grpo": dict(advantage_estimator="grpo", samples_per_prompt=3),
}


def batch_of(prompts: list[str]) -> dict[str, torch.Tensor]:
    ids = TOKENIZER(prompts, add_special_tokens=False)["input_ids"]
    input_ids, attention_mask = left_pad(ids, TOKENIZER.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def make_module(**kwargs) -> PPOModule:
    torch.manual_seed(0)
    defaults = dict(
        model="tiny", reward_function="tests.toy_modules:mean_char_code", max_new_tokens=6, min_new_tokens=2,
        rollout_seed=1234, num_mini_batches=4, ppo_epochs=2,
    )  # fmt: skip
    module = PPOModule(**(defaults | kwargs))
    with torch.no_grad():  # move away from the zero value head / zero LoRA B so all gradients are non-trivial
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return module


def per_example_grads(module: PPOModule, rollout) -> torch.Tensor:
    """Opacus's per-example gradients ``[P, d]`` of the loss on every prompt of ``rollout``."""
    hooks = GradSampleHooks(module, batch_first=True, loss_reduction="mean", strict=True)
    try:
        module.zero_grad()
        for p in module.parameters():
            p.grad_sample = None
        loss, _ = module.minibatch_loss(rollout, torch.arange(rollout.responses.shape[0]))
        loss.backward()
        return torch.cat(
            [p.grad_sample.flatten(1) for p in module.parameters() if p.requires_grad], 1
        ).detach()
    finally:
        hooks.cleanup()


def per_prompt_view(module: PPOModule, prompts: list[str]) -> dict[str, tuple]:
    """Each prompt's sampled tokens (valid part), minibatch ids and per-example gradient in a batch of ``prompts``."""
    rollout = module.rollout(batch_of(prompts))
    hp = module.hparams
    ids = minibatch_ids(
        module.rollout_seed, module.rollout_batches, rollout.keys, hp.num_mini_batches, hp.ppo_epochs
    )
    grads = per_example_grads(module, rollout)
    return {
        prompt: ([r[m].tolist() for r, m in zip(rollout.responses[i], rollout.mask[i], strict=True)], ids[i], grads[i])
        for i, prompt in enumerate(prompts)
    }  # fmt: skip


def test_prompt_keys_and_seeds_ignore_padding_and_batch_mates():
    alone = prompt_keys(**batch_of([PROMPTS[0]]))
    padded = prompt_keys(**batch_of([LONG, PROMPTS[0]]))
    assert alone[0] == padded[1] != padded[0]
    seeds = completion_seeds(7, 3, padded, 4)
    assert seeds[4:] == completion_seeds(7, 3, alone, 4) and len(set(seeds)) == 8
    assert completion_seeds(8, 3, alone, 4) != seeds[4:] and completion_seeds(7, 4, alone, 4) != seeds[4:]


def test_minibatch_ids_are_drawn_per_prompt():
    keys = prompt_keys(**batch_of(PROMPTS))
    ids = minibatch_ids(5, 0, keys, num_mini_batches=4, epochs=3)
    without = minibatch_ids(5, 0, keys[:2] + keys[3:], num_mini_batches=4, epochs=3)
    assert torch.equal(without, torch.cat([ids[:2], ids[3:]]))
    parts = assign_minibatches("independent", 5, 0, keys, 4, 3)
    assert len(parts) == 3 and all(sorted(torch.cat(epoch).tolist()) == list(range(6)) for epoch in parts)
    many = minibatch_ids(5, 0, [str(i) for i in range(4000)], num_mini_batches=4, epochs=1)
    assert torch.bincount(many.flatten(), minlength=4).min() > 900  # uniform over the minibatches


def test_packed_completions_score_like_separate_sequences():
    module = make_module(advantage_estimator="grpo", samples_per_prompt=3)
    batch = batch_of(PROMPTS[:4])
    generator = torch.Generator().manual_seed(0)
    responses = torch.randint(0, 256, (4, 3, 5), generator=generator)
    responses[0, 1, 2] = TOKENIZER.eos_token_id  # ends early: the rest is padding
    mask = torch.arange(5) <= torch.where(responses == TOKENIZER.eos_token_id, torch.arange(5), 5).min(-1).values[..., None]  # fmt: skip
    responses = torch.where(mask, responses, TOKENIZER.pad_token_id)
    packed = pack_completions(batch["input_ids"], batch["attention_mask"], responses, mask)
    with torch.no_grad():
        ours, _ = completion_logprobs(
            module.policy, packed, torch.arange(4), responses, TOKENIZER, temperature=0.7, min_new_tokens=2
        )
        for g in range(3):
            query_responses = torch.cat([batch["input_ids"], responses[:, g]], 1)
            attention = torch.cat([batch["attention_mask"], mask[:, g].long()], 1)
            context = batch["input_ids"].shape[1]
            separate = response_logprobs(
                module.policy,
                TOKENIZER,
                query_responses,
                attention,
                context,
                temperature=0.7,
                min_new_tokens=2,
            )
            torch.testing.assert_close(ours[:, g][mask[:, g]], separate[mask[:, g]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("estimator", sorted(SETTINGS))
def test_removing_an_interior_prompt_or_adding_a_longer_one_changes_no_other_prompt(estimator):
    """With every seed fixed, a prompt's sampled tokens and minibatch ids are identical, and its per-example
    gradient equal up to float rounding, whether an interior prompt is removed or a longer prompt (more left
    padding) is added."""
    module = make_module(**SETTINGS[estimator])
    full = per_prompt_view(module, PROMPTS)
    for neighbour in (PROMPTS[:2] + PROMPTS[3:], [*PROMPTS[:3], LONG, *PROMPTS[3:]]):
        view = per_prompt_view(module, neighbour)
        for prompt in set(PROMPTS) & set(neighbour):
            tokens, ids, grad = view[prompt]
            assert tokens == full[prompt][0] and torch.equal(ids, full[prompt][1])
            torch.testing.assert_close(grad, full[prompt][2], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(full[PROMPTS[0]][2], full[PROMPTS[1]][2])


@pytest.mark.parametrize("estimator", sorted(SETTINGS))
def test_changing_one_prompt_changes_only_its_clipped_contribution(estimator):
    module = make_module(**SETTINGS[estimator])
    changed = [*PROMPTS[:2], "x" * len(PROMPTS[2]), *PROMPTS[3:]]
    a = per_example_grads(module, module.rollout(batch_of(PROMPTS)))
    b = per_example_grads(module, module.rollout(batch_of(changed)))
    assert a.shape[0] == b.shape[0] == len(PROMPTS)  # one per-example gradient per prompt, whatever G is

    def clipped(grads, norm=1e-3):
        return grads * (norm / grads.norm(dim=1, keepdim=True)).clamp(max=1.0)

    others = [i for i in range(len(PROMPTS)) if i != 2]
    torch.testing.assert_close(clipped(a)[others], clipped(b)[others], atol=1e-7, rtol=1e-4)
    assert not torch.allclose(clipped(a)[2], clipped(b)[2])

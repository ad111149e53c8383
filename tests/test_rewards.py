"""Reward sources: callable loading, the local sequence-classifier reward and the toy reward."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from lit_dprl.models import build_tiny_tokenizer
from lit_dprl.rewards import (
    SequenceClassifierReward,
    load_reward_callable,
    score_responses,
    vowel_fraction,
)

PROMPTS = ["The film was", "I", "Worst plot ever, and the acting", "ok"]
RESPONSES = [" great fun.", " hated every minute of it", "!", " a masterpiece of modern cinema, truly."]


def save_tiny_classifier(directory, num_labels: int) -> str:
    tokenizer = build_tiny_tokenizer()
    labels = {0: "NEGATIVE", 1: "POSITIVE"} if num_labels == 2 else {0: "SCORE"}
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=32,
        n_layer=2,
        n_head=2,
        num_labels=num_labels,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("classifier"), num_labels=2)


# ---------------------------------------------------------------- callables


def test_load_reward_callable_returns_the_function():
    function = load_reward_callable("lit_dprl.rewards:vowel_fraction")
    assert function is vowel_fraction


@pytest.mark.parametrize("spec", ["lit_dprl.rewards", "lit_dprl.rewards:", ":vowel_fraction", "a:b:c"])
def test_load_reward_callable_bad_format(spec):
    with pytest.raises(ValueError, match=r"'package\.module:function'"):
        load_reward_callable(spec)


def test_load_reward_callable_errors():
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        load_reward_callable("no_such_reward_package.scoring:reward")
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        load_reward_callable("lit_dprl.rewards:missing")
    with pytest.raises(TypeError, match="not a callable"):
        load_reward_callable("math:pi")


def test_load_reward_callable_keeps_a_missing_dependency_error(tmp_path, monkeypatch):
    (tmp_path / "reward_with_broken_import.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz") as error:
        load_reward_callable("reward_with_broken_import:reward")
    assert error.value.name == "no_such_dependency_xyz"


def test_score_responses_checks_the_output():
    torch.testing.assert_close(
        score_responses(vowel_fraction, ["p", "q"], ["aa", "bb"]), torch.tensor([1.0, 0.0])
    )
    with pytest.raises(ValueError, match="one float per response"):
        score_responses(lambda prompts, responses: [0.0], ["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        score_responses(lambda prompts, responses: [math.nan], ["p"], ["a"])


def test_vowel_fraction():
    assert vowel_fraction(["ignored", "x", "y"], ["aXe!", "", "rhythm"]) == [0.5, 0.0, 0.0]


# ---------------------------------------------------------------- sequence classifier


def test_classifier_label_by_index_and_name_and_probability(classifier_dir):
    by_index = SequenceClassifierReward(classifier_dir, label=1)
    by_name = SequenceClassifierReward(classifier_dir, label="POSITIVE")
    probability = SequenceClassifierReward(classifier_dir, label="NEGATIVE", output="probability")
    logits = by_index.logits([p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    assert logits.shape == (4, 2)
    assert by_index(PROMPTS, RESPONSES) == by_name(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(by_index(PROMPTS, RESPONSES)), logits[:, 1])
    torch.testing.assert_close(torch.tensor(probability(PROMPTS, RESPONSES)), torch.softmax(logits, -1)[:, 0])
    assert not by_index.model.training
    assert not any(p.requires_grad for p in by_index.model.parameters())


def test_classifier_scores_do_not_depend_on_batching(classifier_dir):
    one_at_a_time = SequenceClassifierReward(classifier_dir, batch_size=1)(PROMPTS, RESPONSES)
    all_at_once = SequenceClassifierReward(classifier_dir, batch_size=4)(PROMPTS, RESPONSES)
    uneven = SequenceClassifierReward(classifier_dir, batch_size=3)(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(all_at_once), torch.tensor(one_at_a_time))
    torch.testing.assert_close(torch.tensor(uneven), torch.tensor(one_at_a_time))


def test_classifier_without_prompt_and_truncation_keeps_the_end(classifier_dir):
    response_only = SequenceClassifierReward(classifier_dir, include_prompt=False)
    assert response_only(PROMPTS, RESPONSES) == response_only([""] * 4, RESPONSES)
    short = SequenceClassifierReward(classifier_dir, max_length=8)
    long_text = "x" * 100 + " lovely!"
    torch.testing.assert_close(short.logits([long_text]), short.logits([long_text[-8:]]))


def test_classifier_single_output_probability_is_sigmoid(tmp_path):
    directory = save_tiny_classifier(tmp_path, num_labels=1)
    logit = SequenceClassifierReward(directory, label=0)(PROMPTS, RESPONSES)
    probability = SequenceClassifierReward(directory, label="SCORE", output="probability")(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(probability), torch.sigmoid(torch.tensor(logit)))


def test_classifier_errors(classifier_dir):
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        SequenceClassifierReward("lvwerra/distilbert-imdb")
    with pytest.raises(ValueError, match="NEGATIVE"):
        SequenceClassifierReward(classifier_dir, label="positive")
    with pytest.raises(ValueError, match="out of range"):
        SequenceClassifierReward(classifier_dir, label=2)
    with pytest.raises(ValueError, match="'logit' or 'probability'"):
        SequenceClassifierReward(classifier_dir, output="softmax")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        SequenceClassifierReward(classifier_dir)(["a", "b"], ["c"])

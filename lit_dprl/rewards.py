"""Reward sources for PPO: ``(prompts, responses) -> one float per response``.

- :func:`load_reward_callable` imports any ``"package.module:function"`` with that signature
  (rule-based or remote rewards);
- :class:`SequenceClassifierReward` scores texts with a local Hugging Face sequence classifier
  (a public sentiment classifier);
- :class:`RewardModelScorer` scores ``(prompt, response)`` pairs with a reward model exported by stage 2
  (``reward_config.json`` says how: :func:`write_reward_config`), as stage 2 trained it (:func:`reward_model_scores`);
- :func:`vowel_fraction` is a toy reward for tests and tiny runs.

**Contract (DP).** A reward must score each response on its own: ``reward(prompts, responses)[i]`` may depend
on ``prompts[i]`` and ``responses[i]`` only, never on the other rows (no normalisation across the batch, no
ranking, no state carried between calls). Otherwise one prompt's presence changes the others' rewards and the
per-prompt sensitivity is no longer the clipping norm. PPO therefore calls a ``reward_function`` with ONE
response per call (``score_responses(..., one_at_a_time=True)``), so it cannot see other rows; the built-in
classifier and reward-model scorers batch, and their tests show that their scores do not depend on the batch.

**Provenance.** :func:`read_input_report` reads the ``privacy.json`` of a model directory that a stage
consumes; :func:`reward_source_hazards` says when a DP run must refuse a reward source trained on private data
without DP.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_dprl.data.padding import left_pad
from lit_dprl.data.preferences import encode_prompt_responses
from lit_dprl.models import context_length, disable_dropout, position_ids_from_mask
from lit_dprl.privacy.report import REPORT_NAME

REWARD_CONFIG_FILE = "reward_config.json"


class RewardFunction(Protocol):
    """``reward(prompts, responses) -> scores`` with ``len(scores) == len(responses)``; ``scores[i]`` depends on
    ``(prompts[i], responses[i])`` alone (see the module docstring)."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def load_reward_callable(spec: str) -> RewardFunction:
    """Import and return the callable named by ``"package.module:function"``."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute or ":" in attribute:
        raise ValueError(
            f"reward function spec {spec!r} must look like 'package.module:function' "
            "(for example 'lit_dprl.rewards:vowel_fraction')."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise  # the module exists but one of its own imports is missing
        raise ModuleNotFoundError(
            f"cannot import module {module_name!r} from reward function spec {spec!r}: it is not installed "
            "and not on PYTHONPATH.",
            name=error.name,
        ) from error
    if not hasattr(module, attribute):
        raise AttributeError(
            f"module {module_name!r} has no attribute {attribute!r} (reward function spec {spec!r})."
        )
    function = getattr(module, attribute)
    if not callable(function):
        raise TypeError(
            f"{spec!r} is a {type(function).__name__}, not a callable; it must be a function "
            "(prompts: list[str], responses: list[str]) -> list[float]."
        )
    return function


def score_responses(
    reward: RewardFunction,
    prompts: list[str],
    responses: list[str],
    device: torch.device | str = "cpu",
    one_at_a_time: bool = False,
) -> torch.Tensor:
    """Call ``reward`` and return its scores as a float32 tensor ``[B]``, checking length and finiteness.

    ``one_at_a_time``: call it once per (prompt, response), so that it cannot see the other rows.
    """
    if one_at_a_time:
        values = [
            value for pair in zip(prompts, responses, strict=True) for value in reward([pair[0]], [pair[1]])
        ]
    else:
        values = list(reward(prompts, responses))
    scores = torch.as_tensor(values, dtype=torch.float32, device=device)
    if scores.shape != (len(responses),):
        raise ValueError(
            f"the reward function returned {tuple(scores.shape)} values for {len(responses)} responses; "
            "it must return one float per response."
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"the reward function returned non-finite scores: {scores.tolist()}.")
    return scores


class SequenceClassifierReward:
    """Score ``prompt + response`` with a local ``AutoModelForSequenceClassification`` directory.

    The classifier is frozen (``eval()``, ``requires_grad=False``, scored under ``no_grad``). It is a
    plain object, not an ``nn.Module``, so a LightningModule holding it does not register its weights
    as trainable; move it with :meth:`to`.
    """

    def __init__(
        self,
        directory: str,
        label: int | str = 1,
        output: Literal["logit", "probability"] = "logit",
        batch_size: int = 32,
        max_length: int = 256,
        include_prompt: bool = True,
    ) -> None:
        """
        Args:
            directory: Local Hugging Face model directory (``config.json``, weights, tokenizer files).
                Hub names are refused: nothing is downloaded.
            label: The class whose logit/probability is the reward, by index or by name (``config.label2id``).
            output: ``"logit"`` (raw score, TRL's sentiment recipe) or ``"probability"`` (softmax over the
                classes; sigmoid when the model has a single output).
            batch_size: Texts per classifier forward.
            max_length: Longest tokenised text; longer texts lose their beginning (the response end is kept).
            include_prompt: Score ``prompt + response`` (True) or the response alone (False).
        """
        path = Path(directory).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"reward classifier {directory!r} is not a local model directory with a config.json. Hub names "
                "are not downloaded: save the model with `save_pretrained` and pass that directory."
            )
        if output not in ("logit", "probability"):
            raise ValueError(f"output must be 'logit' or 'probability', got {output!r}.")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}.")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, local_files_only=True
        )
        self.model.eval().requires_grad_(False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        self.passes_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        if not self.passes_position_ids:
            self.tokenizer.padding_side = "right"  # default absolute positions are then right for real tokens
        self.label = self._label_index(label)
        self.output = output
        self.batch_size = batch_size
        self.max_length = max_length
        self.include_prompt = include_prompt

    def _label_index(self, label: int | str) -> int:
        num_labels = self.model.config.num_labels
        if isinstance(label, str):
            label2id = self.model.config.label2id
            if label not in label2id:
                raise ValueError(f"label {label!r} is not one of the classifier's labels {sorted(label2id)}.")
            return int(label2id[label])
        if not 0 <= label < num_labels:
            raise ValueError(
                f"label index {label} is out of range for a classifier with {num_labels} outputs."
            )
        return label

    def to(self, device: torch.device | str) -> SequenceClassifierReward:
        """Move the classifier to ``device``; returns ``self``."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Classifier logits ``[N, num_labels]`` for ``texts``, in batches of ``batch_size``."""
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if self.passes_position_ids:
                inputs["position_ids"] = position_ids_from_mask(batch["attention_mask"])
            chunks.append(self.model(**inputs).logits.float())
        return torch.cat(chunks)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Reward per response: the chosen label's logit or probability."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses.")
        texts = (
            [p + r for p, r in zip(prompts, responses, strict=True)]
            if self.include_prompt
            else list(responses)
        )
        logits = self.logits(texts)
        if self.output == "logit":
            scores = logits[:, self.label]
        elif logits.size(-1) == 1:
            scores = torch.sigmoid(logits[:, 0])
        else:
            scores = torch.softmax(logits, -1)[:, self.label]
        return scores.tolist()


VOWELS = frozenset("aeiouAEIOU")


def vowel_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """TOY reward for tests and tiny runs: the fraction of a response's characters that are vowels.

    ``score = #{c in response : c in "aeiouAEIOU"} / max(1, len(response))``, in [0, 1]; the prompt is
    ignored. It measures nothing about quality: it only gives a byte-level model a signal it can learn to
    increase within a few PPO steps.
    """
    return [sum(c in VOWELS for c in r) / max(1, len(r)) for r in responses]


# ---------------------------------------------------------------- provenance


def read_input_report(source: str | None) -> dict[str, Any] | None:
    """The ``privacy.json`` of a model directory, or None (no directory, no report)."""
    if source is None or not (Path(source) / REPORT_NAME).is_file():
        return None
    return json.loads((Path(source) / REPORT_NAME).read_text())


def non_private_on_private_data(report: dict[str, Any]) -> bool:
    """Whether a report describes training on private data without DP: ε = ∞ or ``differentially_private``
    false, unless the report says ``"private_data": false``."""
    epsilon = report.get("epsilon")
    finite = isinstance(epsilon, int | float) and math.isfinite(epsilon)
    not_dp = report.get("differentially_private") is False or not finite
    return not_dp and report.get("private_data", True) is not False


def reward_source_hazards(
    reports: dict[str, dict[str, Any] | None], declared_public: dict[str, bool]
) -> list[str]:
    """Why a DP run must not use these reward sources (``reports``: ``"reward_model"``/``"reward_classifier"``
    -> its ``privacy.json`` or None; ``declared_public``: the user's ``*_is_public`` flags).

    A reward source trained on private data without DP couples every update to all of its training data. A
    reward model needs a report (stage 2 writes one); a classifier without a report is taken as public (a
    public sentiment classifier); any source whose report says non-private on private data is refused.
    """
    hazards = []
    for name in ("reward_model", "reward_classifier"):
        if name not in reports or declared_public.get(name, False):
            continue
        report = reports[name]
        advice = f"train it with DPCallback, or set {name}_is_public=true if it saw only public data"
        if report is None and name == "reward_model":
            hazards.append(
                f"the reward_model has no {REPORT_NAME}: a non-private reward model trained on private data "
                f"couples every update to all of its data ({advice})"
            )
        elif report is not None and non_private_on_private_data(report):
            hazards.append(
                f"the {name} was trained on private data without DP (its {REPORT_NAME} reports epsilon = "
                f"{report.get('epsilon')}): every update would depend on all of its training data ({advice})"
            )
    return hazards


def reward_model_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Reward per row, shape ``[B]``: the scalar head at the last non-pad token, explicit ``[B, T]`` positions."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return output.logits[:, 0]


def write_reward_config(
    directory: Path, max_length: int | None, bias: float, bias_source: str | None
) -> None:
    """Write ``reward_config.json``: how to read a score from the exported model."""
    config = {
        "score": "AutoModelForSequenceClassification(...)(input_ids, attention_mask, position_ids).logits[:, 0] - bias",
        "reward_position": "last non-pad token; sequences are padded on the left, so the last position",
        "padding_side": "left",
        "position_ids": "cumsum(attention_mask, -1) - 1, clamped at 0",
        "encoding": (
            "prompt and response tokenized separately without special tokens, then concatenated; longer than "
            "max_length: the prompt is truncated from the left"
        ),
        "max_length": max_length,
        "bias": bias,
        "bias_source": bias_source,
    }
    (directory / REWARD_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_reward_model(directory: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The exported reward model (fp32, eval mode, frozen, dropout off) and its left-padding tokenizer."""
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=torch.float32, local_files_only=True
    )
    model.eval().requires_grad_(False)
    disable_dropout(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.padding_side = "left"
    return model, tokenizer


class RewardModelScorer:
    """Scores ``(prompt, response)`` pairs with an exported reward model: ``r(x, y) - bias``.

    Encoding, left padding, position ids and the reward position are those of training; ``bias``
    (0 unless computed from declared-public reference data) comes from ``reward_config.json``. The
    model is frozen and scored under ``no_grad``; this is a plain object, not an ``nn.Module``, so a
    LightningModule holding it does not register its weights. Move it with :meth:`to`.
    """

    def __init__(self, directory: str | Path, batch_size: int = 32) -> None:
        directory = Path(directory)
        self.model, self.tokenizer = load_reward_model(directory)
        self.batch_size = batch_size
        config = json.loads((directory / REWARD_CONFIG_FILE).read_text())
        self.bias = float(config["bias"])
        self.max_length = config["max_length"] or context_length(self.model.config)

    def to(self, device: str | torch.device) -> RewardModelScorer:
        """Move the reward model to ``device``; returns ``self``."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            encoded = encode_prompt_responses(
                self.tokenizer, prompts[start:stop], responses[start:stop], self.max_length
            )
            input_ids, attention_mask = left_pad([e.input_ids for e in encoded], self.tokenizer.pad_token_id)
            device = next(self.model.parameters()).device
            rewards = reward_model_scores(self.model, input_ids.to(device), attention_mask.to(device))
            scores.extend((rewards - self.bias).tolist())
        return scores

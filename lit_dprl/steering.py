"""A low-dimensional adapter for DP-RL: steering along directions measured on *public* labelled text.

DP noise grows with the number of trained parameters d (its norm is σC√d / B) while the signal of
per-prompt policy gradients does not; on 2 CPU cores a LoRA adapter (d in the thousands) does not move under
DP at the batch sizes that fit. Here the policy is the frozen model plus, after each chosen decoder layer ℓ,

    h_ℓ ← h_ℓ + Σ_j α_{ℓ,j} · v_{ℓ,j}

where the directions ``v`` are fixed and computed from public data only, and only the coefficients ``α`` (one
per layer and direction: d = a handful) are trained. Two kinds of direction:

- ``class_mean_directions``: the difference of the mean hidden state of public texts of two classes (e.g.
  positive minus negative reviews): a *semantic* direction;
- ``token_log_odds_direction``: the hidden-state shift whose effect on the next-token logits best matches
  each token's log-odds of appearing in a positive rather than a negative public text: a *lexical* direction
  (α ≈ the logit bias, in nats per unit of log-odds, given to class-typical tokens).
 The private data
(the RL prompts) decides how far to steer; the public data decides along what. With α = 0 the model is
exactly the base model, which is the reference policy.

The steered model exports as a plain ``transformers`` model: the constant shift is merged into the bias of
the layer's MLP output projection (``merged_steering_copy``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_dprl.models import position_ids_from_mask


class SteeringBias(nn.Module):
    """``h + α @ V``: a trainable coefficient per fixed direction (``V`` is ``[k, d]``, frozen)."""

    def __init__(self, directions: torch.Tensor) -> None:
        super().__init__()
        # a frozen Parameter (not a buffer) so Opacus's per-example gradients handle the module
        self.directions = nn.Parameter(directions.detach().clone().float(), requires_grad=False)
        self.alpha = nn.Parameter(torch.zeros(directions.shape[0]))
        self.enabled = True

    def shift(self) -> torch.Tensor:
        """The constant added to the hidden state, ``α @ V``, ``[d]``."""
        return self.alpha @ self.directions

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return hidden
        return hidden + (self.alpha @ self.directions).to(hidden.dtype)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (GPT-2's ``transformer.h``, Llama's ``model.layers``)."""
    base = getattr(model, "base_model", model)
    for attribute in ("layers", "h"):
        layers = getattr(base, attribute, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _output_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _layer_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    max_length: int,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One forward pass over ``texts``: ``({ℓ: output of decoder layer ℓ [N, L, d]}, attention mask [N, L])``."""
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
    ).to(model.device)
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        blocks[index].register_forward_hook(
            lambda _m, _i, out, index=index: captured.__setitem__(index, _output_hidden(out))
        )
        for index in layers
    ]
    try:
        model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=position_ids_from_mask(enc.attention_mask),
        )
    finally:
        for handle in handles:
            handle.remove()
    return captured, enc.attention_mask


@torch.no_grad()
def class_mean_directions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    layers: Sequence[int],
    *,
    positive_label: int = 1,
    max_length: int = 48,
    batch_size: int = 32,
) -> torch.Tensor:
    """``v_ℓ = mean(h̄_ℓ | positive) − mean(h̄_ℓ | other)`` for each layer ℓ in ``layers``, ``[len(layers), d]``.

    ``h̄_ℓ`` is the token mean (padding excluded) of the output of decoder layer ℓ for one text. Use public
    texts only: the directions are not protected by the DP guarantee.
    """
    labels_t = torch.tensor(list(labels))
    if not ((labels_t == positive_label).any() and (labels_t != positive_label).any()):
        raise ValueError("class_mean_directions needs texts of both classes")
    features = []
    for start in range(0, len(texts), batch_size):
        outputs, mask = _layer_outputs(
            model, tokenizer, texts[start : start + batch_size], layers, max_length
        )
        weights = mask.unsqueeze(-1).float()
        features.append(torch.stack([(outputs[i] * weights).sum(1) / weights.sum(1) for i in layers], 1))
    feats = torch.cat(features).float().cpu()  # [N, L, d]
    positive = labels_t == positive_label
    return feats[positive].mean(0) - feats[~positive].mean(0)


def token_log_odds(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    vocab_size: int,
    *,
    positive_label: int = 1,
    min_count: int = 20,
    clip: float = 2.0,
    max_length: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, counts)``, each ``[vocab_size]``: per-token class log-odds and token counts over public ``texts``.

    ``s_t = log((n⁺_t + 1) / (n⁻_t + 1)) − log((N⁺ + 1) / (N⁻ + 1))`` where ``n^±_t`` is the number of texts of
    each class containing token ``t`` and ``N^±`` the number of texts of each class; ``s_t = 0`` for tokens in
    fewer than ``min_count`` texts, and ``s`` is clipped to ``[−clip, clip]``. ``counts_t`` = occurrences of ``t``.
    """
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)[
        "input_ids"
    ]
    in_class = torch.zeros(2, vocab_size)
    counts = torch.zeros(vocab_size)
    texts_per_class = torch.zeros(2)
    for ids, label in zip(encoded, labels, strict=True):
        ids_t = torch.tensor(ids, dtype=torch.long)
        side = 0 if label == positive_label else 1
        in_class[side, ids_t.unique()] += 1
        texts_per_class[side] += 1
        counts += torch.bincount(ids_t, minlength=vocab_size)[:vocab_size].float()
    if not texts_per_class.all():
        raise ValueError("token_log_odds needs texts of both classes")
    scores = torch.log((in_class[0] + 1) / (in_class[1] + 1)) - torch.log(
        (texts_per_class[0] + 1) / (texts_per_class[1] + 1)
    )
    scores[in_class.sum(0) < min_count] = 0.0
    return scores.clamp(-clip, clip), counts


def _final_norm_weight(model: PreTrainedModel) -> torch.Tensor:
    """The elementwise gain of the norm before the output embedding (ones if the model has none)."""
    base = getattr(model, "base_model", model)
    for attribute in ("norm", "ln_f", "final_layernorm"):
        weight = getattr(getattr(base, attribute, None), "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.detach().float().cpu()
    return torch.ones(model.config.hidden_size)


@torch.no_grad()
def token_log_odds_direction(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    layer: int,
    *,
    positive_label: int = 1,
    min_count: int = 20,
    max_length: int = 32,
) -> torch.Tensor:
    """A lexical steering direction ``u`` ``[d]`` at decoder layer ``layer`` from public ``texts``.

    With ``s`` and token counts ``c`` from :func:`token_log_odds`, ``W`` the output embedding ``[V, d]``, ``g``
    the final norm's gain and ``r`` the median RMS of the layer's output over the texts' tokens:

        v = argmin_v Σ_t √(c_t + 1) · (W_t · v − s_t)²,     u = r · v / g,

    so that adding ``α · u`` to the residual stream shifts the logits by about ``α · W v ≈ α · s`` (exact for
    the last layer up to the norm's rescaling; the weights fit frequent tokens best). Public texts only.
    """
    scores, counts = token_log_odds(
        tokenizer, texts, labels, model.config.vocab_size, positive_label=positive_label, min_count=min_count
    )
    if not scores.any():
        raise ValueError(
            f"no token appears in {min_count} of the {len(texts)} public texts with a class preference: pass more "
            "public texts or a smaller min_count"
        )
    unembedding = model.get_output_embeddings().weight.detach().float().cpu()  # [V, d]
    root_weight = (counts + 1).pow(0.25)  # √ of the weights √(c + 1)
    root_weight = root_weight / root_weight.mean()
    fit = torch.linalg.lstsq(unembedding * root_weight[:, None], (scores * root_weight)[:, None])
    vector = fit.solution.squeeze(1)
    outputs, mask = _layer_outputs(model, tokenizer, texts[:64], [layer], max_length)
    hidden = outputs[layer][mask.bool()].float().cpu()
    rms = hidden.pow(2).mean(-1).sqrt().median()
    return rms * vector / _final_norm_weight(model)


def add_steering(model: PreTrainedModel, directions: dict[int, torch.Tensor]) -> PreTrainedModel:
    """Freeze ``model`` and add a :class:`SteeringBias` after each decoder layer in ``directions``.

    ``directions[ℓ]`` is ``[d]`` or ``[k, d]`` (k directions at layer ℓ). Only the α's are trainable.
    """
    model.requires_grad_(False)
    blocks = decoder_layers(model)
    for index, vectors in directions.items():
        if not 0 <= index < len(blocks):
            raise ValueError(f"steering layer {index} is outside the model's {len(blocks)} decoder layers")
        vectors = vectors.reshape(-1, vectors.shape[-1])
        if vectors.shape[-1] != model.config.hidden_size:
            raise ValueError(
                f"steering directions have size {vectors.shape[-1]}, the model's hidden size is "
                f"{model.config.hidden_size}"
            )
        block = blocks[index]
        block.steering = SteeringBias(vectors.to(model.device))
        block.register_forward_hook(_apply_steering)
    return model


def _apply_steering(block: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    if isinstance(output, tuple):
        return (block.steering(output[0]), *output[1:])
    return block.steering(output)


def steering_modules(model: nn.Module) -> list[SteeringBias]:
    """All steering adapters of ``model`` in layer order."""
    return [m for m in model.modules() if isinstance(m, SteeringBias)]


@contextlib.contextmanager
def steering_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base model (α ignored): the reference policy."""
    modules = steering_modules(model)
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.enabled = True


def _mlp_output_projection(block: nn.Module) -> nn.Module:
    mlp = block.mlp
    for name in ("down_proj", "c_proj"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise ValueError(f"cannot find the MLP output projection of {type(block).__name__}")


def merged_steering_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain ``transformers`` CPU copy with each layer's shift ``α @ V`` merged into its MLP output bias.

    Llama-style MLPs have no bias: the copy is built with ``mlp_bias=True`` (the other new biases are zero).
    """
    shifts = {
        index: block.steering.shift().detach().cpu()
        for index, block in enumerate(decoder_layers(model))
        if isinstance(getattr(block, "steering", None), SteeringBias)
    }
    config = copy.deepcopy(model.config)
    if hasattr(config, "mlp_bias") and not config.mlp_bias:
        config.mlp_bias = True
    with torch.random.fork_rng(devices=[]):
        clone = type(model)(config)
    state = {k: v for k, v in model.state_dict().items() if ".steering." not in k}
    missing, unexpected = clone.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise RuntimeError(f"cannot merge the steering adapter: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name in missing:
            clone.get_parameter(name).zero_()
        blocks = decoder_layers(clone)
        for index, shift in shifts.items():
            _mlp_output_projection(blocks[index]).bias.add_(shift)
    return clone.eval()

"""Ghost norms of an embedding tied to an output layer (GPT-2's ``wte`` = ``lm_head``), which Opacus refuses.

The tied weight ``W`` (V × d) gets two gradients per example n: the embedding's ``G_E = Σ_t e_{x_t} g_tᵀ``
(``x_t`` the input ids, ``g_t`` the gradient at the embedding's output) and the output layer's
``G_L = Σ_s b_s h_sᵀ`` (``h_s`` its inputs, ``b_s`` the gradient at its logits). Their norms do not add up:

    ‖G_E + G_L‖² = ‖G_E‖² + ‖G_L‖² + 2 Σ_t Σ_s b_s[x_t] ⟨g_t, h_s⟩,

and the cross term needs only ``b_s[x_t]`` (a [T, T] gather of the logit gradients) and ``⟨g_t, h_s⟩``, so
no per-example gradient is formed. ``‖G_E‖²`` and ``‖G_L‖²`` are Opacus's embedding and linear norm samplers.
"""

from __future__ import annotations

from opacus.utils.module_utils import trainable_modules, trainable_parameters
from torch import Tensor, nn


def parameter_holders(model: nn.Module) -> dict[int, list[nn.Module]]:
    """``{id(parameter): modules holding it as their own}`` for every trainable parameter of ``model``."""
    holders: dict[int, list[nn.Module]] = {}
    for _, module in trainable_modules(model):
        for _, parameter in trainable_parameters(module):
            holders.setdefault(id(parameter), []).append(module)
    return holders


def tied_embedding_partners(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """``{embedding: linear, linear: embedding}`` for each trainable weight held by exactly one ``nn.Embedding``
    and one ``nn.Linear`` (as their ``weight``) and by no other module."""
    partners: dict[nn.Module, nn.Module] = {}
    for modules in parameter_holders(model).values():
        kinds = sorted(modules, key=lambda m: type(m) is nn.Linear)
        if [type(m) for m in kinds] == [nn.Embedding, nn.Linear] and kinds[0].weight is kinds[1].weight:
            partners[kinds[0]], partners[kinds[1]] = kinds[1], kinds[0]
    return partners


def logit_gradients_at_inputs(logit_backprops: Tensor, input_ids: Tensor) -> Tensor:
    """``P[n, s, t] = b_{n,s}[x_{n,t}]``, shape [B, S, T], from logit gradients [B, S, V] and ids [B, T]."""
    index = input_ids.unsqueeze(1).expand(-1, logit_backprops.shape[1], -1)
    return logit_backprops.gather(2, index)


def tied_cross_term(picked: Tensor, embedding_backprops: Tensor, output_inputs: Tensor) -> Tensor:
    """``⟨G_E, G_L⟩ = Σ_{s,t} P[n, s, t] ⟨g_{n,t}, h_{n,s}⟩`` per example, shape [B]."""
    inner = embedding_backprops.matmul(
        output_inputs.to(embedding_backprops.dtype).transpose(1, 2)
    )  # [B, T, S]
    return (picked.to(inner.dtype).transpose(1, 2) * inner).sum((1, 2))

"""White-box canary scores for ``lit-dprl audit --mode white-box``: the training update projected on each
canary's own gradient at initialisation.

With θ the trainable parameters (``requires_grad``; a LoRA stage's adapter, a DPO stage's policy but not its
frozen reference), s_i the canary kind's membership statistic (``statistic_tensor``) and
g_i = ∇_θ s_i(θ_init), the score of canary i is

    score_i = ⟨θ_final − θ_init, g_i⟩ / ‖g_i‖      (0 where g_i = 0)

A run that trained on canary i moved θ (to first order) along its clipped gradient, which is g_i's direction
up to the loss's sign (s_i is the statistic a member's training raises), so members score higher. The score
does not depend on how the statistic's value changed, only on the direction of the whole update: it sees a
change too small to move the statistic measurably (Steinke, Nasr & Jagielski 2023 audit white-box the same
way, with gradient canaries).

Cost: one forward per chunk of ``SCORING_BATCH`` canaries and one backward per canary, before training; the
unit directions g_i/‖g_i‖ are kept on the CPU as one float32 matrix of m × d (4·m·d bytes, d the number of
trainable parameters: e.g. 256 canaries × 10⁶ parameters = 1 GiB), and θ_init as d more floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lit_dprl.commands.audit_canaries import SCORING_BATCH, Canaries, evaluating


def white_box_score_name(statistic_name: str) -> str:
    """The white-box score in words, for ``audit.json``."""
    return f"update along the canary's gradient at initialisation: ⟨θ_final − θ_init, ∇s⟩ / ‖∇s‖, s = {statistic_name}"


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` that training updates (``requires_grad``), in a fixed order."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to audit white-box")
    return parameters


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated into one float32 CPU vector (detached)."""
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


def unit_gradients(
    module: torch.nn.Module, kind: Canaries, rows: list, parameters: list[torch.nn.Parameter]
) -> torch.Tensor:
    """``g_i / ‖g_i‖`` ``[m, d]`` with g_i = ∇ s_i over ``parameters``, the module in eval mode; a row of
    zeros where g_i = 0. One forward per chunk of ``SCORING_BATCH`` rows, one backward per row."""
    directions = []
    with evaluating(module), torch.enable_grad():
        for start in range(0, len(rows), SCORING_BATCH):
            statistics = kind.statistic_tensor(rows[start : start + SCORING_BATCH])
            for i in range(len(statistics)):
                grads = torch.autograd.grad(
                    statistics[i], parameters, retain_graph=True, allow_unused=True, materialize_grads=True
                )
                directions.append(flat(list(grads)))
    gradients = torch.stack(directions)
    return gradients.div_(gradients.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))


@dataclass
class InitialGradients:
    """What the white-box score needs from initialisation: the trainable parameters (the live tensors, which
    training updates in place), their values θ_init, and the canaries' unit gradients ``[m, d]``."""

    parameters: list[torch.nn.Parameter]
    theta_init: torch.Tensor
    directions: torch.Tensor

    @classmethod
    def capture(cls, module: torch.nn.Module, kind: Canaries, rows: list) -> InitialGradients:
        """θ_init and g_i/‖g_i‖ of every canary of ``rows``, before training."""
        parameters = trainable_parameters(module)
        return cls(parameters, flat(parameters), unit_gradients(module, kind, rows, parameters))

    def scores(self) -> np.ndarray:
        """``⟨θ_final − θ_init, g_i⟩ / ‖g_i‖`` per canary, θ_final the parameters now, as float64."""
        update = flat(self.parameters) - self.theta_init
        return (self.directions @ update).double().numpy()

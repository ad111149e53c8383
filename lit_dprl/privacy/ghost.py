"""Ghost clipping (``DPCallback(grad_sample_mode="ghost")``): per-example gradient *norms* without per-example
gradients, on Opacus's fast-gradient-clipping hooks.

One step on a batch of per-example losses ℓ_1..ℓ_B (the training step's ``"per_example_loss"``):

1. norm pass: back-propagate Σ_i ℓ_i with Opacus's norm hooks, which compute each example's gradient norm
   ‖g_i‖ layer by layer from activations and output gradients (``‖Σ_t b_t a_tᵀ‖²_F = ⟨b bᵀ, a aᵀ⟩`` for a
   linear layer), never the gradient itself. Only the gradients the hooks need are computed: the pass asks
   autograd for the gradients at the outputs of the modules whose inputs need none (the embeddings, LoRA's
   first layers), so no weight gradient is formed;
2. clipping coefficients ``c_i = min(1, C / (‖g_i‖ + 10⁻⁶))`` (Opacus's formula, as in hook mode);
3. the loss handed back to Lightning is ``Σ_i c_i ℓ_i`` (c detached), whose backward (hooks off) leaves the
   clipped sum ``Σ_i c_i g_i`` in ``p.grad``;
4. ``GhostDPOptimizer`` adds N(0, σ²C²) once and divides by the expected batch size, as hook mode does (under
   DDP, ``DistributedGhostDPOptimizer``: rank 0 adds the noise, then the ranks' sums are all-reduced).

A parameter used twice in a step gets no Opacus ghost norm, because the norms of its two uses do not add
up to the norm of its gradient. An embedding tied to an output layer (GPT-2's ``wte`` = ``lm_head``) gets
the exact norm with the cross term (``tied.py``). Any other parameter held by two modules, and any module
called twice (the reward and DPO stages run chosen and rejected responses through two forwards, so that a
pair is clipped as one unit), go through Opacus's fast gradient clipping instead: per-example gradients of
that one module, summed over its uses, then their norm (one layer's per-example gradients at a time, where
hook mode holds all layers'). transformers' ``Conv1D`` (GPT-2's projections, ``y = x W + b``) gets Opacus's
linear norm sampler: the norm of ``Wᵀ``'s gradient is that of ``W``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus.grad_sample import GradSampleHooksFastGradientClipping, register_norm_sampler
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.module_utils import trainable_parameters
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_dprl.privacy.optimizers import _DPChecks
from lit_dprl.privacy.refusals import DPConfigurationError
from lit_dprl.privacy.tied import (
    logit_gradients_at_inputs,
    parameter_holders,
    tied_cross_term,
    tied_embedding_partners,
)

PER_EXAMPLE_LOSS = "per_example_loss"
GRADIENT_PROBLEMS = (
    "a parameter received a gradient that the ghost norm pass did not measure, so it would not be clipped; "
    "use grad_sample_mode: hooks for this module",
    "the clipped gradient is not finite: an example with a non-finite loss or activation cannot be isolated by "
    "ghost clipping; use grad_sample_mode: hooks, which drops it",
)

if Conv1D not in GradSampleHooksFastGradientClipping.NORM_SAMPLERS:
    register_norm_sampler(Conv1D)(compute_linear_norm_sample)


def modules_sharing_parameters(model: nn.Module) -> set[nn.Module]:
    """The modules that hold, as their own parameter, a trainable parameter another module holds too."""
    return {module for modules in parameter_holders(model).values() if len(modules) > 1 for module in modules}


def clipping_coefficients(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``c_i = min(1, C / (‖g_i‖ + 10⁻⁶))``, and 0 where ‖g_i‖ is not finite (that example drops out)."""
    coefficients = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return torch.where(norms.isfinite(), coefficients, torch.zeros_like(coefficients))


class GhostNormHooks(GradSampleHooksFastGradientClipping):
    """Opacus's ghost-clipping hooks on ``model``; a module that shares a parameter or runs twice in a step uses
    fast gradient clipping.

    ``norm_pass(losses)`` returns the per-example gradient norms of ``losses`` (shape ``[B]``)."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        super().__init__(
            model, batch_first=True, loss_reduction="sum", strict=True, max_grad_norm=max_grad_norm
        )
        self.shared = modules_sharing_parameters(model)
        self.tied = tied_embedding_partners(model)
        self._tied_halves: dict[int, dict[str, Any]] = {}  # per tied weight: what its first module left
        self.normed: set[int] = set()  # ids of the parameters the last norm pass gave a norm
        self._sources: list[torch.Tensor] = []  # where the norm pass's backward may stop
        self._reused: set[nn.Module] = set()  # modules called more than once in this step

    @contextmanager
    def _routed(self, module: nn.Module) -> Iterator[None]:
        """Serve ``module`` by fast gradient clipping (no ghost norm) if it shares a parameter or runs twice."""
        ghost = self.use_ghost_clipping
        self.use_ghost_clipping = ghost and module not in self.shared and module not in self._reused
        try:
            yield
        finally:
            self.use_ghost_clipping = ghost

    def capture_activations_hook(self, module: nn.Module, forward_input: Any, forward_output: Any) -> None:
        if self.hooks_enabled and torch.is_grad_enabled() and module.training:
            if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in forward_input):
                # nothing upstream carries this module's output gradient: the norm pass asks for that gradient
                outputs = forward_output if isinstance(forward_output, tuple) else (forward_output,)
                outputs = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
                self._sources += outputs or [p for _, p in trainable_parameters(module)]
            if getattr(module, "activations", None):
                self._reused.add(module)
        with self._routed(module):
            super().capture_activations_hook(module, forward_input, forward_output)

    def capture_backprops_hook(
        self,
        module: nn.Module,
        forward_input: Any,
        forward_output: Any,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        partner = self.tied.get(module)
        if partner is not None and self.hooks_enabled and not {module, partner} & self._reused:
            self._tied_backprops(module, partner, forward_output, loss_reduction, batch_first)
            return
        with self._routed(module):
            super().capture_backprops_hook(module, forward_input, forward_output, loss_reduction, batch_first)

    def _tied_backprops(
        self,
        module: nn.Module,
        partner: nn.Module,
        forward_output: Any,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        """One half of a tied embedding/output weight's norm (``tied.py``); the second half sets the norm."""
        activations, backprops = self.rearrange_grad_samples(
            module=module,
            backprops=forward_output[0].detach(),
            loss_reduction=loss_reduction,
            batch_first=batch_first,
        )
        norms = self.NORM_SAMPLERS[type(module)](module, activations, backprops)
        weight = module.weight
        half = self._tied_halves.setdefault(id(weight), {"squared": 0.0})
        half["squared"] = half["squared"] + norms.pop(weight).square()
        for parameter, norm in norms.items():  # the output layer's own bias
            parameter._norm_sample = norm
        if isinstance(module, nn.Embedding):
            half["ids"], half["embedding_backprops"] = activations[0], backprops
        else:  # the embedding's ids: from its first half, or still in its captured activations
            ids = half["ids"] if "ids" in half else partner.activations[-1][0]
            half["picked"], half["output_inputs"] = logit_gradients_at_inputs(backprops, ids), activations[0]
        if "picked" in half and "embedding_backprops" in half:
            cross = tied_cross_term(half["picked"], half["embedding_backprops"], half["output_inputs"])
            weight._norm_sample = (half["squared"] + 2 * cross).clamp(min=0).sqrt()
            del self._tied_halves[id(weight)]
        for _, parameter in trainable_parameters(module):
            parameter._forward_counter -= 1
        if not module.activations and hasattr(module, "max_batch_len"):
            del module.max_batch_len

    def start_step(self) -> None:
        """Forget the previous step's norms and sources, and turn the hooks on for the coming forward."""
        for parameter in self.trainable_parameters:
            parameter._norm_sample = None
        self._sources = []
        self._reused = set()
        self._tied_halves = {}
        self.normed = set()
        self.enable_hooks()

    def norm_pass(self, losses: torch.Tensor) -> torch.Tensor:
        """‖∇ℓ_i‖ for each row of ``losses``: ``sqrt(Σ_p ‖∇_p ℓ_i‖²)`` over the parameters the loss reached."""
        if self._sources:
            torch.autograd.grad(losses.sum(), self._sources, retain_graph=True, allow_unused=True)
            self._sources = []
        self.disable_hooks()  # the second backward (Lightning's) must not recompute norms
        per_parameter = [
            p._norm_sample for p in self.trainable_parameters if getattr(p, "_norm_sample", None) is not None
        ]
        self.normed = {
            id(p) for p in self.trainable_parameters if getattr(p, "_norm_sample", None) is not None
        }
        return example_norms(per_parameter, losses)


def example_norms(per_parameter: list[torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
    """``sqrt(Σ_p ‖∇_p ℓ_i‖²)`` for each row i of ``losses``, from the ``[B]`` norms of each parameter."""
    if not per_parameter:
        return torch.zeros(len(losses), device=losses.device)
    squared = torch.stack([n.to(losses.device, torch.float32) for n in per_parameter]).square().sum(0)
    if squared.shape != losses.shape:
        raise DPConfigurationError(
            f"the per-example gradient norms have shape {tuple(squared.shape)} but per_example_loss has "
            f"{tuple(losses.shape)}: each loss must belong to one row of the batch (first dimension)"
        )
    return squared.sqrt()


def hook_norms(model: nn.Module, max_grad_norm: float) -> GhostNormHooks:
    """``GhostNormHooks`` on ``model``, or a ``DPConfigurationError`` naming what Opacus cannot serve."""
    try:
        return GhostNormHooks(model, max_grad_norm)
    except NotImplementedError as err:
        raise DPConfigurationError(
            f"Opacus's ghost clipping cannot serve this module: {err}. Use grad_sample_mode: hooks, or freeze "
            "or replace those layers."
        ) from err


def per_example_losses(output: Any) -> torch.Tensor:
    """The ``[B]`` per-example losses of a training step's output, checked against its ``"loss"`` (their mean)."""
    if not isinstance(output, dict) or PER_EXAMPLE_LOSS not in output:
        raise DPConfigurationError(
            "grad_sample_mode='ghost' needs training_step to return a dict with 'loss' (the batch mean) and "
            f"'{PER_EXAMPLE_LOSS}' (the loss of each row, shape [B]); this module returned "
            f"{type(output).__name__}{' with keys ' + str(sorted(output)) if isinstance(output, dict) else ''}. "
            "Return both, or use grad_sample_mode: hooks"
        )
    losses, loss = output[PER_EXAMPLE_LOSS], output.get("loss")
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        raise DPConfigurationError(
            f"'{PER_EXAMPLE_LOSS}' must be a 1-D tensor (one loss per row), got {losses!r}"
        )
    if (
        loss is not None
        and len(losses)
        and not torch.allclose(loss.detach(), losses.detach().mean(), rtol=1e-4, atol=1e-6)
    ):
        raise DPConfigurationError(
            f"'loss' ({float(loss.detach()):.6g}) is not the mean of '{PER_EXAMPLE_LOSS}' "
            f"({float(losses.detach().mean()):.6g}): the training loss must be the batch mean of the per-example "
            "losses"
        )
    return losses


def ghost_training_step(
    hooks: GhostNormHooks,
    optimizer: GhostDPOptimizer,
    training_step: Callable[..., Any],
    batch: Any,
    *args: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    """``training_step`` whose returned ``"loss"`` is ``Σ_i c_i ℓ_i``: its backward gives the clipped sum."""
    hooks.start_step()
    output = training_step(batch, *args, **kwargs)
    losses = per_example_losses(output)
    norms = hooks.norm_pass(losses)
    coefficients = clipping_coefficients(norms, hooks.max_grad_norm).to(losses.dtype)
    finite = norms.isfinite()
    optimizer.record_norm_pass(len(losses), int((~finite).sum()), hooks.normed)
    kept = torch.where(finite, losses, torch.zeros_like(losses))  # no 0 × inf from a dropped example
    return {**output, "loss": (coefficients.detach() * kept).sum()}


class GhostDPOptimizer(_DPChecks, DPOptimizer):
    """The DP optimizer of ghost mode: ``p.grad`` already holds the clipped sum; add noise once, normalise.

    The update is ``(Σ_i c_i g_i + N(0, σ²C²)) / expected_batch_size``, the same as hook mode's, with the same
    noise draws for the same generator. Checks before the noise: the step's examples are counted against the
    batch (``_DPChecks``); a parameter with a gradient but no norm from this step's norm pass, or a gradient
    that is not finite (a non-finite example that ghost clipping could not isolate), stops the run.
    """

    _pending_units: int = 0
    _normed: frozenset[int] = frozenset()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free the gradients between steps (Opacus keeps zeros by default): the forward and the norm pass run
        without them, as a plain torch optimizer's do; ``pre_step`` gives an untouched parameter zeros."""
        super().zero_grad(set_to_none)

    def record_norm_pass(self, units: int, non_finite: int, normed: set[int]) -> None:
        """The norm pass of the coming step clipped ``units`` examples (``non_finite`` dropped)."""
        self._pending_units += units
        self.non_finite_units += non_finite
        self._normed = frozenset(normed)

    def _shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of a gradient this process checks and noises: all of it here (``fsdp.py``: its shard)."""
        return tensor

    def _gradient_problem(self, normed: frozenset[int]) -> int:
        """0, or the index + 1 in ``GRADIENT_PROBLEMS`` of what is wrong with this process's clipped sum."""
        for parameter in self.params:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)  # untouched by the loss, or an empty batch
            elif id(parameter) not in normed and bool(self._shard(parameter.grad).any()):
                return 1
            if not bool(self._shard(parameter.grad).isfinite().all()):
                return 2
        return 0

    def _raise_if(self, problem: int) -> None:
        """Stop on a problem; across processes every rank stops if one has a problem (no rank is left waiting
        in the step's collective), with the message of the first problem found."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            worst = torch.tensor([problem], device=self.params[0].device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if int(worst) and not problem:
                raise RuntimeError(f"another rank stopped the step: {GRADIENT_PROBLEMS[int(worst) - 1]}")
        if problem:
            raise RuntimeError(GRADIENT_PROBLEMS[problem - 1])

    def _add_noise(self) -> bool:
        """Whether this process adds the noise (the only one, or rank 0 under DDP)."""
        return True

    def _reduce(self) -> None:
        """Sum the scaled gradients over processes (none here: one process, or FSDP's reduce-scatter)."""

    @torch.no_grad()
    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        units, normed = self._pending_units, self._normed
        self._pending_units, self._normed = 0, frozenset()
        self._count_participation(units)
        self._raise_if(self._gradient_problem(normed))
        std = self.noise_multiplier * self.max_grad_norm
        for parameter in self.params:
            grad = self._shard(parameter.grad)
            if self._add_noise():
                grad.add_(_generate_noise(std, grad, generator=self.generator, secure_mode=self.secure_mode))
            grad.div_(self.expected_batch_size)
        self._reduce()
        if self.step_hook:
            self.step_hook(self)
        self.noisy_steps += 1
        return True


class DistributedGhostDPOptimizer(GhostDPOptimizer):
    """Ghost mode under DDP (whose own gradient sync is off, ``patching.stop_ddp_gradient_sync``): each rank's
    ``p.grad`` holds the clipped sum of its share of the Poisson sample; rank 0 adds the noise, each rank divides
    by its expected share and the results are all-reduced and averaged, as Opacus's ``DistributedDPOptimizer``
    does in hook mode: ``(Σ_{global i} c_i g_i + N(0, σ²C²)) / global expected batch size`` on every rank. A rank
    with an empty share still steps (its sum is zero), so the all-reduce always has every rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()

    def _add_noise(self) -> bool:
        return self.rank == 0

    def _reduce(self) -> None:
        for parameter in self.params:
            torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.SUM)
            parameter.grad /= self.world_size

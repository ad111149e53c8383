"""DP-SGD under FSDP2: Lightning's ``ModelParallelStrategy`` with ``fully_shard`` (data parallel only), in ghost mode.

Each rank trains on its share of the global Poisson sample (``sampling.py``) with a sharded model. What makes the
step the single-process DP-SGD step on the global batch:

- **per-example norms of the full model on each rank.** In forward and backward FSDP2 gathers each layer's full
  parameters, so Opacus's FSDP ghost hooks (``GradSampleHooksFastGradientClippingFSDP``, norms kept on the module,
  whose parameters FSDP swaps between sharded and gathered) see whole layers: the norm of an example is computed
  by the rank that holds the example, over every parameter, with no communication. No all-reduce of norms is
  needed (no rank holds a part of another rank's example);
- **the clipped sum over all ranks.** The backward of ``Σ_i c_i ℓ_i`` (``ghost.py``) is reduce-scattered with a
  divide factor of 1 (``sum_gradients``), so each rank's shard of ``p.grad`` holds its elements of ``Σ_{global i}
  c_i g_i``;
- **noise once per parameter element.** Every element lives in exactly one rank's shard (``Shard`` placements on
  the one data-parallel mesh dimension; checked), and that rank adds N(0, σ²C²) to it, then divides by the
  expected *global* batch size. The ranks draw from independent streams (``rank_generator``): equal streams would
  add the same noise to elements of different shards, noise that cancels in their difference. Opacus's own
  ``FSDPOptimizerFastGradientClipping`` instead draws a full-size tensor on each rank and keeps its shard (more
  memory, same distribution);
- **ranks in step.** FSDP's gathers and reduce-scatters are collectives, so a rank whose share of a Poisson sample
  is empty still runs the step, on a batch of zero rows (``zero_row_batch``), whose clipped sum is exactly zero.

Refused: hook mode (Opacus's per-example gradients do not support sharded parameters), tensor parallelism
(``tensor_parallel_size > 1``), a trainable parameter that is not sharded on the data-parallel mesh (it would not
be reduced), and modules that share a parameter or run twice in a step (Opacus's FSDP hooks do not support tying).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.strategies import ModelParallelStrategy
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
    GradSampleHooksFastGradientClippingFSDP,
)
from opacus.utils.module_utils import trainable_parameters
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.utils.data import DataLoader

from lit_dprl.privacy.ghost import GhostDPOptimizer, example_norms, modules_sharing_parameters
from lit_dprl.privacy.refusals import DPConfigurationError
from lit_dprl.privacy.sampling import EmptyBatch, derive_seed

HOW_TO_SHARD = (
    "Use ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) and call "
    "fully_shard(layer, mesh=self.device_mesh['data_parallel']) on the layers and the model in configure_model()"
)


def is_sharded(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` trains under FSDP2 (Lightning's ``ModelParallelStrategy``)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def refuse_sharded_trainer(trainer: pl.Trainer, grad_sample_mode: str) -> None:
    """Refuse hook mode and tensor parallelism under ``ModelParallelStrategy``."""
    if grad_sample_mode != "ghost":
        raise DPConfigurationError(
            "DPCallback under ModelParallelStrategy (FSDP2) needs grad_sample_mode='ghost': hook mode's "
            "per-example gradients do not support sharded parameters (Opacus supports FSDP only through ghost "
            "clipping). Set grad_sample_mode: ghost (training_step must return 'per_example_loss')"
        )
    mesh = trainer.strategy.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        raise DPConfigurationError(
            f"tensor parallelism (tensor_parallel_size={mesh['tensor_parallel'].size()}) is not supported under "
            "DP: a layer's per-example gradient norm would be split across ranks. " + HOW_TO_SHARD
        )


def strategy_description(trainer: pl.Trainer) -> str:
    """How the run was distributed, for the report."""
    name = type(trainer.strategy).__name__
    if is_sharded(trainer):
        return f"{name} (FSDP2 fully_shard over {trainer.world_size} data-parallel ranks; sharded parameters)"
    return name


def refuse_unsharded_parameters(optimizers: list[torch.optim.Optimizer], trainer: pl.Trainer) -> None:
    """Every trainable parameter must be sharded (``Shard`` placements) on the data-parallel mesh, else its
    gradient is not summed over the ranks and no rank owns its noise alone."""
    mesh = trainer.strategy.device_mesh["data_parallel"]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if not isinstance(p, DTensor) or p.device_mesh != mesh:
                    raise DPConfigurationError(
                        f"a trainable parameter of shape {tuple(p.shape)} is not sharded by fully_shard on the "
                        "data-parallel mesh, so its gradient would not be summed over the ranks. "
                        + HOW_TO_SHARD
                    )
                if not all(isinstance(placement, Shard) for placement in p.placements):
                    raise DPConfigurationError(
                        f"a trainable parameter has placements {p.placements}; DP under FSDP needs every "
                        "parameter sharded (Shard), so that each element's noise is drawn once, by one rank"
                    )


def sum_gradients(model: nn.Module) -> Any:
    """Make FSDP reduce-scatter gradient *sums* (divide factor 1, a plain SUM: gloo has no pre-multiplied sum)
    instead of means; returns the undo, which restores FSDP's defaults (mean, its choice of reduce op)."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        raise DPConfigurationError("no module is wrapped by fully_shard. " + HOW_TO_SHARD)
    for module in fsdp_modules:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)

    def undo() -> None:
        for module in fsdp_modules:
            module.set_gradient_divide_factor(None)
            module.set_force_sum_reduction_for_comms(False)

    return undo


def zero_row_batch(loader: DataLoader) -> Any:
    """A batch with the structure of ``loader``'s but no rows: the first example collated, every tensor cut to
    its first 0 rows. A rank runs it when its share of a Poisson sample is empty, so it joins the collectives."""
    batch = loader.collate_fn([loader.dataset[0]])
    return apply_to_collection(batch, torch.Tensor, lambda t: t[:0] if t.dim() > 0 else t)


def fill_empty(batch: Any, zero_rows: Any, device: torch.device) -> Any:
    """``batch``, or the zero-row batch (on ``device``) if this rank's share of the sample is empty."""
    if isinstance(batch, EmptyBatch):
        return apply_to_collection(zero_rows, torch.Tensor, lambda t: t.to(device))
    return batch


class ShardedGhostNormHooks(GradSampleHooksFastGradientClippingFSDP):
    """Opacus's FSDP ghost-clipping hooks with ``ghost.GhostNormHooks``'s interface (``start_step``, ``norm_pass``,
    ``normed``): the norm pass asks autograd only for the gradients at the outputs of the modules whose inputs
    need none, so no weight gradient (and no reduce-scatter) is formed before the clipped backward."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        shared = modules_sharing_parameters(model)
        if shared:
            raise DPConfigurationError(
                "under FSDP, ghost clipping cannot serve a parameter held by two modules (tied weights: "
                f"{sorted(type(m).__name__ for m in shared)}): untie them or train on one process or DDP"
            )
        super().__init__(
            model, batch_first=True, loss_reduction="sum", strict=True, max_grad_norm=max_grad_norm
        )
        self.modules_with_norms = list(self.iterate_submodules(model))
        # ids of the sharded parameters (the optimizer's), taken now: in forward/backward FSDP swaps in gathered ones
        self._ids = {m: {id(p) for _, p in trainable_parameters(m)} for m in self.modules_with_norms}
        self.normed: set[int] = set()
        self._sources: list[torch.Tensor] = []

    def capture_activations_hook(self, module: nn.Module, forward_input: Any, forward_output: Any) -> None:
        first = not any(isinstance(t, torch.Tensor) and t.requires_grad for t in forward_input)
        if self.hooks_enabled and torch.is_grad_enabled() and module.training and first:
            # nothing upstream carries this module's output gradient: the norm pass asks for that gradient
            outputs = forward_output if isinstance(forward_output, tuple) else (forward_output,)
            self._sources += [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        with _tying_refused():
            super().capture_activations_hook(module, forward_input, forward_output)

    def start_step(self) -> None:
        """Forget the previous step's norms and sources, and turn the hooks on for the coming forward."""
        for module in self.modules_with_norms:
            if hasattr(module, "norm_sample"):
                del module.norm_sample
        self._sources = []
        self.normed = set()
        self.enable_hooks()

    def norm_pass(self, losses: torch.Tensor) -> torch.Tensor:
        """‖∇ℓ_i‖ over the whole (gathered) model for each row of ``losses``, from this rank's rows only."""
        if self._sources:
            torch.autograd.grad(losses.sum(), self._sources, retain_graph=True, allow_unused=True)
            self._sources = []
        self.disable_hooks()
        normed = [m for m in self.modules_with_norms if hasattr(m, "norm_sample")]
        self.normed = {i for m in normed for i in self._ids[m]}
        per_parameter = [n.reshape(-1) for m in normed for n in m.norm_sample]
        return example_norms(per_parameter, losses)


@contextmanager
def _tying_refused() -> Iterator[None]:
    try:
        yield
    except NotImplementedError as err:
        raise DPConfigurationError(
            f"{err}: under FSDP a module may run once per step (no tied or reused layers); train on one "
            "process or under DDP for such a model"
        ) from err


def hook_norms(model: nn.Module, max_grad_norm: float) -> ShardedGhostNormHooks:
    """``ShardedGhostNormHooks`` on ``model``, or a ``DPConfigurationError`` naming what Opacus cannot serve."""
    try:
        return ShardedGhostNormHooks(model, max_grad_norm)
    except NotImplementedError as err:
        raise DPConfigurationError(
            f"Opacus's FSDP ghost clipping cannot serve this module: {err}. Freeze or replace those layers."
        ) from err


class ShardedGhostDPOptimizer(GhostDPOptimizer):
    """``GhostDPOptimizer`` on sharded parameters: checks, noise and scaling act on this rank's shard of each
    gradient (the clipped sum over all ranks, see ``sum_gradients``); ``expected_batch_size`` is the global one."""

    def _shard(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def rank_generator(generator: Any, rank: int) -> Any:
    """An independent noise stream for ``rank``: torch's generator reseeded from its seed and the rank."""
    if not isinstance(generator, torch.Generator):
        return generator  # secure mode (refused across ranks) or none
    return torch.Generator(device=generator.device).manual_seed(derive_seed(generator.initial_seed(), rank))


def make_sharded_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: Any,
    rank: int,
    secure_mode: bool = False,
    distributed: bool = True,
    ghost: bool = True,
) -> ShardedGhostDPOptimizer:
    """Wrap ``optimizer`` (``optimizers.make_dp_optimizer``'s arguments; ``expected_batch_size`` per rank): each
    element's update is ``(Σ_{global i} c_i g_i + N(0, σ²C²)) / (expected_batch_size × world size)``."""
    if not ghost:
        raise DPConfigurationError("under FSDP only grad_sample_mode='ghost' is supported")
    world_size = torch.distributed.get_world_size() if distributed else 1
    return ShardedGhostDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size * world_size,
        loss_reduction="mean",
        generator=rank_generator(generator, rank),
        secure_mode=secure_mode,
    )

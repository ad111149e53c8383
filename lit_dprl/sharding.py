"""FSDP2 for the built-in stages: ``fully_shard`` of a Hugging Face model under Lightning's ``ModelParallelStrategy``.

A stage calls ``shard_model(self.model, self.device_mesh)`` from ``configure_model``; Lightning sets ``device_mesh``
only under ``ModelParallelStrategy``, so on one device or under DDP nothing happens. Each decoder block (the classes
the model lists in ``_no_split_modules``: ``GPT2Block``, ``LlamaDecoderLayer``, ...) is sharded on its own, then the
whole model (embeddings, final norm, heads, a LoRA wrapper) at the root, on the data-parallel mesh.

The weights of a sharded model are ``DTensor`` shards: ``full_state_dict`` gathers them (a collective: every rank
calls it) for an export on rank zero.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class its Hugging Face base model declares unsplittable (its blocks)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_model(model: nn.Module, device_mesh: Any) -> None:
    """``fully_shard`` every decoder block of ``model``, then ``model``, on ``device_mesh["data_parallel"]``;
    nothing when ``device_mesh`` is None (not ``ModelParallelStrategy``) or ``model`` is already sharded."""
    if device_mesh is None or isinstance(model, FSDPModule):
        return
    if device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"the built-in stages shard by data parallelism only: set ModelParallelStrategy(tensor_parallel_size=1), "
            f"got tensor_parallel_size={device_mesh['tensor_parallel'].size()}"
        )
    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} declares no decoder block classes (_no_split_modules), so it cannot be "
            "sharded block by block; train it on one device or under DDP"
        )
    mesh = device_mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a module in it) was sharded by ``fully_shard``."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded ``model``'s full weights on the CPU on global rank zero (an empty dict on the other ranks), or None
    for a model that is not sharded. A collective under FSDP: every rank must call it."""
    if not is_sharded(model):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_class(module: nn.Module) -> type[nn.Module]:
    """``module``'s own class (``fully_shard`` replaces it by an ``FSDP<class>`` subclass)."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))

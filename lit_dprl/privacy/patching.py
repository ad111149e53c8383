"""Where ``DPCallback`` hooks into a fit: the train DataLoader, ``training_step`` and Opacus's per-example hooks.

Each patch shadows an attribute of one instance (never a class) and returns its undo, which the callback
runs at teardown, so the trainer and the module leave the fit as they came in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from opacus.grad_sample import GradSampleHooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lit_dprl.privacy.refusals import DPConfigurationError

Undo = Callable[[], None]


def shadow(obj: Any, name: str, value: Any) -> Undo:
    """Set ``obj.<name>`` on the instance; the undo deletes it, so the class's attribute shows again."""
    setattr(obj, name, value)
    return lambda: delattr(obj, name)


def patch_train_dataloader(trainer: pl.Trainer, wrap: Callable[[DataLoader], Any]) -> Undo:
    """Make ``trainer`` train on ``wrap(loader)``, ``loader`` being the one DataLoader the module or data
    module returns or ``fit(train_dataloaders=...)`` was given (refused unless it is a DataLoader with an
    integer ``batch_size``).
    """
    # Private, as Lightning 2.6 offers a Callback no public route: in setup/on_fit_start it could only replace the
    # (data) module's train_dataloader method, which fit(train_dataloaders=...) bypasses; from on_train_start the
    # loader is built (trainer.train_dataloader is read-only); Strategy.process_dataloader is the user's strategy's.
    source = trainer.fit_loop._data_source  # serves the module's, the data module's and fit's loader alike
    original = source.dataloader

    def dataloader() -> Any:
        loader = original()
        if not isinstance(loader, DataLoader):
            raise DPConfigurationError(
                f"DPCallback needs one torch DataLoader for training, got {type(loader).__name__}; return a single "
                "DataLoader(dataset, batch_size=..., collate_fn=...) from train_dataloader()"
            )
        if not isinstance(loader.batch_size, int) or loader.batch_size < 1:
            raise DPConfigurationError(
                "the training DataLoader must have an integer batch_size (the expected Poisson batch size)"
            )
        return wrap(loader)

    return shadow(source, "dataloader", dataloader)


def patch_training_step(pl_module: pl.LightningModule, step: Callable[..., Any]) -> Undo:
    """Make ``pl_module.training_step(batch, ...)`` call ``step(original_training_step, batch, ...)``."""
    original = pl_module.training_step

    def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:  # *args: Lightning passes batch_idx
        return step(original, batch, *args, **kwargs)

    return shadow(pl_module, "training_step", training_step)


def hook_per_example_gradients(pl_module: pl.LightningModule, trainer: pl.Trainer) -> GradSampleHooks:
    """Opacus's per-example gradient hooks on ``pl_module`` (``cleanup()`` removes them); under DDP, DDP's
    own gradient sync is turned off (``stop_ddp_gradient_sync``)."""
    try:
        hooks = GradSampleHooks(pl_module, batch_first=True, loss_reduction="mean", strict=True)
    except NotImplementedError as err:
        raise DPConfigurationError(
            f"Opacus cannot compute per-example gradients for this module: {err}. Freeze those layers or "
            "replace them (opacus.validators.ModuleValidator.fix)."
        ) from err
    stop_ddp_gradient_sync(trainer)
    return hooks


def stop_ddp_gradient_sync(trainer: pl.Trainer) -> None:
    """Under DDP, turn off DDP's own gradient all-reduce (and buffer broadcast): the DP optimizer reduces the
    gradients after clipping and noise; DDP's all-reduce in backward would only cost bandwidth and would hang
    on a rank with an empty batch (no backward)."""
    ddp = trainer.strategy.model
    if isinstance(ddp, DistributedDataParallel):
        ddp.require_backward_grad_sync = False
        ddp.require_forward_param_sync = False

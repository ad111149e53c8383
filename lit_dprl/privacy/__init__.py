"""The privacy layer: DP-SGD for any LightningModule (``DPCallback``), sampling and accounting."""

from lit_dprl.privacy.callback import DPCallback, DPConfigurationError

__all__ = ["DPCallback", "DPConfigurationError"]

"""The privacy layer: DP-SGD for any LightningModule (``DPCallback``), sampling, accounting and reports.

``DPCallback`` and ``DPConfigurationError`` are imported on first use, so that ``lit_dprl.privacy.report``
(used by every stage's export) does not load Opacus.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DPCallback", "DPConfigurationError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lit_dprl.privacy import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The ``lit-dprl`` commands (``lit_dprl.__main__`` dispatches to them): ``fit`` (LightningCLI, one stage),
``pipeline``, ``sweep`` and ``audit``. They parse arguments and write run folders; the work is in the layers below."""

"""icl-metarl: in-context against gradient-based meta-RL on Meta-World, under one evaluator."""

__version__ = "0.1.0"

from icl_metarl.harness.errors import UsageError

__all__ = ["UsageError", "__version__"]

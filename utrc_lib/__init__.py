"""utrc: post-training token reduction for state space models (Mamba, Mamba-2).

Reproduces "Rethinking Token Reduction for State Space Models" (Zhan et al., EMNLP 2024, UTRC),
the authors' released behaviour as a separate reference mode, and the baselines EViT, PuMer, ToMe,
prune-only, merge-only and random.
"""
from .config import ReductionConfig
from .engine import ReductionResult, reduce_tokens
from .flops import flops  # eager: binds the function over the submodule of the same name
from .methods import available_methods
from .metrics import available_metrics
from .schedule import default_layers, flops_table, keep_ratio_for_flops, token_layer_fraction

__version__ = "0.1.0"

__all__ = [
    "ReductionConfig", "ReductionResult", "reduce_tokens", "available_methods", "available_metrics",
    "default_layers", "flops_table", "keep_ratio_for_flops", "token_layer_fraction", "apply", "flops",
    "load_model", "__version__",
]


def __getattr__(name):  # heavy imports (transformers) only when asked for
    if name == "apply":
        from .patch import apply
        return apply
    if name in ("load_model", "available_models"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module 'utrc_lib' has no attribute {name!r}")

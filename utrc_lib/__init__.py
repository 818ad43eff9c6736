"""utrc: post-training token reduction for state space models (Mamba, Mamba-2).

Reproduces "Rethinking Token Reduction for State Space Models" (Zhan et al., EMNLP 2024, UTRC),
the authors' released behaviour as a separate reference mode, and the baselines EViT, PuMer, ToMe,
prune-only, merge-only and random. docs/method.md describes the method; utrc_lib/GLOSSARY.md
the symbols every module uses.

Layers (imports point down only):
    core/         the algorithm: config, schedule, metrics, methods, plan, reduce, kernels + twins (torch only)
    hosts/        apply / Handle and one layer loop per host library (transformers, mamba-ssm), model loading
    eval/         the built-in scorer, the offline task suite, the lm-eval adapter and CLI
    experiments/  FLOPs accounting, timing, benchmark, sweeps, analyses behind the notebooks
    report/       plotting, results.json provenance, token-fate rendering, the notebook runner
"""
from .core.config import ReductionConfig, config_from_args
from .core.methods import available_methods
from .core.metrics import available_metrics
from .core.reduce import ReductionResult, reduce_tokens
from .core.schedule import default_layers, flops_table, keep_ratio_for_flops, token_layer_fraction

__version__ = "0.1.0"

__all__ = [
    "ReductionConfig", "ReductionResult", "reduce_tokens", "available_methods", "available_metrics",
    "default_layers", "flops_table", "keep_ratio_for_flops", "token_layer_fraction", "apply", "flops",
    "load_model", "available_models", "config_from_args", "__version__", "prefill", "generate_from",
    "PrefillState",
]

_LAZY = {  # heavy imports (transformers) only when asked for
    "apply": ("hosts.handle", "apply"),
    "load_model": ("hosts.models", "load_model"),
    "available_models": ("hosts.models", "available_models"),
    "flops": ("core.flops", "flops"),
    "prefill": ("hosts.generation", "prefill"),            # reduce once ...
    "generate_from": ("hosts.generation", "generate_from"),  # ... ask many
    "PrefillState": ("hosts.generation", "PrefillState"),
}

# the "utrc-text-generation" transformers pipeline: registered when transformers' pipelines are
# imported (a one-shot import hook; importing them here would add ~2 s to `import utrc_lib`)
from .hosts.pipeline import register_when_imported as _register_pipeline  # noqa: E402

_register_pipeline()


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'utrc_lib' has no attribute {name!r}")

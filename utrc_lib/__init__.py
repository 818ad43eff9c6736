"""utrc: post-training token reduction for state space models (Mamba, Mamba-2).

Reproduces "Rethinking Token Reduction for State Space Models" (Zhan et al., EMNLP 2024, UTRC),
the authors' released behaviour as a separate reference mode, and the baselines EViT, PuMer, ToMe,
prune-only, merge-only and random, plus SSM-native methods. docs/method.md describes the method,
docs/api.md this package's public API; utrc_lib/GLOSSARY.md the symbols every module uses.

Layers (imports point down only; nothing here imports the study harness `utrc_study`):
    core/          the algorithm (torch only): config (+ schedule), methods (metrics, methods, one
                   anchor's rounds), plan (+ the merge kernel), the SSM-native methods, the reference
                   mode, loop twins, FLOPs accounting
    hosts/         handle (apply / Handle, the per-prefill ForwardReducer, the taps) and one layer loop
                   per host library (transformers, mamba-ssm), model loading, prefill / generation, the
                   transformers pipeline
    scoring.py     log-likelihood of continuations under reduction (protected tail), lm-eval conventions
    integrations/  lm-eval's `--model utrc` and its command line (imported on demand)

Importing `utrc_lib` imports torch only: transformers is imported when a host needs it.
"""
from .core.config import (ReductionConfig, config_from_args, default_layers, flops_table, keep_ratio_for_flops,
                          token_layer_fraction)
from .core.flops import flops
from .core.methods import (Context, Method, ReductionResult, available_methods, available_metrics, reduce_tokens,
                           register_method, unregister_method)
from .core.plan import Plan
from .hosts.generation import PrefillState, generate_from, prefill
from .hosts.handle import Handle, apply
from .hosts.models import available_models, load_model
from .hosts.pipeline import register_when_imported as _register_pipeline

__version__ = "0.1.0"

__all__ = [
    # reduce a model
    "ReductionConfig", "config_from_args", "apply", "Handle", "load_model", "available_models",
    "prefill", "generate_from", "PrefillState",
    # count
    "flops", "flops_table", "keep_ratio_for_flops", "token_layer_fraction", "default_layers",
    # the algorithm on tensors, and the extension API (add a method)
    "reduce_tokens", "ReductionResult", "available_methods", "available_metrics",
    "Method", "Context", "Plan", "register_method", "unregister_method",
    "__version__",
]

# the "utrc-text-generation" transformers pipeline: registered when transformers' pipelines are
# imported (a one-shot import hook; importing them here would add ~2 s to `import utrc_lib`)
_register_pipeline()

"""apply / remove: reversible patching of a model's layer loop (ToMe / tomesd style).

`handle = utrc_lib.apply(model, config)` installs the reduction on `model` (prefill only; single-token
decoding with a cache is untouched); `handle.remove()` restores the model bit for bit. The handle is
also a context manager.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .config import ReductionConfig

# class name -> module path of its backend (one small patch module per host library)
_BACKENDS = {
    "MambaForCausalLM": "utrc_lib.backends.hf_mamba",
    "Mamba2ForCausalLM": "utrc_lib.backends.hf_mamba2",
    "MambaLMHeadModel": "utrc_lib.backends.mamba_ssm",
}


def supported_models() -> list[str]:
    return list(_BACKENDS)


def backend_for(model):
    import importlib

    name = type(model).__name__
    if name not in _BACKENDS:
        raise ValueError(
            f"unsupported model class {name}; supported: {', '.join(_BACKENDS)} "
            f"(transformers Mamba / Mamba-2 causal LMs and mamba-ssm's MambaLMHeadModel)")
    return importlib.import_module(_BACKENDS[name])


class Handle:
    """A live patch. Attributes after each patched forward:

    last_reducer: the ForwardReducer of the latest prefill (token history, positions, sizes).
    record: when True, each reducer keeps its plans in `last_reducer.history`.
    sample_protect_last: None, or a (B,) tensor of per-sample protected tail lengths used by the
        following forwards instead of config.protect_last.
    kept_only: when True, a full-logits prefill returns rows for the kept tokens only, (B, N', ...)
        (no scatter back to the N input positions, so the logits tensor shrinks as in the authors'
        code); `output_positions` says which original position each row is (-1 on padding).
    """

    def __init__(self, model, config: ReductionConfig):
        self.model = model
        self.config = config
        self.last_reducer = None
        self.last_only = False
        self.kept_only = False
        self.record = False
        self.reducer_class = None  # a ForwardReducer subclass for the next forwards (bench: slicing, timers)
        # optional (B,) per-sample protected tail lengths for the next forwards (overrides
        # config.protect_last; set and cleared by callers such as utrc_lib.evaluate)
        self.sample_protect_last = None
        self.captured: dict = {}
        self._undo: list[Callable[[], None]] = []
        self._removed = False

    # -- helpers for backends -------------------------------------------------------------------
    def set_attr(self, obj, name: str, value) -> None:
        """Set an instance attribute and remember how to undo it."""
        had = name in obj.__dict__
        old = obj.__dict__.get(name)

        def undo():
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)

        setattr(obj, name, value)
        self._undo.append(undo)

    def add_hook(self, hook_handle) -> None:
        self._undo.append(hook_handle.remove)

    def new_reducer(self, num_layers: int, valid: torch.Tensor):
        """The ForwardReducer of one prefill (per-sample protection and `record` from this handle);
        kept as `last_reducer`. Called by the backends' layer loops."""
        from .engine import ForwardReducer

        cls = self.reducer_class or ForwardReducer
        reducer = cls(self.config, num_layers, valid, protect_last=self.sample_protect_last)
        reducer.record = reducer.record or self.record  # handle.record keeps plans in history
        self.last_reducer = reducer
        return reducer

    def output(self, reducer, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, N', D) -> what the LM head sees: the last row (last-token mode), the
        kept rows (kept_only), or rows aligned to the N input positions."""
        if self.last_only:
            return reducer.last(hidden)
        return hidden if self.kept_only else reducer.expand(hidden)

    @property
    def output_positions(self) -> Optional[torch.Tensor]:
        """(B, N') original position of each output row of the latest prefill in kept_only mode (the
        latest member of a merged group; -1 on padding); None before any prefill or when nothing
        was reduced (rows are then the N input positions)."""
        r = self.last_reducer
        return r.state.positions if r is not None and r.reduced else None

    # -- public ---------------------------------------------------------------------------------
    def remove(self) -> None:
        if self._removed:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._removed = True
        if getattr(self.model, "_utrc_handle", None) is self:
            del self.model._utrc_handle

    @property
    def active(self) -> bool:
        return not self._removed

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"<utrc Handle {type(self.model).__name__} {self.config.method} ({state})>"


def apply(model, config: ReductionConfig) -> Handle:
    """Install token reduction on `model` (transformers Mamba/Mamba-2 CausalLM or mamba-ssm LM).

    Raises ValueError for an unsupported model class or an out-of-range layer, RuntimeError when
    the model is already patched.
    """
    if not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a utrc_lib.ReductionConfig, got {type(config).__name__}")
    backend = backend_for(model)
    if getattr(model, "_utrc_handle", None) is not None:
        raise RuntimeError("this model is already patched by utrc; call handle.remove() before applying again")
    num_layers = backend.num_layers(model)
    config.resolve_layers(num_layers)  # raises on an out-of-range layer
    config.resolve_keep_ratio(num_layers)
    handle = Handle(model, config)
    backend.install(model, handle)
    model._utrc_handle = handle
    return handle


def delta_needed(config: ReductionConfig) -> bool:
    return config.metric == "delta"


def ssm_needed(config: ReductionConfig) -> bool:
    from .methods import get_method

    return (config.metric_source == "ssm" and get_method(config.method).needs_features
            and config.metric not in ("delta", "random"))


def install_capture(handle: Handle, module: torch.nn.Module, key, pre: bool,
                    transform: Optional[Callable] = None) -> None:
    """Hook `module` to store its input (pre=True) or output in handle.captured[key] while capturing."""

    def store(value):
        if handle.captured.get("on"):
            handle.captured[key] = transform(value) if transform else value

    if pre:
        h = module.register_forward_pre_hook(lambda mod, args: store(args[0]))
    else:
        h = module.register_forward_hook(lambda mod, args, out: store(out))
    handle.add_hook(h)

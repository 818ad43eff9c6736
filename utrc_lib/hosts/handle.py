"""apply / remove: reversible patching of a model's layer loop (ToMe / tomesd style).

Glossary: utrc_lib/GLOSSARY.md.

`handle = utrc_lib.apply(model, config)` resolves the schedule once (anchors, keep ratio per anchor)
and installs the reduction on `model` (prefill only; single-token decoding with a cache is
untouched); `handle.remove()` restores the model bit for bit. The handle is a context manager.

Per-forward options go through one seam, `with handle.options(...)`, and hold for the forwards of
the calling thread inside the block. Everything a forward computes lives in that forward; its
reducer (token history, positions) is readable afterwards as `handle.last_reducer`, again per
thread. Two threads may therefore run one patched model at the same time.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterator, Optional

import torch

from ..core.config import ReductionConfig
from ..core.reduce import ForwardReducer
from ..core.schedule import Schedule

# class name -> host library whose layer loop patches it (one small patch module per host library)
_HOSTS = {"MambaForCausalLM": "hf", "Mamba2ForCausalLM": "hf", "MambaLMHeadModel": "mamba_ssm"}


def supported_models() -> list[str]:
    return list(_HOSTS)


def host_for(model):
    """The host module that patches `model`'s class; ValueError for an unsupported class."""
    name = type(model).__name__
    if name not in _HOSTS:
        raise ValueError(
            f"unsupported model class {name}; supported: {', '.join(_HOSTS)} "
            f"(transformers Mamba / Mamba-2 causal LMs and mamba-ssm's MambaLMHeadModel)")
    if _HOSTS[name] == "hf":
        from . import hf as host
    else:
        from . import mamba_ssm as host
    return host


def num_layers(model) -> int:
    """Depth of a supported model (both hosts keep their blocks in `model.backbone.layers`)."""
    host_for(model)
    return len(model.backbone.layers)


class ReductionDisabled(UserWarning):
    """A forward of a patched model ran dense (the model is in training mode)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-forward options (see `Handle.options`)."""

    protect_last: Optional[torch.Tensor] = None
    kept_only: bool = False
    record: bool = False
    reducer: type = ForwardReducer


SHORTFALL_TOLERANCE = 0.01   # a prefill's token-layer cut this far below the requested one warns
_SHORT_WARNED: set = set()   # configurations already warned about (once per configuration per process)


def requested_cut(schedule: Schedule) -> float:
    """The token-layer cut a schedule asks for (the paper's continuous definition)."""
    from ..core.schedule import token_layer_fraction

    if not schedule.layers:
        return 0.0
    return 1.0 - token_layer_fraction(schedule.num_layers, schedule.layers, schedule.keep_ratio)


def check_cut(reducer: ForwardReducer) -> None:
    """Warn (ReductionShortfall, once per configuration) when a prefill's achieved token-layer cut is
    more than SHORTFALL_TOLERANCE below the requested one: a short sequence for the schedule, `align`
    above what an anchor keeps, a long protected tail or a method's cap skipped reductions."""
    cfg = reducer.config
    if not cfg.active:
        return
    key = (cfg, reducer.schedule.num_layers)
    if key in _SHORT_WARNED:
        return
    req = requested_cut(reducer.schedule)
    if req <= SHORTFALL_TOLERANCE:
        return
    got = reducer.achieved_cut_host() if reducer.uniform else float(reducer.achieved_cut().mean())
    if req - got > SHORTFALL_TOLERANCE:
        import warnings

        from ..core.reduce import ReductionShortfall

        _SHORT_WARNED.add(key)
        warnings.warn(
            f"utrc {cfg.method}: a prefill of {reducer.num_input} tokens reached a token-layer cut of {got:.3f}, "
            f"{req - got:.3f} below the requested {req:.3f} (a sequence too short for the schedule, align={cfg.align} "
            f"above what an anchor keeps, the protected tail, or the method's cap). Warned once per configuration; "
            f"result rows carry the achieved cut beside the requested one (ForwardReducer.achieved_cut(), "
            f"'achieved_token_layer_cut')", ReductionShortfall, stacklevel=5)


class Handle:
    """A live patch of one model.

    config: the ReductionConfig; schedule: the resolved `Schedule` (anchors, keep ratio per anchor),
    computed once by apply(); last_reducer: the ForwardReducer of the calling thread's latest prefill
    (token history, positions, sizes), None before one.
    """

    def __init__(self, model, config: ReductionConfig, schedule: Schedule):
        self.model = model
        self.config = config
        self.schedule = schedule
        self._undo: list[Callable[[], None]] = []
        self._removed = False
        self._options = contextvars.ContextVar(f"utrc_options_{id(self)}", default=Options())
        self._last = contextvars.ContextVar(f"utrc_last_{id(self)}", default=None)
        self._last_only = contextvars.ContextVar(f"utrc_last_only_{id(self)}", default=False)
        self._warned_training = False

    # -- the one seam for per-forward options ---------------------------------------------------
    @contextlib.contextmanager
    def options(self, *, protect_last=None, kept_only: Optional[bool] = None, record: Optional[bool] = None,
                reducer: Optional[type] = None) -> Iterator["Handle"]:
        """Options for the forwards inside the block (this thread only; blocks nest, inner wins).

        protect_last: (B,) per-sample protected tail lengths (int or tensor) instead of
            config.protect_last (the scorer protects each request's own continuation).
        kept_only: a full-logits prefill returns rows for the kept tokens only, (B, N', ...), as the
            authors' code does; `output_positions` says which original position each row is.
        record: keep each anchor's plan in `last_reducer.history` (token-fate reports).
        reducer: a ForwardReducer subclass to run instead (the bench's slicing bound and timers).
        """
        cur = self._options.get()
        changes = {}
        if protect_last is not None:
            changes["protect_last"] = torch.as_tensor(protect_last).long().reshape(-1)
        if kept_only is not None:
            changes["kept_only"] = bool(kept_only)
        if record is not None:
            changes["record"] = bool(record)
        if reducer is not None:
            if not (isinstance(reducer, type) and issubclass(reducer, ForwardReducer)):
                raise TypeError(f"reducer must be a ForwardReducer subclass, got {reducer!r}")
            changes["reducer"] = reducer
        token = self._options.set(dataclasses.replace(cur, **changes))
        try:
            yield self
        finally:
            self._options.reset(token)

    @property
    def current_options(self) -> Options:
        return self._options.get()

    # -- used by the host loops -----------------------------------------------------------------
    def new_reducer(self, valid: torch.Tensor, uniform: Optional[bool] = None) -> ForwardReducer:
        """The ForwardReducer of one prefill, built from the resolved schedule and this thread's
        options; remembered as this thread's `last_reducer`. uniform=True: the host knows that every
        token is valid (no padding), so the reducer need not read `valid` back (no host sync)."""
        opt = self._options.get()
        protect = opt.protect_last
        if protect is not None:
            protect = protect.to(valid.device)
            if protect.numel() == 1 and valid.shape[0] != 1:
                protect = protect.expand(valid.shape[0])
            if protect.shape[0] != valid.shape[0]:
                raise ValueError(f"options(protect_last=...) has {protect.shape[0]} entries for a batch of "
                                 f"{valid.shape[0]}")
        extra = {} if uniform is None else {"uniform": uniform}
        reducer = opt.reducer(self.config, self.schedule, valid, protect_last=protect, record=opt.record, **extra)
        self._last.set(reducer)
        return reducer

    @contextlib.contextmanager
    def last_token_mode(self, on: bool) -> Iterator[None]:
        """Set by the LM-level wrapper when only the last position's logits are asked for."""
        token = self._last_only.set(bool(on))
        try:
            yield
        finally:
            self._last_only.reset(token)

    def output(self, reducer: ForwardReducer, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, N', D) -> what the LM head sees: the last row (last-token mode), the
        kept rows (kept_only), or rows aligned to the N input positions (zero rows at the positions
        without a row of their own; `mark_absent` sets their logits to NaN; `kept_mask` lists them)."""
        check_cut(reducer)
        if self._last_only.get():
            return reducer.last(hidden)
        return hidden if self._options.get().kept_only else reducer.expand(hidden)

    def mark_absent(self, out, before: Optional[ForwardReducer]):
        """After an LM forward: when it ran a reduced prefill with full-length logits, set the logits
        rows of the positions without a row of their own (removed positions, padding) to NaN, in
        place (no extra copy of the logits; autograd records it). Other forwards pass unchanged."""
        r = self._last.get()
        if r is None or r is before or not r.reduced or self._options.get().kept_only or self._last_only.get():
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out:
            logits = out[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != r.num_input:
            return out
        logits.masked_fill_(~r.kept_mask()[..., None].to(logits.device), float("nan"))
        return out

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

    def refuse_copies(self, *modules) -> None:
        """A deep copy of a patched module would run the original's weights (the patched forwards
        close over the original objects): refuse it with a clear error instead."""
        def refuse(memo=None):
            raise RuntimeError("utrc: this model is patched; deep-copy it before utrc_lib.apply() or after "
                               "handle.remove(), then apply the config to the copy")

        for m in modules:
            self.set_attr(m, "__deepcopy__", refuse)

    # -- public ---------------------------------------------------------------------------------
    @property
    def last_reducer(self) -> Optional[ForwardReducer]:
        return self._last.get()

    @property
    def output_positions(self) -> Optional[torch.Tensor]:
        """(B, N') original position of each output row of the latest prefill in kept_only mode (the
        latest member of a merged group; -1 on padding); None before any prefill or when nothing
        was reduced (rows are then the N input positions)."""
        r = self._last.get()
        return r.state.positions if r is not None and r.reduced else None

    @property
    def kept_positions(self) -> Optional[torch.Tensor]:
        """(B, N') original positions whose full-length output row is the model's own prediction
        there, for the latest prefill of this thread (-1 on padding; the same as `output_positions`);
        None before any prefill or when nothing was reduced (then every row is its own)."""
        return self.output_positions

    @property
    def kept_mask(self) -> Optional[torch.Tensor]:
        """(B, N) bool over the input positions of this thread's latest prefill: True where the
        full-length logits row is the model's own prediction at that position, False where the row
        is NaN (a removed position, or padding). None before any prefill."""
        r = self._last.get()
        return r.kept_mask() if r is not None else None

    def warn_training(self) -> None:
        """A training-mode forward runs dense (reduction is for inference): say so once per handle."""
        if not self._warned_training:
            self._warned_training = True
            import warnings

            warnings.warn("utrc: the model is in training mode, so this forward runs DENSE (reduction applies "
                          "to eval-mode prefills only); call model.eval() inside utrc_lib.apply to reduce",
                          ReductionDisabled, stacklevel=4)

    def remove(self) -> None:
        if self._removed:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._removed = True
        if self.model.__dict__.get("_utrc_handle") is self:
            del self.model.__dict__["_utrc_handle"]

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


def active_handle(model) -> Optional[Handle]:
    """The live utrc patch on `model` (a Handle from `apply` not yet removed), or None."""
    h = getattr(model, "__dict__", {}).get("_utrc_handle")
    return h if h is not None and h.active else None


def ensure_unpatched(model, what: str = "scoring") -> None:
    """Raise RuntimeError when `model` carries a live utrc patch: an evaluator would score with that
    patch active, unprotected, and record the row as whatever config it was given."""
    h = active_handle(model)
    if h is not None:
        raise RuntimeError(
            f"utrc: {what} needs an unpatched model, but this model is patched ({h!r}, from "
            f"utrc_lib.apply). Leave the `with utrc_lib.apply(model, cfg):` block (or call handle.remove()) "
            f"first, and pass the reduction as config= instead: the evaluator applies it itself, with the "
            f"scored continuation protected")


def apply(model, config: ReductionConfig) -> Handle:
    """Install token reduction on `model` (transformers Mamba/Mamba-2 CausalLM or mamba-ssm LM).

    Resolves the schedule once (`config.resolve`). Raises ValueError for an unsupported model class
    or an out-of-range layer, RuntimeError when the model is already patched.
    """
    if not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a utrc_lib.ReductionConfig, got {type(config).__name__}")
    host = host_for(model)
    if model.__dict__.get("_utrc_handle") is not None:
        raise RuntimeError("this model is already patched by utrc; call handle.remove() before applying again")
    schedule = config.resolve(len(model.backbone.layers))  # raises on an out-of-range layer
    handle = Handle(model, config, schedule)
    host.install(model, handle)
    handle.refuse_copies(model, model.backbone)
    model.__dict__["_utrc_handle"] = handle
    return handle

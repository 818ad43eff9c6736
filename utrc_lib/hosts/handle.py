"""Where a model's layer loop meets the algorithm, in this order: the `ForwardReducer` each prefill
carries, `apply` / `Handle`, and the taps that read the importance sources inside a mixer call. Both
host loops (hosts/hf.py: transformers, hosts/mamba_ssm.py: mamba-ssm) are written against this module.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, N' tokens after a reduction, Di SSM inner width,
H heads, Rdt dt rank).

ForwardReducer: one per prefill, created by the host's layer loop (`Handle.new_reducer`); it carries
the token state through the forward, reduces at the anchors (core/methods.py: `reduce_rounds`), counts
the achieved cut, and maps the final rows back to the input positions.

apply / Handle (ToMe / tomesd style reversible patching): `handle = utrc_lib.apply(model, config)`
resolves the schedule once (anchors, keep ratio per anchor) and installs the reduction on `model`
(prefill only; single-token decoding with a cache is untouched); `handle.remove()` restores the model
bit for bit. The handle is a context manager. Per-forward options go through one seam, `with
handle.options(...)`, and hold for the forwards of the calling thread inside the block. Everything a
forward computes lives in that forward; its reducer (token history, positions) is readable afterwards
as `handle.last_reducer`, again per thread. Two threads may therefore run one patched model at the
same time.

Taps: apply() registers one forward hook per source module of each anchor mixer (`out_proj` input for
y; `in_proj` / `x_proj` output for Delta). A hook stores its value only inside `tap()`, which a layer
loop opens around the one mixer call it wants to read; the values come back to the loop as the
`Tapped` object `tap()` yields. The current tap lives in a ContextVar, so each thread (and each
forward) reads only its own mixer calls; outside `tap()` the hooks do nothing. The Delta readers are
written once here for both hosts: Mamba-2 keeps dt in the last H channels of the in_proj output
(softplus(dt + dt_bias), clamped to the mixer's limits); Mamba-1 projects the first R channels of the
x_proj output with dt_proj (softplus(dt_proj(dt))).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..core import hattn
from ..core.config import ReductionConfig, Schedule, processed_token_layers, token_layer_fraction, tokens_to_remove
from ..core.methods import HostSizes, ReductionShortfall, reduce_rounds
from ..core.plan import TokenState

Tensor = torch.Tensor

# -- the reducer of one prefill -------------------------------------------------------------------------

def _warn_exhausted(config: ReductionConfig, layer: int) -> None:
    warnings.warn(f"{config.method}: after layer {layer} fewer than 2 reducible tokens are left (earlier anchors "
                  f"removed the rest; the protected tail is never reduced): this anchor removes nothing and the "
                  f"achieved cut is below the nominal one", ReductionShortfall, stacklevel=3)


class ForwardReducer:
    """Carries the token state through one prefill forward and reduces at the anchor layers.

    One instance per forward call, created by the host's layer loop and local to it (no state is
    shared between forwards, so concurrent forwards on one patched model do not interfere).

    Args:
        config: the reduction; schedule: `config.resolve(num_layers)`, resolved once by apply().
        valid: (B, N) bool, False on padding.
        protect_last: optional (B,) per-sample protected tail lengths, overriding config.protect_last
            for this forward (the scorer protects each request's own continuation).
        record: keep each anchor's plan, positions_before and sizes_before in `history`.
    """

    def __init__(self, config: ReductionConfig, schedule: Schedule, valid: Tensor, *,
                 protect_last: Optional[Tensor] = None, record: bool = False, uniform: Optional[bool] = None):
        self.config = config
        self.schedule = schedule
        self.layers = schedule.anchors
        self.keep_ratio = schedule.keep_ratio
        # absolute budget (decimamba without a ratio): the method's own count per anchor
        self.absolute = config.absolute_budget
        self._anchor_index = {layer: s for s, layer in enumerate(sorted(schedule.layers))}
        self.active = config.active and (self.keep_ratio < 1.0 or self.absolute) and bool(self.layers)
        per_sample = protect_last is not None
        self.state = TokenState.initial(valid, protect_last=protect_last if per_sample else config.protect_last,
                                        protect_from=None if per_sample else config.protect_from)
        self.num_input = N = valid.shape[1]
        # uniform = no padding: token counts are the same for every sample and tracked on the host
        self.uniform = (bool(valid.all()) if uniform is None else uniform) and not per_sample
        if config.protect_from is not None:
            self.n_protected = max(0, N - config.protect_from)
        else:
            self.n_protected = min(config.protect_last, N)
        self.n_current = N
        self.reduced = False
        self.history: list[dict] = []  # per round of each anchor: layer, tokens before/after (for reports)
        self.record = record
        self.n_valid_input = valid.sum(1)
        self.counts: list = []  # (anchor, valid tokens after it: int, or (B,) with padding)

    def wants(self, layer: int) -> bool:
        return self.active and layer in self.layers

    def anchor_index(self, layer: int) -> int:
        """s: the index of `layer` among the schedule's anchors (DeciMamba's budget decays with it)."""
        return self._anchor_index[layer]

    def _absolute_r(self, n_red, layer: int):
        """Tokens to remove under the method's absolute budget, reducible - budget(reducible, s), for
        n_red reducible tokens (a host int on the uniform path, a (B,) tensor otherwise)."""
        return n_red - self.config.spec.budget(n_red, self.anchor_index(layer), self.config.resolved_params)

    def step(self, layer: int, hidden: Tensor, residual: Tensor, features: Optional[Tensor] = None,
             delta: Optional[Tensor] = None, scan=None) -> tuple[Tensor, Tensor]:
        """Reduce (hidden, residual) after `layer` if it is an anchor; returns them (B, N', D).
        scan: `hattn.ScanParams` of the anchor layer (hidden-attention metrics only)."""
        if not self.wants(layer):
            return hidden, residual
        static = None
        if self.uniform:
            n = self.n_current
            if self.absolute:
                r_host = self._absolute_r(max(0, n - self.n_protected), layer)
            else:
                r_host = n - self.schedule.kept(n, layer)
            if r_host == 0:
                return hidden, residual
            if self.reduced and n - self.n_protected < 2:  # earlier anchors used up the reducible pool
                _warn_exhausted(self.config, layer)
                return hidden, residual
            r = torch.full((hidden.shape[0],), r_host, dtype=torch.long, device=hidden.device)
            static = HostSizes(n=n, n_red=n - self.n_protected, r=r_host)
        else:
            if self.absolute:
                r = self._absolute_r(self.state.reducible.sum(1), layer).clamp_min(0)
            elif self.config.ratio_basis == "batch":    # the authors' r: from the padded length, every row
                n_pad = self.state.valid.shape[1]
                r = self.state.reducible.sum(1).clamp_max(n_pad - self.schedule.kept(n_pad, layer))
            else:
                r = tokens_to_remove(self.state.valid, self.schedule.ratio(layer), self.schedule.align)
            if self.reduced:  # a sample whose pool earlier anchors used up is a shortfall, not an error
                keep = self.state.reducible.sum(1) >= 2
                if not bool(keep.all()) and bool((r > 0).any()):
                    _warn_exhausted(self.config, layer)
                r = torch.where(keep, r, torch.zeros_like(r))
            if int(r.max()) == 0:
                return hidden, residual
        source = hidden if self.config.metric_source == "mixer" else features
        rounds = reduce_rounds(self.config, self.state, r, hidden=hidden, residual=residual, features=source,
                               delta=delta, salt=layer, static=static, n_protected=self.n_protected, scan=scan)
        for plan, st in zip(rounds.plans, rounds.states_before):
            entry = {"layer": layer, "tokens_before": int(st.valid.shape[1]),
                     "tokens_after": int(plan.num_out), "positions": None, "form": self.config.form}
            if self.record:  # the plan and the state it acted on (references, no copies): for reports
                entry.update(plan=plan, positions_before=st.positions, sizes_before=st.sizes)
            self.history.append(entry)
        self.history[-1]["positions"] = rounds.state.positions
        for e, nxt in zip(self.history[-len(rounds.plans):-1], rounds.states_before[1:]):
            e["positions"] = nxt.positions
        self.history[-1].update(requested=rounds.requested, removed=rounds.removed)
        self.state = rounds.state
        # host count on the uniform path (no sync), per-sample valid counts otherwise
        self.counts.append((layer, int(rounds.hidden.shape[1]) if self.uniform else self.state.valid.sum(1)))
        self.n_current = int(rounds.hidden.shape[1])
        self.reduced = True
        return rounds.hidden, rounds.residual

    def achieved_cut(self) -> Tensor:
        """(B,) token-layer cut this forward achieved per sample: 1 - mean over the schedule's layers of
        (valid tokens the layer processed / the sample's valid input tokens). Compare with the nominal
        `1 - token_layer_fraction(...)`; they differ where rounding, protection or a method's cap bites."""
        L = self.schedule.num_layers
        n0 = self.n_valid_input.double()
        total = processed_token_layers(n0, [(l, c.double() if isinstance(c, Tensor) else c) for l, c in self.counts], L)
        return 1.0 - total / (L * n0.clamp_min(1))

    def achieved_cut_host(self) -> float:
        """`achieved_cut` of a uniform prefill from the host counts alone (no device read)."""
        if not self.uniform:
            raise ValueError("achieved_cut_host needs a uniform prefill (host counts); use achieved_cut()")
        L, n = self.schedule.num_layers, max(self.num_input, 1)
        return 1.0 - processed_token_layers(n, self.counts, L) / (L * n)

    @property
    def attention_mask(self) -> Optional[Tensor]:
        """(B, N') long mask of the current tokens, or None when no slot is padding."""
        if self.uniform:
            return None
        v = self.state.valid
        return None if bool(v.all()) else v.long()

    def expand(self, x: Tensor) -> Tensor:
        """(B, N', D) -> (B, N, D) aligned by original position.

        The row of a kept position (a kept token, or the latest member of a merged group) is the
        model's own output there; every other row (a removed position, or left padding) is zero,
        never another position's row (`kept_mask()` says which rows are real; the host sets the
        logits of the others to NaN, `Handle.mark_absent`).
        """
        if not self.reduced:
            return x
        return scatter_to_positions(x, self.state.positions, self.num_input)

    def kept_mask(self) -> Tensor:
        """(B, N) bool: True where `expand` returns the model's own row (kept positions), False where
        it returns a zero row (removed positions and padding; NaN in the logits). All valid positions when nothing was reduced."""
        if not self.reduced:
            return self.state.valid.clone()
        return positions_mask(self.state.positions, self.num_input)

    def last(self, x: Tensor) -> Tensor:
        """(B, N', D) -> (B, 1, D): the row of the last position (no scatter)."""
        return x[:, -1:]


def positions_mask(positions: Tensor, num_positions: int) -> Tensor:
    """(B, N') original positions (-1 = padding) -> (B, num_positions) bool, True at those positions."""
    B = positions.shape[0]
    idx = torch.where(positions >= 0, positions, torch.full_like(positions, num_positions))
    mask = torch.zeros(B, num_positions + 1, dtype=torch.bool, device=positions.device)
    mask.scatter_(1, idx, True)
    return mask[:, :num_positions]


def scatter_to_positions(x: Tensor, positions: Tensor, num_positions: int) -> Tensor:
    """Rows at original `positions` (B, N', -1 = padding) -> (B, num_positions, D), zero where no row
    is (removed positions, padding)."""
    B, _, D = x.shape
    idx = torch.where(positions >= 0, positions, torch.full_like(positions, num_positions))
    out = x.new_zeros((B, num_positions + 1, D))
    out = out.scatter(1, idx[..., None].expand(-1, -1, D), x)
    return out[:, :num_positions]


# -- apply / Handle -------------------------------------------------------------------------------------

# class name -> host library whose layer loop patches it (one small patch module per host library)
_HOSTS = {"MambaForCausalLM": "hf", "Mamba2ForCausalLM": "hf", "MambaLMHeadModel": "mamba_ssm"}


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


# -- taps: the importance sources of one mixer call -----------------------------------------------------

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("utrc_tap", default=None)


class Tapped:
    """What one mixer call produced: `ssm` (B, N, Di) the out_proj input, `delta` the raw Delta source."""

    __slots__ = ("ssm", "delta")

    def __init__(self):
        self.ssm: Optional[Tensor] = None
        self.delta: Optional[Tensor] = None


@contextlib.contextmanager
def tap() -> Iterator[Tapped]:
    """Collect the hooked values of the mixer calls inside this block (this thread only)."""
    got = Tapped()
    token = _CURRENT.set(got)
    try:
        yield got
    finally:
        _CURRENT.reset(token)


def _store(name: str, value: Tensor) -> None:
    got = _CURRENT.get()
    if got is not None:
        setattr(got, name, value)


def hook_ssm_output(module: torch.nn.Module):
    """Forward pre-hook on `out_proj`: its input is y (gated) for both mixer generations."""
    return module.register_forward_pre_hook(lambda mod, args: _store("ssm", args[0]))


def hook_delta_source(module: torch.nn.Module):
    """Forward hook on the module whose output carries dt (Mamba-2 `in_proj`, Mamba-1 `x_proj`)."""
    return module.register_forward_hook(lambda mod, args, out: _store("delta", out))


# -- Delta readers ---------------------------------------------------------------------------------
def delta_mamba2(zxbcdt: Tensor, dt_bias: Tensor, num_heads: int, limit: tuple[float, float],
                 shape: Optional[tuple[int, int]] = None) -> Tensor:
    """(B, N, d_in_proj) (or (B N, d_in_proj) with shape=(B, N)) in_proj output -> (B, N, H)
    softplus(dt + dt_bias), clamped to `limit` when it is not (0, inf)."""
    if shape is not None:
        zxbcdt = zxbcdt.reshape(*shape, -1)
    dt = F.softplus(zxbcdt[..., -num_heads:].float() + dt_bias.float())
    lo, hi = limit
    if lo > 0.0 or hi != float("inf"):
        dt = torch.clamp(dt, lo, hi)
    return dt


def delta_mamba1(x_dbl: Tensor, dt_proj: torch.nn.Linear, rank: int,
                 shape: Optional[tuple[int, int]] = None) -> Tensor:
    """(B, N, Rdt + 2 S) (or flattened with shape=(B, N)) x_proj output -> (B, N, Di)
    softplus(dt_proj(dt))."""
    if shape is not None:
        x_dbl = x_dbl.reshape(*shape, -1)
    dt = F.linear(x_dbl[..., :rank], dt_proj.weight, dt_proj.bias)  # (B, N, Di)
    return F.softplus(dt.float())


# -- scan readers (hidden-attention metrics): the same hooked output -> core.hattn.ScanParams -------------
def scan_mamba1(x_dbl: Tensor, mixer, rank: int, shape: Optional[tuple[int, int]] = None):
    """Mamba-1 x_proj output -> ScanParams (Delta, B, C from x_proj; A = -exp(mixer.A_log))."""
    return hattn.from_mamba1(x_dbl, mixer.dt_proj.weight, mixer.dt_proj.bias, rank, mixer.A_log, shape)


def scan_mamba2(zxbcdt: Tensor, mixer, *, heads: int, groups: int, state: int, limit, mask=None,
                shape: Optional[tuple[int, int]] = None):
    """Mamba-2 in_proj output -> ScanParams (B, C through the mixer's own conv filters and SiLU)."""
    return hattn.from_mamba2(zxbcdt, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log,
                             heads=heads, groups=groups, state=state, limit=limit, mask=mask, shape=shape)

"""The per-forward driver shared by all backends, and the functional entry point `reduce_tokens`.

Glossary: B batch, N tokens, N' tokens after a reduction, D width, L layers, rho keep ratio.

Convention (mamba-ssm's Block): after layer l, `hidden` is the layer's mixer output and `residual`
the residual stream it was added to; the next layer sees hidden + residual. Each branch is reduced
with its own rule, both with the same plan (same kept tokens, same order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ReductionConfig
from .methods import Context
from .kernels import feature_stats
from .plan import Plan, TokenState, gather_rows
from .schedule import Schedule, tokens_to_remove

Tensor = torch.Tensor


class SequenceTooShort(ValueError):
    """A sample has fewer than 2 reducible tokens where the schedule asks to remove some."""


def plan_reduction(config: ReductionConfig, state: TokenState, r: Tensor, *, hidden: Tensor,
                   residual: Optional[Tensor] = None, features: Optional[Tensor] = None,
                   delta: Optional[Tensor] = None, salt: int = 0, static: Optional[dict] = None) -> Plan:
    """One reduction's plan.

    Args:
        hidden: (B, N, D) mixer output. features: (B, N, C) importance / similarity source (the SSM
            output y for metric_source="ssm"; defaults to `hidden`). delta: (B, N, H) timescale.
        r: (B,) tokens to remove per sample.
        static: {"n", "n_red", "r"} host integers when every sample has the same length and
            protection (no padding): the plan is then built without host syncs.
    """
    method = config.spec
    red = state.reducible
    if static is not None:  # every sample full length: sizes are host integers, no sync
        if static["r"] > 0 and static["n_red"] < 2:
            raise SequenceTooShort(
                f"sequence too short to reduce: {static['n_red']} reducible token(s) "
                f"({static['n']} valid, protected tail excluded); need at least 2")
        too_short = None
    else:
        too_short = (r > 0) & (red.sum(1) < 2)
    if too_short is not None and bool(too_short.any()):
        b = int(too_short.nonzero()[0, 0])
        raise SequenceTooShort(
            f"sequence too short to reduce: sample {b} has {int(red[b].sum())} reducible token(s) "
            f"({int(state.valid[b].sum())} valid, protected tail excluded); need at least 2")
    feats = hidden if features is None else features
    scores = inv_norm = None
    if method.needs_features:  # importance and norms in one pass over the features (utrc_lib.kernels)
        scores, inv_norm = feature_stats(config.metric, feats, delta=delta, valid=state.valid, seed=config.seed,
                                         salt=salt)
    ctx = Context(scores=scores, feats=feats, state=state, r=r, rules=config.branch_rules(),
                  causal=config.causal, hidden=hidden, residual=residual, seed=config.seed, salt=salt,
                  static=static, inv_norm=inv_norm)
    return method.fn(ctx)


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
        self.active = config.active and self.keep_ratio < 1.0 and bool(self.layers)
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
        self.history: list[dict] = []  # per anchor: layer, tokens before/after (for reports)
        self.record = record

    def wants(self, layer: int) -> bool:
        return self.active and layer in self.layers

    def step(self, layer: int, hidden: Tensor, residual: Tensor, features: Optional[Tensor] = None,
             delta: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Reduce (hidden, residual) after `layer` if it is an anchor; returns them (B, N', D)."""
        if not self.wants(layer):
            return hidden, residual
        static = None
        if self.uniform:
            n = self.n_current
            r_host = n - self.schedule.kept(n, layer)
            if r_host == 0:
                return hidden, residual
            r = torch.full((hidden.shape[0],), r_host, dtype=torch.long, device=hidden.device)
            static = {"n": n, "n_red": n - self.n_protected, "r": r_host}
        else:
            r = tokens_to_remove(self.state.valid, self.schedule.ratio(layer), self.schedule.align)
            if int(r.max()) == 0:
                return hidden, residual
        source = hidden if self.config.metric_source == "mixer" else features
        plan = plan_reduction(self.config, self.state, r, hidden=hidden, residual=residual,
                              features=source, delta=delta, salt=layer, static=static)
        sizes = self.state.sizes
        positions_before = self.state.positions
        before = int(hidden.shape[1])
        hidden = plan.apply(hidden, "hidden", sizes)
        residual = plan.apply(residual, "residual", sizes)
        self.state = plan.next_state(self.state)
        self.n_current = int(hidden.shape[1])
        self.reduced = True
        entry = {"layer": layer, "tokens_before": before, "tokens_after": int(hidden.shape[1]),
                 "positions": self.state.positions}
        if self.record:  # the plan and the state it acted on (references, no copies): for reports
            entry.update(plan=plan, positions_before=positions_before, sizes_before=sizes)
        self.history.append(entry)
        return hidden, residual

    @property
    def attention_mask(self) -> Optional[Tensor]:
        """(B, N') long mask of the current tokens, or None when no slot is padding."""
        if self.uniform:
            return None
        v = self.state.valid
        return None if bool(v.all()) else v.long()

    def expand(self, x: Tensor) -> Tensor:
        """(B, N', D) -> (B, N, D) aligned by original position.

        A removed position gets the row of the nearest kept position before it; positions before the
        first kept token get the first kept token's row (unscored positions only, since protected
        tokens are never removed).
        """
        if not self.reduced:
            return x
        return expand_to_positions(x, self.state.positions, self.num_input)

    def last(self, x: Tensor) -> Tensor:
        """(B, N', D) -> (B, 1, D): the row of the last position (no scatter)."""
        return x[:, -1:]


def expand_to_positions(x: Tensor, positions: Tensor, num_positions: int) -> Tensor:
    """Map rows at original `positions` (B, N', ascending, -1 = padding) to (B, num_positions, D)."""
    B = x.shape[0]
    grid = torch.arange(num_positions, device=x.device).expand(B, num_positions).contiguous()
    slot = torch.searchsorted(positions.contiguous(), grid, right=True) - 1  # last slot with pos <= t
    first_valid = (positions < 0).sum(1, keepdim=True)  # index of the first real slot
    slot = torch.maximum(slot, first_valid).clamp_max(x.shape[1] - 1)
    return gather_rows(x, slot)


@dataclass
class ReductionResult:
    """Output of `reduce_tokens`: hidden / residual (B, N', D), positions / sizes / valid (B, N')."""

    hidden: Tensor
    residual: Optional[Tensor]
    positions: Tensor
    sizes: Tensor
    valid: Tensor
    plan: Plan


def reduce_tokens(hidden: Tensor, residual: Optional[Tensor] = None, *, config: ReductionConfig,
                  n_keep, metric: Optional[Tensor] = None, lengths=None, delta: Optional[Tensor] = None,
                  sizes: Optional[Tensor] = None) -> ReductionResult:
    """Reduce one layer's tokens (functional form of a single anchor).

    Args:
        hidden: (B, N, D) mixer output (mamba-ssm Block convention); residual: (B, N, D) or None.
        config: method, metric, rules, protection, causality, seed (schedule fields are ignored).
        n_keep: int or (B,) tokens to keep per sample (including protected ones).
        metric: (B, N, C) importance / similarity source; None = computed from `hidden` as
            config.metric says (for utrc_reference: the clipped mixer output, as the authors do).
        lengths: (B,) valid lengths, LEFT-padded (pads first, as the engine feeds Mamba); None = all valid.
        delta: (B, N, H) softplus timescale, for metric "delta".
        sizes: (B, N) token sizes from an earlier reduction (default 1).
    Returns:
        ReductionResult with `.hidden`, `.residual`, `.positions` (original index, -1 = pad),
        `.sizes`, `.valid`, `.plan`.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, N, D), got shape {tuple(hidden.shape)}")
    B, N, _ = hidden.shape
    dev = hidden.device
    if lengths is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=dev)
    else:
        lengths = torch.as_tensor(lengths, device=dev).long().reshape(B)
        if bool(((lengths < 0) | (lengths > N)).any()):
            raise ValueError(f"lengths must be in [0, {N}], got {lengths.tolist()}")
        valid = torch.arange(N, device=dev)[None, :] >= (N - lengths)[:, None]
    n_keep_t = torch.as_tensor(n_keep, device=dev).long().expand(B)
    n_valid = valid.sum(1)
    if bool(((n_keep_t < 1) & (n_valid > 0)).any()):
        raise ValueError(f"n_keep must be >= 1, got {n_keep}")
    state = TokenState.initial(valid, protect_last=config.protect_last, protect_from=config.protect_from)
    if sizes is not None:
        state.sizes = sizes.float() * valid
    r = (n_valid - torch.minimum(n_keep_t, n_valid)).clamp_min(0)
    if config.method == "utrc_reference" and metric is None:
        metric = hidden
    source = metric if metric is not None else hidden
    plan = plan_reduction(config, state, r, hidden=hidden, residual=residual, features=source, delta=delta)
    out_h = plan.apply(hidden, "hidden", state.sizes)
    out_r = plan.apply(residual, "residual", state.sizes) if residual is not None else None
    nxt = plan.next_state(state)
    return ReductionResult(out_h, out_r, nxt.positions, nxt.sizes, nxt.valid, plan)

"""The per-forward driver shared by all backends, and the functional entry point `reduce_tokens`.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, N' tokens after a reduction, D width, L layers,
rho keep ratio, r tokens removed per sample).

Convention (mamba-ssm's Block): after layer l, `hidden` is the layer's mixer output and `residual`
the residual stream it was added to; the next layer sees hidden + residual. Each branch is reduced
with its own rule, both with the same plan (same kept tokens, same order).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import ReductionConfig
from .methods import Context, HostSizes
from .kernels import feature_stats
from .metrics import get_metric, importance
from .plan import Plan, TokenState
from .schedule import Schedule, tokens_to_remove

Tensor = torch.Tensor


class SequenceTooShort(ValueError):
    """A sample has fewer than 2 reducible tokens where the schedule asks to remove some."""


class ReductionShortfall(UserWarning):
    """An anchor removed fewer tokens than its keep ratio asks for (the achieved cut is reported)."""


MAX_ROUNDS = 64  # safety bound; a round removes at least one token or the loop stops


@dataclass
class Rounds:
    """Outcome of one anchor: the reduced branches and state, each round's plan, and per-sample counts
    (requested / removed: (B,) long)."""

    hidden: Tensor
    residual: Optional[Tensor]
    state: TokenState
    plans: list = field(default_factory=list)
    states_before: list = field(default_factory=list)
    requested: Optional[Tensor] = None
    removed: Optional[Tensor] = None


def reduce_rounds(config: ReductionConfig, state: TokenState, r: Tensor, *, hidden: Tensor,
                  residual: Optional[Tensor] = None, features: Optional[Tensor] = None,
                  delta: Optional[Tensor] = None, salt: int = 0, static: Optional[HostSizes] = None,
                  n_protected: int = 0, scan=None) -> Rounds:
    """Remove r[b] tokens of each sample: one plan, repeated on the reduced tokens while a sample
    still lacks removals and the method repeats rounds (bipartite matching removes at most half of
    the reducible tokens per round). Features and Delta follow the residual branch's rule between
    rounds. The first round is exactly `plan_reduction`; later rounds only run when the first falls
    short. Warns `ReductionShortfall` when the target is not reached.

    Args: as plan_reduction; `static` describes the first round (host sizes); n_protected: protected
    tail length on the host for the static path; scan: `hattn.ScanParams` (hidden-attention metrics),
    carried between rounds like Delta.
    """
    out = Rounds(hidden, residual, state, requested=r)
    feats_is_hidden = features is None or features is hidden
    repeat = config.spec.repeat_rounds
    # static path (no padding, one protection for all): every count is a host integer, no syncs
    r_host = static.r if static is not None else None
    remaining, todo = r, r
    prev = None  # (plan, sizes) of the previous round: features / Delta follow it only if a round comes
    for k in range(MAX_ROUNDS):
        if k > 0:
            plan0, sizes0 = prev
            if not feats_is_hidden and features is not None:
                features = plan0.apply(features, "residual", sizes0)
            if delta is not None:
                delta = plan0.apply(delta, "residual", sizes0)
            if scan is not None:
                scan = scan.carry(plan0, sizes0)
        plan = plan_reduction(config, out.state, todo, hidden=out.hidden, residual=out.residual,
                              features=out.hidden if feats_is_hidden else features, delta=delta,
                              salt=salt if k == 0 else salt + 104729 * k, static=static, scan=scan)
        sizes = out.state.sizes
        out.plans.append(plan)
        out.states_before.append(out.state)
        n_before = int(out.hidden.shape[1])
        out.hidden = plan.apply(out.hidden, "hidden", sizes)
        if out.residual is not None:
            out.residual = plan.apply(out.residual, "residual", sizes)
        if static is not None:
            removed_host = n_before - plan.num_out
            r_host -= removed_host
            out.state = plan.next_state(out.state)
            n = plan.num_out
            if not repeat or r_host <= 0 or removed_host == 0 or n - n_protected < 2:
                break
            static = HostSizes(n=n, n_red=n - n_protected, r=r_host)
            todo = torch.full_like(r, r_host)
        else:
            before = out.state.valid.sum(1)
            out.state = plan.next_state(out.state)
            removed = before - out.state.valid.sum(1)
            remaining = (remaining - removed).clamp_min(0)
            if not repeat or int(removed.max()) == 0:
                break
            # stop quietly where nothing reducible is left (the shortfall is reported below)
            todo = torch.where(out.state.reducible.sum(1) >= 2, remaining, torch.zeros_like(remaining))
            if int(todo.max()) <= 0:
                break
        prev = (plan, sizes)
    if r_host is not None:
        out.removed = r - max(r_host, 0)
        if r_host > 0:
            _warn_short(config, int(out.removed[0]), int(r[0]), 0)
    else:
        out.removed = r - remaining
        short = remaining > 0
        if bool(short.any()):
            b = int(short.nonzero()[0, 0])
            _warn_short(config, int(out.removed[b]), int(r[b]), b)
    return out


def _warn_short(config: ReductionConfig, removed: int, asked: int, sample: int) -> None:
    warnings.warn(
        f"{config.method}: an anchor removed {removed} of the {asked} tokens asked for (sample {sample}); "
        f"the achieved cut is below the nominal one (ReductionResult.removed, ForwardReducer.achieved_cut())",
        ReductionShortfall, stacklevel=4)


def plan_reduction(config: ReductionConfig, state: TokenState, r: Tensor, *, hidden: Tensor,
                   residual: Optional[Tensor] = None, features: Optional[Tensor] = None,
                   delta: Optional[Tensor] = None, salt: int = 0, static: Optional[HostSizes] = None,
                   scan=None) -> Plan:
    """One reduction's plan.

    Args:
        hidden: (B, N, D) mixer output. features: (B, N, C) importance / similarity source (the SSM
            output y for metric_source="ssm"; defaults to `hidden`). delta: (B, N, H) timescale.
        r: (B,) tokens to remove per sample.
        static: `HostSizes` (n, n_red, r) host integers when every sample has the same length and
            protection (no padding): the plan is then built without host syncs.
        scan: `hattn.ScanParams` of the anchor's scan, needed by the hidden-attention metrics.
    """
    method = config.spec
    red = state.reducible
    if static is not None:  # every sample full length: sizes are host integers, no sync
        if static.r > 0 and static.n_red < 2:
            raise SequenceTooShort(
                f"sequence too short to reduce: {static.n_red} reducible token(s) "
                f"({static.n} valid, protected tail excluded); need at least 2")
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
    metric = config.scoring_metric  # config.metric unless the method scores with its own
    if get_metric(metric).source == "scan":  # hidden attention: scores from the scan, norms from the features
        scores = importance(metric, None, scan=scan, reducible=red, params=config.resolved_params)
        if method.needs_features:
            _, inv_norm = feature_stats("l2", feats)
    elif method.needs_features:  # importance and norms in one pass over the features (utrc_lib.kernels)
        scores, inv_norm = feature_stats(metric, feats, delta=delta, valid=state.valid, seed=config.seed,
                                         salt=salt)
    elif method.metrics:  # a scoring method without similarity features (decimamba)
        scores = importance(metric, feats, delta=delta, valid=state.valid, seed=config.seed, salt=salt)
    ctx = Context(scores=scores, feats=feats, state=state, r=r, rules=config.branch_rules(),
                  causal=config.causal, hidden=hidden, residual=residual, seed=config.seed, salt=salt,
                  static=static, inv_norm=inv_norm, params=config.resolved_params,
                  match_window=config.match_window)
    return method.fn(ctx)


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


def processed_token_layers(n_input, counts, num_layers: int):
    """Sum over the layers of the tokens each processes: n_input before the first anchor, then each
    anchor's count (`counts`: (layer, count) in order) from the layer after it. Ints or tensors alike."""
    total, cur, prev = 0, n_input, -1
    for layer, count in counts:
        total = total + cur * (layer - prev)
        cur, prev = count, layer
    return total + cur * (num_layers - 1 - prev)


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


@dataclass
class ReductionResult:
    """Output of `reduce_tokens`: hidden / residual (B, N', D), positions / sizes / valid (B, N');
    plan: the first round's Plan, plans: every round's; requested / removed: (B,) tokens asked for and
    removed (removed < requested only where a method cannot reach the count, e.g. utrc_reference)."""

    hidden: Tensor
    residual: Optional[Tensor]
    positions: Tensor
    sizes: Tensor
    valid: Tensor
    plan: Plan
    plans: list = field(default_factory=list)
    requested: Optional[Tensor] = None
    removed: Optional[Tensor] = None


def reduce_tokens(hidden: Tensor, residual: Optional[Tensor] = None, *, config: ReductionConfig,
                  n_keep, metric: Optional[Tensor] = None, lengths=None, delta: Optional[Tensor] = None,
                  sizes: Optional[Tensor] = None, scan=None) -> ReductionResult:
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
        scan: `hattn.ScanParams` (B, N, ...) of the layer's scan, for the hidden-attention metrics.
    Returns:
        ReductionResult with `.hidden`, `.residual`, `.positions` (original index, -1 = pad),
        `.sizes`, `.valid`, `.plan` (`.plans` when several rounds ran), `.requested`, `.removed`.
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
    rounds = reduce_rounds(config, state, r, hidden=hidden, residual=residual, features=source, delta=delta,
                           scan=scan)
    nxt = rounds.state
    return ReductionResult(rounds.hidden, rounds.residual, nxt.positions, nxt.sizes, nxt.valid, rounds.plans[0],
                           rounds.plans, rounds.requested, rounds.removed)

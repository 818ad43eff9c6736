"""What to reduce, where and how much: `ReductionConfig`, the one builder from loose arguments
(`config_from_args`), and the layer schedule the config resolves for a model depth.

Glossary: utrc_lib/GLOSSARY.md (L layers, N tokens, rho keep ratio per anchor, r tokens removed at one
anchor, q hybrid prune fraction).

A `ReductionConfig` is frozen and validated on construction. `config.resolve(num_layers)` gives the
`Schedule`: the anchors and the keep ratio at each (a FLOPs target solved to rho for the depth), once
per patch; the layer loops read it.

Schedule (paper, docs/method.md §1): reduce after layers 12, 17, ..., 42 (0-based) for 64-layer models
and after 10, 15, ..., 35 for 48-layer models, the same keep ratio rho at each anchor. A reduction
"after layer l" shortens the input of layer l + 1 onward. The FLOPs reduction the authors report is the
token-layer fraction: 1 - mean over layers of (tokens that layer processes / N).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Optional, Sequence

import torch

from . import params as _params
from .methods import available_methods, get_method, get_metric

RULES = ("prune", "merge", "hybrid")
METRIC_SOURCES = ("ssm", "mixer")
_HYBRID_RE = re.compile(r"^hybrid\(\s*([0-9.]+)\s*\)$")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def parse_rule(rule: str, q: float) -> tuple[str, float]:
    """'prune' | 'merge' | 'hybrid' | 'hybrid(0.3)' -> (kind, fraction of edges pruned)."""
    if not isinstance(rule, str):
        raise ValueError(f"a branch rule must be a string, got {rule!r}")
    m = _HYBRID_RE.match(rule.strip())
    if m:
        try:
            frac = float(m.group(1))
        except ValueError:
            raise ValueError(f"hybrid rule {rule!r}: the fraction must be a number, e.g. 'hybrid(0.3)'") from None
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"hybrid fraction must be in [0, 1], got {rule!r}")
        return "hybrid", frac
    kind = rule.strip()
    if kind not in RULES:
        raise ValueError(f"unknown branch rule {rule!r}; valid: 'prune', 'merge', 'hybrid', 'hybrid(q)'")
    return kind, {"prune": 1.0, "merge": 0.0, "hybrid": q}[kind]


@dataclasses.dataclass(frozen=True)
class ReductionConfig:
    """What to reduce, where, and how much.

    Args:
        method: a name from `utrc_lib.available_methods()` ("utrc", "utrc_reference", "evit", ...).
        metric: importance metric, a name from `utrc_lib.available_metrics()` ("clip" = paper).
        layers: reduce after these 0-based layers; None = the paper's schedule for the depth.
        keep_ratio: per-anchor keep ratio rho in (0, 1]; exclusive with flops_reduction.
        flops_reduction: token-layer FLOPs cut in [0, 1); solved to keep_ratio for the model depth.
        q: fraction of matched edges pruned by the "hybrid" rule (paper: 0.5).
        hidden_rule / residual_rule: "prune" | "merge" | "hybrid" | "hybrid(q)"; None = method default
            (utrc: hybrid on the hidden branch, merge on the residual branch).
        protect_last: keep the last k valid tokens of every sample untouched and out of the selection
            statistics (scored continuation tokens).
        protect_from: alternatively, an explicit index: tokens at input index >= protect_from are protected.
        causal: content only moves to a position at or after its own (default). False allows the
            authors' non-causal merges (required by "utrc_reference").
        seed: seed of the random metric / random method (batch independent).
        metric_source: "ssm" (the SSM output y, paper) or "mixer" (mixer output, authors' code); "delta"
            metric reads the timescale itself. utrc_reference always uses the clipped mixer output.
        align: round each anchor's kept count ceil(n * rho) to the nearest multiple of `align` (at
            least `align`, at most n; 1 = off). GPU kernels run faster on lengths that are multiples
            of 8 / 16. The FLOPs accounting follows the rounding; the flops_reduction solver keeps
            the paper's continuous definition.
        ratio_basis: "sample" (default): each sample removes r from its own valid length (docs/method.md
            §3.3); "batch": every sample removes r computed from the padded batch length, as the
            authors' code does (the `authors` evaluation protocol), capped by what the sample can lose.
        params: hyperparameters of the method and of its metric, {name: value} (or "name=value;..."),
            validated against what they declare (e.g. decimamba's L_base / beta / min_seq_len,
            mtr_style's keep_fraction, the hidden-attention metrics' window); `resolved_params` has
            every default filled in. Stored as sorted (name, value) pairs (hashable).
        match_window: None (default: global matching) or an integer >= 1: the bipartite matching of
            the methods that support it (utrc, tome, pumer, prune_only, merge_only) links a token only
            to tokens at most `match_window` token indices away (counted in the sequence the anchor
            sees); a token with none there is not removed by that round. A speed option whose accuracy
            on the long tasks is not measured yet: not recommended (docs/prefill_speed.md).

    A method that scores with its own metrics (`Method.metrics`, e.g. decimamba: delta_l2) uses the
    config's metric when it is one of them and its first one otherwise; `scoring_metric` says which
    ran. A method with an absolute budget (decimamba) may be given neither keep_ratio nor
    flops_reduction: it then keeps its own count per anchor (`absolute_budget`).
    """

    method: str
    metric: str = "clip"
    layers: Optional[Sequence[int]] = None
    keep_ratio: Optional[float] = None
    flops_reduction: Optional[float] = None
    q: float = 0.5
    hidden_rule: Optional[str] = None
    residual_rule: Optional[str] = None
    protect_last: int = 0
    causal: bool = True
    seed: int = 0
    metric_source: str = "ssm"
    protect_from: Optional[int] = None
    align: int = 1
    params: Optional[object] = None
    ratio_basis: str = "sample"
    match_window: Optional[int] = None

    def __post_init__(self):
        for name in ("keep_ratio", "flops_reduction", "q"):   # numpy / torch scalars become plain floats
            v = getattr(self, name)
            if isinstance(v, numbers.Real) and not isinstance(v, (bool, int, float)) and hasattr(v, "item"):
                object.__setattr__(self, name, float(v))
        method = get_method(self.method)
        get_metric(self.metric)
        scoring = self.metric
        if method.metrics and self.metric not in method.metrics:
            if self.metric != "clip":  # "clip" is the field's default: the method's own metric applies
                raise ValueError(f"method {self.method!r} scores with {', '.join(method.metrics)}; "
                                 f"metric={self.metric!r} is not used by it")
            scoring = method.metrics[0]
        object.__setattr__(self, "params", _params.normalise(self.params))
        resolved = _params.resolve([(f"method {self.method!r}", method.params),
                                    (f"metric {scoring!r}", get_metric(scoring).params)], dict(self.params))
        object.__setattr__(self, "params", tuple((k, resolved[k]) for k, _ in self.params))  # parsed values
        if self.keep_ratio is not None and self.flops_reduction is not None:
            raise ValueError("give keep_ratio or flops_reduction, not both")
        if self.keep_ratio is not None:
            if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                    or not 0.0 < float(self.keep_ratio) <= 1.0:
                raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.flops_reduction is not None:
            if isinstance(self.flops_reduction, bool) or not isinstance(self.flops_reduction, (int, float)) \
                    or not 0.0 <= float(self.flops_reduction) < 1.0:
                raise ValueError(f"flops_reduction must be in [0, 1), got {self.flops_reduction!r}")
        if self.keep_ratio is None and self.flops_reduction is None and self.method != "none" \
                and method.budget is None:
            raise ValueError(f"method {self.method!r} needs keep_ratio (0, 1] or flops_reduction [0, 1)")
        if isinstance(self.q, bool) or not isinstance(self.q, numbers.Real) or not 0.0 <= float(self.q) <= 1.0:
            raise ValueError(f"q must be a number in [0, 1], got {self.q!r}")
        for name in ("hidden_rule", "residual_rule"):
            rule = getattr(self, name)
            if rule is not None:
                try:
                    parse_rule(rule, self.q)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        if not _is_int(self.protect_last) or self.protect_last < 0:
            raise ValueError(f"protect_last must be an integer >= 0, got {self.protect_last!r}")
        if self.protect_from is not None and (not _is_int(self.protect_from) or self.protect_from < 0):
            raise ValueError(f"protect_from must be an integer >= 0, got {self.protect_from!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be True or False, got {self.causal!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.metric, str) or not isinstance(self.method, str):
            raise ValueError("method and metric must be names (strings)")
        if self.protect_from is not None and self.protect_last:
            raise ValueError("give protect_last or protect_from, not both")
        if self.ratio_basis not in RATIO_BASES:
            raise ValueError(f"ratio_basis must be one of {', '.join(RATIO_BASES)}, got {self.ratio_basis!r}")
        if not _is_int(self.align) or self.align < 1:
            raise ValueError(f"align must be an integer >= 1, got {self.align!r}")
        if self.match_window is not None:
            if not _is_int(self.match_window) or self.match_window < 1:
                raise ValueError(f"match_window must be None (global matching) or an integer >= 1, "
                                 f"got {self.match_window!r}")
            if not method.windowed:
                ok = [n for n in available_methods() if get_method(n).windowed]
                raise ValueError(f"method {self.method!r} has no bipartite matching to window; match_window "
                                 f"applies to: {', '.join(ok)}")
            object.__setattr__(self, "match_window", int(self.match_window))
        if self.metric_source not in METRIC_SOURCES:
            raise ValueError(f"unknown metric_source {self.metric_source!r}; valid: {METRIC_SOURCES}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"layers must be a sequence of layer indices, got {self.layers!r}")
            layers = tuple(self.layers)
            if not layers and method.name != "none":
                raise ValueError("layers is empty: nothing would be reduced; give at least one layer, or "
                                 "layers=None for the default schedule, or method='none' for the dense model")
            if any(not _is_int(l) or l < 0 for l in layers):
                raise ValueError(f"layers must be non-negative integers, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.causal and not method.causal_capable:
            raise ValueError(
                f"method {self.method!r} reproduces non-causal merges (later tokens fold into earlier "
                f"positions); pass causal=False to use it")
        for name in ("seed", "protect_last", "align"):  # numpy integers become plain ints
            object.__setattr__(self, name, int(getattr(self, name)))
        # derived once (attributes, not dataclass fields: asdict, equality and hashing see the user's
        # fields only): spec, branch rules, active, needs_ssm_output, needs_delta
        hidden = self.hidden_rule or method.hidden_rule
        residual = self.residual_rule or method.residual_rule
        source = get_metric(scoring).source
        derived = {
            "spec": method,  # the method's registry record (utrc_lib.core.methods.Method)
            "_rules": {"hidden": parse_rule(hidden, self.q), "residual": parse_rule(residual, self.q)},
            "active": self.method != "none",  # False: the dense path through the same loop
            # whether the layer loops must read the SSM output y (metric / similarity source)
            "needs_ssm_output": (self.metric_source == "ssm" and method.needs_features
                                 and (source == "features" or method.uses_similarity)),
            "needs_delta": source == "delta",
            "needs_scan": source == "scan",  # Delta, B, C, A of the anchor's scan (hidden attention)
            "scoring_metric": scoring,  # the metric that scores (the method's own, or the config's)
            "resolved_params": resolved,  # every declared hyperparameter, defaults filled in
            # the method's own absolute count per anchor (no keep_ratio / flops_reduction given)
            "absolute_budget": (method.budget is not None and self.keep_ratio is None
                                and self.flops_reduction is None),
            "form": method.form or "anchor",  # where the cut runs (every method here: at the anchor)
        }
        for k, v in derived.items():
            object.__setattr__(self, k, v)

    # -- schedule ---------------------------------------------------------------------------------
    def resolve(self, num_layers: int) -> Schedule:
        """The schedule for a `num_layers`-layer model: anchors and the keep ratio at each (solving
        flops_reduction for the depth). Raises ValueError on an out-of-range layer. apply() calls
        this once per patch; the layer loops read the result."""
        layers = default_layers(num_layers) if self.layers is None else tuple(self.layers)
        bad = [l for l in layers if l >= num_layers - 1]
        if bad:
            raise ValueError(
                f"layer index {bad[0]} out of range for a {num_layers}-layer model: reduction runs "
                f"after a layer and must leave one to shorten (valid 0..{num_layers - 2})")
        if self.keep_ratio is not None:
            rho = float(self.keep_ratio)
        elif self.flops_reduction is not None:
            rho = keep_ratio_for_flops(float(self.flops_reduction), num_layers, layers)
        else:
            rho = 1.0
        return Schedule(num_layers, layers, rho, self.align)

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """Reduction layers for a `num_layers`-layer model; raises on an out-of-range index."""
        return self.resolve(num_layers).layers

    def resolve_keep_ratio(self, num_layers: int) -> float:
        """Per-anchor keep ratio (solving flops_reduction for the model depth when given)."""
        return self.resolve(num_layers).keep_ratio

    def branch_rules(self) -> dict[str, tuple[str, float]]:
        """{'hidden': (kind, prune fraction), 'residual': (...)} with method defaults filled in."""
        return self._rules

    def replace(self, **changes) -> "ReductionConfig":
        return dataclasses.replace(self, **changes)


# -- one builder from loose arguments (CLI flags, lm-eval model_args strings, sweep rows, bench) --------
_DENSE_NAMES = (None, "", "none", "dense")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(name: str, v) -> bool:
    """A strict boolean from a loose value: bool, or true/false/1/0/yes/no/on/off; ValueError naming `name`."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE or s in _FALSE:
        return s in _TRUE
    raise ValueError(f"{name} must be a boolean (true/false), got {v!r}")


def _as_number(name: str, v, kind=float):
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        x = kind(v) if not isinstance(v, str) else kind(v.strip())
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None
    if kind is int and isinstance(v, float) and v != x:
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return x


def _as_layers(v) -> Optional[tuple[int, ...]]:
    if v is None or v == "" or v == "default":
        return None
    if isinstance(v, (list, tuple)):
        return tuple(_as_number("layers", x, int) for x in v)
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    text = str(v)
    for sep in (",", ";", ":", "|", "/", " "):
        if sep in text:
            return tuple(_as_number("layers", x, int) for x in text.split(sep) if x.strip())
    return (_as_number("layers", text, int),)


RATIO_BASES = ("sample", "batch")   # r from each sample's length / from the padded batch length (authors)

_PARSERS = {
    "metric": str, "hidden_rule": str, "residual_rule": str, "metric_source": str,
    "layers": _as_layers,
    "keep_ratio": lambda v: _as_number("keep_ratio", v), "flops_reduction": lambda v: _as_number("flops_reduction", v),
    "q": lambda v: _as_number("q", v), "seed": lambda v: _as_number("seed", v, int),
    "align": lambda v: _as_number("align", v, int),
    "match_window": lambda v: _as_number("match_window", v, int), "protect_last": lambda v: _as_number("protect_last", v, int),
    "causal": lambda v: parse_bool("causal", v),
    "params": _params.normalise, "ratio_basis": str,
}
BUILDER_FIELDS = ("method",) + tuple(_PARSERS)


def config_from_args(method=None, **kw) -> Optional[ReductionConfig]:
    """The one way loose arguments become a ReductionConfig (CLIs, lm-eval model_args, sweep rows, bench).

    Values may be strings (parsed strictly; an unparsable value raises ValueError naming its field)
    or already typed. `None` / "" mean "not given". Returns None for the dense model: no method (or
    "none" / "dense") with no ratio, or a method with flops_reduction 0.

    Defaults: every field as ReductionConfig, except `causal`, whose default here is the method's
    own: True for every method but `utrc_reference`, which reproduces the authors' non-causal merges
    and gets False. A ratio without a method is an error (it would silently run dense).
    """
    unknown = sorted(set(kw) - set(_PARSERS))
    if unknown:
        raise ValueError(f"unknown reduction argument(s) {unknown}; valid: {', '.join(BUILDER_FIELDS)}")
    args = {k: _PARSERS[k](v) for k, v in kw.items() if v is not None and v != ""}
    if method in _DENSE_NAMES:
        given = [k for k in ("flops_reduction", "keep_ratio") if k in args]
        if given:
            raise ValueError(f"{given[0]} given without a method; pass a method (e.g. method='utrc')")
        return None
    method = str(method)
    if args.get("flops_reduction") == 0.0 and "keep_ratio" not in args:
        return None
    if "causal" not in args:
        args["causal"] = get_method(method).causal_capable
    return ReductionConfig(method=method, **args)


# -- the layer schedule: anchors, kept counts, token-layer fractions -----------------------------------

# Anchors of the paper for its two depths (docs/method.md §1).
DEFAULT_ANCHORS = {
    64: tuple(range(12, 43, 5)),  # 12, 17, 22, 27, 32, 37, 42
    48: tuple(range(10, 36, 5)),  # 10, 15, 20, 25, 30, 35
}


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Reduction layers for a model of `num_layers` layers.

    64 and 48 layers use the paper's anchors. Any other depth follows the paper's general rule
    scaled to depth: start at about a fifth of the depth (the paper starts at 12 of 64 and 10 of 48),
    then every max(2, round(L / 10)) layers, stopping before the last sixth of the network (the
    paper's last anchor is 42 of 64 and 35 of 48). A 12-layer model gets 2, 4, 6, 8.
    Small models (L < 4) get a single anchor after layer 0.
    """
    if num_layers in DEFAULT_ANCHORS:
        return DEFAULT_ANCHORS[num_layers]
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers < 4:
        return (0,) if num_layers > 1 else ()
    start = max(1, round(num_layers * 0.2))
    step = max(2, round(num_layers / 10))
    stop = num_layers - max(1, num_layers // 6)  # no anchor at or after this layer
    layers = tuple(range(start, stop, step))
    return layers or (num_layers // 2,)


def kept_tokens(n, keep_ratio: float, align: int = 1):
    """Tokens an anchor keeps of n: ceil(n * rho) (docs/method.md §2: r = n - ceil(n * rho)); with
    align > 1 rounded to the nearest multiple of `align` (halves up), at least `align`, at most n.

    `n` is an int (host counts) or a (B,) long tensor (per-sample valid lengths); both follow the
    same float64 arithmetic, so host and device counts agree.
    """
    if isinstance(n, torch.Tensor):
        k = torch.ceil(n.double() * keep_ratio - 1e-9).long()
        if align > 1:
            k = (torch.floor(k.double() / align + 0.5).long() * align).clamp_min(align)
        return torch.minimum(k, n)
    k = math.ceil(n * keep_ratio - 1e-9)
    if align > 1:
        k = max(align, int(math.floor(k / align + 0.5)) * align)
    return min(int(n), k)


def tokens_to_remove(valid: torch.Tensor, keep_ratio: float, align: int = 1) -> torch.Tensor:
    """(B,) r = n - kept_tokens(n) with n each sample's valid length (per sample, docs/method.md §3.3)."""
    n = valid.sum(1)
    return (n - kept_tokens(n, keep_ratio, align)).clamp_min(0)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Where and how much, resolved once for one model depth (`ReductionConfig.resolve`).

    layers: anchors (reduce after these 0-based layers); ratios: {anchor: keep ratio rho}; align:
    kept counts rounded to multiples of it. Each anchor reads its own ratio (`ratio(layer)`); nothing
    is solved again per forward.
    """

    num_layers: int
    layers: tuple
    keep_ratio: float
    align: int = 1
    ratios: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.ratios:
            object.__setattr__(self, "ratios", {l: self.keep_ratio for l in self.layers})
        object.__setattr__(self, "anchors", frozenset(self.layers))  # derived, for membership tests

    def ratio(self, layer: int) -> float:
        return self.ratios[layer]

    def kept(self, n, layer: int):
        """Tokens kept of n (int or (B,) tensor) at anchor `layer`."""
        return kept_tokens(n, self.ratios[layer], self.align)


def tokens_per_layer(seq_len: int, num_layers: int, layers: Sequence[int], keep_ratio: float,
                     *, exact: bool = True, align: int = 1) -> list[float]:
    """Tokens processed by each of the `num_layers` layers.

    With `exact=True` counts are integers, as the engine computes them: n <- kept_tokens(n, rho,
    align) at each anchor. With `exact=False` counts are real: n <- n * rho.
    """
    counts, n = [], float(seq_len)
    anchors = set(layers)
    for layer in range(num_layers):
        counts.append(n)
        if layer in anchors:
            n = kept_tokens(int(n), keep_ratio, align) if exact else n * keep_ratio
    return counts


def token_layer_fraction(num_layers: int, layers: Sequence[int], keep_ratio: float,
                         seq_len: int | None = None, align: int = 1) -> float:
    """Mean over layers of the fraction of tokens each layer processes (1 = dense).

    `seq_len=None` gives the continuous value (the paper's definition); an integer gives the value
    with the engine's integer rounding.
    """
    if seq_len is None:
        return sum(tokens_per_layer(1, num_layers, layers, keep_ratio, exact=False)) / num_layers
    counts = tokens_per_layer(seq_len, num_layers, layers, keep_ratio, exact=True, align=align)
    return sum(counts) / (num_layers * seq_len)


def processed_token_layers(n_input, counts, num_layers: int):
    """Sum over the layers of the tokens each processes: n_input before the first anchor, then each
    anchor's count (`counts`: (layer, count) in order) from the layer after it. Ints or tensors alike."""
    total, cur, prev = 0, n_input, -1
    for layer, count in counts:
        total = total + cur * (layer - prev)
        cur, prev = count, layer
    return total + cur * (num_layers - 1 - prev)


def keep_ratio_for_flops(flops_reduction: float, num_layers: int, layers: Sequence[int],
                         tol: float = 1e-10) -> float:
    """Per-anchor keep ratio rho whose token-layer FLOPs reduction equals `flops_reduction`.

    Solves 1 - token_layer_fraction(rho) = flops_reduction by bisection (the fraction is monotone
    in rho). Raises ValueError when no anchor exists or the target is not reachable.
    """
    if not 0.0 <= flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be in [0, 1), got {flops_reduction!r}")
    if flops_reduction == 0.0:
        return 1.0
    if not layers:
        raise ValueError("flops_reduction > 0 needs at least one reduction layer")
    max_cut = 1.0 - token_layer_fraction(num_layers, layers, 0.0)
    if flops_reduction > max_cut:
        raise ValueError(
            f"flops_reduction={flops_reduction} is not reachable with layers {tuple(layers)} of a "
            f"{num_layers}-layer model (at most {max_cut:.3f}); start reducing earlier")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if 1.0 - token_layer_fraction(num_layers, layers, mid) > flops_reduction:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def flops_table(num_layers: int, cuts: Sequence[float] = (0.1, 0.2, 0.3),
                layers: Sequence[int] | None = None) -> dict[float, float]:
    """{FLOPs cut: keep ratio} for the default (or given) anchors of a `num_layers`-layer model."""
    layers = default_layers(num_layers) if layers is None else layers
    return {cut: keep_ratio_for_flops(cut, num_layers, layers) for cut in cuts}

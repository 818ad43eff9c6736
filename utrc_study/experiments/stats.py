"""Paired per-item statistics: intervals, exact tests and power for telling methods apart.

Every function takes per-item arrays in the same item order (the sweep rows' row["items"][task],
`utrc_study.eval.scorer.evaluate(items=True)["items"][task]`): item i of one array is item i of the
other, so differences are paired. Deltas are always first minus second: delta(a, b) = mean(a) - mean(b)
(reduced minus dense, method minus baseline).

    paired_bootstrap(a, b, statistic="mean" | callable, ...) -> Interval     paired delta, percentile CI
    bootstrap_mean(x, ...) -> Interval                                       e.g. mean KL per item
    bootstrap_ppl(ll, tokens, ...) -> Interval                               ppl = exp(-sum ll / sum tokens)
    paired_bootstrap_ppl(ll_a, ll_b, tokens, ...) -> Interval                ppl(a) - ppl(b)
    mcnemar_exact(a, b) -> McNemar                                           exact paired test, binary outcomes
    minimum_detectable_effect(n, discordance, ...) -> MDE                    what n items can resolve
    paired_accuracy(a, b, ...) -> PairedAccuracy                             the three above for 0/1 arrays
    compare(outcomes, reference="utrc", ...) -> Comparison                   beats / beaten by / unresolved

Bootstrap: `resamples` (default 10 000) draws of n item indices with replacement from
numpy.random.default_rng(seed) (default seed 0); the same indices for both arrays (paired); the
interval is the (1 - level) / 2 and (1 + level) / 2 percentiles of the resampled statistic (numpy
"linear" quantiles). The seed, level and number of resamples are recorded in every Interval.
A bootstrap p-value resolves no better than 1 / resamples: one of 0 is printed "< 1/resamples"
(`format_p`) and enters a multiple-testing correction as 1 / resamples (`p_floor`).

McNemar exact (= the sign test on the discordant pairs): with b = items only `a` gets right and
c = items only `b` gets right, under H0 (no difference) b ~ Binomial(b + c, 1/2); the two-sided p-value
is min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2), computed exactly (integer arithmetic).

Minimum detectable effect, for n paired binary items with discordance rate p_d = (b + c) / n: the
paired accuracy difference is d = (b - c) / n with variance (p_d - d^2) / n, so an observed d is
resolved at level 1 - alpha (two-sided, normal approximation) when |d| >= z * sqrt((p_d - d^2) / n),
z = z_{1 - alpha/2}; the smallest such d is

    d_min = z * sqrt(p_d / (n + z^2))                        (`MDE.resolvable`, 50% power)

and the difference detected with probability `power` (Connor 1987, d^2 term dropped) is

    d_power = (z_{1 - alpha/2} + z_{power}) * sqrt(p_d / n)  (`MDE.at_power`).

`MDE.exact` is the smallest |b - c| / n with b + c = round(p_d * n) discordant items that the exact
McNemar test calls significant (None when even b + c all in one direction is not).
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from statistics import NormalDist
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

DEFAULT_SEED = 0
DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95
_CHUNK = 1000   # resamples drawn at a time (memory: _CHUNK * n indices)

__all__ = ["Interval", "McNemar", "MDE", "PairedAccuracy", "Comparison", "paired_bootstrap", "bootstrap_mean",
           "bootstrap", "bootstrap_ppl", "paired_bootstrap_ppl", "mcnemar_exact", "binomial_two_sided",
           "minimum_detectable_effect", "paired_accuracy", "compare", "item_array", "format_p", "p_floor",
           "holm", "DEFAULT_SEED", "DEFAULT_RESAMPLES"]


# -- results --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap percentile interval, and how it was drawn."""

    estimate: float
    low: float
    high: float
    level: float
    n: int
    resamples: int
    seed: int
    p_value: Optional[float] = None   # paired deltas: two-sided bootstrap p for "delta = 0" (see `_boot_p`)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def excludes_zero(self) -> bool:
        return not self.contains(0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of paired 0/1 outcomes a, b: a_only = items only a gets right, b_only =
    items only b gets right; p_value two-sided (module doc)."""

    n: int
    a_only: int
    b_only: int
    p_value: float

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only

    @property
    def discordance(self) -> float:
        return self.discordant / self.n if self.n else 0.0

    @property
    def delta(self) -> float:
        return (self.a_only - self.b_only) / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "discordant": self.discordant, "discordance": self.discordance,
                "delta": self.delta}


@dataclasses.dataclass(frozen=True)
class MDE:
    """Smallest paired accuracy difference n items resolve at `level` (formulas in the module doc)."""

    n: int
    discordance: float
    level: float
    resolvable: float            # z * sqrt(p_d / (n + z^2))
    at_power: float              # (z_{1-alpha/2} + z_power) * sqrt(p_d / n)
    power: float
    exact: Optional[float]       # smallest |b - c| / n the exact McNemar test resolves

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PairedAccuracy:
    """a vs b on paired 0/1 outcomes: the bootstrap interval of mean(a) - mean(b), the exact test and
    the minimum detectable effect at the measured discordance."""

    delta: Interval
    mcnemar: McNemar
    mde: MDE

    @property
    def significant(self) -> bool:
        return self.mcnemar.p_value < 1.0 - self.delta.level

    def to_dict(self) -> dict:
        return {"delta": self.delta.to_dict(), "mcnemar": self.mcnemar.to_dict(), "mde": self.mde.to_dict(),
                "significant": self.significant}


# -- arrays -------------------------------------------------------------------------------------------
def _array(x, name: str = "x") -> np.ndarray:
    arr = np.asarray([np.nan if v is None else v for v in x] if isinstance(x, (list, tuple)) else x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array of per-item values, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: no items")
    if np.isnan(arr).any():
        raise ValueError(f"{name}: missing values (None / NaN), e.g. KL without a dense reference")
    return arr


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(a, "a"), _array(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size} items")
    return a, b


def _binary(x, name: str) -> np.ndarray:
    arr = _array(x, name)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name}: binary outcomes must be 0/1 (or bools)")
    return arr.astype(int)


def item_array(items: Mapping, key: str = "correct", ids: Optional[Sequence] = None) -> np.ndarray:
    """One per-item array of a task's item dict (row["items"][task]); with `ids`, checked to be the
    same items in the same order (pairing two rows: `item_array(r2, k, ids=r1["id"])`)."""
    if key not in items:
        raise KeyError(f"no per-item {key!r} (has: {', '.join(sorted(items))})")
    if ids is not None and "id" in items and list(items["id"]) != list(ids):
        raise ValueError("the two rows hold different items (ids differ): not paired")
    return _array(items[key], key)


# -- bootstrap ------------------------------------------------------------------------------------------
_STATISTICS = {"mean": lambda x, axis=-1: x.mean(axis=axis)}


def _resampled(arrays: Sequence[np.ndarray], stat: Callable, resamples: int, seed: int) -> np.ndarray:
    """stat(*resampled arrays) for `resamples` paired index draws (rows of indices)."""
    n = arrays[0].size
    rng = np.random.default_rng(seed)
    out = []
    left = resamples
    while left > 0:
        k = min(_CHUNK, left)
        idx = rng.integers(0, n, size=(k, n))
        out.append(np.asarray(stat(*(a[idx] for a in arrays)), dtype=float).reshape(k))
        left -= k
    return np.concatenate(out)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def _boot_p(values: np.ndarray) -> float:
    """Two-sided bootstrap p-value for "the statistic is 0": 2 * the smaller of the shares of
    resamples at or below / at or above 0 (capped at 1)."""
    return float(min(1.0, 2.0 * min(np.mean(values <= 0.0), np.mean(values >= 0.0))))


def p_floor(p: float, resamples: Optional[int]) -> float:
    """A bootstrap p-value as a conservative number: at least 1 / resamples (a p of 0 only says that no
    draw fell on the far side of 0, i.e. p < 1 / resamples). Exact p-values (resamples None) unchanged."""
    return float(p) if not resamples else max(float(p), 1.0 / resamples)


def format_p(p: Optional[float], resamples: Optional[int] = None, digits: int = 3) -> str:
    """A p-value as printed: a bootstrap p (`resamples` given) below 1 / resamples reads "< 1/resamples"
    (e.g. "< 0.0001" for 10 000 resamples), never "0"; otherwise `digits` significant digits. "" for
    None / NaN. Exact p-values (McNemar) pass resamples=None."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    if resamples and p < 1.0 / resamples:
        return f"< {1.0 / resamples:.{digits}g}"
    return f"{p:.{digits}g}"


def bootstrap(arrays: Sequence, statistic: Callable, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
              level: float = DEFAULT_LEVEL, p_value: bool = False) -> Interval:
    """Percentile interval of `statistic(*arrays)`, resampling items (the same indices for every
    array). `statistic` takes arrays of shape (resamples, n) and returns (resamples,) values (and
    works on the 1-d originals for the estimate)."""
    arrs = [_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    if len({a.size for a in arrs}) != 1:
        raise ValueError("arrays differ in length")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    est = float(statistic(*(a[None, :] for a in arrs))[0])
    vals = _resampled(arrs, statistic, resamples, seed)
    lo, hi = _percentiles(vals, level)
    return Interval(est, lo, hi, level, arrs[0].size, resamples, seed, _boot_p(vals) if p_value else None)


def bootstrap_mean(x, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   level: float = DEFAULT_LEVEL) -> Interval:
    """Mean of per-item values (e.g. row["items"][task]["kl"]) with its bootstrap interval."""
    return bootstrap([x], lambda v: v.mean(axis=-1), resamples=resamples, seed=seed, level=level)


def paired_bootstrap(a, b, statistic: Union[str, Callable] = "mean", *, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> Interval:
    """statistic(a) - statistic(b) over paired items (default: the mean, e.g. an accuracy delta from
    0/1 arrays), with its percentile interval and two-sided bootstrap p-value."""
    a, b = _pair(a, b)
    f = _STATISTICS[statistic] if isinstance(statistic, str) else statistic
    return bootstrap([a, b], lambda x, y: f(x, axis=-1) - f(y, axis=-1), resamples=resamples, seed=seed,
                     level=level, p_value=True)


def _ppl(ll, tok, axis=-1):
    return np.exp(-ll.sum(axis=axis) / tok.sum(axis=axis))


def bootstrap_ppl(ll, tokens=None, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                  level: float = DEFAULT_LEVEL) -> Interval:
    """Perplexity exp(-sum ll / sum tokens) over items (ll: each item's summed log-likelihood, tokens:
    its scored tokens, e.g. "ll" and "gold_tokens" of the ppl task), resampling items. tokens=None
    counts one per item (the cloze task's exp(-mean ll))."""
    ll = _array(ll, "ll")
    tok = np.ones_like(ll) if tokens is None else _array(tokens, "tokens")
    return bootstrap([ll, tok], _ppl, resamples=resamples, seed=seed, level=level)


def paired_bootstrap_ppl(ll_a, ll_b, tokens=None, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                         level: float = DEFAULT_LEVEL) -> Interval:
    """ppl(a) - ppl(b) over the same items (same tokens), resampling items (paired)."""
    a, b = _pair(ll_a, ll_b)
    tok = np.ones_like(a) if tokens is None else _array(tokens, "tokens")
    return bootstrap([a, b, tok], lambda x, y, t: _ppl(x, t) - _ppl(y, t), resamples=resamples, seed=seed,
                     level=level, p_value=True)


# -- exact test -----------------------------------------------------------------------------------------
def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials: min(1, 2 * P(X <= min(k, n - k)))."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = Fraction(sum(math.comb(n, j) for j in range(m + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def mcnemar_exact(a, b) -> McNemar:
    """Exact McNemar (sign) test of paired 0/1 outcomes (module doc)."""
    a, b = _pair(_binary(a, "a"), _binary(b, "b"))
    a_only = int(((a == 1) & (b == 0)).sum())
    b_only = int(((a == 0) & (b == 1)).sum())
    return McNemar(int(a.size), a_only, b_only, binomial_two_sided(a_only, a_only + b_only))


# -- power ----------------------------------------------------------------------------------------------
def minimum_detectable_effect(n: int, discordance: float, *, level: float = DEFAULT_LEVEL,
                              power: float = 0.8) -> MDE:
    """Smallest paired accuracy difference `n` items resolve at `level` given the discordance rate
    (share of items on which the two outcomes differ); formulas in the module doc."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must be in [0, 1], got {discordance}")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    zb = NormalDist().inv_cdf(power)
    resolvable = z * math.sqrt(discordance / (n + z * z))
    at_power = (z + zb) * math.sqrt(discordance / n)
    nd = int(round(discordance * n))
    # the largest minority count m (b + c = nd, min(b, c) = m) with 2 P(X <= m) < alpha: |b - c| = nd - 2m
    alpha, total, term, cdf, best = Fraction(1.0 - level), 2 ** nd, 1, 0, None
    for m in range(nd // 2 + 1):
        cdf += term                       # sum_{j <= m} C(nd, j)
        if 2 * Fraction(cdf, total) >= alpha:
            break
        best = m
        term = term * (nd - m) // (m + 1)
    exact = None if best is None else (nd - 2 * best) / n
    return MDE(n, discordance, level, resolvable, at_power, power, exact)


def paired_accuracy(a, b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                    level: float = DEFAULT_LEVEL, power: float = 0.8) -> PairedAccuracy:
    """a vs b on paired 0/1 outcomes (e.g. reduced vs dense "correct"): bootstrap delta interval,
    exact McNemar test, minimum detectable effect at the measured discordance."""
    a, b = _pair(_binary(a, "a"), _binary(b, "b"))
    delta = paired_bootstrap(a, b, resamples=resamples, seed=seed, level=level)
    test = mcnemar_exact(a, b)
    return PairedAccuracy(delta, test, minimum_detectable_effect(test.n, test.discordance, level=level, power=power))


# -- which methods UTRC beats -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Comparison:
    """`reference` against each other method on one per-item metric at one cut.

    beats: methods the reference is significantly better than; beaten_by: significantly worse than;
    unresolved: neither. details[method]: {"delta" (reference minus method, Interval dict), "p_value"
    (the test's), "p_adjusted" (Holm, when asked), "test", and for binary outcomes "mcnemar", "mde"}.
    """

    reference: str
    metric: str
    beats: list
    beaten_by: list
    unresolved: list
    details: dict
    alpha: float
    correction: str
    seed: int
    resamples: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values {key: p_adjusted} of {key: p} (one family)."""
    return _holm(pvalues)


def _holm(pvalues: dict) -> dict:
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out


def compare(outcomes: Mapping[str, Sequence], reference: str = "utrc", *, metric: str = "correct",
            higher_is_better: Optional[bool] = None, alpha: float = 0.05, correction: str = "holm",
            resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Comparison:
    """Which methods `reference` beats significantly, which beat it, which are unresolved.

    outcomes: {method: per-item array} at one cut and task, paired (same items, same order).
    metric: its name, for the record and the defaults: binary metrics ("correct", "correct_norm", or
        any 0/1 arrays) use the exact McNemar test; others (ll, kl, top1, ...) the paired bootstrap
        p-value. higher_is_better defaults to False for names starting with "kl", else True.
    correction: "holm" (Holm-Bonferroni over the methods compared, default) or "none".
    A method is beaten / beats when its (adjusted) p < alpha; the direction is the sign of the delta
    (reference minus method). Every bootstrap interval is at level 1 - alpha with `seed`.
    """
    if reference not in outcomes:
        raise KeyError(f"reference {reference!r} not among the methods {sorted(outcomes)}")
    if correction not in ("holm", "none"):
        raise ValueError(f"correction must be 'holm' or 'none', got {correction!r}")
    if higher_is_better is None:
        higher_is_better = not metric.startswith("kl")
    ref = _array(outcomes[reference], reference)
    binary = bool(np.isin(ref, (0.0, 1.0)).all()) and all(
        np.isin(_array(v, k), (0.0, 1.0)).all() for k, v in outcomes.items())
    level = 1.0 - alpha
    details, pvals = {}, {}
    for name, arr in outcomes.items():
        if name == reference:
            continue
        if binary:
            pa = paired_accuracy(ref, arr, resamples=resamples, seed=seed, level=level)
            details[name] = {"delta": pa.delta.to_dict(), "p_value": pa.mcnemar.p_value, "test": "mcnemar_exact",
                             "mcnemar": pa.mcnemar.to_dict(), "mde": pa.mde.to_dict()}
        else:
            d = paired_bootstrap(ref, arr, resamples=resamples, seed=seed, level=level)
            details[name] = {"delta": d.to_dict(), "p_value": d.p_value, "test": "paired_bootstrap"}
        pvals[name] = p_floor(details[name]["p_value"], None if binary else resamples)
    adjusted = _holm(pvals) if correction == "holm" and pvals else dict(pvals)
    beats, beaten_by, unresolved = [], [], []
    for name in details:
        details[name]["p_adjusted"] = adjusted[name]
        est = details[name]["delta"]["estimate"]
        better = est > 0 if higher_is_better else est < 0
        if adjusted[name] < alpha and est != 0:
            (beats if better else beaten_by).append(name)
        else:
            unresolved.append(name)
    return Comparison(reference, metric, beats, beaten_by, unresolved, details, alpha, correction, seed, resamples)

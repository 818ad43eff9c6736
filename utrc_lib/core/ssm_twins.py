"""Slow loop twins of the SSM-native methods (core/ssm_methods.py), for tests.

Like core/twins.py: ONE sample's valid tokens, plain Python, returning the reduced tokens as a list of
(original index, hidden row, residual row, size) in output order. They share only the one-line metric
functions (and, for the hidden-attention scores, `hattn.scores_loop`, itself a loop over the full
matrix) with the vectorised code.
"""
from __future__ import annotations

import math

import torch

from . import hattn
from .methods import get_metric
from .twins import _assemble, _by_score, _cos

Tensor = torch.Tensor


def loop_scores(metric: str, feats: Tensor, *, delta: Tensor | None = None, scan=None, reducible=None,
                window: int = 8) -> list[float]:
    """One sample's scores by metric (feats (n, C), delta (n, Ch), scan a one-sample ScanParams)."""
    m = get_metric(metric)
    if m.source == "delta":
        return m.fn(delta[None])[0].tolist()
    if m.source == "scan":
        return hattn.scores_loop(metric.split("_", 1)[1], scan, reducible[None], window)[0].tolist()
    return m.fn(feats[None])[0].tolist()


def loop_ssm_reduce(method: str, hidden: Tensor, residual: Tensor, *, r: int, rules: dict, causal: bool,
                    protect: int = 0, metric: str, params: dict, features: Tensor | None = None,
                    delta: Tensor | None = None, scan=None, sizes: Tensor | None = None):
    """Reduce one sample with the loop twin of an SSM-native method (see the module docstring).

    metric: the scoring metric (ReductionConfig.scoring_metric); params: ReductionConfig.resolved_params.
    adjacent_merge: merge rules only (the default), features = hidden (rounds recompute them).
    """
    n = hidden.shape[0]
    feats = hidden if features is None else features
    sizes = torch.ones(n) if sizes is None else sizes
    red = list(range(n - protect))
    nothing = {"hidden": set(), "residual": set()}
    if r == 0:
        return _assemble(n, hidden, residual, sizes, {}, nothing, causal)
    reducible = torch.tensor([i < n - protect for i in range(n)])

    def scores_of(f):
        return loop_scores(metric, f, delta=delta, scan=scan, reducible=reducible,
                           window=params.get("window", 8))

    if method in ("decimamba", "hattn_prune"):
        scores = scores_of(feats)
        gone = set(_by_score(red, scores)[:min(r, len(red))])
        return _assemble(n, hidden, residual, sizes, {}, {"hidden": gone, "residual": gone}, causal)
    if method == "mtr_style":
        scores = scores_of(feats)
        r = min(r, max(len(red) - 1, 0))
        srcs = _by_score(red, scores)[:r]
        rest = [i for i in red if i not in srcs]
        m = len(rest)
        n_keep = max(0, min(math.ceil(m * params["keep_fraction"] - 1e-9), m - 1))
        keep = set(sorted(rest, key=lambda i: (-scores[i], i))[:n_keep])
        targets = [i for i in rest if i not in keep]
        edges = {}
        for a in srcs:
            sims = [(_cos(feats[a], feats[b]), b) for b in targets]
            top = max(s for s, _ in sims)
            edges[a] = next(b for s, b in sims if s == top)
        ranked = _by_score(list(edges), scores)
        pruned = {br: set(ranked[:math.floor(len(ranked) * frac + 1e-9)]) for br, (_, frac) in rules.items()}
        return _assemble(n, hidden, residual, sizes, edges, pruned, causal)
    if method == "adjacent_merge":
        return _adjacent_loop(hidden, residual, sizes, r, protect, metric, params["pair_score"])
    raise ValueError(f"no loop twin for method {method!r}")


def _adjacent_loop(hidden, residual, sizes, r, protect, metric, pair_score):
    """Rounds of locally best adjacent pairs on a token list; each pair (t, t+1) becomes one token at
    t+1's position, both branches the size-weighted average."""
    n = hidden.shape[0]
    toks = [(i, hidden[i].double(), residual[i].double(), float(sizes[i])) for i in range(n)]
    left = r
    while left > 0:
        red = [k for k, t in enumerate(toks) if t[0] < n - protect]
        if len(red) < 2:
            break
        cand = [k for k in range(len(toks) - 1) if k in red and k + 1 in red]
        if pair_score == "importance":
            s = get_metric(metric).fn(torch.stack([t[1] for t in toks])[None])[0].tolist()
            e = {k: -(s[k] + s[k + 1]) for k in cand}
        else:
            e = {k: _cos(toks[k][1], toks[k + 1][1]) for k in cand}
        maxima = [k for k in cand if (k - 1 not in e or e[k] > e[k - 1]) and (k + 1 not in e or e[k] >= e[k + 1])]
        chosen = sorted(sorted(maxima, key=lambda k: -e[k])[:left])
        if not chosen:
            break
        out, skip = [], set()
        for k, t in enumerate(toks):
            if k in skip:
                continue
            if k in chosen:
                a, b = t, toks[k + 1]
                w = a[3] + b[3]
                out.append((b[0], (a[1] * a[3] + b[1] * b[3]) / w, (a[2] * a[3] + b[2] * b[3]) / w, w))
                skip.add(k + 1)
            else:
                out.append(t)
        toks = out
        left -= len(chosen)
    return toks

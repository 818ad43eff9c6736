"""Slow, loop-based twins of the vectorised methods, for tests (one sample at a time, plain Python).

Each twin takes ONE sample's valid tokens (n, D) and returns the reduced tokens as a list of
(original index, hidden row, residual row, size), in output order. They share nothing with the
vectorised code except the metric functions (one-line reductions over channels).
"""
from __future__ import annotations

import math

import torch

from .methods import get_metric, seeded_uniform

Tensor = torch.Tensor


def _cos(u: Tensor, v: Tensor) -> float:
    nu, nv = float(u.double().norm()), float(v.double().norm())
    if nu == 0.0 or nv == 0.0:
        return 0.0
    return float((u.double() @ v.double()) / (nu * nv))


def _scores(metric: str, feats: Tensor, seed: int, salt: int) -> list[float]:
    if get_metric(metric).source == "random":
        return seeded_uniform(torch.ones(1, feats.shape[0], dtype=torch.bool), seed, salt)[0].tolist()
    return get_metric(metric).fn(feats[None])[0].tolist()


def _by_score(idx: list[int], scores: list[float]) -> list[int]:
    return sorted(idx, key=lambda i: (scores[i], i))


def _match(feats: Tensor, side_a: list[int], side_b: list[int], r: int, window: int | None = None) -> dict[int, int]:
    """{source: destination} for the r best A -> B cosine edges (ties: first by position).

    window: only B tokens at most `window` indices from the A token; an A token with none is no source.
    """
    if not side_a or not side_b:
        return {}
    best = {}
    for a in side_a:
        sims = [(_cos(feats[a], feats[b]), b) for b in sorted(side_b) if window is None or abs(a - b) <= window]
        if not sims:
            continue
        top = max(s for s, _ in sims)
        best[a] = (top, next(b for s, b in sims if s == top))
    ranked = sorted(sorted(best), key=lambda a: -best[a][0])  # stable: ties by position
    r = min(r, len(side_a), len(side_b))
    return {a: best[a][1] for a in ranked[:r]}


def _assemble(n, hidden, residual, sizes, edges, pruned_in, causal):
    """Group kept tokens with their merged sources; returns the output list."""
    sources = set(edges) | set().union(*pruned_in.values()) if pruned_in else set(edges)
    out = []
    for j in range(n):
        if j in sources:
            continue
        members = {br: [j] for br in ("hidden", "residual")}
        pos = j
        for i, d in edges.items():
            if d != j:
                continue
            merged_any = False
            for br in members:
                if i not in pruned_in[br]:
                    members[br].append(i)
                    merged_any = True
            if merged_any and causal:
                pos = max(pos, i)
        rows = {}
        for br, x in (("hidden", hidden), ("residual", residual)):
            w = [float(sizes[i]) for i in members[br]]
            acc = sum(float(sizes[i]) * x[i].double() for i in members[br])
            rows[br] = (acc / sum(w)) if len(members[br]) > 1 else x[j].double()
        size = sum(float(sizes[i]) for i in members["residual"])
        out.append((pos, rows["hidden"], rows["residual"], size))
    return sorted(out, key=lambda t: t[0])


def loop_reduce(method: str, hidden: Tensor, residual: Tensor, *, r: int, rules: dict, causal: bool,
                protect: int = 0, metric: str = "clip", features: Tensor | None = None,
                sizes: Tensor | None = None, seed: int = 0, salt: int = 0, window: int | None = None):
    """Reduce one sample's tokens with the loop twin of `method` (see module docstring).

    rules: {'hidden': (kind, prune fraction), 'residual': (...)} as ReductionConfig.branch_rules().
    window: ReductionConfig.match_window (bipartite methods: match within this many indices).
    """
    n = hidden.shape[0]
    feats = hidden if features is None else features
    sizes = torch.ones(n) if sizes is None else sizes
    red = list(range(n - protect))
    if method in ("none",) or r == 0:
        return _assemble(n, hidden, residual, sizes, {}, {"hidden": set(), "residual": set()}, causal)
    scores = _scores(metric, feats, seed, salt)

    def rule_prunes(edges):
        srcs = _by_score(list(edges), scores)
        return {br: set(srcs[:math.floor(len(srcs) * frac + 1e-9)]) for br, (_, frac) in rules.items()}

    if method in ("utrc", "prune_only", "merge_only"):
        order = _by_score(red, scores)
        half = len(red) // 2
        edges = _match(feats, order[:half], order[half:], r, window)
        return _assemble(n, hidden, residual, sizes, edges, rule_prunes(edges), causal)
    if method in ("tome", "utrc_alternate"):
        edges = _match(feats, red[0::2], red[1::2], r, window)
        return _assemble(n, hidden, residual, sizes, edges, rule_prunes(edges), causal)
    if method == "pumer":
        n_prune = min(math.floor(r * rules["hidden"][1] + 1e-9), len(red))
        pruned = set(_by_score(red, scores)[:n_prune])
        rest = [i for i in red if i not in pruned]
        edges = _match(feats, rest[0::2], rest[1::2], r - n_prune, window)
        return _assemble(n, hidden, residual, sizes, edges, {"hidden": pruned, "residual": pruned}, causal)
    if method == "evit":
        r = min(r, max(len(red) - 1, 0))
        if r == 0:
            return _assemble(n, hidden, residual, sizes, {}, {"hidden": set(), "residual": set()}, causal)
        fused = _by_score(red, scores)[:r + 1]
        last = max(fused)
        edges = {i: last for i in fused if i != last}
        return _assemble(n, hidden, residual, sizes, edges, {"hidden": set(), "residual": set()}, causal)
    if method == "random":
        u = seeded_uniform(torch.ones(1, n, dtype=torch.bool), seed, 7919 + salt)[0].tolist()
        gone = set(_by_score(red, u)[:min(r, len(red))])
        return _assemble(n, hidden, residual, sizes, {}, {"hidden": gone, "residual": gone}, causal)
    raise ValueError(f"no loop twin for method {method!r}")

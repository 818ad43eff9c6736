"""Reduction methods: a registry of name -> function(Context) -> Plan.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, C feature width, r tokens removed per
sample (B,), side A / side B the halves of a bipartite matching, of sizes RA / RB).

Every method works on the reducible tokens only (valid and not protected), per sample, vectorised
over the batch. Ties are broken by position (stable sorts), and random draws are indexed by a
token's position within its sample, so a sample's plan never depends on the rest of the batch.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .kernels import row_best, scaled_row_max, tile_matching
from .metrics import seeded_uniform
from .plan import Plan, TokenState, build_plan, gather_rows, identity_plan, stable_partition

Tensor = torch.Tensor


@dataclass(frozen=True)
class HostSizes:
    """Sizes of one anchor known on the host (no sample padded, one protected tail for all), so that
    a method can count without reading anything back from the device."""

    n: int      # valid tokens per sample
    n_red: int  # reducible tokens per sample (valid minus the protected tail)
    r: int      # tokens to remove per sample at this anchor


@dataclass
class Context:
    """Inputs of one reduction.

    scores: (B, N) importance (larger = more important).
    feats:  (B, N, C) similarity features (raw; cosine via inv_norm).
    inv_norm: (B, N) 1 / ||feats|| per token (0 for zero rows); None = feats already normalised.
    state:  TokenState (valid / protected / sizes / positions).
    r:      (B,) long, tokens to remove in each sample (before the method's own cap).
    rules:  {'hidden': (kind, prune fraction), 'residual': (...)}.
    causal: content only moves to later positions.
    hidden, residual: the raw branch tensors (B, N, D) (the reference mode computes its own metric).
    seed, salt: random draws (salt = layer index).
    """

    scores: Tensor
    feats: Optional[Tensor]
    state: TokenState
    r: Tensor
    rules: dict
    causal: bool
    hidden: Optional[Tensor] = None
    residual: Optional[Tensor] = None
    seed: int = 0
    salt: int = 0
    static: Optional[HostSizes] = None  # host sizes when no sample is padded (no device sync)
    inv_norm: Optional[Tensor] = None
    params: dict = field(default_factory=dict)  # the method's / metric's hyperparameters, defaults filled in
    match_window: Optional[int] = None  # bipartite matching only within this many token indices (None: global)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Context], Plan]
    doc: str
    hidden_rule: str = "merge"
    residual_rule: str = "merge"
    causal_capable: bool = True
    needs_features: bool = True
    # one matching round removes at most half of the reducible tokens (bipartite methods): repeat
    # rounds within the anchor until the anchor's count is reached. False: one round, as the
    # reproduced authors' code does (its cap r <= N/2 is part of the behaviour); the shortfall is
    # reported and warned about.
    repeat_rounds: bool = True
    # the metrics the method scores with (first = its default, used when the config's metric is not
    # one of them); empty = the config's metric. (docs/ssm_methods.md: decimamba scores with delta_l2)
    metrics: tuple = ()
    # hyperparameters (utrc_lib.core.params.Param), passed as ReductionConfig(params={...})
    params: tuple = ()
    # an absolute budget used when the config gives neither keep_ratio nor flops_reduction:
    # budget(n_reducible (int or (B,) tensor), anchor index s, params) -> tokens kept of them
    budget: Optional[Callable] = None
    # where the cut runs: None = at a utrc anchor (every method); "anchor" is said explicitly by ports
    # whose source cuts elsewhere (decimamba: inside the mixer after the conv; here at the anchor)
    form: Optional[str] = None
    # the similarity source is needed even with a Delta / scan metric (cosine matching on features)
    uses_similarity: bool = False
    # the method's bipartite matching honours ReductionConfig.match_window (Context.match_window)
    windowed: bool = False


# -- building blocks -----------------------------------------------------------------------------

def _inverse_perm(order: Tensor) -> Tensor:
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ar)


def rank_by(scores: Tensor, mask: Tensor, descending: bool = False) -> Tensor:
    """(B, N) rank of each masked token by score (ties by position); unmasked tokens rank last."""
    fill = float("-inf") if descending else float("inf")
    key = scores.float().masked_fill(~mask, fill)
    return _inverse_perm(torch.argsort(key, dim=1, descending=descending, stable=True))


def lowest(scores: Tensor, mask: Tensor, k: Tensor) -> Tensor:
    """(B, N) bool: the k[b] lowest-scoring masked tokens of each sample."""
    return mask & (rank_by(scores, mask) < k[:, None])


_BMM_FP32_OUT: dict = {}  # device type -> whether torch.bmm(..., out_dtype=torch.float32) runs


def _best_match(fa: Tensor, fb_t: Tensor, inv_a: Optional[Tensor], inv_b: Optional[Tensor],
                b_ok: Optional[Tensor], n_b: Optional[int] = None, *, window: Optional[int] = None,
                pos_a: Optional[Tensor] = None, pos_b: Optional[Tensor] = None,
                a_ok: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Best B token of every A token: (cosine (B, RA) float32, index into the B list (B, RA)).

    (B, RA, C) x (B, C, RB) dot products, each column scaled by its B token's inverse norm, row max
    (first index on ties; padded B entries, b_ok False, never win), times the A token's inverse norm
    (positive: the argmax is unchanged). inv_a / inv_b None: the features are already normalised.
    n_b: the first n_b columns of fb_t are the B list (the rest is alignment padding, never read).
    CUDA half precision: tensor-core bmm with float32 output (no overflow of raw dot products, no
    normalised copy of the features), then one Triton pass for the scaled row max; where the
    float32-output bmm is missing, both sides' rows are scaled first. CPU: float32.

    Long inputs (|A| |B| >= kernels.TILE_MIN_PAIRS per sample) and windowed matching (`window`: only
    B tokens with |pos_b - pos_a| <= window; pos_a / pos_b the tokens' indices) run tiled
    (`kernels.row_best`: fused Triton kernel on CUDA, chunked torch twin elsewhere): the same maxima
    and tie rule (first B index), memory linear in N instead of the (B, |A|, |B|) float32 buffer.
    """
    RB = fb_t.shape[2] if n_b is None else n_b
    if tile_matching(fa.shape[1], RB, window):
        return row_best(fa, fb_t[..., :RB], inv_a, inv_b, b_ok, pos_a=pos_a, pos_b=pos_b, window=window, a_ok=a_ok)
    half = fa.is_cuda and fa.dtype in (torch.float16, torch.bfloat16)
    prescaled = False
    if half and _BMM_FP32_OUT.get(fa.device.type, True):
        try:
            sim = torch.bmm(fa, fb_t, out_dtype=torch.float32)
            _BMM_FP32_OUT[fa.device.type] = True
        except (RuntimeError, TypeError):
            _BMM_FP32_OUT[fa.device.type] = False
    if half and not _BMM_FP32_OUT[fa.device.type]:
        if inv_a is not None:
            fa = fa * inv_a[..., None].to(fa.dtype)
            fb_t = fb_t[..., :inv_b.shape[1]] * inv_b[:, None, :].to(fb_t.dtype)
        sim, prescaled = torch.bmm(fa, fb_t).float(), True
    elif not half:
        sim = torch.bmm(fa.float(), fb_t.float())
    if n_b is not None and sim.shape[-1] != n_b:
        sim = sim[..., :n_b]  # drop the alignment padding (a strided view)
    if inv_b is None or prescaled:
        if b_ok is not None:
            sim = sim.masked_fill(~b_ok[:, None, :], float("-inf"))
        return sim.max(-1)
    if b_ok is None:
        g, j = scaled_row_max(sim, inv_b)
    else:
        g, j = sim.mul_(inv_b[:, None, :]).masked_fill_(~b_ok[:, None, :], float("-inf")).max(-1)
    return g * inv_a, j


def bipartite_match(feats: Tensor, is_a: Tensor, is_b: Tensor, r: Tensor,
                    sizes: Optional[tuple[int, int, int]] = None,
                    inv_norm: Optional[Tensor] = None, window: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Link each A token to its most similar B token (cosine), keep the r[b] best edges.

    Paper §3 steps 3-4 (and ToMe's bipartite soft matching). `inv_norm` (B, N) = 1 / ||feats|| per
    token (0 for zero rows); None means `feats` are already L2-normalised. The A and B rows are
    gathered in one pass (channel-major features are gathered along their token axis, no contiguous
    copy); the A x B matmul runs in the features' dtype on CUDA (half precision: tensor cores,
    float32 output) and in float32 on CPU. `sizes` = (r, |A|, |B|) as host integers when they are the
    same for every sample (no host sync then). `window`: an A token is matched only to B tokens at
    most `window` token indices away; A tokens with none there are never chosen (so fewer than r
    edges may be kept: the caller counts the sources on the device). Returns is_src (B, N) bool and
    dst (B, N) long (the B token each chosen source joins).
    """
    B, N, C = feats.shape
    ar = torch.arange(N, device=feats.device).expand(B, N)
    if sizes is not None:  # host sizes: no counting, no sync
        r_max, RA, RB = min(sizes[0], sizes[1], sizes[2]), sizes[1], sizes[2]
        r = r.clamp_max(min(RA, RB))
    else:
        n_a, n_b = is_a.sum(1), is_b.sum(1)
        r = torch.minimum(r, torch.minimum(n_a, n_b))
        r_max, RA, RB = torch.stack([r.max(), n_a.max(), n_b.max()]).tolist()  # one host sync
    if r_max <= 0:
        return torch.zeros_like(is_a), ar
    perm = stable_partition(is_a, is_b)  # A tokens by position, then B tokens, then the rest
    if sizes is not None:  # every sample has exactly RA A tokens and RB B tokens
        both = perm[:, :RA + RB]
        a_idx, b_idx = both[:, :RA], both[:, RA:]
        a_ok = b_ok = None
    else:  # shorter samples pad their lists with other tokens, masked out below
        a_idx = perm[:, :RA]
        a_ok = is_a.gather(1, a_idx)
        b_pos = n_a[:, None] + torch.arange(RB, device=feats.device)[None, :]  # B list starts after A
        b_idx = perm.gather(1, b_pos.clamp_max(N - 1))
        b_ok = is_b.gather(1, b_idx) & (b_pos < N)
        both = torch.cat([a_idx, b_idx], 1)  # (B, RA + RB)
    # CUDA: each side's block starts at, and the B side spans, a multiple of 16 rows (repeats of a
    # real token fill the gaps; their columns are never read back): cuBLAS picked kernels up to 6x
    # slower for odd |B| (an H100 took 1.58 ms for 926 x 927 against 0.26 ms for 1024 x 1024)
    pa = pb = 0
    if feats.is_cuda:
        pa, pb = -RA % 16, -RB % 16
        if pa or pb:
            both = torch.cat([a_idx, a_idx[:, -1:].expand(B, pa), b_idx, b_idx[:, -1:].expand(B, pb)], 1)
    RA_p = RA + pa
    if feats.stride(-1) != 1 and feats.stride(1) == 1:  # channel-major view of (B, C, N)
        # torch.gather along the token axis (a Triton version measured slower: 0.79 vs 0.54 ms on an H100)
        rows_t = torch.gather(feats.transpose(1, 2), 2, both[:, None, :].expand(B, C, both.shape[1]))
        fa, fb_t = rows_t[:, :, :RA].transpose(1, 2), rows_t[:, :, RA_p:]
    else:
        rows = gather_rows(feats, both)  # (B, RA_p + RB_p, C)
        fa, fb_t = rows[:, :RA], rows[:, RA_p:].transpose(1, 2)
    inv_a = inv_b = None
    if inv_norm is not None:
        inv_a, inv_b = inv_norm.gather(1, a_idx), inv_norm.gather(1, b_idx)
    g, j = _best_match(fa, fb_t, inv_a, inv_b, b_ok, RB, window=window, pos_a=a_idx, pos_b=b_idx,
                       a_ok=a_ok)  # (B, RA) best cosine, index into the B list
    if window is not None:  # A tokens with no B token inside the window are never sources
        near = has_partner(a_idx, b_idx, b_ok, window)
        a_ok = near if a_ok is None else a_ok & near
    if a_ok is not None:
        g = g.masked_fill(~a_ok, float("-inf"))
    edge_rank = _inverse_perm(torch.argsort(g, dim=1, descending=True, stable=True))
    chosen = edge_rank < r[:, None]
    if a_ok is not None:
        chosen &= a_ok
    is_src = torch.zeros_like(is_a).scatter(1, a_idx, chosen)
    dst = ar.clone().scatter(1, a_idx, b_idx.gather(1, j))
    return is_src, dst


def has_partner(pos_a: Tensor, pos_b: Tensor, b_ok: Optional[Tensor], window: int) -> Tensor:
    """(B, M) bool: some valid B entry lies within `window` of each A position. The valid B entries
    come first in pos_b, ascending (stable_partition); no host sync."""
    big = torch.iinfo(torch.long).max // 4
    pb = pos_b if b_ok is None else pos_b.masked_fill(~b_ok, big)
    idx = torch.searchsorted(pb.contiguous(), (pos_a - window).contiguous())  # first B at >= pos_a - window
    nxt = pb.gather(1, idx.clamp_max(pb.shape[1] - 1))
    return (idx < pb.shape[1]) & (nxt <= pos_a + window)


def edges_to_plan(ctx: Context, is_src: Tensor, dst: Tensor, n_src_host: Optional[int] = None) -> Plan:
    """Apply each branch's rule to the chosen edges: prune the least important fraction, merge the rest.

    The paper leaves open which edges are pruned under the hybrid rule; we prune the
    floor(fraction * r) sources of lowest importance (documented choice, ablated in 02_design_choices).
    """
    n_src = is_src.sum(1)
    merged = {}
    for branch, (_, frac) in ctx.rules.items():
        if frac <= 0:  # merge every edge (host-side check: no ranking needed)
            merged[branch] = is_src
            continue
        n_prune = torch.floor(n_src.float() * frac + 1e-9).long()
        merged[branch] = is_src & ~lowest(ctx.scores, is_src, n_prune)
    counts = None
    if n_src_host is not None:  # sizes known on the host: no sync in build_plan
        counts = (n_src_host, {b: n_src_host - math.floor(n_src_host * frac + 1e-9) > 0
                               for b, (_, frac) in ctx.rules.items()})
    return build_plan(ctx.state.valid, is_src, dst, merged, ctx.causal, counts=counts)


def importance_halves(scores: Tensor, reducible: Tensor) -> tuple[Tensor, Tensor]:
    """Paper §3 step 2: less important half of the reducible tokens = A, the rest = B."""
    n_a = reducible.sum(1) // 2
    is_a = reducible & (rank_by(scores, reducible) < n_a[:, None])
    return is_a, reducible & ~is_a


def alternate_halves(reducible: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe's split: every other reducible token (by position) is in A, the others in B."""
    rel = reducible.long().cumsum(1) - 1
    is_a = reducible & (rel % 2 == 0)
    return is_a, reducible & ~is_a


# -- methods -------------------------------------------------------------------------------------

def _host_sources(ctx: Context, sizes) -> Optional[int]:
    """Sources per sample as a host integer (static sizes, global matching), else None (counted on the
    device: a window may leave A tokens without a partner)."""
    return None if sizes is None or ctx.match_window is not None else min(sizes)


def _utrc(ctx: Context) -> Plan:
    """Paper §3: importance split, cosine match A -> B, top-r edges, per-branch prune/merge/hybrid."""
    is_a, is_b = importance_halves(ctx.scores, ctx.state.reducible)
    st = ctx.static
    sizes = None if st is None else (st.r, st.n_red // 2, st.n_red - st.n_red // 2)
    is_src, dst = bipartite_match(ctx.feats, is_a, is_b, ctx.r, sizes, ctx.inv_norm, ctx.match_window)
    return edges_to_plan(ctx, is_src, dst, _host_sources(ctx, sizes))


def _utrc_alternate(ctx: Context) -> Plan:
    """UTRC's matching and branch rules on ToMe's alternate split instead of the importance split (an
    ablation: what the importance classification buys)."""
    return _tome(ctx)


def _tome(ctx: Context) -> Plan:
    """ToMe bipartite soft matching on alternate tokens; size-weighted merges (default rules: merge)."""
    is_a, is_b = alternate_halves(ctx.state.reducible)
    st = ctx.static
    sizes = None if st is None else (st.r, st.n_red - st.n_red // 2, st.n_red // 2)
    is_src, dst = bipartite_match(ctx.feats, is_a, is_b, ctx.r, sizes, ctx.inv_norm, ctx.match_window)
    return edges_to_plan(ctx, is_src, dst, _host_sources(ctx, sizes))


def _pumer(ctx: Context) -> Plan:
    """PuMer-style: prune the floor(q * r) least important tokens, ToMe-merge the rest of r.

    q is the hybrid fraction of the config's hidden rule (default 0.5); both branches follow it.
    """
    red = ctx.state.reducible
    frac = ctx.rules["hidden"][1]
    n_prune = torch.minimum(torch.floor(ctx.r.float() * frac + 1e-9).long(), red.sum(1))
    pruned = lowest(ctx.scores, red, n_prune)
    is_a, is_b = alternate_halves(red & ~pruned)
    sizes = counts = None
    st = ctx.static
    if st is not None:  # host sizes (no padding): the same counts, no host sync
        p_host = min(math.floor(st.r * frac + 1e-9), st.n_red)
        m = st.n_red - p_host
        sizes = (st.r - p_host, m - m // 2, m // 2)
        if ctx.match_window is None:
            n_match = max(0, min(sizes))
            counts = (p_host + n_match, {branch: n_match > 0 for branch in ctx.rules})
    matched, dst = bipartite_match(ctx.feats, is_a, is_b, ctx.r - n_prune, sizes, inv_norm=ctx.inv_norm,
                                   window=ctx.match_window)
    merged = {branch: matched for branch in ctx.rules}
    return build_plan(ctx.state.valid, matched | pruned, dst, merged, ctx.causal, counts=counts)


def _evit(ctx: Context) -> Plan:
    """EViT: keep the top-k tokens by importance, fuse the rest into one token (size-weighted).

    The fused token takes the position of its latest member. Fixes the authors' inversion (they kept
    the lowest-scoring tokens, docs/method.md §2).
    """
    red = ctx.state.reducible
    r = torch.minimum(ctx.r, (red.sum(1) - 1).clamp_min(0))
    n_fused = torch.where(r > 0, r + 1, torch.zeros_like(r))
    fused = lowest(ctx.scores, red, n_fused)
    B, N = red.shape
    ar = torch.arange(N, device=red.device).expand(B, N)
    last = torch.where(fused, ar, torch.full_like(ar, -1)).amax(1).clamp_min(0)  # (B,)
    is_src = fused & (ar != last[:, None])
    dst = last[:, None].expand(B, N)
    merged = {branch: is_src for branch in ctx.rules}
    counts = None
    if ctx.static is not None:  # host sizes (no padding): r sources in every sample, no host sync
        r_host = max(0, min(ctx.static.r, ctx.static.n_red - 1))
        counts = (r_host, {branch: r_host > 0 for branch in ctx.rules})
    return build_plan(ctx.state.valid, is_src, dst, merged, ctx.causal, counts=counts)


def _evit_reference(ctx: Context) -> Plan:
    """EViT as the authors' code runs it (docs/method.md §2): the same clipped score, but the k
    LOWEST-scoring tokens are kept and the rest fused into one token (their inversion). Reproduced
    for the `authors` evaluation protocol only; `evit` is the method as published."""
    return _evit(replace(ctx, scores=-ctx.scores))


def _random(ctx: Context) -> Plan:
    """Drop r random reducible tokens (seeded, batch independent)."""
    red = ctx.state.reducible
    u = seeded_uniform(ctx.state.valid, ctx.seed, 7919 + ctx.salt)
    is_src = lowest(u, red, torch.minimum(ctx.r, red.sum(1)))
    counts = None
    if ctx.static is not None:  # host sizes (no padding): no host sync
        counts = (min(ctx.static.r, ctx.static.n_red), {b: False for b in ctx.rules})
    return drop_plan(ctx, is_src, counts)


def drop_plan(ctx: Context, is_src: Tensor, counts=None) -> Plan:
    """A pure pruning plan: the `is_src` tokens leave, every other token is an exact copy, order kept
    (`counts`: build_plan's host counts, when known)."""
    zeros = torch.zeros_like(is_src)
    return build_plan(ctx.state.valid, is_src, torch.zeros_like(ctx.r)[:, None].expand_as(is_src),
                      {b: zeros for b in ctx.rules}, ctx.causal, counts=counts)


def _none(ctx: Context) -> Plan:
    return identity_plan(ctx.state.valid)


def _utrc_reference(ctx: Context) -> Plan:
    from .reference import reference_plan

    return reference_plan(ctx)


_METHODS: dict[str, Method] = {
    m.name: m for m in (
        Method("utrc", _utrc, "UTRC as the paper states it (hidden: hybrid q, residual: merge)",
               hidden_rule="hybrid", residual_rule="merge", windowed=True),
        Method("utrc_reference", _utrc_reference,
               "the authors' released behaviour (per-channel sort, even/odd, fold into position 1)",
               hidden_rule="hybrid", residual_rule="merge", causal_capable=False, needs_features=False,
               repeat_rounds=False),
        Method("evit", _evit, "keep top-k by importance, fuse the rest into one token"),
        Method("evit_reference", _evit_reference,
               "EViT as the authors' code runs it: keeps the LOWEST-scoring tokens (their inversion)"),
        Method("pumer", _pumer, "prune the q least important, bipartite-merge the rest",
               hidden_rule="hybrid", residual_rule="hybrid", windowed=True),
        Method("tome", _tome, "bipartite soft matching on alternate tokens, size-weighted merges",
               windowed=True),
        Method("prune_only", _utrc, "UTRC matching, prune on both branches",
               hidden_rule="prune", residual_rule="prune", windowed=True),
        Method("merge_only", _utrc, "UTRC matching, merge on both branches", windowed=True),
        Method("utrc_alternate", _utrc_alternate, "UTRC's branch rules on ToMe's alternate split (ablation)",
               hidden_rule="hybrid", residual_rule="merge", windowed=True),
        Method("random", _random, "drop r random tokens (seeded)", needs_features=False),
        Method("none", _none, "no reduction (dense)", needs_features=False),
    )
}


from .ssm_methods import SSM_METHODS  # noqa: E402 (they build on the blocks above)

_METHODS.update({m.name: m for m in SSM_METHODS})

BUILTIN_METHODS = tuple(_METHODS)  # shipped methods: never replaced or removed by register / unregister


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add a reduction method to the registry, so that ReductionConfig(method=method.name) runs it.

    The public way to extend the library without editing it: `method.fn(ctx: Context) -> Plan`
    (build plans with `build_plan` / `edges_to_plan`, pick tokens with `lowest`, `importance_halves`,
    `bipartite_match`). Raises TypeError for a non-Method, ValueError for an empty name, a built-in
    name, or a name already registered (unless replace=True). Returns the method.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a utrc_lib.core.methods.Method, got {type(method).__name__}")
    if not isinstance(method.name, str) or not method.name.strip():
        raise ValueError(f"a method needs a non-empty name, got {method.name!r}")
    if not callable(method.fn):
        raise TypeError(f"method {method.name!r}: fn must be callable (Context -> Plan)")
    if method.name in BUILTIN_METHODS:
        raise ValueError(f"{method.name!r} is a built-in method and cannot be replaced; pick another name")
    if method.name in _METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to replace it")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method added with `register_method` (built-ins cannot be removed)."""
    if name in BUILTIN_METHODS:
        raise ValueError(f"{name!r} is a built-in method and cannot be removed")
    if name not in _METHODS:
        raise ValueError(f"method {name!r} is not registered; registered: {', '.join(_METHODS)}")
    del _METHODS[name]


def available_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(_METHODS)}") from None

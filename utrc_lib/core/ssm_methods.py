"""SSM-native reduction methods (issue 31; docs/ssm_methods.md says what each source states and what we adapted).

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, C feature width, r tokens removed per sample (B,)).

  decimamba       DeciMamba's Delta decimation (faithful port of the scoring and the budget; the cut runs
                  at a utrc anchor, "anchor" form): drop the tokens of lowest L2 norm of Delta, order kept.
                  Budget: the config's keep ratio / FLOPs target (ratio form), or, with neither,
                  DeciMamba's absolute count K_s = max(min(n, L_base * beta^s), min_seq_len).
  hattn_prune     ours: drop the tokens of lowest hidden-attention score (core/hattn.py), order kept.
  mtr_style       an approximation of MTR from a secondary summary: Delta mean score, the r lowest are
                  sources, the top `keep_fraction` of the rest are kept untouched, each source merges into
                  its most similar remaining (target) token, size-weighted, at the latest member's position.
  adjacent_merge  ours, inspired by STM's neighbour merging: merge non-overlapping adjacent pairs
                  (t, t+1) outside the tail, the locally best pairs first (by cosine, or least important).

Every method works on the reducible tokens only (valid, not protected), vectorised over the batch,
ties broken by position; the slow twins live in core/ssm_twins.py.
"""
from __future__ import annotations

import math

import torch

from .methods import Context, Method, _best_match, drop_plan, edges_to_plan, inverse_norm, lowest, rank_by
from .params import Param
from .plan import Plan, gather_rows, stable_partition

Tensor = torch.Tensor

HATTN_METRICS = ("hattn_window", "hattn_last", "hattn_colsum", "hattn_nodecay")


# -- building blocks -------------------------------------------------------------------------------------

def match_each(feats: Tensor, is_a: Tensor, is_b: Tensor, inv_norm=None) -> Tensor:
    """(B, N) long: for every A token, the B token of largest cosine (first by position on ties); other
    tokens map to themselves. Unlike `bipartite_match`, every A token is matched (no cap at |B|).

    feats (B, N, C); inv_norm (B, N) 1 / ||feats|| (0 for zero rows; None: computed here).
    """
    B, N, C = feats.shape
    ar = torch.arange(N, device=feats.device).expand(B, N)
    n_a, n_b = is_a.sum(1), is_b.sum(1)
    RA, RB = (int(v) for v in torch.stack([n_a.max(), n_b.max()]).tolist()) if B else (0, 0)
    if RA == 0 or RB == 0:
        return ar.clone()
    if inv_norm is None:
        sq = feats.float().pow(2).sum(-1)
        inv_norm = inverse_norm(sq)
    perm = stable_partition(is_a, is_b)  # A tokens by position, then B tokens, then the rest
    a_idx = perm[:, :RA]
    a_ok = is_a.gather(1, a_idx)
    b_pos = n_a[:, None] + torch.arange(RB, device=feats.device)[None, :]
    b_idx = perm.gather(1, b_pos.clamp_max(N - 1))
    b_ok = is_b.gather(1, b_idx) & (b_pos < N)
    fa, fb_t = gather_rows(feats, a_idx), gather_rows(feats, b_idx).transpose(1, 2)
    _, j = _best_match(fa, fb_t, inv_norm.gather(1, a_idx), inv_norm.gather(1, b_idx), b_ok)
    best = torch.where(a_ok, b_idx.gather(1, j), a_idx)  # (B, RA)
    return ar.clone().scatter(1, a_idx, best)


# -- decimamba -------------------------------------------------------------------------------------------

DECIMAMBA_PARAMS = (
    Param("L_base", 2000, "int", lo=1, doc="absolute budget: tokens kept at the first decimating anchor"),
    Param("beta", 0.5, "float", lo=0.0, hi=1.0, lo_open=True, doc="absolute budget: decay per anchor"),
    Param("min_seq_len", 20, "int", lo=1, doc="absolute budget: never keep fewer (shorter prompts: keep all)"),
)


def decimamba_kept(n, anchor_index: int, params: dict):
    """DeciMamba's absolute budget: K_s = int(max(min(n, L_base * beta^s), min_seq_len)), at most n
    (n < min_seq_len: keep all). n: reducible tokens (int, or a (B,) long tensor); s: anchor index."""
    target = math.floor(params["L_base"] * params["beta"] ** anchor_index)
    msl = params["min_seq_len"]
    if isinstance(n, Tensor):
        return torch.minimum(n.clamp_max(target).clamp_min(msl), n)
    return min(max(min(int(n), target), msl), int(n))


def _drop_lowest(ctx: Context) -> Plan:
    """DeciMamba step 5 (and hattn_prune): the r lowest-scoring reducible tokens leave, order kept."""
    red = ctx.state.reducible
    is_src = lowest(ctx.scores, red, torch.minimum(ctx.r, red.sum(1)))
    return drop_plan(ctx, is_src)


# -- mtr_style -------------------------------------------------------------------------------------------

MTR_PARAMS = (
    Param("keep_fraction", 0.5, "float", lo=0.0, hi=1.0, hi_open=True,
          doc="share of the non-source tokens kept untouched (never a destination); the rest are targets"),
)


def _mtr_style(ctx: Context) -> Plan:
    """Sources = the r lowest; Keep = the top ceil(keep_fraction (n - r)) of the rest (at most n - r - 1,
    so one target remains); Target = the others; each source joins its most similar target."""
    red = ctx.state.reducible
    n = red.sum(1)
    r = torch.minimum(ctx.r, (n - 1).clamp_min(0))
    is_src = lowest(ctx.scores, red, r)
    rest = red & ~is_src
    m = n - r
    n_keep = torch.ceil(m.double() * ctx.params["keep_fraction"] - 1e-9).long()
    n_keep = torch.minimum(n_keep, (m - 1).clamp_min(0))
    is_keep = rest & (rank_by(ctx.scores, rest, descending=True) < n_keep[:, None])
    is_tgt = rest & ~is_keep
    dst = match_each(ctx.feats, is_src, is_tgt, ctx.inv_norm)
    return edges_to_plan(ctx, is_src, dst)


# -- adjacent_merge --------------------------------------------------------------------------------------

ADJACENT_PARAMS = (
    Param("pair_score", "similarity", "choice", choices=("similarity", "importance"),
          doc="rank pairs by cosine of their features, or by low summed importance"),
)


def adjacent_edges(ctx: Context) -> tuple[Tensor, Tensor]:
    """(edge score (B, N - 1) float32, candidate (B, N - 1) bool) of every pair (t, t + 1) of reducible
    tokens: cosine of the features, or minus the summed importance (pair_score="importance")."""
    red = ctx.state.reducible
    cand = red[:, :-1] & red[:, 1:]
    if ctx.params["pair_score"] == "importance":
        s = ctx.scores.float()
        e = -(s[:, :-1] + s[:, 1:])
    else:
        f = ctx.feats.float()
        inv = ctx.inv_norm
        if inv is None:
            sq = f.pow(2).sum(-1)
            inv = inverse_norm(sq)
        e = (f[:, :-1] * f[:, 1:]).sum(-1) * inv[:, :-1] * inv[:, 1:]
    return e.masked_fill(~cand, float("-inf")), cand


def _adjacent_merge(ctx: Context) -> Plan:
    """One round: the candidate pairs that beat both neighbouring pairs (ties: the earlier pair wins) are
    non-overlapping; the r best of them merge, token t into t + 1. Later rounds (reduce_rounds) merge
    more pairs until r tokens are gone."""
    e, cand = adjacent_edges(ctx)
    B = e.shape[0]
    ninf = torch.full((B, 1), float("-inf"), device=e.device)
    left = torch.cat([ninf, e[:, :-1]], 1)
    right = torch.cat([e[:, 1:], ninf], 1)
    is_max = cand & (e > left) & (e >= right)
    chosen = is_max & (rank_by(e, is_max, descending=True) < ctx.r[:, None])
    is_src = torch.zeros_like(ctx.state.valid)
    is_src[:, :-1] = chosen
    N = is_src.shape[1]
    dst = (torch.arange(N, device=e.device) + 1).clamp_max(N - 1).expand(B, N)
    return edges_to_plan(ctx, is_src, dst)


SSM_METHODS = (
    Method("decimamba", _drop_lowest,
           "DeciMamba: drop the tokens of lowest L2 norm of Delta, order kept (anchor form; ratio or absolute budget)",
           hidden_rule="prune", residual_rule="prune", needs_features=False, metrics=("delta_l2",),
           params=DECIMAMBA_PARAMS, budget=decimamba_kept, form="anchor"),
    Method("hattn_prune", _drop_lowest,
           "ours: drop the tokens of lowest hidden-attention score (queries from the context), order kept",
           hidden_rule="prune", residual_rule="prune", needs_features=False, metrics=HATTN_METRICS),
    Method("mtr_style", _mtr_style,
           "MTR-style: Delta-mean sources merge into their most similar target; the top tokens are kept apart",
           metrics=("delta",), params=MTR_PARAMS, uses_similarity=True),
    Method("adjacent_merge", _adjacent_merge,
           "ours (STM-inspired): merge non-overlapping adjacent pairs (t, t+1), best pairs first, order kept",
           params=ADJACENT_PARAMS, uses_similarity=True),
)

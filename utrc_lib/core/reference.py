"""The authors' released behaviour ("utrc_reference"), reproduced from its description (docs/method.md §2).

Glossary: utrc_lib/GLOSSARY.md (n tokens of the reduced segment, D width, r removed tokens, E even / O
odd positions).

What it does (not what the paper says): the clipped mixer output is L2-normalised per token, then
SORTED ALONG THE TOKEN AXIS PER CHANNEL, so the rows it matches are rank levels, not tokens. The lower
half of rows (a) is matched to the upper half (b); the r best a-rows are applied to the real sequence
as even positions (sources) merged into odd positions (destinations). With non-negative values the
sources are positions 0, 2, ..., 2r-2 and every destination is position 1 (a non-causal fold).
Residual branch: plain mean. Hidden branch ("hybrid"): per channel, only the top floor(r/2) source
values are added, and the divisor counts them.

Differences from the released code, all documented: a zero-norm token gives 0 instead of NaN;
under padding or protection the segment is each sample's valid, unprotected tokens (the code used the
padded batch length); token sizes are not carried across layers (the code starts from 1 each time);
edges whose best scores tie are taken lowest index first (the code's unstable argsort leaves their order
to the device and the sort implementation, so its outputs differ between a GPU and a CPU).
"""
from __future__ import annotations


import torch

from .methods import row_best_torch, tile_matching
from .plan import Plan, TokenState, build_plan

Tensor = torch.Tensor


def reference_edges(hidden: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Source and destination indices exactly as the released code computes them.

    Args:
        hidden: (G, n, D) mixer output of G samples sharing the segment length n.
        r: tokens to remove (already capped at floor(n / 2)).
    Returns:
        src_idx (G, r): indices into E = x[:, 0::2], ascending.
        dst_idx (G, r): indices into O = x[:, 1::2], paired position-wise with src_idx
            (the i-th smallest source with the destination of the i-th best edge).
    """
    m = hidden.clamp(min=0)
    norm = m.norm(dim=-1, keepdim=True)
    m = torch.where(norm > 0, m / norm.where(norm > 0, torch.ones_like(norm)), torch.zeros_like(m))
    s = m.sort(dim=1, descending=True).values  # per channel, along tokens
    n = hidden.shape[1]
    mid = n // 2
    a, b = s[:, mid:], s[:, :mid]
    if tile_matching(a.shape[1], b.shape[1]):  # long segments: row max in tiles, no (n/2)^2 buffer
        node_max, node_idx = row_best_torch(a, b.transpose(-1, -2), product=torch.matmul)
    else:
        scores = a @ b.transpose(-1, -2)  # (G, ceil(n/2), floor(n/2))
        node_max, node_idx = scores.max(dim=-1)
    # ties (frequent: rank-level rows of clipped values repeat) go to the lowest index, on every device
    edges = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    src_idx = edges[:, :r].sort(dim=1).values[..., 0]
    dst_idx = node_idx[..., None].gather(1, edges[:, :r])[..., 0]
    return src_idx, dst_idx


class ReferencePlan(Plan):
    """A Plan whose hybrid rule masks sources per channel (top-k values), as the released code does."""

    rules: dict = None
    n_src: Tensor = None

    def apply(self, x: Tensor, branch: str, sizes: Tensor) -> Tensor:
        kind, frac = self.rules[branch]
        ones = torch.ones_like(sizes)
        if kind != "hybrid":
            return super().apply(x, branch, ones)
        D = x.shape[-1]
        out = x.gather(1, self.base[..., None].expand(-1, -1, D))
        if self.src.shape[1] == 0:
            return out * self.slot_valid[..., None].to(x.dtype)
        ok = (self.src_weight[branch] > 0)[..., None].expand(-1, -1, D)  # (B, R, D)
        vals = x.gather(1, self.src[..., None].expand(-1, -1, D))
        k = torch.floor(self.n_src.float() * frac + 1e-9).long()  # authors: floor(r / 2)
        key = vals.float().masked_fill(~ok, float("-inf"))
        order = key.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=x.device)[None, :, None].expand_as(order))
        keep = ok & (rank < k[:, None, None])
        idx = self.src_slot[..., None].expand(-1, -1, D)
        acc = torch.promote_types(x.dtype, torch.float32)
        num = out.to(acc).scatter_add(1, idx, vals.to(acc) * keep)
        den = torch.ones_like(num).scatter_add(1, idx, keep.to(acc))
        return (num / den).to(x.dtype) * self.slot_valid[..., None].to(x.dtype)

    def next_state(self, state: TokenState) -> TokenState:
        nxt = super().next_state(state)
        nxt.sizes = nxt.valid.float()  # the released code does not carry sizes
        return nxt


def reference_plan(ctx) -> ReferencePlan:
    """Plan of the released code for every sample (segments = valid, unprotected tokens)."""
    st = ctx.state
    red = st.reducible
    B, N = red.shape
    dev = red.device
    ar = torch.arange(N, device=dev)
    n_seg = red.sum(1)
    start = torch.where(red.any(1), red.float().argmax(1), torch.zeros(B, dtype=torch.long, device=dev))
    runs = (red[:, 1:] & ~red[:, :-1]).sum(1) + red[:, 0].long()  # starts of reducible runs
    if bool((runs > 1).any()):
        raise ValueError("utrc_reference needs each sample's reducible tokens to be contiguous")
    is_src = torch.zeros(B, N, dtype=torch.bool, device=dev)
    dst = ar.expand(B, N).clone()
    r = torch.minimum(ctx.r, n_seg // 2)
    # samples sharing (start, length, r) are processed together, as the released code does a batch
    keys = torch.stack([start, n_seg, r], 1).tolist()
    groups: dict = {}
    for b, key in enumerate(keys):
        groups.setdefault(tuple(key), []).append(b)
    for (s, n, rr), members in groups.items():
        if rr <= 0:
            continue
        rows = torch.tensor(members, device=dev)
        seg = ctx.hidden[rows, s:s + n]
        src_idx, dst_idx = reference_edges(seg, rr)
        src_tok = s + 2 * src_idx
        dst_tok = s + 2 * dst_idx + 1
        is_src[rows[:, None], src_tok] = True
        dst[rows[:, None], src_tok] = dst_tok
    merged = {branch: is_src for branch in ctx.rules}
    plan = build_plan(st.valid, is_src, dst, merged, causal=False)
    ref = ReferencePlan(plan.base, plan.pos_index, plan.slot_valid, plan.src, plan.src_slot, plan.src_weight)
    ref.rules = ctx.rules
    ref.n_src = is_src.sum(1)
    return ref


def reference_reduce_loop(x: Tensor, r: int, rule: str = "merge", hybrid_k: int | None = None,
                          metric_input: Tensor | None = None) -> Tensor:
    """Loop twin of the released code for ONE sample (n, D): the output (n - r, D).

    Follows docs/method.md §2 step by step with Python loops where the code uses scatter/topk; used to
    test `reference_plan` + `ReferencePlan.apply`.
    """
    n, D = x.shape
    r = min(r, n // 2)
    src_idx, dst_idx = reference_edges((x if metric_input is None else metric_input)[None], r)
    src_idx, dst_idx = src_idx[0].tolist(), dst_idx[0].tolist()
    E, O = x[0::2].clone().double(), x[1::2].clone().double()
    total = O.clone()
    count = torch.ones_like(O)
    k = r // 2 if hybrid_k is None else hybrid_k
    for c in range(D):
        vals = [(float(E[s, c]), i) for i, s in enumerate(src_idx)]
        if rule == "hybrid":
            chosen = {i for _, i in sorted(vals, key=lambda t: -t[0])[:k]}
        elif rule == "merge":
            chosen = set(range(len(src_idx)))
        else:
            chosen = set()
        for i, s in enumerate(src_idx):
            if i in chosen:
                total[dst_idx[i], c] += E[s, c]
                count[dst_idx[i], c] += 1
    O_new = total / count
    out = []
    removed = {2 * s for s in src_idx}
    for p in range(n):
        if p in removed:
            continue
        out.append(O_new[p // 2] if p % 2 else E[p // 2])
    return torch.stack(out).to(x.dtype)

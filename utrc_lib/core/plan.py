"""Reduction plans: index tensors computed once per reduction, applied to every per-token tensor.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens before, N' tokens after (max over the batch;
shorter samples are left-padded), R source entries (most tokens removed by one sample), D width).

A plan says, for each output slot, which input token is its base ("kept" token) and which original
position it takes; and, for each removed token ("source"), which slot it joins and with what weight in
each branch (0 = pruned there, its size = merged there). A branch output is the size-weighted average
of the slot's base and the sources merged into it. Order of slots follows position: order is meaning
in an SSM.

In this module: the per-token bookkeeping a forward carries (`TokenState`), the `Plan` and how it is
applied (`Plan.apply`: row gathers, then the merges, on CUDA by the Triton kernel `merge_rows`, whose
torch twin is `Plan._merge_torch`), and how a plan is assembled from per-token decisions
(`build_plan`, the public helper methods are written with). Triton availability (`HAVE_TRITON`,
`_triton_can_run`) is decided here for every kernel of the package (the others: core/methods.py).
Set UTRC_NO_TRITON=1 to force the torch twins.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

Tensor = torch.Tensor


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, M) -> (B, M, D): x[b, idx[b, m]] as whole-row copies (index_select)."""
    B, N, D = x.shape
    flat = (idx + torch.arange(B, device=idx.device)[:, None] * N).reshape(-1)
    return x.reshape(B * N, D).index_select(0, flat).view(B, idx.shape[1], D)


def stable_partition(first: Tensor, second: Optional[Tensor] = None) -> Tensor:
    """(B, N) permutation listing the `first` tokens (by position), then the `second` ones, then the rest.

    The same permutation as a stable argsort on the keys 0 / 1 / 2, built from prefix sums and one
    scatter (no sort). `first` and `second` must not overlap.
    """
    B, N = first.shape
    ar = torch.arange(N, device=first.device).expand(B, N)
    f = first.long()
    c1 = f.cumsum(1)
    n1 = c1[:, -1:]
    if second is None:
        dest = torch.where(first, c1 - 1, n1 + ar - c1)  # rest: n1 + (tokens before it that are not first)
    else:
        s_ = second.long()
        c2 = s_.cumsum(1)
        rest_rank = ar - (c1 - f) - (c2 - s_)  # rest tokens before this one
        dest = torch.where(first, c1 - 1, torch.where(second, n1 + c2 - 1, n1 + c2[:, -1:] + rest_rank))
    return torch.empty_like(ar).scatter_(1, dest, ar)


@dataclass
class TokenState:
    """Per-token bookkeeping carried across reduction layers of one forward pass.

    positions: (B, N) long, original input index of each token (-1 on padding slots).
    sizes:     (B, N) float32, how many original tokens each token stands for (merge mass).
    valid:     (B, N) bool, real tokens (False on padding).
    protect_start: (B,) long, original index from which tokens are protected (N0 = none).
    """

    positions: Tensor
    sizes: Tensor
    valid: Tensor
    protect_start: Tensor

    @classmethod
    def initial(cls, valid: Tensor, *, protect_last: int | Tensor = 0, protect_from: int | None = None) -> "TokenState":
        """protect_last: an int for every sample, or a (B,) tensor (per-sample scored tails)."""
        B, N = valid.shape
        dev = valid.device
        positions = torch.arange(N, device=dev).expand(B, N).clone()
        positions = positions.masked_fill(~valid, -1)
        if protect_from is not None:
            start = torch.full((B,), protect_from, dtype=torch.long, device=dev)
        elif isinstance(protect_last, Tensor) or protect_last > 0:
            k = protect_last.to(dev).long().reshape(B, 1) if isinstance(protect_last, Tensor) else protect_last
            # index of the k-th valid token from the end of each sample (k = 0: none protected)
            from_end = valid.flip(1).long().cumsum(1).flip(1)  # valid tokens at or after each index
            is_start = valid & (from_end == k)
            has = is_start.any(1)
            first_valid = torch.where(valid.any(1), valid.float().argmax(1), torch.zeros(B, dtype=torch.long, device=dev))
            start = torch.where(has, is_start.float().argmax(1), first_valid)
            if isinstance(k, Tensor):
                start = torch.where(k[:, 0] > 0, start, torch.full_like(start, N))
        else:
            start = torch.full((B,), N, dtype=torch.long, device=dev)
        return cls(positions, valid.float().clone(), valid.clone(), start)

    @property
    def protected(self) -> Tensor:
        """(B, N) bool: valid tokens in the protected tail."""
        return self.valid & (self.positions >= self.protect_start[:, None])

    @property
    def reducible(self) -> Tensor:
        return self.valid & ~self.protected


@dataclass
class Plan:
    """Index tensors of one reduction (see module docstring).

    base:       (B, N') long, input index of each slot's base token (0 on padding slots).
    pos_index:  (B, N') long, input index whose original position the slot takes (causal: the
                latest member of its group).
    slot_valid: (B, N') bool.
    src:        (B, R) long, input index of each removed token (0 where unused).
    src_slot:   (B, R) long, slot a removed token joins (0 where unused / pruned).
    src_weight: {branch: (B, R) float 0/1}, 1 where the source is merged in that branch.
    size_branch: branch whose merges define the carried token sizes.
    """

    base: Tensor
    pos_index: Tensor
    slot_valid: Tensor
    src: Tensor
    src_slot: Tensor
    src_weight: dict = field(default_factory=dict)
    size_branch: str = "residual"
    has_merge: dict | None = None  # {branch: bool} any source merged there (None = compute in apply)
    all_valid: bool = False  # every slot valid (no padding): skip the zeroing pass
    _layout: dict | None = field(default=None, repr=False, compare=False)  # cache of _merge_layout

    @property
    def num_out(self) -> int:
        return self.base.shape[1]

    def _merge_layout(self) -> dict:
        """Source entries grouped by the slot they join (computed once, shared by the branches).

        order: (B, R) entries sorted by slot (stable: index order within a slot); slot / src: (B, R)
        in that order; lead: (B, R) bool, first entry of its slot; seg: (B, R) the entry's group;
        count: (B, R) group size on a group's first entry, 0 elsewhere.
        """
        if self._layout is None:
            order = torch.argsort(self.src_slot, dim=1, stable=True)
            slot = self.src_slot.gather(1, order)  # (B, R) ascending
            lead = torch.ones_like(slot, dtype=torch.bool)
            lead[:, 1:] = slot[:, 1:] != slot[:, :-1]
            seg = lead.long().cumsum(1) - 1  # (B, R) group index in [0, R)
            count = torch.zeros_like(seg).scatter_add_(1, seg, torch.ones_like(seg)).gather(1, seg) * lead
            self._layout = dict(order=order, slot=slot, src=self.src.gather(1, order), lead=lead, seg=seg,
                                count=count)
        return self._layout

    def apply(self, x: Tensor, branch: str, sizes: Tensor) -> Tensor:
        """Reduce a per-token tensor (B, N, D) -> (B, N', D) with `branch`'s rule.

        sizes: (B, N) float token sizes before this reduction (merge weights).
        Only the slots that receive sources are recomputed (in >= fp32); every other slot is an
        exact copy of its base token. For one slot the arithmetic is
        (base * w_base + src_1 * w_1 + src_2 * w_2 + ...) / (w_base + w_1 + ...), sources in index
        order. CUDA: one Triton kernel (`merge_rows`); elsewhere grouped row ops in
        torch (the twin).
        """
        B, N, D = x.shape
        out = gather_rows(x, self.base)  # (B, N', D): exact for kept tokens
        w_src = self.src_weight.get(branch)
        R = self.src.shape[1]
        has_merge = self.has_merge.get(branch) if self.has_merge is not None else None
        if has_merge is None and w_src is not None and R > 0:
            has_merge = bool((w_src > 0).any())  # host sync; plans from build_plan carry the flag
        if w_src is not None and R > 0 and has_merge:
            lay = self._merge_layout()
            w_e = w_src.gather(1, lay["order"]) * sizes.gather(1, lay["src"])  # (B, R) entry weights
            w_base = sizes.gather(1, self.base)  # (B, N')
            if merge_kernel_available(x, out):
                merge_rows(out, x, lay["slot"], lay["src"], w_e, lay["count"], w_base)
            else:
                self._merge_torch(out, x, lay, w_e, w_base)
        if self.all_valid:
            return out
        return out * self.slot_valid[..., None].to(x.dtype)

    @staticmethod
    def _merge_torch(out: Tensor, x: Tensor, lay: dict, w_e: Tensor, w_base: Tensor) -> None:
        """Torch twin of `merge_rows`: grouped row ops on (B R, D) rows, in place on `out`."""
        B, N, D = x.shape
        n_out, R = out.shape[1], w_e.shape[1]
        acc = torch.promote_types(x.dtype, torch.float32)  # merge arithmetic in >= fp32
        w_e, w_base = w_e.to(acc), w_base.to(acc)
        slot = lay["slot"]
        added = torch.zeros(B, n_out, dtype=acc, device=x.device).scatter_add_(1, slot, w_e)
        # a slot that receives nothing keeps its base row exactly: weight 1, denominator 1
        recv = added > 0
        w_base = torch.where(recv, w_base, torch.ones_like(w_base))
        den = torch.where(recv, w_base + added, torch.ones_like(added))
        wb_e = w_base.gather(1, slot) * lay["lead"]  # base term once per slot
        den_e = den.gather(1, slot)
        ar = torch.arange(B, device=x.device)[:, None]
        flat_slot = (slot + ar * n_out).reshape(-1)  # rows of out
        flat_seg = (lay["seg"] + ar * R).reshape(-1)  # rows of the (B R, D) accumulator
        base_rows = gather_rows(out, slot).reshape(B * R, D)
        src_rows = gather_rows(x, lay["src"]).reshape(B * R, D)
        # zero weights contribute exactly nothing (not 0 x value: a pruned NaN / inf source, or the
        # base row counted on a group's later entries, must not turn the merged row into NaN)
        wb_col, w_col = wb_e.reshape(-1, 1), w_e.reshape(-1, 1)
        contrib = torch.where(wb_col > 0, base_rows, 0.0) * wb_col  # (B R, D) in acc
        contrib.addcmul_(torch.where(w_col > 0, src_rows, 0.0), w_col)
        num = torch.zeros(B * R, D, dtype=acc, device=x.device).index_add_(0, flat_seg, contrib)
        rows = (num.index_select(0, flat_seg) / den_e.reshape(-1, 1)).to(x.dtype)
        out.view(B * n_out, D).index_copy_(0, flat_slot, rows)  # entries of one slot write identical rows

    def apply_index(self, t: Tensor, fill=0) -> Tensor:
        """Carry a (B, N) per-token tensor to slots by each slot's position token."""
        return t.gather(1, self.pos_index).masked_fill(~self.slot_valid, fill)

    def next_state(self, state: TokenState) -> TokenState:
        sizes = state.sizes.gather(1, self.base)
        w = self.src_weight.get(self.size_branch)
        if w is not None and self.src.shape[1] > 0:
            sizes = sizes.scatter_add(1, self.src_slot, w * state.sizes.gather(1, self.src))
        sizes = sizes * self.slot_valid
        return TokenState(self.apply_index(state.positions, -1), sizes, self.slot_valid.clone(),
                          state.protect_start)


def identity_plan(valid: Tensor) -> Plan:
    """A plan that keeps every token (used by method 'none' and keep_ratio = 1)."""
    B, N = valid.shape
    idx = torch.arange(N, device=valid.device).expand(B, N)
    empty = torch.zeros(B, 0, dtype=torch.long, device=valid.device)
    return Plan(idx, idx, valid.clone(), empty, empty, {})


def build_plan(valid: Tensor, is_src: Tensor, dst: Tensor, merged: dict, causal: bool,
               size_branch: str = "residual", counts: tuple | None = None) -> Plan:
    """Assemble a Plan from per-token decisions (vectorised over the batch).

    Args:
        valid:  (B, N) bool real tokens.
        is_src: (B, N) bool tokens removed (pruned or merged away).
        dst:    (B, N) long token each source joins (ignored where not merged).
        merged: {branch: (B, N) bool} sources merged (not pruned) in that branch.
        causal: a group's slot takes the latest position of its merged members (content only moves
                forward); otherwise it keeps the base token's position.
        counts: (sources per sample, {branch: merges anything}) as host values when every sample is
                full length and removes the same number of tokens: then no host sync is needed.
    """
    B, N = valid.shape
    dev = valid.device
    ar = torch.arange(N, device=dev).expand(B, N)
    is_src = is_src & valid
    kept = valid & ~is_src
    merged = {k: v & is_src for k, v in merged.items()}
    merged_any = torch.zeros_like(is_src)
    for v in merged.values():
        merged_any |= v
    dst = torch.where(merged_any, dst, ar)

    pos_of = ar
    if causal:
        pos_of = ar.scatter_reduce(1, dst, ar, reduce="amax", include_self=True)  # latest member
    # output order: kept tokens by the position their slot takes; removed tokens last
    big = torch.full_like(ar, 2 * N)
    order = torch.argsort(torch.where(kept, pos_of, big + ar), dim=1, stable=True)
    n_out = kept.sum(1)  # (B,)
    n_src = is_src.sum(1)  # (B,)
    if counts is not None and bool(B):
        R, has_merge = counts
        n_max = n_min = N - R
    else:
        flags = [v.any() for v in merged.values()]
        # one host sync for every size this plan needs: max / min kept, most sources, merge flags
        stats = torch.stack([n_out.max(), n_out.min(), n_src.max(), *flags]).tolist() if B else [0, 0, 0] + [False] * len(flags)
        n_max, n_min, R = int(stats[0]), int(stats[1]), int(stats[2])
        has_merge = {k: bool(f) for k, f in zip(merged, stats[3:])}
    offset = n_max - n_out  # left padding of shorter samples
    slots = torch.arange(n_max, device=dev).expand(B, n_max)
    rank = slots - offset[:, None]
    slot_valid = rank >= 0
    base = order.gather(1, rank.clamp_min(0)).masked_fill(~slot_valid, 0)
    pos_index = pos_of.gather(1, base)
    # slot of every kept token
    slot_of = torch.full_like(ar, -1).scatter(1, order, ar - 0)  # rank in order
    slot_of = torch.where(kept, slot_of + offset[:, None], torch.full_like(ar, -1))

    src = stable_partition(is_src)[:, :R]  # sources first, by position
    src_valid = is_src.gather(1, src)
    src_slot = slot_of.gather(1, dst.gather(1, src)).clamp_min(0)
    src_weight = {k: (v.gather(1, src) & src_valid).float() for k, v in merged.items()}
    src = src.masked_fill(~src_valid, 0)
    src_slot = src_slot.masked_fill(~src_valid, 0)
    all_valid = n_min == n_max and bool(B) and valid.shape[1] > 0
    return Plan(base, pos_index, slot_valid, src, src_slot, src_weight, size_branch,
                has_merge=has_merge if R > 0 else None, all_valid=all_valid)


# -- Triton: availability (every kernel of the package) and the merge kernel, twin of Plan._merge_torch ----

try:  # pragma: no cover - exercised on the GPU machine (or with TRITON_INTERPRET=1)
    import triton
    import triton.language as tl

    @triton.jit
    def _merge_kernel(out_ptr, x_ptr, slot_ptr, src_ptr, w_ptr, cnt_ptr, wb_ptr, R, N_in, N_out, D,
                      BLOCK_D: tl.constexpr):
        """Program (entry e, block of columns): if e leads its slot's group, write the slot's merged row.

        out[b, slot] = (out[b, slot] * wb + sum_j x[b, src_j] * w_j) / (wb + sum_j w_j), sources in
        entry order, float32 arithmetic; rows whose sources all have weight 0 are left untouched.
        """
        e = tl.program_id(0)
        cnt = tl.load(cnt_ptr + e)
        if cnt > 0:
            b = e // R
            slot = tl.load(slot_ptr + e)
            offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            m = offs < D
            row = (b.to(tl.int64) * N_out + slot) * D
            wb = tl.load(wb_ptr + b.to(tl.int64) * N_out + slot)
            acc = tl.load(out_ptr + row + offs, mask=m, other=0.0).to(tl.float32) * wb
            tot = wb
            added = 0.0
            for k in range(0, cnt):
                w = tl.load(w_ptr + e + k)
                src = tl.load(src_ptr + e + k)
                v = tl.load(x_ptr + (b.to(tl.int64) * N_in + src) * D + offs, mask=m, other=0.0).to(tl.float32)
                acc += tl.where(w > 0, v * w, 0.0)  # a pruned source (w = 0) contributes nothing, NaN included
                tot += w
                added += w
            if added > 0:
                tl.store(out_ptr + row + offs, (acc / tot).to(out_ptr.dtype.element_ty), mask=m)

    HAVE_TRITON = True
except Exception:  # triton missing or unusable: the torch twins are used
    HAVE_TRITON = False


def _triton_can_run(t: Tensor) -> bool:
    """Triton is importable, not switched off (UTRC_NO_TRITON=1), and `t` lives where kernels run
    (CUDA, or any device under Triton's CPU interpreter, TRITON_INTERPRET=1)."""
    return (HAVE_TRITON and os.environ.get("UTRC_NO_TRITON") != "1" and t.numel() > 0
            and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


def merge_kernel_available(x: Tensor, out: Tensor) -> bool:
    """Whether `merge_rows` runs the Triton kernel (CUDA or interpreter, contiguous rows, and no
    gradient to track: the kernel writes in place, invisible to autograd; the torch twin is used then)."""
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return False
    return (_triton_can_run(x) and x.is_contiguous() and out.is_contiguous() and x.dtype == out.dtype
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def merge_rows(out: Tensor, x: Tensor, slot: Tensor, src: Tensor, w: Tensor, count: Tensor, w_base: Tensor) -> None:
    """Merge source rows into their slots, in place on `out` (the Triton twin of Plan.apply's torch path).

    out: (B, N', D) base rows; x: (B, N, D) input rows. Per entry (B, R), sorted by slot: slot, src
    (row of x), w (float32 merge weight), count (group size on the group's first entry, else 0).
    w_base: (B, N') float32 base weights.
    """
    B, n_out, D = out.shape
    R = slot.shape[1]
    if B * R == 0:
        return
    block_d = min(1024, triton.next_power_of_2(D))
    grid = (B * R, triton.cdiv(D, block_d))
    _merge_kernel[grid](out, x, slot.contiguous(), src.contiguous(), w.float().contiguous(),
                        count.to(torch.int32).contiguous(), w_base.float().contiguous(),
                        R, x.shape[1], n_out, D, BLOCK_D=block_d)

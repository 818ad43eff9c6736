"""Reduction plans: index tensors computed once per reduction layer, applied to every per-token tensor.

Glossary: B batch, N tokens before, N' tokens after (max over the batch; shorter samples are
left-padded), R most sources (removed tokens) in one sample, D width.

A plan says, for each output slot, which input token is its base ("kept" token) and which original
position it takes; and, for each removed token ("source"), which slot it joins and with what weight in
each branch (0 = pruned there, its size = merged there). A branch output is the size-weighted average
of the slot's base and the sources merged into it. Order of slots follows position: order is meaning
in an SSM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


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
    def initial(cls, valid: Tensor, *, protect_last: int = 0, protect_from: int | None = None) -> "TokenState":
        B, N = valid.shape
        dev = valid.device
        positions = torch.arange(N, device=dev).expand(B, N).clone()
        positions = positions.masked_fill(~valid, -1)
        if protect_from is not None:
            start = torch.full((B,), protect_from, dtype=torch.long, device=dev)
        elif protect_last > 0:
            # index of the protect_last-th valid token from the end of each sample
            from_end = valid.flip(1).long().cumsum(1).flip(1)  # valid tokens at or after each index
            is_start = valid & (from_end == protect_last)
            has = is_start.any(1)
            first_valid = torch.where(valid.any(1), valid.float().argmax(1), torch.zeros(B, dtype=torch.long, device=dev))
            start = torch.where(has, is_start.float().argmax(1), first_valid)
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

    @property
    def num_out(self) -> int:
        return self.base.shape[1]

    def apply(self, x: Tensor, branch: str, sizes: Tensor) -> Tensor:
        """Reduce a per-token tensor (B, N, D) -> (B, N', D) with `branch`'s rule.

        sizes: (B, N) float token sizes before this reduction (merge weights).
        """
        D = x.shape[-1]
        out = x.gather(1, self.base[..., None].expand(-1, -1, D))  # (B, N', D): exact for kept tokens
        w_src = self.src_weight.get(branch)
        if w_src is not None and self.src.shape[1] > 0 and bool((w_src > 0).any()):
            acc = torch.promote_types(x.dtype, torch.float32)  # merge arithmetic in >= fp32
            w_src = (w_src * sizes.gather(1, self.src)).to(acc)  # (B, R)
            w_base = sizes.gather(1, self.base).to(acc)  # (B, N')
            idx = self.src_slot[..., None].expand(-1, -1, D)
            num = (out.to(acc) * w_base[..., None]).scatter_add(
                1, idx, x.gather(1, self.src[..., None].expand(-1, -1, D)).to(acc) * w_src[..., None])
            added = torch.zeros_like(w_base).scatter_add(1, self.src_slot, w_src)
            den = w_base + added
            out = torch.where((added > 0)[..., None], (num / den.clamp_min(1e-12)[..., None]).to(x.dtype), out)
        return out * self.slot_valid[..., None].to(x.dtype)

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
               size_branch: str = "residual") -> Plan:
    """Assemble a Plan from per-token decisions (vectorised over the batch).

    Args:
        valid:  (B, N) bool real tokens.
        is_src: (B, N) bool tokens removed (pruned or merged away).
        dst:    (B, N) long token each source joins (ignored where not merged).
        merged: {branch: (B, N) bool} sources merged (not pruned) in that branch.
        causal: a group's slot takes the latest position of its merged members (content only moves
                forward); otherwise it keeps the base token's position.
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
    n_max = int(n_out.max()) if B else 0
    offset = n_max - n_out  # left padding of shorter samples
    slots = torch.arange(n_max, device=dev).expand(B, n_max)
    rank = slots - offset[:, None]
    slot_valid = rank >= 0
    base = order.gather(1, rank.clamp_min(0)).masked_fill(~slot_valid, 0)
    pos_index = pos_of.gather(1, base)
    # slot of every kept token
    slot_of = torch.full_like(ar, -1).scatter(1, order, ar - 0)  # rank in order
    slot_of = torch.where(kept, slot_of + offset[:, None], torch.full_like(ar, -1))

    R = int(is_src.sum(1).max()) if B else 0
    src = torch.argsort((~is_src).to(torch.int8), dim=1, stable=True)[:, :R]  # sources first, by position
    src_valid = is_src.gather(1, src)
    src_slot = slot_of.gather(1, dst.gather(1, src)).clamp_min(0)
    src_weight = {k: (v.gather(1, src) & src_valid).float() for k, v in merged.items()}
    src = src.masked_fill(~src_valid, 0)
    src_slot = src_slot.masked_fill(~src_valid, 0)
    return Plan(base, pos_index, slot_valid, src, src_slot, src_weight, size_branch)

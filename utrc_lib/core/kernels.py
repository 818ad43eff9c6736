"""One-pass feature statistics for a reduction step: importance score and squared L2 norm per token.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, C feature width: Di for the SSM output y).

A UTRC anchor needs two reductions over the channels of the (B, N, C) features: the importance
score (paper §3: channel mean of max(0, y)) and the L2 norm used by the cosine similarity. In torch
that is three passes over the features (clamp writes a copy, the mean reads it, the norm reads the
input again), the largest memory traffic of the whole step. On CUDA a Triton kernel reads every
element once and produces both. The features may be channel-major (mamba-ssm's Mamba-1 hands
`out_proj` a transposed view of the (B, C, N) scan output): the kernel reads through strides, so no
contiguous copy is made.

`feature_stats_torch` is the reference twin (plain torch, any device); `feature_stats` picks the
kernel when it can run (CUDA tensor, triton importable, a metric the kernel knows) and falls back to
the twin otherwise. Set UTRC_NO_TRITON=1 to force the twin.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .metrics import get_metric, importance

Tensor = torch.Tensor

# metric name -> mode of the kernel (what it accumulates per token)
_KERNEL_MODES = {"clip": 0, "sum": 1, "l1": 2, "l2": 3}

try:  # pragma: no cover - exercised on the GPU machine (or with TRITON_INTERPRET=1)
    import triton
    import triton.language as tl

    @triton.jit
    def _stats_kernel(x_ptr, score_ptr, inv_ptr, N, C, stride_b, stride_n, stride_c,
                      MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program (b, block of BLOCK_N tokens): loop over channels in tiles, accumulate in fp32."""
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        row = x_ptr + pid_b.to(tl.int64) * stride_b + offs_n[:, None].to(tl.int64) * stride_n
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m = mask_n[:, None] & (offs_c[None, :] < C)
            v = tl.load(row + offs_c[None, :].to(tl.int64) * stride_c, mask=m, other=0.0).to(tl.float32)
            if MODE == 0:
                acc += tl.sum(tl.maximum(v, 0.0), axis=1)
            elif MODE == 1:
                acc += tl.sum(v, axis=1)
            elif MODE == 2:
                acc += tl.sum(tl.abs(v), axis=1)
            acc_sq += tl.sum(v * v, axis=1)
        if MODE == 3:
            score = tl.sqrt(acc_sq)
        else:
            score = acc / C
        out = pid_b.to(tl.int64) * N + offs_n
        tl.store(score_ptr + out, score, mask=mask_n)
        inv = tl.where(acc_sq > 0, 1.0 / tl.sqrt(tl.maximum(acc_sq, 1e-38)), 0.0)  # 0 for zero rows
        tl.store(inv_ptr + out, inv, mask=mask_n)

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

    @triton.jit
    def _scaled_row_max_kernel(s_ptr, scale_ptr, g_ptr, j_ptr, M, K, stride_b, stride_m,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Per row of s (B, M, K) float32 (unit column stride): max over k of s[b, m, k] * scale[b, k]
        and its first argmax."""
        b = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = offs_m < M
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_M], dtype=tl.int32)
        row = s_ptr + b.to(tl.int64) * stride_b + offs_m[:, None].to(tl.int64) * stride_m
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            sc = tl.load(scale_ptr + b.to(tl.int64) * K + offs_k, mask=mk, other=0.0)
            v = tl.load(row + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=float("-inf")) * sc[None, :]
            v = tl.where(mk[None, :], v, float("-inf"))
            cm = tl.max(v, axis=1)
            ca = tl.argmax(v, axis=1, tie_break_left=True) + k0
            better = cm > best  # strict: an earlier column wins ties
            arg = tl.where(better, ca, arg)
            best = tl.where(better, cm, best)
        out = b.to(tl.int64) * M + offs_m
        tl.store(g_ptr + out, best, mask=mm)
        tl.store(j_ptr + out, arg.to(tl.int64), mask=mm)

    @triton.jit
    def _row_best_kernel(a_ptr, b_ptr, inva_ptr, invb_ptr, ok_ptr, lo_ptr, hi_ptr, pa_ptr, pb_ptr, g_ptr, j_ptr,
                         M, K, C, W, n_mblk, sa_b, sa_m, sa_c, sb_b, sb_k, sb_c,
                         HAS_INV: tl.constexpr, HAS_OK: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program (b, block of BLOCK_M A rows): best B column of each row, the similarity never stored.

        Loop over column tiles [lo, hi) of the B list (the whole list, or the tiles that can hold a
        column inside the window); per tile the (BLOCK_M, BLOCK_N) dot products accumulate over the
        channels in float32 (tl.dot), are scaled by the B tokens' inverse norms, masked (-inf outside
        the list, on padded entries, outside the window), and fold into a running (max, first argmax):
        a later tile replaces the running best only when strictly larger, so ties keep the lowest
        column. The row's best is finally scaled by the A token's inverse norm.
        """
        b = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = offs_m < M
        offs_c0 = tl.arange(0, BLOCK_C)
        a_row = a_ptr + b.to(tl.int64) * sa_b + offs_m[:, None].to(tl.int64) * sa_m
        b_base = b_ptr + b.to(tl.int64) * sb_b
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_M], dtype=tl.int32)
        if WINDOW:
            k_lo = tl.load(lo_ptr + b.to(tl.int64) * n_mblk + pid_m).to(tl.int32)
            k_hi = tl.load(hi_ptr + b.to(tl.int64) * n_mblk + pid_m).to(tl.int32)
            pa = tl.load(pa_ptr + b.to(tl.int64) * M + offs_m, mask=mm, other=0)
        else:
            k_lo = 0
            k_hi = K
        for k0 in range(k_lo, k_hi, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mk = offs_k < k_hi
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + offs_c0
                mc = offs_c < C
                av = tl.load(a_row + offs_c[None, :].to(tl.int64) * sa_c, mask=mm[:, None] & mc[None, :], other=0.0)
                bv = tl.load(b_base + offs_c[:, None].to(tl.int64) * sb_c + offs_k[None, :].to(tl.int64) * sb_k,
                             mask=mc[:, None] & mk[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(av, bv, input_precision="ieee")
                else:
                    acc += tl.dot(av, bv)
            ok = mk
            if HAS_INV:
                ib = tl.load(invb_ptr + b.to(tl.int64) * K + offs_k, mask=mk, other=0.0)
                acc = acc * ib[None, :]
            if HAS_OK:
                ok = ok & (tl.load(ok_ptr + b.to(tl.int64) * K + offs_k, mask=mk, other=0) != 0)
            keep = ok[None, :] & mm[:, None]
            if WINDOW:
                pb = tl.load(pb_ptr + b.to(tl.int64) * K + offs_k, mask=mk, other=0)
                dist = pa[:, None] - pb[None, :]
                keep = keep & (dist <= W) & (dist >= -W)
            v = tl.where(keep, acc, float("-inf"))
            cm = tl.max(v, axis=1)
            ca = tl.argmax(v, axis=1, tie_break_left=True) + k0
            better = cm > best  # strict: an earlier tile (lower column) keeps a tie
            arg = tl.where(better, ca, arg)
            best = tl.where(better, cm, best)
        if HAS_INV:
            best = best * tl.load(inva_ptr + b.to(tl.int64) * M + offs_m, mask=mm, other=0.0)
        out = b.to(tl.int64) * M + offs_m
        tl.store(g_ptr + out, best, mask=mm)
        tl.store(j_ptr + out, arg.to(tl.int64), mask=mm)

    HAVE_TRITON = True
except Exception:  # triton missing or unusable: the torch twin is used
    HAVE_TRITON = False


def _triton_can_run(t: Tensor) -> bool:
    """Triton is importable, not switched off (UTRC_NO_TRITON=1), and `t` lives where kernels run
    (CUDA, or any device under Triton's CPU interpreter, TRITON_INTERPRET=1)."""
    return (HAVE_TRITON and os.environ.get("UTRC_NO_TRITON") != "1" and t.numel() > 0
            and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


def feature_stats_torch(metric: str, feats: Tensor, *, delta: Tensor | None = None, valid: Tensor | None = None,
                        seed: int = 0, salt: int = 0) -> tuple[Tensor, Tensor]:
    """Reference twin: (scores (B, N) float32, inverse L2 norms (B, N) float32) in plain torch."""
    scores = importance(metric, feats, delta=delta, valid=valid, seed=seed, salt=salt)
    x = feats.float() if feats.dtype == torch.float64 else feats
    sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32) ** 2
    return scores, inverse_norm(sq)


def kernel_available(metric: str, feats: Tensor) -> bool:
    """Whether `feature_stats` would run the Triton kernel for these inputs."""
    return (_triton_can_run(feats) and metric in _KERNEL_MODES and feats.dim() == 3
            and feats.dtype in (torch.float16, torch.bfloat16, torch.float32))


def feature_stats_triton(metric: str, feats: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel: one read of `feats` (any strides) -> (scores, inverse norms), float32 (B, N)."""
    B, N, C = feats.shape
    scores = torch.empty(B, N, dtype=torch.float32, device=feats.device)
    inv = torch.empty(B, N, dtype=torch.float32, device=feats.device)
    channel_major = feats.stride(-1) != 1
    # tiles: many tokens per program when tokens are contiguous (channel-major), wide channel
    # tiles otherwise; 4096-element tiles either way
    block_n, block_c = (32, 128) if channel_major else (8, 512)  # fastest of 8 tilings on an H100
    grid = (B, triton.cdiv(N, block_n))
    _stats_kernel[grid](feats, scores, inv, N, C, feats.stride(0), feats.stride(1), feats.stride(2),
                        MODE=_KERNEL_MODES[metric], BLOCK_N=block_n, BLOCK_C=block_c)
    return scores, inv


def feature_stats(metric: str, feats: Tensor, *, delta: Tensor | None = None, valid: Tensor | None = None,
                  seed: int = 0, salt: int = 0) -> tuple[Tensor, Tensor]:
    """(scores (B, N) float32 for `metric`, inverse L2 norms of `feats` (B, N) float32, 0 for zero rows).

    Scores follow `utrc_lib.metrics.importance` (larger = more important); the inverse norms feed
    the cosine similarity (methods.bipartite_match scales dot products by them).
    """
    get_metric(metric)  # validates the name
    if kernel_available(metric, feats):
        return feature_stats_triton(metric, feats)
    return feature_stats_torch(metric, feats, delta=delta, valid=valid, seed=seed, salt=salt)


def inverse_norm(sq: Tensor) -> Tensor:
    """1 / ||x|| from squared norms; 0 for zero vectors (their cosine with anything is 0, never NaN)."""
    return torch.where(sq > 0, sq.clamp_min(1e-38).rsqrt(), torch.zeros_like(sq))


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


def scaled_row_max(sim: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(max_k sim[b, m, k] * scale[b, k], first argmax) for float32 sim (B, M, K), scale (B, K) >= 0.

    sim may be a column slice of a wider buffer (unit column stride, any row stride).

    CUDA: one Triton pass over sim (no scaled copy); elsewhere torch (the twin).
    """
    B, M, K = sim.shape
    if _triton_can_run(sim) and sim.dtype == torch.float32 and sim.stride(-1) == 1:
        g = torch.empty(B, M, dtype=torch.float32, device=sim.device)
        j = torch.empty(B, M, dtype=torch.long, device=sim.device)
        block_m, block_k = 16, 256
        _scaled_row_max_kernel[(B, triton.cdiv(M, block_m))](sim, scale.float().contiguous(), g, j, M, K,
                                                            sim.stride(0), sim.stride(1),
                                                            BLOCK_M=block_m, BLOCK_K=block_k)
        return g, j
    return (sim * scale[:, None, :]).max(-1)


# -- tiled best match (no N x N buffer) ------------------------------------------------------------
#
# The bipartite matching needs, for every A token, the B token of largest cosine and that cosine.
# The dense path (methods._best_match) materialises the (B, RA, RB) float32 similarity: 17 GB for one
# 128k-token sequence. The tiled path computes the same row max / first argmax over (tile_m x tile_n)
# tiles with a running (max, argmax): memory O(B (tile_m tile_n + RA)), linear in N.
#
# Tie rule (both paths, and the loop twin core.twins._match): among equal maxima the LOWEST column
# (the first B token by position) wins. Within a tile torch.max / tl.argmax(tie_break_left=True) pick
# the first; across tiles a later tile replaces the running best only when strictly larger.
#
# Exactness: the tiled path takes the same maxima over the same products, scaled the same way. Its
# float32 dot products may round differently from the dense bmm in the last bit (BLAS picks different
# blockings for a tile than for the whole matrix: measured on CPU, not only in Triton), so two
# candidates whose cosines differ by less than that rounding may swap; everything else (and every
# exact tie, e.g. duplicated tokens with exactly representable products) gives the same matches.
# Which path runs: `tile_matching` below (dense under TILE_MIN_PAIRS pairs per sample, i.e. below
# ~8192 reducible tokens: every committed configuration keeps its dense path and numbers).

TILE_MIN_PAIRS = 1 << 24  # |A| x |B| per sample from which the matching is tiled (about N >= 8192)
ROW_TILE, COL_TILE = 1024, 4096  # the torch twin's tiles (B x 16 MB of float32 per tile)


def tile_matching(n_a: int, n_b: int, window=None) -> bool:
    """Whether the best match of n_a x n_b pairs per sample runs tiled (always with a window).
    Override with UTRC_TILE_MATCH=1 (always) / 0 (never, unless windowed)."""
    env = os.environ.get("UTRC_TILE_MATCH")
    if window is not None:
        return True
    if env in ("0", "1"):
        return env == "1"
    return n_a * n_b >= TILE_MIN_PAIRS


def _fp32_product(fa: Tensor, fb_t: Tensor) -> Tensor:
    """The dense path's similarity rule: float32 products (CUDA half: tensor cores, float32 output)."""
    if fa.is_cuda and fa.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.bmm(fa, fb_t, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return torch.bmm(fa.float(), fb_t.float())


def window_bounds(pos_a: Tensor, pos_b: Tensor, a_ok, b_ok, window: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Column range [lo, hi) of the B list that can hold a partner within `window` positions of some
    valid A row of each block of `block_m` rows: (B, ceil(M / block_m)) long each, on the device (no sync).

    The valid B entries come first in the list, ascending by position (methods.stable_partition).
    """
    B, M = pos_a.shape
    big = torch.iinfo(torch.long).max // 4
    pb = pos_b if b_ok is None else pos_b.masked_fill(~b_ok, big)  # padding sorts last, never inside
    n_blk = -(-M // block_m)
    pad = n_blk * block_m - M
    okm = torch.ones_like(pos_a, dtype=torch.bool) if a_ok is None else a_ok
    lo_src = pos_a.masked_fill(~okm, big)
    hi_src = pos_a.masked_fill(~okm, -big)
    if pad:
        lo_src = torch.cat([lo_src, lo_src.new_full((B, pad), big)], 1)
        hi_src = torch.cat([hi_src, hi_src.new_full((B, pad), -big)], 1)
    lo_pos = lo_src.view(B, n_blk, block_m).amin(2) - window
    hi_pos = hi_src.view(B, n_blk, block_m).amax(2) + window
    lo = torch.searchsorted(pb.contiguous(), lo_pos.contiguous(), right=False)
    hi = torch.searchsorted(pb.contiguous(), hi_pos.contiguous(), right=True)
    return lo, torch.maximum(hi, lo)


def row_best_torch(fa: Tensor, fb_t: Tensor, inv_a: Optional[Tensor] = None, inv_b: Optional[Tensor] = None,
                   b_ok: Optional[Tensor] = None, *, pos_a: Optional[Tensor] = None, pos_b: Optional[Tensor] = None,
                   window: Optional[int] = None, tile_m: Optional[int] = None, tile_n: Optional[int] = None,
                   product: Optional[Callable] = None) -> tuple[Tensor, Tensor]:
    """Torch twin of the fused kernel: best B column of every A row, tile by tile.

    Args:
        fa: (B, M, C) A rows; fb_t: (B, C, K) B rows transposed (any strides).
        inv_a (B, M), inv_b (B, K): inverse norms (None: features already normalised, no scaling).
        b_ok: (B, K) bool, False on padded B entries (never win).
        pos_a (B, M), pos_b (B, K), window: with a window, only pairs with |pos_a - pos_b| <= window.
        product: (fa tile, fb_t tile) -> similarity tile; default: float32 products as the dense path.
    Returns:
        g (B, M) float32 (or the product's dtype): max over valid columns of sim * inv_b, times inv_a
        (-inf times inv_a where a row has no valid column); j (B, M) long: the first column reaching it
        (0 where none).
    """
    B, M, _ = fa.shape
    K = fb_t.shape[2]
    product = product or _fp32_product
    tile_m, tile_n = tile_m or ROW_TILE, tile_n or COL_TILE  # module values at call time (tests shrink them)
    if M == 0 or K == 0:  # no rows, or no column to win: -inf / index 0, as torch.max over -inf
        g = torch.full((B, M), float("-inf"), dtype=torch.float32, device=fa.device)
        return (g if inv_a is None else g * inv_a), torch.zeros(B, M, dtype=torch.long, device=fa.device)
    g_all, j_all = [], []
    for m0 in range(0, M, tile_m):
        a = fa[:, m0:m0 + tile_m]
        best = arg = None
        for k0 in range(0, K, tile_n):
            s = product(a, fb_t[:, :, k0:k0 + tile_n])  # (B, tm, tn)
            if inv_b is not None:
                s = s * inv_b[:, None, k0:k0 + tile_n].to(s.dtype)
            keep = None
            if b_ok is not None:
                keep = b_ok[:, None, k0:k0 + tile_n]
            if window is not None:
                d = pos_a[:, m0:m0 + tile_m, None] - pos_b[:, None, k0:k0 + tile_n]
                near = d.abs() <= window
                keep = near if keep is None else keep & near
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            cm, ca = s.max(-1)
            ca = ca + k0
            if best is None:
                best, arg = cm, ca
            else:
                better = cm > best  # strict: the earlier tile keeps a tie
                best, arg = torch.where(better, cm, best), torch.where(better, ca, arg)
        g_all.append(best)
        j_all.append(arg)
    g, j = torch.cat(g_all, 1), torch.cat(j_all, 1)
    if inv_a is not None:
        g = g * inv_a
    return g, j


def row_best_kernel_available(fa: Tensor, fb_t: Tensor) -> bool:
    """Whether `row_best` runs the fused Triton kernel for these inputs."""
    return (_triton_can_run(fa) and fa.dtype == fb_t.dtype
            and fa.dtype in (torch.float16, torch.bfloat16, torch.float32))


def row_best_triton(fa: Tensor, fb_t: Tensor, inv_a: Optional[Tensor] = None, inv_b: Optional[Tensor] = None,
                    b_ok: Optional[Tensor] = None, *, pos_a: Optional[Tensor] = None, pos_b: Optional[Tensor] = None,
                    window: Optional[int] = None, a_ok: Optional[Tensor] = None,
                    block_m: int = 64, block_n: int = 64, block_c: int = 64) -> tuple[Tensor, Tensor]:
    """The fused kernel (same contract as `row_best_torch`): one pass, no similarity buffer.

    a_ok (B, M): valid A rows (only narrows the window's column ranges; the rows are computed anyway).
    float32 inputs use IEEE float32 dots (not tf32); half inputs tensor cores with float32 accumulation.
    """
    B, M, C = fa.shape
    K = fb_t.shape[2]
    dev = fa.device
    g = torch.empty(B, M, dtype=torch.float32, device=dev)
    j = torch.empty(B, M, dtype=torch.long, device=dev)
    if B * M == 0:
        return g, j
    if K == 0:
        return g.fill_(float("-inf")) * (1.0 if inv_a is None else inv_a), j.zero_()
    n_mblk = triton.cdiv(M, block_m)
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    has_inv = inv_a is not None
    ia = inv_a.float().contiguous() if has_inv else dummy
    ib = inv_b.float().contiguous() if has_inv else dummy
    ok = b_ok.to(torch.int8).contiguous() if b_ok is not None else dummy
    if window is not None:
        lo, hi = window_bounds(pos_a, pos_b, a_ok, b_ok, int(window), block_m)
        lo, hi = lo.contiguous(), hi.contiguous()
        pa, pb = pos_a.long().contiguous(), pos_b.long().contiguous()
    else:
        lo = hi = pa = pb = dummy
    _row_best_kernel[(B, n_mblk)](fa, fb_t, ia, ib, ok, lo, hi, pa, pb, g, j,
                                  M, K, C, int(window or 0), n_mblk,
                                  fa.stride(0), fa.stride(1), fa.stride(2),
                                  fb_t.stride(0), fb_t.stride(2), fb_t.stride(1),
                                  HAS_INV=has_inv, HAS_OK=b_ok is not None, WINDOW=window is not None,
                                  IEEE=fa.dtype == torch.float32,
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c)
    return g, j


def row_best(fa: Tensor, fb_t: Tensor, inv_a: Optional[Tensor] = None, inv_b: Optional[Tensor] = None,
             b_ok: Optional[Tensor] = None, *, pos_a: Optional[Tensor] = None, pos_b: Optional[Tensor] = None,
             window: Optional[int] = None, a_ok: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Tiled best match: the Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch twin otherwise."""
    if (inv_a is None) != (inv_b is None):
        raise ValueError("row_best: give both inverse norms (inv_a, inv_b) or neither")
    if window is not None and (pos_a is None or pos_b is None):
        raise ValueError("row_best: a window needs the positions of both sides (pos_a, pos_b)")
    if row_best_kernel_available(fa, fb_t):
        return row_best_triton(fa, fb_t, inv_a, inv_b, b_ok, pos_a=pos_a, pos_b=pos_b, window=window, a_ok=a_ok)
    return row_best_torch(fa, fb_t, inv_a, inv_b, b_ok, pos_a=pos_a, pos_b=pos_b, window=window)

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

"""One-pass feature statistics for a reduction step: importance score and squared L2 norm per token.

Glossary: B batch, N tokens, C feature width (the SSM output y: D' channels).

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
    def _stats_kernel(x_ptr, score_ptr, sq_ptr, N, C, stride_b, stride_n, stride_c,
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
        tl.store(sq_ptr + out, acc_sq, mask=mask_n)

    HAVE_TRITON = True
except Exception:  # triton missing or unusable: the torch twin is used
    HAVE_TRITON = False


def feature_stats_torch(metric: str, feats: Tensor, *, delta: Tensor | None = None, valid: Tensor | None = None,
                        seed: int = 0, salt: int = 0) -> tuple[Tensor, Tensor]:
    """Reference twin: (scores (B, N) float32, squared L2 norms (B, N) float32) in plain torch."""
    scores = importance(metric, feats, delta=delta, valid=valid, seed=seed, salt=salt)
    x = feats.float() if feats.dtype == torch.float64 else feats
    sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32) ** 2
    return scores, sq


def kernel_available(metric: str, feats: Tensor) -> bool:
    """Whether `feature_stats` would run the Triton kernel for these inputs."""
    return (HAVE_TRITON and metric in _KERNEL_MODES and feats.dim() == 3 and feats.numel() > 0
            and (feats.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and feats.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and os.environ.get("UTRC_NO_TRITON") != "1")


def feature_stats_triton(metric: str, feats: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel: one read of `feats` (any strides) -> (scores, squared norms), float32 (B, N)."""
    B, N, C = feats.shape
    scores = torch.empty(B, N, dtype=torch.float32, device=feats.device)
    sq = torch.empty(B, N, dtype=torch.float32, device=feats.device)
    channel_major = feats.stride(-1) != 1
    # tiles: many tokens per program when tokens are contiguous (channel-major), wide channel
    # tiles otherwise; 4096-element tiles either way
    block_n, block_c = (64, 64) if channel_major else (16, 256)
    grid = (B, triton.cdiv(N, block_n))
    _stats_kernel[grid](feats, scores, sq, N, C, feats.stride(0), feats.stride(1), feats.stride(2),
                        MODE=_KERNEL_MODES[metric], BLOCK_N=block_n, BLOCK_C=block_c)
    return scores, sq


def feature_stats(metric: str, feats: Tensor, *, delta: Tensor | None = None, valid: Tensor | None = None,
                  seed: int = 0, salt: int = 0) -> tuple[Tensor, Tensor]:
    """(scores (B, N) float32 for `metric`, squared L2 norms of `feats` (B, N) float32).

    Scores follow `utrc_lib.metrics.importance` (larger = more important); the norms feed the
    cosine similarity (methods.bipartite_match scales dot products by their inverse square roots).
    """
    get_metric(metric)  # validates the name
    if kernel_available(metric, feats):
        return feature_stats_triton(metric, feats)
    return feature_stats_torch(metric, feats, delta=delta, valid=valid, seed=seed, salt=salt)


def inverse_norm(sq: Tensor) -> Tensor:
    """1 / ||x|| from squared norms; 0 for zero vectors (their cosine with anything is 0, never NaN)."""
    return torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))

"""One reduction at an anchor: importance metrics, the methods that turn scores and features into a
`Plan`, and the rounds that reach the anchor's count.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, N' tokens after a reduction, C feature width: Di for
the SSM output y, D for the mixer output, H heads or Di channels for the timescale Delta; r tokens
removed per sample (B,); side A / side B the halves of a bipartite matching, of sizes RA / RB).

In reading order:
  metrics          (B, N, C) features -> (B, N) importance scores, larger = more important (registry:
                   `available_metrics`, `importance`), and `feature_stats`: the scores with the inverse
                   L2 norms of the cosine similarity in one pass (a Triton kernel on CUDA, its torch twin
                   `feature_stats_torch` elsewhere).
  methods          a registry of name -> function(Context) -> Plan (`register_method`, `get_method`) and
                   the building blocks the methods are written with (`lowest`, `importance_halves`,
                   `alternate_halves`, `bipartite_match` with its scaled row max and its tiled best
                   match for long inputs, `edges_to_plan`); the built-in methods; the SSM-native ones
                   live in core/ssm_methods.py, the authors' reference mode in core/reference.py.
  the anchor       `plan_reduction` (scores, norms, Context, the method's plan), `reduce_rounds` (plans
                   repeated until the anchor's count is reached) and `reduce_tokens`, the functional
                   form of one anchor.

Metrics (paper §3, Table 3): scores = (1/Di) sum_d max(0, y_d) ("clip"; the paper's S) beat l1, l2 and
the unclipped sum. The timescale metrics read the softplus timescale Delta (B, N, H or Di), which the
host hands in: "delta" is its MEAN over heads (channels), as an MTR summary describes it
(docs/ssm_methods.md §3); "delta_l2" its L2 NORM over heads (channels), as DeciMamba's released code
scores (§1). They rank tokens differently when heads disagree. "delta" keeps its mean (committed numbers
used it). The hidden-attention metrics ("hattn_*", core/hattn.py, §2) read the scan's Delta, B, C and A
(`ScanParams`) and take their queries from the context, never the protected tail. "random" draws
batch-independent scores from the seed.

Feature statistics: a UTRC anchor needs two reductions over the channels of the (B, N, C) features: the
importance score and the L2 norm used by the cosine similarity. In torch that is three passes over the
features (clamp writes a copy, the mean reads it, the norm reads the input again), the largest memory
traffic of the whole step. On CUDA a Triton kernel reads every element once and produces both. The
features may be channel-major (mamba-ssm's Mamba-1 hands `out_proj` a transposed view of the (B, C, N)
scan output): the kernel reads through strides, so no contiguous copy is made. Every kernel runs only
where `plan._triton_can_run` says so (UTRC_NO_TRITON=1 forces the twins).

Methods: every method works on the reducible tokens only (valid and not protected), per sample,
vectorised over the batch. Ties are broken by position (stable sorts), and random draws are indexed by
a token's position within its sample, so a sample's plan never depends on the rest of the batch.

Convention of the anchor (mamba-ssm's Block): after layer l, `hidden` is the layer's mixer output and
`residual` the residual stream it was added to; the next layer sees hidden + residual. Each branch is
reduced with its own rule, both with the same plan (same kept tokens, same order).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional

import torch

from . import hattn
from .params import Param
from .plan import (HAVE_TRITON, Plan, TokenState, _triton_can_run, build_plan, gather_rows, identity_plan,
                   stable_partition)

if TYPE_CHECKING:
    from .config import ReductionConfig

Tensor = torch.Tensor


# == metrics ===========================================================================================

@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Tensor], Tensor]
    source: str  # "features" (SSM/mixer output), "delta" (timescale), "scan" (ScanParams), or "random"
    doc: str
    params: tuple = ()  # Params this metric reads from ReductionConfig.params (utrc_lib.core.params)


# Each accumulates in float32 without a float32 copy of a half-precision (B, N, C) input.
def _low(x: Tensor) -> Tensor:
    return x.float() if x.dtype == torch.float64 else x


def _clip(x: Tensor) -> Tensor:
    return _low(x).clamp_min(0).mean(-1, dtype=torch.float32)


def _sum(x: Tensor) -> Tensor:
    return _low(x).mean(-1, dtype=torch.float32)


def _l1(x: Tensor) -> Tensor:
    return _low(x).abs().mean(-1, dtype=torch.float32)


def _l2(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(_low(x), dim=-1, dtype=torch.float32)


def _delta(dt: Tensor) -> Tensor:
    """Mean of Delta over heads / channels (MTR's summary; NOT DeciMamba's norm: see `_delta_l2`)."""
    return dt.float().mean(-1)


def _delta_l2(dt: Tensor) -> Tensor:
    """L2 norm of Delta over heads / channels (DeciMamba's released scoring)."""
    return torch.linalg.vector_norm(dt.float(), dim=-1)


def _hattn(variant: str):
    def fn(scan, reducible, params):
        return hattn.hattn_scores(variant, scan, reducible, int((params or {}).get("window", 8)))
    fn.__name__ = f"_hattn_{variant}"
    return fn


WINDOW = Param("window", 8, "int", lo=1, hi=4096,
               doc="query rows: the last `window` reducible (context) tokens")


def _random_scores(x: Tensor) -> Tensor:  # replaced by seeded scores in `importance`
    raise RuntimeError("random scores are drawn by utrc_lib.core.methods.importance")


_METRICS: dict[str, Metric] = {
    m.name: m for m in (
        Metric("clip", _clip, "features", "channel mean of max(0, y) (paper)"),
        Metric("sum", _sum, "features", "channel mean of y, unclipped"),
        Metric("l1", _l1, "features", "channel mean of |y|"),
        Metric("l2", _l2, "features", "L2 norm of y"),
        Metric("delta", _delta, "delta", "mean over heads of the softplus timescale Delta (MTR-style summary)"),
        Metric("delta_l2", _delta_l2, "delta", "L2 norm over heads of the softplus timescale Delta (DeciMamba)"),
        Metric("hattn_window", _hattn("window"), "scan",
               "hidden attention: sum of |alpha| over the last `window` context rows", params=(WINDOW,)),
        Metric("hattn_last", _hattn("last"), "scan", "hidden attention: |alpha| of the last context row"),
        Metric("hattn_colsum", _hattn("colsum"), "scan",
               "hidden attention: |signed column sums| over all context rows (one reverse scan)"),
        Metric("hattn_nodecay", _hattn("nodecay"), "scan",
               "hidden attention without the decay: Delta_j |C_i . B_j| over the last `window` context rows",
               params=(WINDOW,)),
        Metric("random", _random_scores, "random", "seeded uniform scores, batch independent"),
    )
}


def available_metrics() -> list[str]:
    return list(_METRICS)


def _lookup(registry: dict, kind: str, name):
    """registry[name], or one ValueError naming the valid entries (also for an unhashable name)."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(registry)}") from None


def get_metric(name: str) -> Metric:
    return _lookup(_METRICS, "metric", name)


def relative_positions(valid: Tensor) -> Tensor:
    """(B, N) bool -> (B, N) long: index of each token among its sample's valid tokens (pads: 0)."""
    return (valid.long().cumsum(1) - 1).clamp_min(0)


def seeded_uniform(valid: Tensor, seed: int, salt: int = 0) -> Tensor:
    """Uniform scores indexed by each token's position within its sample: batch independent."""
    B, N = valid.shape
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(salt))
    table = torch.rand(N, generator=gen).to(valid.device)
    return table[relative_positions(valid)]


def importance(name: str, features: Tensor | None, *, delta: Tensor | None = None,
               valid: Tensor | None = None, seed: int = 0, salt: int = 0, scan=None,
               reducible: Optional[Tensor] = None, params: Optional[dict] = None) -> Tensor:
    """Scores (B, N) float32 for metric `name`.

    Args:
        features: (B, N, C) SSM or mixer output (unused by "delta" / "random").
        delta: (B, N, H) softplus timescale, needed by "delta" / "delta_l2".
        valid: (B, N) bool, needed by "random".
        scan: `hattn.ScanParams`, needed by the "hattn_*" metrics; reducible: (B, N) bool, the tokens
            that may be removed (their last ones are the queries); params: {"window": int}.
    """
    metric = get_metric(name)
    if metric.source == "scan":
        return metric.fn(scan, reducible, params)
    if metric.source == "random":
        if valid is None:
            valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        return seeded_uniform(valid, seed, salt)
    if metric.source == "delta":
        if delta is None:
            raise ValueError(f"metric {name!r} needs the timescale Delta; this backend or call did not provide it")
        return metric.fn(delta)
    return metric.fn(features)


# -- feature statistics: scores and inverse norms in one pass -------------------------------------------

# metric name -> mode of the kernel (what it accumulates per token)
_KERNEL_MODES = {"clip": 0, "sum": 1, "l1": 2, "l2": 3}

if HAVE_TRITON:  # pragma: no cover - exercised on the GPU machine (or with TRITON_INTERPRET=1)
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

    Scores follow `importance` (larger = more important); the inverse norms feed the cosine
    similarity (`bipartite_match` scales dot products by them).
    """
    get_metric(metric)  # validates the name
    if kernel_available(metric, feats):
        return feature_stats_triton(metric, feats)
    return feature_stats_torch(metric, feats, delta=delta, valid=valid, seed=seed, salt=salt)


def inverse_norm(sq: Tensor) -> Tensor:
    """1 / ||x|| from squared norms; 0 for zero vectors (their cosine with anything is 0, never NaN)."""
    return torch.where(sq > 0, sq.clamp_min(1e-38).rsqrt(), torch.zeros_like(sq))


# == methods ===========================================================================================

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

    Long inputs (|A| |B| >= TILE_MIN_PAIRS per sample) and windowed matching (`window`: only
    B tokens with |pos_b - pos_a| <= window; pos_a / pos_b the tokens' indices) run tiled
    (`row_best`: fused Triton kernel on CUDA, chunked torch twin elsewhere): the same maxima
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


# -- the matching's kernels: scaled row max, tiled best match ---------------------------------------------

if HAVE_TRITON:  # pragma: no cover - (triton, tl: imported with the feature-statistics kernel above)
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
# The dense path (`_best_match`) materialises the (B, RA, RB) float32 similarity: 17 GB for one
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

    The valid B entries come first in the list, ascending by position (stable_partition).
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
        # UTRC's matching and branch rules on ToMe's alternate split instead of the importance split (an
        # ablation: what the importance classification buys)
        Method("utrc_alternate", _tome, "UTRC's branch rules on ToMe's alternate split (ablation)",
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
    return _lookup(_METHODS, "method", name)


# == the anchor: plan, rounds, functional form ==========================================================

class SequenceTooShort(ValueError):
    """A sample has fewer than 2 reducible tokens where the schedule asks to remove some."""


class ReductionShortfall(UserWarning):
    """An anchor removed fewer tokens than its keep ratio asks for (the achieved cut is reported)."""


MAX_ROUNDS = 64  # safety bound; a round removes at least one token or the loop stops


@dataclass
class Rounds:
    """Outcome of one anchor: the reduced branches and state, each round's plan, and per-sample counts
    (requested / removed: (B,) long)."""

    hidden: Tensor
    residual: Optional[Tensor]
    state: TokenState
    plans: list = field(default_factory=list)
    states_before: list = field(default_factory=list)
    requested: Optional[Tensor] = None
    removed: Optional[Tensor] = None


def reduce_rounds(config: ReductionConfig, state: TokenState, r: Tensor, *, hidden: Tensor,
                  residual: Optional[Tensor] = None, features: Optional[Tensor] = None,
                  delta: Optional[Tensor] = None, salt: int = 0, static: Optional[HostSizes] = None,
                  n_protected: int = 0, scan=None) -> Rounds:
    """Remove r[b] tokens of each sample: one plan, repeated on the reduced tokens while a sample
    still lacks removals and the method repeats rounds (bipartite matching removes at most half of
    the reducible tokens per round). Features and Delta follow the residual branch's rule between
    rounds. The first round is exactly `plan_reduction`; later rounds only run when the first falls
    short. Warns `ReductionShortfall` when the target is not reached.

    Args: as plan_reduction; `static` describes the first round (host sizes); n_protected: protected
    tail length on the host for the static path; scan: `hattn.ScanParams` (hidden-attention metrics),
    carried between rounds like Delta.
    """
    out = Rounds(hidden, residual, state, requested=r)
    feats_is_hidden = features is None or features is hidden
    repeat = config.spec.repeat_rounds
    # static path (no padding, one protection for all): every count is a host integer, no syncs
    r_host = static.r if static is not None else None
    remaining, todo = r, r
    prev = None  # (plan, sizes) of the previous round: features / Delta follow it only if a round comes
    for k in range(MAX_ROUNDS):
        if k > 0:
            plan0, sizes0 = prev
            if not feats_is_hidden and features is not None:
                features = plan0.apply(features, "residual", sizes0)
            if delta is not None:
                delta = plan0.apply(delta, "residual", sizes0)
            if scan is not None:
                scan = scan.carry(plan0, sizes0)
        plan = plan_reduction(config, out.state, todo, hidden=out.hidden, residual=out.residual,
                              features=out.hidden if feats_is_hidden else features, delta=delta,
                              salt=salt if k == 0 else salt + 104729 * k, static=static, scan=scan)
        sizes = out.state.sizes
        out.plans.append(plan)
        out.states_before.append(out.state)
        n_before = int(out.hidden.shape[1])
        out.hidden = plan.apply(out.hidden, "hidden", sizes)
        if out.residual is not None:
            out.residual = plan.apply(out.residual, "residual", sizes)
        if static is not None:
            removed_host = n_before - plan.num_out
            r_host -= removed_host
            out.state = plan.next_state(out.state)
            n = plan.num_out
            if not repeat or r_host <= 0 or removed_host == 0 or n - n_protected < 2:
                break
            static = HostSizes(n=n, n_red=n - n_protected, r=r_host)
            todo = torch.full_like(r, r_host)
        else:
            before = out.state.valid.sum(1)
            out.state = plan.next_state(out.state)
            removed = before - out.state.valid.sum(1)
            remaining = (remaining - removed).clamp_min(0)
            if not repeat or int(removed.max()) == 0:
                break
            # stop quietly where nothing reducible is left (the shortfall is reported below)
            todo = torch.where(out.state.reducible.sum(1) >= 2, remaining, torch.zeros_like(remaining))
            if int(todo.max()) <= 0:
                break
        prev = (plan, sizes)
    if r_host is not None:
        out.removed = r - max(r_host, 0)
        if r_host > 0:
            _warn_short(config, int(out.removed[0]), int(r[0]), 0)
    else:
        out.removed = r - remaining
        short = remaining > 0
        if bool(short.any()):
            b = int(short.nonzero()[0, 0])
            _warn_short(config, int(out.removed[b]), int(r[b]), b)
    return out


def _warn_short(config: ReductionConfig, removed: int, asked: int, sample: int) -> None:
    warnings.warn(
        f"{config.method}: an anchor removed {removed} of the {asked} tokens asked for (sample {sample}); "
        f"the achieved cut is below the nominal one (ReductionResult.removed, ForwardReducer.achieved_cut())",
        ReductionShortfall, stacklevel=4)


def plan_reduction(config: ReductionConfig, state: TokenState, r: Tensor, *, hidden: Tensor,
                   residual: Optional[Tensor] = None, features: Optional[Tensor] = None,
                   delta: Optional[Tensor] = None, salt: int = 0, static: Optional[HostSizes] = None,
                   scan=None) -> Plan:
    """One reduction's plan.

    Args:
        hidden: (B, N, D) mixer output. features: (B, N, C) importance / similarity source (the SSM
            output y for metric_source="ssm"; defaults to `hidden`). delta: (B, N, H) timescale.
        r: (B,) tokens to remove per sample.
        static: `HostSizes` (n, n_red, r) host integers when every sample has the same length and
            protection (no padding): the plan is then built without host syncs.
        scan: `hattn.ScanParams` of the anchor's scan, needed by the hidden-attention metrics.
    """
    method = config.spec
    red = state.reducible
    if static is not None:  # every sample full length: sizes are host integers, no sync
        if static.r > 0 and static.n_red < 2:
            raise SequenceTooShort(
                f"sequence too short to reduce: {static.n_red} reducible token(s) "
                f"({static.n} valid, protected tail excluded); need at least 2")
        too_short = None
    else:
        too_short = (r > 0) & (red.sum(1) < 2)
    if too_short is not None and bool(too_short.any()):
        b = int(too_short.nonzero()[0, 0])
        raise SequenceTooShort(
            f"sequence too short to reduce: sample {b} has {int(red[b].sum())} reducible token(s) "
            f"({int(state.valid[b].sum())} valid, protected tail excluded); need at least 2")
    feats = hidden if features is None else features
    scores = inv_norm = None
    metric = config.scoring_metric  # config.metric unless the method scores with its own
    if get_metric(metric).source == "scan":  # hidden attention: scores from the scan, norms from the features
        scores = importance(metric, None, scan=scan, reducible=red, params=config.resolved_params)
        if method.needs_features:
            _, inv_norm = feature_stats("l2", feats)
    elif method.needs_features:  # importance and norms in one pass over the features (`feature_stats`)
        scores, inv_norm = feature_stats(metric, feats, delta=delta, valid=state.valid, seed=config.seed,
                                         salt=salt)
    elif method.metrics:  # a scoring method without similarity features (decimamba)
        scores = importance(metric, feats, delta=delta, valid=state.valid, seed=config.seed, salt=salt)
    ctx = Context(scores=scores, feats=feats, state=state, r=r, rules=config.branch_rules(),
                  causal=config.causal, hidden=hidden, residual=residual, seed=config.seed, salt=salt,
                  static=static, inv_norm=inv_norm, params=config.resolved_params,
                  match_window=config.match_window)
    return method.fn(ctx)


@dataclass
class ReductionResult:
    """Output of `reduce_tokens`: hidden / residual (B, N', D), positions / sizes / valid (B, N');
    plan: the first round's Plan, plans: every round's; requested / removed: (B,) tokens asked for and
    removed (removed < requested only where a method cannot reach the count, e.g. utrc_reference)."""

    hidden: Tensor
    residual: Optional[Tensor]
    positions: Tensor
    sizes: Tensor
    valid: Tensor
    plan: Plan
    plans: list = field(default_factory=list)
    requested: Optional[Tensor] = None
    removed: Optional[Tensor] = None


def reduce_tokens(hidden: Tensor, residual: Optional[Tensor] = None, *, config: ReductionConfig,
                  n_keep, metric: Optional[Tensor] = None, lengths=None, delta: Optional[Tensor] = None,
                  sizes: Optional[Tensor] = None, scan=None) -> ReductionResult:
    """Reduce one layer's tokens (functional form of a single anchor).

    Args:
        hidden: (B, N, D) mixer output (mamba-ssm Block convention); residual: (B, N, D) or None.
        config: method, metric, rules, protection, causality, seed (schedule fields are ignored).
        n_keep: int or (B,) tokens to keep per sample (including protected ones).
        metric: (B, N, C) importance / similarity source; None = computed from `hidden` as
            config.metric says (for utrc_reference: the clipped mixer output, as the authors do).
        lengths: (B,) valid lengths, LEFT-padded (pads first, as the engine feeds Mamba); None = all valid.
        delta: (B, N, H) softplus timescale, for metric "delta".
        sizes: (B, N) token sizes from an earlier reduction (default 1).
        scan: `hattn.ScanParams` (B, N, ...) of the layer's scan, for the hidden-attention metrics.
    Returns:
        ReductionResult with `.hidden`, `.residual`, `.positions` (original index, -1 = pad),
        `.sizes`, `.valid`, `.plan` (`.plans` when several rounds ran), `.requested`, `.removed`.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, N, D), got shape {tuple(hidden.shape)}")
    B, N, _ = hidden.shape
    dev = hidden.device
    if lengths is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=dev)
    else:
        lengths = torch.as_tensor(lengths, device=dev).long().reshape(B)
        if bool(((lengths < 0) | (lengths > N)).any()):
            raise ValueError(f"lengths must be in [0, {N}], got {lengths.tolist()}")
        valid = torch.arange(N, device=dev)[None, :] >= (N - lengths)[:, None]
    n_keep_t = torch.as_tensor(n_keep, device=dev).long().expand(B)
    n_valid = valid.sum(1)
    if bool(((n_keep_t < 1) & (n_valid > 0)).any()):
        raise ValueError(f"n_keep must be >= 1, got {n_keep}")
    state = TokenState.initial(valid, protect_last=config.protect_last, protect_from=config.protect_from)
    if sizes is not None:
        state.sizes = sizes.float() * valid
    r = (n_valid - torch.minimum(n_keep_t, n_valid)).clamp_min(0)
    if config.method == "utrc_reference" and metric is None:
        metric = hidden
    source = metric if metric is not None else hidden
    rounds = reduce_rounds(config, state, r, hidden=hidden, residual=residual, features=source, delta=delta,
                           scan=scan)
    nxt = rounds.state
    return ReductionResult(rounds.hidden, rounds.residual, nxt.positions, nxt.sizes, nxt.valid, rounds.plans[0],
                           rounds.plans, rounds.requested, rounds.removed)

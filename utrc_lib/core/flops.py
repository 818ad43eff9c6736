"""Analytic FLOPs of a Mamba / Mamba-2 forward (prefill), dense and with token reduction.

Glossary (utrc_lib/GLOSSARY.md; the letters used below):
    B  batch                         n_l  tokens processed by layer l (n_0 = seq_len)
    D  model width (d_model)         Di   SSM inner width (D' in prose) = expand * D (d_inner)
    S  SSM state size (d_state)      K    depthwise conv kernel width (d_conv)
    Rdt dt rank (Mamba-1)            H    heads, P head dim (Mamba-2; Di = H * P), G groups
    Q  SSD chunk size (Mamba-2)      T    n padded up to a multiple of Q; c = T / Q chunks
    V  vocabulary size               L    layers; rho per-anchor keep ratio
    C  feature width of the reduction's metric / similarity (Di for metric_source="ssm", D for "mixer")
    N  tokens entering one reduction; |A| = floor(N/2), |B| = N - |A| the two halves

Conventions (docs/method.md §1.5; the spec asks for in_proj, conv, scan, out_proj, norm, LM head and the reduction's
own cost):
    * A multiply-add is 2 FLOPs; a matmul (m x k) @ (k x n) is 2 m k n, exactly as
      `torch.utils.flop_counter.FlopCounterMode` counts it. Bias additions are not counted (the
      counter ignores them too).
    * Element-wise ops (add, mul, compare, exp, log, rsqrt, div) are 1 FLOP per element; silu = 4,
      softplus = 3. These components are approximate (they are not matmuls, so no counter checks
      them) and small next to the projections.
    * Sorts, argmax and top-k are comparisons, not FLOPs: reported separately
      (`FlopsReport.reduction_comparisons`, n log2 n per sort of n items).
    * Embedding lookup = 0 FLOPs.
    * The counts follow the transformers torch path (the one this project runs on CPU):
        - conv1d is `F.conv1d(..., padding=K-1)` then sliced, so it computes n + K - 1 outputs per
          channel: 2 * C_conv * K * (n + K - 1) per sample;
        - Mamba-1 scan (`mamba_selective_scan`, sequential path): per token the state update
          h = exp(dt A) * h + dt B x (element-wise, 6 Di S + 11 Di FLOPs incl. softplus, D skip and the
          silu(z) gate) and the output y = h @ C, a (Di x S) @ (S x 1) matmul: 2 Di S;
        - Mamba-2 SSD (`mamba2_chunk_scan`): the sequence is padded to T = c Q and the five einsums
          of the chunked scan cost, per sample,
              G      = C B^T within a chunk      bclhn,bcshn->bclsh   2 c Q^2 H S
              Y_diag = (G * L) x                 bclsh,bcshp->bclhp   2 c Q^2 H P
              states = (B * decay)^T x            bclhn,bclhp->bchpn   2 T H P S
              inter-chunk recurrence             bzch,bzhpn->bchpn    2 (c+1)^2 H P S
              Y_off  = C states                  bclhn,bchpn->bclhp   2 T H S P
          plus element-wise work (segment sums, decays, masks, D residual; approximate);
        - Mamba-2 gated RMSNorm: y * silu(z), then RMSNorm per group: 9 Di + G per token.
      The fused CUDA kernels do the same matmul work up to the conv padding.
    * LM head: 2 D V per position, on all seq_len positions for logits="all" (the engine scatters
      reduced tokens back to full length before the head) or on 1 position for logits="last". The
      final RMSNorm runs on all seq_len positions.
    * Reduction cost at an anchor that removes r > 0 tokens of N (none when r = 0, as the engine
      skips it): importance 2 N C + N (clip, sum, scale); similarity 2 N C (squared norms) +
      2 |A| |B| C (dot products of the A x B halves) + |A| |B| + |A| (scaling by inverse norms;
      utrc_reference L2-normalises instead: 3 N C); merge 4 N D (size-weighting and division on both the
      hidden and the residual branch). Comparisons: N log2 N (importance sort) + |A| |B| (argmax
      over B) + |A| log2 |A| (edge sort). Per method: "evit" has no similarity, "tome" no importance,
      "random" only the merge (gather), "utrc_reference" works on the mixer output (C = D) and also
      sorts every channel along the tokens (D N log2 N comparisons).

Shapes of the torch path (per layer, one sample): hidden (n, D) -> in_proj (n, 2E) [Mamba-1] or
(n, 2E + 2GS + H) [Mamba-2] -> conv over (Di or Di + 2GS channels, n + K - 1) -> x_proj (n, Rdt + 2S)
-> dt_proj (Di, n) [Mamba-1] -> scan y (n, Di) -> [gated norm (n, Di)] -> out_proj (n, D).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from .shapes import PAPER_NAMES, _get, read_mamba_ssm_config, shape_config

SUPPORTED = ("transformers MambaForCausalLM / Mamba2ForCausalLM (or their MambaModel / Mamba2Model), "
             "transformers MambaConfig / Mamba2Config, a mamba-ssm MambaConfig-like object "
             "(d_model, n_layer, vocab_size, ssm_cfg)")

MATMUL_COMPONENTS = ("in_proj", "conv1d", "x_proj", "dt_proj", "ssm_scan", "out_proj", "lm_head")
REDUCTION_COMPONENTS = ("reduction_importance", "reduction_similarity", "reduction_merge")

# Which parts of the reduction each method pays for (default: all three).
_METHOD_PARTS = {
    "none": (),
    "random": ("merge",),
    "evit": ("importance", "merge"),
    "tome": ("similarity", "merge"),
    # SSM-native methods (docs/ssm_methods.md): pure pruning pays its score and the gather
    "decimamba": ("importance", "merge"),
    "hattn_prune": ("importance", "merge"),
    "mtr_style": ("importance", "similarity", "merge"),
    "adjacent_merge": ("importance", "similarity", "merge"),
}
# methods whose similarity is not the |A| x |B| bipartite matmul
_SIMILARITY_KIND = {"mtr_style": "sources_x_targets", "adjacent_merge": "adjacent"}


def scoring_flops(shape: "ModelShape", n: int, metric: str, window: int = 8) -> int:
    """Approximate FLOPs of one anchor's importance score on n tokens for the Delta and hidden-attention
    metrics (per sample); None for the feature metrics (2 N C + N, counted by reduction_flops).

    Delta: softplus is the host's; the mean / L2 norm over Ch is 2 N Ch. Hidden attention (core/hattn.py),
    Ch = H (Mamba-2, scalar A per head) or Di (Mamba-1, A per channel and state): window / last rows
    (q = window or 1): Mamba-2 q N (2 G S + 5 H), Mamba-1 5 q N Di S; column sums (one reverse scan):
    Mamba-2 N (5 H S + 2 H), Mamba-1 N (5 Di S + 2 Di); decay-free: q N (2 G S + 3 H) (Mamba-1: G = 1,
    H -> Di). Mamba-2 also recomputes B and C through the conv: 2 GS (2 K + 4) N.
    """
    m2 = shape.kind == "mamba2"
    Ch = shape.n_heads if m2 else shape.d_inner
    G = shape.n_groups if m2 else 1
    S = shape.d_state
    if metric in ("delta", "delta_l2"):
        return 2 * n * Ch
    if not metric.startswith("hattn_"):
        return None
    q = 1 if metric == "hattn_last" else max(1, min(window, n))
    if metric == "hattn_colsum":
        core = n * (5 * Ch * S + 2 * Ch)
    elif metric == "hattn_nodecay":
        core = q * n * (2 * G * S + 3 * Ch)
    else:
        core = q * n * (2 * G * S + 5 * Ch) if m2 else 5 * q * n * Ch * S
    conv = 2 * G * S * (2 * shape.d_conv + 4) * n if m2 else 0
    return core + conv


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Dimensions that determine the FLOPs of a Mamba (kind="mamba1") or Mamba-2 (kind="mamba2") LM."""

    kind: str
    d_model: int
    n_layer: int
    vocab_size: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int = 0        # Mamba-1 only
    n_heads: int = 0        # Mamba-2 only
    head_dim: int = 0       # Mamba-2 only
    n_groups: int = 1       # Mamba-2 only
    chunk_size: int = 256   # Mamba-2 only

    @property
    def conv_channels(self) -> int:
        return self.d_inner if self.kind == "mamba1" else self.d_inner + 2 * self.n_groups * self.d_state


@dataclasses.dataclass
class FlopsReport:
    """FLOPs of one forward (prefill) of `batch` sequences of `seq_len` tokens.

    Attributes:
        dense / reduced: total FLOPs without / with the reduction (reduced includes the overhead).
        reduction_overhead: FLOPs of the reduction itself (importance + similarity + merge).
        reduction_comparisons: comparisons of its sorts / argmax (not FLOPs).
        flops_cut: 1 - reduced / dense, the *analytic FLOPs cut* (also `analytic_cut`).
        token_layer_fraction: mean over layers of n_l / seq_len (the paper's definition; 1 = dense);
            `token_layer_cut` = 1 - token_layer_fraction, the *token-layer cut* the figures' x-axes use.
        tokens_per_layer: n_l for each layer.
        matmul_only / matmul_only_reduced: FLOPs of the matmul-like components only (MATMUL_COMPONENTS),
            the figure `FlopCounterMode` gives for the dense / reduced model (reduction matmuls excluded).
        reduction_matmul: the reduction's matmul FLOPs (cosine similarity, 2 |A| |B| C per anchor),
            included in reduction_overhead; matmul_only_reduced + reduction_matmul is what the counter
            sees on the patched model.
        breakdown: {"dense": {component: FLOPs}, "reduced": {component: FLOPs}}.
    """

    model: str
    seq_len: int
    batch: int
    logits: str
    layers: tuple
    keep_ratio: float
    dense: int
    reduced: int
    reduction_overhead: int
    reduction_comparisons: int
    flops_cut: float
    token_layer_fraction: float
    tokens_per_layer: list
    matmul_only: int
    matmul_only_reduced: int
    reduction_matmul: int
    breakdown: dict

    @property
    def analytic_cut(self) -> float:
        """1 - reduced / dense FLOPs (every component counted, the reduction's own cost included)."""
        return self.flops_cut

    @property
    def token_layer_cut(self) -> float:
        """The paper's cut: 1 - mean over layers of the fraction of tokens each layer processes."""
        return 1.0 - self.token_layer_fraction

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists), with both cuts named apart."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["analytic_cut"], d["token_layer_cut"] = self.analytic_cut, self.token_layer_cut
        return d


# -- model shape ----------------------------------------------------------------------------------
def model_shape(model_or_config) -> ModelShape:
    """ModelShape of a transformers Mamba / Mamba-2 model or config, or a mamba-ssm-like config.

    Raises ValueError for anything else (the message names the supported types).
    """
    obj = model_or_config
    cfg = getattr(obj, "config", None)
    if cfg is not None and _get(cfg, "model_type") in ("mamba", "mamba2"):
        obj = cfg
    model_type = _get(obj, "model_type")
    try:
        if model_type == "mamba":
            return ModelShape(
                kind="mamba1", d_model=int(obj.hidden_size), n_layer=int(obj.num_hidden_layers),
                vocab_size=int(obj.vocab_size), d_inner=int(obj.intermediate_size),
                d_state=int(obj.state_size), d_conv=int(obj.conv_kernel), dt_rank=int(obj.time_step_rank))
        if model_type == "mamba2":
            return ModelShape(
                kind="mamba2", d_model=int(obj.hidden_size), n_layer=int(obj.num_hidden_layers),
                vocab_size=int(obj.vocab_size), d_inner=int(obj.expand * obj.hidden_size),
                d_state=int(obj.state_size), d_conv=int(obj.conv_kernel), n_heads=int(obj.num_heads),
                head_dim=int(obj.head_dim), n_groups=int(obj.n_groups), chunk_size=int(obj.chunk_size))
        if model_type is None and all(_get(obj, k) is not None for k in ("d_model", "n_layer", "vocab_size")):
            return _mamba_ssm_shape(obj)
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"incomplete {type(model_or_config).__name__}: {exc}; supported: {SUPPORTED}") from exc
    raise ValueError(f"unsupported model or config {type(model_or_config).__name__} "
                     f"(model_type={model_type!r}); supported: {SUPPORTED}")


def _mamba_ssm_shape(cfg) -> ModelShape:
    """mamba-ssm `MambaConfig` (mamba_ssm.models.config_mamba) or an object / dict with its fields,
    read by `core.shapes.read_mamba_ssm_config` (mamba-ssm's defaults; ssm_cfg fields that do not
    change the shape are ignored)."""
    m = read_mamba_ssm_config(cfg)
    if m.d_intermediate:
        raise ValueError("mamba-ssm configs with an MLP (d_intermediate > 0) are not supported")
    if m.attn_layer_idx:
        raise ValueError("mamba-ssm hybrid configs with attention layers are not supported")
    common = dict(d_model=m.d_model, n_layer=m.n_layer, vocab_size=m.padded_vocab, d_inner=m.d_inner,
                  d_state=int(m.mixer["d_state"]), d_conv=int(m.mixer["d_conv"]))
    if m.arch == "mamba":
        return ModelShape(kind="mamba1", dt_rank=m.dt_rank, **common)
    return ModelShape(kind="mamba2", n_heads=m.n_heads, head_dim=int(m.mixer["headdim"]),
                      n_groups=int(m.mixer["ngroups"]), chunk_size=int(m.mixer["chunk_size"]), **common)


# -- per-layer formulas ---------------------------------------------------------------------------
def layer_flops(shape: ModelShape, n: int, batch: int = 1) -> dict[str, int]:
    """FLOPs of one block (RMSNorm + mixer + residual add) on `n` tokens, for `batch` samples.

    Args:
        shape: model dimensions.
        n: tokens the layer processes (per sample).
        batch: samples.
    Returns:
        {component: FLOPs}; the matmul components are exact for the transformers torch path.
    """
    D, Di, S, K = shape.d_model, shape.d_inner, shape.d_state, shape.d_conv
    out = dict.fromkeys(("block_norm", "in_proj", "conv1d", "activations", "x_proj", "dt_proj", "ssm_scan",
                         "ssm_elementwise", "gated_norm", "out_proj", "residual_add"), 0)
    if n <= 0:
        return out
    out["block_norm"] = 4 * n * D
    out["residual_add"] = n * D
    out["conv1d"] = 2 * shape.conv_channels * K * (n + K - 1)
    out["activations"] = 4 * n * shape.conv_channels  # silu after the conv
    out["out_proj"] = 2 * n * Di * D
    if shape.kind == "mamba1":
        Rdt = shape.dt_rank
        out["in_proj"] = 2 * n * D * 2 * Di
        out["x_proj"] = 2 * n * Di * (Rdt + 2 * S)
        out["dt_proj"] = 2 * n * Rdt * Di
        out["ssm_scan"] = 2 * n * Di * S                  # y_t = h_t @ C_t
        out["ssm_elementwise"] = n * (6 * Di * S + 11 * Di)  # exp(dt A), dt B x, h update, softplus, D, gate
    else:
        H, P, G, Q = shape.n_heads, shape.head_dim, shape.n_groups, shape.chunk_size
        c = -(-n // Q)
        T = c * Q
        out["in_proj"] = 2 * n * D * (2 * Di + 2 * G * S + H)
        out["ssm_scan"] = (2 * c * Q * Q * H * S        # G = C B^T
                           + 2 * c * Q * Q * H * P      # Y_diag
                           + 2 * T * H * P * S          # chunk states
                           + 2 * (c + 1) ** 2 * H * P * S  # inter-chunk recurrence
                           + 2 * T * H * S * P)         # Y_off = C states
        out["ssm_elementwise"] = (5 * n * H + T * (5 * Di + 5 * H + H * S)
                                  + 3 * c * Q * Q * H + 2 * (c + 1) ** 2 * H)
        out["gated_norm"] = n * (9 * Di + G)
    return {k: v * batch for k, v in out.items()}


def reduction_flops(shape: ModelShape, n: int, r: int, *, batch: int = 1, method: str = "utrc",
                    feature_width: Optional[int] = None, metric: str = "clip", window: int = 8,
                    keep_fraction: float = 0.5) -> tuple[dict[str, int], int, int]:
    """Cost of one reduction that removes `r` of `n` tokens (per sample).

    Args:
        shape: model dimensions.
        n: tokens entering the reduction (N); r: tokens removed (0 -> no cost).
        batch: samples.
        method: reduction method name (selects the parts paid, see the module docstring).
        feature_width: C; default d_inner (metric_source="ssm").
        metric: the scoring metric (ReductionConfig.scoring_metric); Delta and hidden-attention metrics
            are counted by `scoring_flops` (window: their query rows). keep_fraction: mtr_style's.
    Returns:
        ({reduction component: FLOPs}, comparisons, FLOPs of the similarity matmul (2 |A| |B| C for
        the bipartite methods, 2 r |targets| C for mtr_style), part of reduction_similarity).
    """
    out = dict.fromkeys(REDUCTION_COMPONENTS, 0)
    if r <= 0 or n <= 0:
        return out, 0, 0
    D = shape.d_model
    C = shape.d_inner if feature_width is None else feature_width
    if method == "utrc_reference":
        C = D
    parts = _METHOD_PARTS.get(method, ("importance", "similarity", "merge"))
    a, b = n // 2, n - n // 2
    cmp = matmul = 0
    if "importance" in parts:
        own = scoring_flops(shape, n, metric, window)
        out["reduction_importance"] = 2 * n * C + n if own is None else own
        cmp += math.ceil(n * math.log2(n)) if n > 1 else 0
    kind = _SIMILARITY_KIND.get(method)
    if "similarity" in parts and kind == "adjacent":  # cosine of N - 1 neighbouring pairs: no matmul
        out["reduction_similarity"] = 2 * n * C + 2 * (n - 1) * C + 2 * (n - 1)
        cmp += 2 * n
    elif "similarity" in parts and kind == "sources_x_targets":
        targets = max(1, (n - r) - math.ceil((n - r) * keep_fraction))
        matmul = 2 * r * targets * C
        out["reduction_similarity"] = 2 * n * C + r * targets + r + matmul
        cmp += r * targets
    elif "similarity" in parts:
        matmul = 2 * a * b * C
        # norms 2 N C (squares, sums) + scaling |A| |B| + |A|; the reference mode normalises (3 N C)
        out["reduction_similarity"] = (3 * n * C if method == "utrc_reference" else 2 * n * C + a * b + a) + matmul
        cmp += a * b + (math.ceil(a * math.log2(a)) if a > 1 else 0)
    if "merge" in parts:
        out["reduction_merge"] = 4 * n * D
    if method == "utrc_reference" and n > 1:
        cmp += math.ceil(D * n * math.log2(n))
    return {k: v * batch for k, v in out.items()}, cmp * batch, matmul * batch


# -- whole model ----------------------------------------------------------------------------------
def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def count(shape: ModelShape, seq_len: int, layers=(), keep_ratio: float = 1.0, *, batch: int = 1,
          logits: str = "all", method: str = "utrc", feature_width: Optional[int] = None,
          model_name: str = "", align: int = 1, metric: str = "clip", params: Optional[dict] = None,
          counts: Optional[list] = None) -> FlopsReport:
    """FlopsReport for explicit reduction settings (no ReductionConfig needed).

    Args:
        shape: model dimensions (see `model_shape`).
        seq_len: tokens per sample; batch: samples.
        layers: reduce after these 0-based layers; keep_ratio: per-anchor rho in (0, 1].
        logits: "all" (head on every position) or "last" (one position).
        method: reduction method name; feature_width: C (default d_inner).
        align: kept counts rounded to multiples of `align` (ReductionConfig.align).
        metric: the scoring metric; params: resolved method / metric params (window, keep_fraction).
        counts: tokens per layer, given (an absolute budget); default from keep_ratio and align.
    Returns:
        FlopsReport.
    """
    from .config import tokens_per_layer

    _check_int("seq_len", seq_len)
    _check_int("batch", batch)
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    L = shape.n_layer
    layers = tuple(sorted(layers))
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < L - 1]
    if bad:
        raise ValueError(f"reduction layer {bad[0]!r} out of range for a {L}-layer model (valid 0..{L - 2})")
    if method == "none":
        layers = ()
    if counts is None or method == "none":
        counts = [int(x) for x in tokens_per_layer(seq_len, L, layers, float(keep_ratio), exact=True, align=align)]
    params = params or {}

    def model_parts(ns):
        total: dict[str, int] = {}
        for n in ns:
            for k, v in layer_flops(shape, n, batch).items():
                total[k] = total.get(k, 0) + v
        total["final_norm"] = 4 * seq_len * shape.d_model * batch
        total["lm_head"] = 2 * (seq_len if logits == "all" else 1) * shape.d_model * shape.vocab_size * batch
        total["embedding"] = 0
        return total

    dense = model_parts([seq_len] * L)
    reduced = model_parts(counts)
    overhead = dict.fromkeys(REDUCTION_COMPONENTS, 0)
    comparisons = red_matmul = 0
    for l in layers:
        n_in = counts[l]
        n_out = counts[l + 1]
        parts, cmp, mm = reduction_flops(shape, n_in, n_in - n_out, batch=batch, method=method,
                                         feature_width=feature_width, metric=metric,
                                         window=int(params.get("window", 8)),
                                         keep_fraction=float(params.get("keep_fraction", 0.5)))
        for k, v in parts.items():
            overhead[k] += v
        comparisons += cmp
        red_matmul += mm
    reduced.update(overhead)
    dense.update(dict.fromkeys(REDUCTION_COMPONENTS, 0))
    dense_total, reduced_total = sum(dense.values()), sum(reduced.values())
    return FlopsReport(
        model=model_name or f"{shape.kind} d_model={shape.d_model} L={L}",
        seq_len=seq_len, batch=batch, logits=logits, layers=layers, keep_ratio=float(keep_ratio),
        dense=dense_total, reduced=reduced_total, reduction_overhead=sum(overhead.values()),
        reduction_comparisons=comparisons, flops_cut=1.0 - reduced_total / dense_total,
        token_layer_fraction=sum(counts) / (L * seq_len), tokens_per_layer=counts,
        matmul_only=sum(dense.get(k, 0) for k in MATMUL_COMPONENTS),
        matmul_only_reduced=sum(reduced.get(k, 0) for k in MATMUL_COMPONENTS),
        reduction_matmul=red_matmul,
        breakdown={"dense": dense, "reduced": reduced})


def flops(model_or_config: Any, seq_len: int, config=None, *, batch: int = 1, logits: str = "all") -> FlopsReport:
    """Analytic FLOPs of a prefill forward, dense and with the reduction `config`.

    Args:
        model_or_config: transformers MambaForCausalLM / Mamba2ForCausalLM (or the bare models), their
            MambaConfig / Mamba2Config, or a mamba-ssm MambaConfig-like object.
        seq_len: tokens per sample (n_0).
        config: a `utrc_lib.ReductionConfig`, or None for dense. Its layers / keep ratio are resolved
            for the model depth; after each anchor n <- ceil(n * rho) (rounded per config.align).
        batch: samples (all of length seq_len).
        logits: "all" (LM head on all seq_len positions) or "last" (one position).
    Returns:
        FlopsReport (dense and reduced totals, per-component breakdown, token-layer fraction, ...).
    Raises:
        ValueError: unsupported model / config type, bad seq_len / batch / logits, out-of-range layers.
    """
    shape = model_shape(model_or_config)
    if config is None:
        return count(shape, seq_len, (), 1.0, batch=batch, logits=logits, method="none")
    from .config import ReductionConfig

    if not isinstance(config, ReductionConfig):
        raise ValueError(f"config must be a utrc_lib.ReductionConfig or None, got {type(config).__name__}")
    L = shape.n_layer
    layers = config.resolve_layers(L)
    rho = config.resolve_keep_ratio(L)
    width = shape.d_model if config.metric_source == "mixer" else shape.d_inner
    counts = None
    if config.absolute_budget:  # the method's own count per anchor (decimamba without a ratio)
        counts, n, anchors = [], seq_len, sorted(layers)
        for layer in range(L):
            counts.append(n)
            if layer in anchors:
                tail = min(config.protect_last, n)
                n = tail + config.spec.budget(n - tail, anchors.index(layer), config.resolved_params)
    return count(shape, seq_len, layers, rho, batch=batch, logits=logits, method=config.method,
                 feature_width=width, align=config.align, metric=config.scoring_metric,
                 params=config.resolved_params, counts=counts)


# -- table ----------------------------------------------------------------------------------------
# the paper's models by the paper's names: a view of the one table, `core.shapes.SHAPES`
PAPER_SHAPES = {paper: shape_config(name)[1] for paper, name in PAPER_NAMES.items()}


def flops_table_rows(cuts=(0.1, 0.2, 0.3), seq_len: int = 2048, models=("Mamba-2-2.7B", "Mamba-2-1.3B"),
                     method: str = "utrc", logits: str = "all") -> list[dict]:
    """Rows of target cut -> keep ratio -> token-layer fraction -> analytic FLOPs cut, default anchors.

    Args:
        cuts: token-layer FLOPs cuts (the paper's definition) to solve keep ratios for.
        seq_len: prompt length for the analytic count (paper: 2048).
        models: keys of PAPER_SHAPES.
        method, logits: as in `flops`.
    Returns:
        list of dicts (model, layers, anchors, cut, keep_ratio, token_layer_fraction, analytic_cut,
        overhead_pct, dense_tflops).
    """
    from .config import default_layers, keep_ratio_for_flops

    rows = []
    for name in models:
        shape = _mamba_ssm_shape(PAPER_SHAPES[name])
        L = shape.n_layer
        layers = default_layers(L)
        for cut in cuts:
            rho = keep_ratio_for_flops(cut, L, layers)
            rep = count(shape, seq_len, layers, rho, method=method, logits=logits, model_name=name)
            rows.append(dict(model=name, layers=L, anchors=layers, cut=cut, keep_ratio=rho,
                             token_layer_fraction=rep.token_layer_fraction, analytic_cut=rep.flops_cut,
                             overhead_pct=100.0 * rep.reduction_overhead / rep.dense,
                             dense_tflops=rep.dense / 1e12))
    return rows


def flops_table_markdown(cuts=(0.1, 0.2, 0.3), seq_len: int = 2048,
                         models=("Mamba-2-2.7B", "Mamba-2-1.3B"), method: str = "utrc",
                         logits: str = "all") -> str:
    """Markdown table of `flops_table_rows` (one row per model and cut)."""
    rows = flops_table_rows(cuts, seq_len, models, method, logits)
    lines = [f"Analytic prefill FLOPs, seq_len={seq_len}, batch 1, logits={logits!r}, method={method!r}, "
             f"default anchors (token-layer fraction with integer token counts):", "",
             "| model | L | anchors | target cut | keep ratio | token-layer fraction | analytic FLOPs cut "
             "| overhead (% dense) | dense TFLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        anchors = f"{r['anchors'][0]}..{r['anchors'][-1]} ({len(r['anchors'])})"
        lines.append(f"| {r['model']} | {r['layers']} | {anchors} | {r['cut']:.0%} | {r['keep_ratio']:.4f} | "
                     f"{r['token_layer_fraction']:.4f} | {r['analytic_cut']:.2%} | {r['overhead_pct']:.3f} | "
                     f"{r['dense_tflops']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    from .methods import available_methods

    p = argparse.ArgumentParser(prog="python -m utrc_lib.flops",
                                description="Analytic FLOPs table for the paper's default anchors: the analytic "
                                            "FLOPs cut beside the token-layer cut (the paper's definition).")
    p.add_argument("--seq-len", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--cuts", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                   help="target token-layer cuts, each in [0, 1) (default 0.1 0.2 0.3)")
    p.add_argument("--models", nargs="+", default=["Mamba-2-2.7B", "Mamba-2-1.3B"], choices=sorted(PAPER_SHAPES),
                   help="paper model shapes (default Mamba-2-2.7B Mamba-2-1.3B)")
    p.add_argument("--method", default="utrc", choices=available_methods(),
                   help="reduction method whose own cost is counted (default utrc)")
    p.add_argument("--logits", default="all", choices=["all", "last"],
                   help="LM head over all positions or the last one only (default all)")
    a = p.parse_args(argv)
    bad = [c for c in a.cuts if not 0.0 <= c < 1.0]
    if bad or a.seq_len < 1:
        p.error(f"--cuts must be in [0, 1) (got {bad})" if bad else f"--seq-len must be >= 1 (got {a.seq_len})")
    print(flops_table_markdown(tuple(a.cuts), a.seq_len, tuple(a.models), a.method, a.logits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

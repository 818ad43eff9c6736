"""Importance metrics: (B, N, C) features -> (B, N) scores; larger = more important.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, C feature width: Di for the SSM output y, D for the
mixer output, H heads or Di channels for the timescale Delta).

Paper §3 (Table 3): scores = (1/Di) sum_d max(0, y_d) ("clip"; the paper's S) beat l1, l2 and the unclipped sum.
The timescale metrics read the softplus timescale Delta (B, N, H or Di), which the host hands in:
"delta" is its MEAN over heads (channels), as an MTR summary describes it (docs/ssm_methods.md §3);
"delta_l2" its L2 NORM over heads (channels), as DeciMamba's released code scores (§1). They rank
tokens differently when heads disagree. "delta" keeps its mean (committed numbers used it).
The hidden-attention metrics ("hattn_*", core/hattn.py, §2) read the scan's Delta, B, C and A
(`ScanParams`) and take their queries from the context, never the protected tail.
"random" draws batch-independent scores from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import hattn
from .params import Param

Tensor = torch.Tensor


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


def _random(x: Tensor) -> Tensor:  # replaced by seeded scores in `importance`
    raise RuntimeError("random scores are drawn by utrc_lib.metrics.importance")


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
        Metric("random", _random, "random", "seeded uniform scores, batch independent"),
    )
}


def available_metrics() -> list[str]:
    return list(_METRICS)


def get_metric(name: str) -> Metric:
    try:
        return _METRICS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(_METRICS)}") from None


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

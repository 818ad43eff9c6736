"""Importance metrics: (B, N, C) features -> (B, N) scores; larger = more important.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, C feature width: Di for the SSM output y, D for the
mixer output, H heads or Di channels for the timescale Delta).

Paper §3 (Table 3): scores = (1/Di) sum_d max(0, y_d) ("clip"; the paper's S) beat l1, l2 and the unclipped sum.
"delta" follows MTR / DeciMamba: mean over heads (channels) of softplus(dt); the backend hands the
softplus timescale in as the features. "random" draws batch-independent scores from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Tensor], Tensor]
    source: str  # "features" (SSM/mixer output), "delta" (timescale), or "random"
    doc: str


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
    return dt.float().mean(-1)


def _random(x: Tensor) -> Tensor:  # replaced by seeded scores in `importance`
    raise RuntimeError("random scores are drawn by utrc_lib.metrics.importance")


_METRICS: dict[str, Metric] = {
    m.name: m for m in (
        Metric("clip", _clip, "features", "channel mean of max(0, y) (paper)"),
        Metric("sum", _sum, "features", "channel mean of y, unclipped"),
        Metric("l1", _l1, "features", "channel mean of |y|"),
        Metric("l2", _l2, "features", "L2 norm of y"),
        Metric("delta", _delta, "delta", "mean softplus timescale Delta (MTR / DeciMamba)"),
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
               valid: Tensor | None = None, seed: int = 0, salt: int = 0) -> Tensor:
    """Scores (B, N) float32 for metric `name`.

    Args:
        features: (B, N, C) SSM or mixer output (unused by "delta" / "random").
        delta: (B, N, H) softplus timescale, needed by "delta".
        valid: (B, N) bool, needed by "random".
    """
    metric = get_metric(name)
    if metric.source == "random":
        if valid is None:
            valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        return seeded_uniform(valid, seed, salt)
    if metric.source == "delta":
        if delta is None:
            raise ValueError("metric 'delta' needs the timescale Delta; this backend or call did not provide it")
        return metric.fn(delta)
    return metric.fn(features)

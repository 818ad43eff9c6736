"""Layer schedules: where to reduce, and how much to keep at each reduction layer.

Glossary: utrc_lib/GLOSSARY.md (L layers, N tokens, rho keep ratio per anchor, r tokens removed at one
anchor).

Paper (docs/method.md §1): reduce after layers 12, 17, ..., 42 (0-based) for 64-layer models and after
10, 15, ..., 35 for 48-layer models, the same keep ratio rho at each anchor. A reduction "after
layer l" shortens the input of layer l + 1 onward. The FLOPs reduction the authors report is the
token-layer fraction: 1 - mean over layers of (tokens that layer processes / N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

# Anchors of the paper for its two depths (docs/method.md §1).
DEFAULT_ANCHORS = {
    64: tuple(range(12, 43, 5)),  # 12, 17, 22, 27, 32, 37, 42
    48: tuple(range(10, 36, 5)),  # 10, 15, 20, 25, 30, 35
}


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Reduction layers for a model of `num_layers` layers.

    64 and 48 layers use the paper's anchors. Any other depth follows the paper's general rule
    scaled to depth: start at about a fifth of the depth (the paper starts at 12 of 64 and 10 of 48),
    then every max(2, round(L / 10)) layers, stopping before the last sixth of the network (the
    paper's last anchor is 42 of 64 and 35 of 48). A 12-layer model gets 2, 4, 6, 8.
    Small models (L < 4) get a single anchor after layer 0.
    """
    if num_layers in DEFAULT_ANCHORS:
        return DEFAULT_ANCHORS[num_layers]
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers < 4:
        return (0,) if num_layers > 1 else ()
    start = max(1, round(num_layers * 0.2))
    step = max(2, round(num_layers / 10))
    stop = num_layers - max(1, num_layers // 6)  # no anchor at or after this layer
    layers = tuple(range(start, stop, step))
    return layers or (num_layers // 2,)


def kept_tokens(n, keep_ratio: float, align: int = 1):
    """Tokens an anchor keeps of n: ceil(n * rho) (docs/method.md §2: r = n - ceil(n * rho)); with
    align > 1 rounded to the nearest multiple of `align` (halves up), at least `align`, at most n.

    `n` is an int (host counts) or a (B,) long tensor (per-sample valid lengths); both follow the
    same float64 arithmetic, so host and device counts agree.
    """
    if isinstance(n, torch.Tensor):
        k = torch.ceil(n.double() * keep_ratio - 1e-9).long()
        if align > 1:
            k = (torch.floor(k.double() / align + 0.5).long() * align).clamp_min(align)
        return torch.minimum(k, n)
    k = math.ceil(n * keep_ratio - 1e-9)
    if align > 1:
        k = max(align, int(math.floor(k / align + 0.5)) * align)
    return min(int(n), k)


def tokens_to_remove(valid: torch.Tensor, keep_ratio: float, align: int = 1) -> torch.Tensor:
    """(B,) r = n - kept_tokens(n) with n each sample's valid length (per sample, docs/method.md §3.3)."""
    n = valid.sum(1)
    return (n - kept_tokens(n, keep_ratio, align)).clamp_min(0)


@dataclass(frozen=True)
class Schedule:
    """Where and how much, resolved once for one model depth (`ReductionConfig.resolve`).

    layers: anchors (reduce after these 0-based layers); ratios: {anchor: keep ratio rho}; align:
    kept counts rounded to multiples of it. Each anchor reads its own ratio (`ratio(layer)`); nothing
    is solved again per forward.
    """

    num_layers: int
    layers: tuple
    keep_ratio: float
    align: int = 1
    ratios: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.ratios:
            object.__setattr__(self, "ratios", {l: self.keep_ratio for l in self.layers})
        object.__setattr__(self, "anchors", frozenset(self.layers))  # derived, for membership tests

    def ratio(self, layer: int) -> float:
        return self.ratios[layer]

    def kept(self, n, layer: int):
        """Tokens kept of n (int or (B,) tensor) at anchor `layer`."""
        return kept_tokens(n, self.ratios[layer], self.align)


def tokens_per_layer(seq_len: int, num_layers: int, layers: Sequence[int], keep_ratio: float,
                     *, exact: bool = True, align: int = 1) -> list[float]:
    """Tokens processed by each of the `num_layers` layers.

    With `exact=True` counts are integers, as the engine computes them: n <- kept_tokens(n, rho,
    align) at each anchor. With `exact=False` counts are real: n <- n * rho.
    """
    counts, n = [], float(seq_len)
    anchors = set(layers)
    for layer in range(num_layers):
        counts.append(n)
        if layer in anchors:
            n = kept_tokens(int(n), keep_ratio, align) if exact else n * keep_ratio
    return counts


def token_layer_fraction(num_layers: int, layers: Sequence[int], keep_ratio: float,
                         seq_len: int | None = None, align: int = 1) -> float:
    """Mean over layers of the fraction of tokens each layer processes (1 = dense).

    `seq_len=None` gives the continuous value (the paper's definition); an integer gives the value
    with the engine's integer rounding.
    """
    if seq_len is None:
        return sum(tokens_per_layer(1, num_layers, layers, keep_ratio, exact=False)) / num_layers
    counts = tokens_per_layer(seq_len, num_layers, layers, keep_ratio, exact=True, align=align)
    return sum(counts) / (num_layers * seq_len)


def keep_ratio_for_flops(flops_reduction: float, num_layers: int, layers: Sequence[int],
                         tol: float = 1e-10) -> float:
    """Per-anchor keep ratio rho whose token-layer FLOPs reduction equals `flops_reduction`.

    Solves 1 - token_layer_fraction(rho) = flops_reduction by bisection (the fraction is monotone
    in rho). Raises ValueError when no anchor exists or the target is not reachable.
    """
    if not 0.0 <= flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be in [0, 1), got {flops_reduction!r}")
    if flops_reduction == 0.0:
        return 1.0
    if not layers:
        raise ValueError("flops_reduction > 0 needs at least one reduction layer")
    max_cut = 1.0 - token_layer_fraction(num_layers, layers, 0.0)
    if flops_reduction > max_cut:
        raise ValueError(
            f"flops_reduction={flops_reduction} is not reachable with layers {tuple(layers)} of a "
            f"{num_layers}-layer model (at most {max_cut:.3f}); start reducing earlier")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if 1.0 - token_layer_fraction(num_layers, layers, mid) > flops_reduction:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def flops_table(num_layers: int, cuts: Sequence[float] = (0.1, 0.2, 0.3),
                layers: Sequence[int] | None = None) -> dict[float, float]:
    """{FLOPs cut: keep ratio} for the default (or given) anchors of a `num_layers`-layer model."""
    layers = default_layers(num_layers) if layers is None else layers
    return {cut: keep_ratio_for_flops(cut, num_layers, layers) for cut in cuts}

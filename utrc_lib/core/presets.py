"""Presets: published schedules expressed as ordinary ReductionConfigs (no new method).

Glossary: utrc_lib/GLOSSARY.md (L layers, rho keep ratio per anchor).

`topvim`: ToP-ViM's released schedule (docs/ssm_methods.md §4). Its code (Vim-S, 24 layers) scores
tokens after blocks 5, 10 and 15 by the channel sum of one scan direction's output (a clamp at 0,
utrc's `clip`, is present but commented out there), keeps ceil(0.8 (N - 1)) in order (the class token
aside) and then fine-tunes. In a 1-D causal scan its "hidden-state alignment" (pruned positions pass
the state unchanged) gives the kept tokens exactly the outputs of the shortened sequence, so the
training-free part is prune-only with the clipped score: method "prune_only", metric "clip". The
anchors are every 5 layers from layer 5 while the layer is at most 5/8 of the depth (5, 10, 15 of
24), keep 0.8 per anchor unless a keep ratio or FLOPs target is given.
"""
from __future__ import annotations

from .config import ReductionConfig


def topvim_layers(num_layers: int) -> tuple[int, ...]:
    """Anchors 5, 10, 15, ... up to 5/8 of the depth (24 layers: 5, 10, 15; 48: 5..30; 64: 5..40)."""
    if num_layers < 7:
        raise ValueError(f"the ToP-ViM schedule starts after layer 5: needs at least 7 layers, got {num_layers}")
    last = min(num_layers - 2, (5 * num_layers) // 8)
    return tuple(range(5, last + 1, 5))


PRESETS = {
    "topvim": dict(method="prune_only", metric="clip", keep_ratio=0.8, layers=topvim_layers),
}


def preset_config(name: str, num_layers: int, **overrides) -> ReductionConfig:
    """The ReductionConfig of preset `name` for a `num_layers`-layer model; `overrides` replace fields
    (e.g. flops_reduction=0.2 for a cut-matched comparison, which drops the preset's keep_ratio)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields["layers"] = fields["layers"](num_layers)
    if "flops_reduction" in overrides:
        fields.pop("keep_ratio", None)
    fields.update(overrides)
    return ReductionConfig(**fields)

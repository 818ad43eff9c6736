"""Backend: transformers `MambaForCausalLM` (Mamba-1), CPU and GPU.

Glossary: B batch, N tokens, D' inner width, R dt_rank.
Importance sources: "ssm" = input of `mixer.out_proj` (y * silu(z), width D'); "delta" =
softplus(dt_proj(x_proj(x)[..., :R])) (B, N, D'), read from the `x_proj` output.
"""
from __future__ import annotations

import torch.nn.functional as F

from . import _hf_common

num_layers = _hf_common.num_layers


def _delta(mixer):
    rank = mixer.time_step_rank

    def transform(x_dbl):  # (B, N, R + 2 * d_state)
        dt = F.linear(x_dbl[..., :rank], mixer.dt_proj.weight, mixer.dt_proj.bias)  # (B, N, D')
        return F.softplus(dt.float())

    return mixer.x_proj, transform


def install(model, handle) -> None:
    _hf_common.install(model, handle, _delta)

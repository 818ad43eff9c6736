"""Backend: transformers `Mamba2ForCausalLM`, CPU (torch path) and GPU.

Glossary: B batch, N tokens, D' inner width, H heads.
Importance sources: "ssm" = input of `mixer.out_proj` (gated-normed SSD output, width D'); "delta" =
softplus(dt + dt_bias) (B, N, H), read from the last H channels of the `in_proj` output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _hf_common

num_layers = _hf_common.num_layers


def _delta(mixer):
    H = mixer.num_heads
    lo, hi = mixer.time_step_limit

    def transform(zxbcdt):  # (B, N, d_in_proj); dt is the last H channels
        dt = F.softplus(zxbcdt[..., -H:].float() + mixer.dt_bias.float())
        if lo > 0.0 or hi != float("inf"):
            dt = torch.clamp(dt, lo, hi)
        return dt

    return mixer.in_proj, transform


def install(model, handle) -> None:
    _hf_common.install(model, handle, _delta)

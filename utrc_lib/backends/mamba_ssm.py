"""Backend: mamba-ssm's `MambaLMHeadModel` (Mamba-1 and Mamba-2 mixers), GPU.

Glossary: B batch, N input tokens, N' tokens after reductions, D d_model, D' SSM inner width,
H heads (Mamba-2), R dt_rank (Mamba-1).

mamba-ssm's `MixerModel.forward` loops `hidden, residual = layer(hidden, residual, ...)`: the seam
between layers already holds the two branches apart (hidden = mixer output, residual = the stream),
which is the engine's convention. We run the same loop, reduce both branches with one plan after each
anchor layer, then end with the model's own final (fused) add + norm. Prefill only: a forward with
`inference_params.seqlen_offset > 0` (decoding) runs the original code. `num_last_tokens == 1` is
last-token mode (no scatter back to N positions).

Importance sources: "ssm" = input of `mixer.out_proj` (Mamba-1: y gated by silu(z), (B, N, D');
Mamba-2: the gated-RMSNormed SSD output, (B, N, D')). The fused paths never call out_proj as a
module, so anchor mixers are switched to their unfused path while patched (Mamba-1
`use_fast_path=False`, Mamba-2 `use_mem_eff_path=False`; undone by handle.remove()). "delta" =
softplus timescale: Mamba-2 from the last H channels of the `in_proj` output, + dt_bias;
Mamba-1 from the flattened `x_proj` output ((B N), R + 2 d_state): dt_proj.weight @ dt + dt_proj.bias.

mamba-ssm has no attention mask: batches are equal length (every token valid).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..patch import Handle, delta_needed, install_capture, ssm_needed


def num_layers(model) -> int:
    return len(model.backbone.layers)


def _is_mamba2(mixer) -> bool:
    return hasattr(mixer, "dt_bias") and hasattr(mixer, "nheads")


def _delta_mamba2(mixer, zxbcdt, B: int, N: int) -> torch.Tensor:
    """(B, N, d_in_proj) (or (B N, d_in_proj)) in_proj output -> (B, N, H) softplus(dt + dt_bias)."""
    H = mixer.nheads
    dt = zxbcdt.reshape(B, N, -1)[..., -H:].float() + mixer.dt_bias.float()
    dt = F.softplus(dt)
    lo, hi = mixer.dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    return dt


def _delta_mamba1(mixer, x_dbl, B: int, N: int) -> torch.Tensor:
    """((B N), R + 2 d_state) x_proj output -> (B, N, D') softplus(dt_proj.weight @ dt + dt_proj.bias)."""
    dt = x_dbl.reshape(B, N, -1)[..., :mixer.dt_rank]  # (B, N, R)
    dt = F.linear(dt, mixer.dt_proj.weight, mixer.dt_proj.bias)  # (B, N, D')
    return F.softplus(dt.float())


def install(model, handle: Handle) -> None:
    """Patch `model` (instance attributes and hooks only, undone by handle.remove())."""
    backbone = model.backbone
    config = handle.config
    layers = config.resolve_layers(len(backbone.layers))
    want_ssm, want_delta = ssm_needed(config), delta_needed(config)
    for i in layers:
        mixer = backbone.layers[i].mixer
        mamba2 = _is_mamba2(mixer)
        if want_ssm:
            install_capture(handle, mixer.out_proj, ("ssm", i), pre=True)
            # the fused kernels apply out_proj inside; the unfused path calls it as a module
            handle.set_attr(mixer, "use_mem_eff_path" if mamba2 else "use_fast_path", False)
        if want_delta:
            install_capture(handle, mixer.in_proj if mamba2 else mixer.x_proj, ("delta", i), pre=False)
            if not mamba2:
                handle.set_attr(mixer, "use_fast_path", False)

    lm_forward = model.forward  # bound class method
    backbone_forward = backbone.forward

    @functools.wraps(backbone_forward)
    def patched_backbone_forward(input_ids, inference_params=None, **mixer_kwargs):
        decoding = inference_params is not None and inference_params.seqlen_offset > 0
        if decoding or input_ids.shape[1] <= 1 or backbone.training:
            return backbone_forward(input_ids, inference_params=inference_params, **mixer_kwargs)
        if mixer_kwargs:
            raise ValueError(f"utrc: mixer arguments {sorted(mixer_kwargs)} (packed / varlen sequences) are not "
                             f"supported with token reduction; call handle.remove() first")
        return _reduced_forward(backbone, handle, input_ids, inference_params)

    @functools.wraps(lm_forward)
    def patched_lm_forward(input_ids, position_ids=None, inference_params=None, num_last_tokens=0,
                           **mixer_kwargs):
        handle.last_only = num_last_tokens == 1
        try:
            return lm_forward(input_ids, position_ids=position_ids, inference_params=inference_params,
                              num_last_tokens=num_last_tokens, **mixer_kwargs)
        finally:
            handle.last_only = False

    handle.set_attr(backbone, "forward", patched_backbone_forward)
    handle.set_attr(model, "forward", patched_lm_forward)


def _final_norm(backbone, hidden, residual):
    """mamba-ssm MixerModel.forward's last lines, fused_add_norm or not (same calls)."""
    if not backbone.fused_add_norm:
        residual = (hidden + residual) if residual is not None else hidden
        return backbone.norm_f(residual.to(dtype=backbone.norm_f.weight.dtype))
    from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn

    return layer_norm_fn(
        hidden, backbone.norm_f.weight, backbone.norm_f.bias, eps=backbone.norm_f.eps, residual=residual,
        prenorm=False, residual_in_fp32=backbone.residual_in_fp32,
        is_rms_norm=isinstance(backbone.norm_f, RMSNorm))


def _reduced_forward(backbone, handle: Handle, input_ids, inference_params):
    """MixerModel.forward with reductions after the anchor layers; returns (B, N, D) or (B, 1, D)."""
    hidden = backbone.embedding(input_ids)  # (B, N, D)
    B, N = input_ids.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=hidden.device)
    reducer = handle.new_reducer(len(backbone.layers), valid)
    residual = None
    handle.captured = {"on": reducer.active}
    try:
        for i, layer in enumerate(backbone.layers):
            hidden, residual = layer(hidden, residual, inference_params=inference_params)
            if reducer.wants(i):
                n = hidden.shape[1]
                mixer = layer.mixer
                delta = handle.captured.pop(("delta", i), None)
                if delta is not None:
                    delta = (_delta_mamba2 if _is_mamba2(mixer) else _delta_mamba1)(mixer, delta, B, n)
                hidden, residual = reducer.step(i, hidden, residual, features=handle.captured.pop(("ssm", i), None),
                                                delta=delta)  # (B, N', D) each
    finally:
        handle.captured = {}
    hidden = _final_norm(backbone, hidden, residual)  # (B, N', D)
    return handle.output(reducer, hidden)

"""Host: mamba-ssm's `MambaLMHeadModel` (Mamba-1 and Mamba-2 mixers), GPU.

Glossary: utrc_lib/GLOSSARY.md (B batch, N input tokens, N' tokens after reductions, D d_model,
Di SSM inner width, H heads, Rdt dt rank).

Follows mamba-ssm 2.2-2.3 `MixerModel.forward` (models/mixer_seq_simple.py); what it changes: a
ForwardReducer per prefill, the reduction after each anchor layer, and the output mapping of the
handle's options (last row / kept rows / N input positions).

mamba-ssm's `MixerModel.forward` loops `hidden, residual = layer(hidden, residual, ...)`: the seam
between layers already holds the two branches apart (hidden = mixer output, residual = the stream),
which is the engine's convention. We run the same loop, reduce both branches with one plan after each
anchor layer, then end with the model's own final (fused) add + norm. Prefill only: a forward with
`inference_params.seqlen_offset > 0` (decoding) runs the original code. `num_last_tokens == 1` is
last-token mode (no scatter back to N positions).

Importance sources: "ssm" = input of `mixer.out_proj` (Mamba-1: y gated by silu(z), (B, N, Di);
Mamba-2: the gated-RMSNormed SSD output, (B, N, Di)). The fused paths never call out_proj as a
module, so anchor mixers are switched to their unfused path while patched (Mamba-1
`use_fast_path=False`, Mamba-2 `use_mem_eff_path=False`; undone by handle.remove()). "delta" =
softplus timescale: Mamba-2 from the last H channels of the `in_proj` output, + dt_bias;
Mamba-1 from the flattened `x_proj` output ((B N), Rdt + 2 S): dt_proj.weight @ dt + dt_proj.bias.

mamba-ssm has no attention mask: batches are equal length (every token valid).
"""
from __future__ import annotations

import functools

import torch

from .handle import (Handle, delta_mamba1, delta_mamba2, hook_delta_source, hook_ssm_output, scan_mamba1,
                     scan_mamba2, tap)


def _is_mamba2(mixer) -> bool:
    return hasattr(mixer, "dt_bias") and hasattr(mixer, "nheads")


def _delta_reader(mixer):
    """(module whose output carries dt, function (output, (B, N)) -> Delta)."""
    if _is_mamba2(mixer):
        return mixer.in_proj, lambda out, shape: delta_mamba2(out, mixer.dt_bias, mixer.nheads,
                                                              mixer.dt_limit, shape)
    return mixer.x_proj, lambda out, shape: delta_mamba1(out, mixer.dt_proj, mixer.dt_rank, shape)


def _scan_reader(mixer):
    """Function (hooked output, (B, N)) -> hattn.ScanParams (hidden-attention metrics)."""
    if _is_mamba2(mixer):
        return lambda out, shape: scan_mamba2(out, mixer, heads=mixer.nheads, groups=mixer.ngroups,
                                              state=mixer.d_state, limit=mixer.dt_limit, shape=shape)
    return lambda out, shape: scan_mamba1(out, mixer, mixer.dt_rank, shape)


def install(model, handle: Handle) -> None:
    """Patch `model` (instance attributes and hooks only, undone by handle.remove())."""
    backbone = model.backbone
    config = handle.config
    readers = {}
    for i in handle.schedule.layers:
        mixer = backbone.layers[i].mixer
        mamba2 = _is_mamba2(mixer)
        if config.needs_ssm_output:
            handle.add_hook(hook_ssm_output(mixer.out_proj))
            # the fused kernels apply out_proj inside; the unfused path calls it as a module
            handle.set_attr(mixer, "use_mem_eff_path" if mamba2 else "use_fast_path", False)
        if config.needs_delta or config.needs_scan:
            module, readers[i] = _delta_reader(mixer)
            if config.needs_scan:
                readers[i] = _scan_reader(mixer)
            handle.add_hook(hook_delta_source(module))
            if not mamba2:
                handle.set_attr(mixer, "use_fast_path", False)

    lm_forward = model.forward  # bound class method
    backbone_forward = backbone.forward

    @functools.wraps(backbone_forward)
    def patched_backbone_forward(input_ids, inference_params=None, **mixer_kwargs):
        decoding = inference_params is not None and inference_params.seqlen_offset > 0
        if backbone.training and not decoding and input_ids.shape[1] > 1:
            handle.warn_training()
        if decoding or input_ids.shape[1] <= 1 or backbone.training:
            return backbone_forward(input_ids, inference_params=inference_params, **mixer_kwargs)
        if mixer_kwargs:
            raise ValueError(f"utrc: mixer arguments {sorted(mixer_kwargs)} (packed / varlen sequences) are not "
                             f"supported with token reduction; call handle.remove() first")
        return _reduced_forward(backbone, handle, input_ids, inference_params, readers)

    @functools.wraps(lm_forward)
    def patched_lm_forward(input_ids, position_ids=None, inference_params=None, num_last_tokens=0,
                           **mixer_kwargs):
        before = handle.last_reducer
        with handle.last_token_mode(num_last_tokens == 1):
            out = lm_forward(input_ids, position_ids=position_ids, inference_params=inference_params,
                             num_last_tokens=num_last_tokens, **mixer_kwargs)
        return handle.mark_absent(out, before)

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


def _reduced_forward(backbone, handle: Handle, input_ids, inference_params, readers: dict):
    """MixerModel.forward with reductions after the anchor layers; returns (B, N, D) or (B, 1, D)."""
    hidden = backbone.embedding(input_ids)  # (B, N, D)
    B, N = input_ids.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=hidden.device)
    reducer = handle.new_reducer(valid, uniform=True)  # no padding on this path: no host read of `valid`
    residual = None
    for i, layer in enumerate(backbone.layers):
        if not reducer.wants(i):
            hidden, residual = layer(hidden, residual, inference_params=inference_params)
            continue
        with tap() as got:
            hidden, residual = layer(hidden, residual, inference_params=inference_params)
        ssm, delta, scan = got.ssm, got.delta, None
        del got  # y is (B, N, Di): hold it no longer than this anchor's step (peak memory)
        if delta is not None:
            delta = readers[i](delta, (B, hidden.shape[1]))
            if handle.config.needs_scan:
                delta, scan = None, delta
        extra = {} if scan is None else {"scan": scan}  # (reducer subclasses without `scan` keep working)
        hidden, residual = reducer.step(i, hidden, residual, features=ssm, delta=delta, **extra)  # (B, N', D) each
        del ssm, delta, scan
    hidden = _final_norm(backbone, hidden, residual)  # (B, N', D)
    return handle.output(reducer, hidden)

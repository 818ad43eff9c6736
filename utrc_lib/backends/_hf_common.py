"""Shared layer loop for transformers' MambaForCausalLM and Mamba2ForCausalLM (same block structure).

Glossary: B batch, N input tokens, N' tokens after reductions, D d_model, D' SSM inner width.

The transformers block computes stream <- stream + mixer(norm(stream)). We run the same operations
but keep the two terms apart at anchor layers, in mamba-ssm's convention: hidden = mixer output,
residual = the stream it is added to; both are reduced with the same plan, then added.
"""
from __future__ import annotations

import functools
import sys

import torch

from ..patch import Handle, delta_needed, install_capture, ssm_needed


def num_layers(model) -> int:
    return len(model.backbone.layers)


def install(model, handle: Handle, delta_transform_factory) -> None:
    """Patch `model` (instance attributes only, undone by handle.remove())."""
    backbone = model.backbone
    config = handle.config
    layers = config.resolve_layers(len(backbone.layers))
    for i in layers:
        mixer = backbone.layers[i].mixer
        if ssm_needed(config):
            install_capture(handle, mixer.out_proj, ("ssm", i), pre=True)
        if delta_needed(config):
            module, transform = delta_transform_factory(mixer)
            install_capture(handle, module, ("delta", i), pre=False, transform=transform)

    lm_forward = model.forward  # bound class method
    backbone_forward = backbone.forward

    @functools.wraps(backbone_forward)  # same signature: generate() inspects it
    def patched_backbone_forward(input_ids=None, inputs_embeds=None, cache_params=None, use_cache=None,
                                 output_hidden_states=None, return_dict=None, attention_mask=None, **kwargs):
        n = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        if n <= 1 or backbone.training:  # decoding step (or training): untouched
            return backbone_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, cache_params=cache_params,
                                    use_cache=use_cache, output_hidden_states=output_hidden_states,
                                    return_dict=return_dict, attention_mask=attention_mask, **kwargs)
        return _reduced_forward(backbone, handle, input_ids, inputs_embeds, cache_params, use_cache,
                                output_hidden_states, return_dict, attention_mask)

    @functools.wraps(lm_forward)
    def patched_lm_forward(*args, logits_to_keep=0, **kwargs):
        handle.last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1
        try:
            return lm_forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        finally:
            handle.last_only = False

    handle.set_attr(backbone, "forward", patched_backbone_forward)
    handle.set_attr(model, "forward", patched_lm_forward)


def _reduced_forward(backbone, handle, input_ids, inputs_embeds, cache_params, use_cache,
                     output_hidden_states, return_dict, attention_mask):
    from transformers.cache_utils import DynamicCache

    cfg = backbone.config
    output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
    use_cache = use_cache if use_cache is not None else cfg.use_cache
    return_dict = return_dict if return_dict is not None else cfg.return_dict
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.embeddings(input_ids)
    if use_cache and cache_params is None:
        cache_params = DynamicCache(config=cfg)
    B, N, _ = inputs_embeds.shape

    mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, -N:]
        if not bool((attention_mask == 1).all()):
            mask = attention_mask
    valid = torch.ones(B, N, dtype=torch.bool, device=inputs_embeds.device) if mask is None else mask.bool()
    reducer = handle.new_reducer(len(backbone.layers), valid)

    stream = inputs_embeds
    all_hidden = () if output_hidden_states else None
    handle.captured = {"on": reducer.active}
    try:
        for i, block in enumerate(backbone.layers):
            residual = stream
            normed = block.norm(stream.to(dtype=block.norm.weight.dtype))
            if block.residual_in_fp32:
                residual = residual.to(torch.float32)
            mixed = block.mixer(normed, cache_params=cache_params, attention_mask=mask)
            if reducer.wants(i):
                mixed, residual = reducer.step(i, mixed, residual, features=handle.captured.pop(("ssm", i), None),
                                               delta=handle.captured.pop(("delta", i), None))
                mask = reducer.attention_mask
            stream = residual + mixed
            if output_hidden_states:
                all_hidden = all_hidden + (stream,)
    finally:
        handle.captured = {}
    hidden = backbone.norm_f(stream)
    hidden = handle.output(reducer, hidden)
    if output_hidden_states:
        all_hidden = all_hidden + (hidden,)
    if not return_dict:
        return tuple(v for v in (hidden, cache_params, all_hidden) if v is not None)
    module = sys.modules[type(backbone).__module__]
    output_cls = getattr(module, "Mamba2Output", None) or getattr(module, "MambaOutput")
    return output_cls(last_hidden_state=hidden, cache_params=cache_params if use_cache else None,
                      hidden_states=all_hidden)

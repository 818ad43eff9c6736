"""Host: transformers' MambaForCausalLM and Mamba2ForCausalLM (one loop: same block structure).

Glossary: utrc_lib/GLOSSARY.md (B batch, N input tokens, N' tokens after reductions, D d_model,
Di SSM inner width, H heads, Rdt dt rank).

Follows transformers 5.23-5.24 `MambaModel.forward` / `Mamba2Model.forward` and their blocks'
`forward` (stream <- stream + mixer(norm(stream)), residual in float32 when `residual_in_fp32`).
What it changes, and nothing else:
  * the backbone loop (instance `forward`) creates one ForwardReducer per prefill, shortens the
    attention mask after each anchor, and maps the final rows back to the N input positions (or
    the last row / the kept rows, as the handle's options say); decoding steps (N = 1), forwards
    that continue a filled cache (a question after a prefilled context) and training run the
    original forward;
  * an anchor block's `forward` (instance attribute) runs the block's own operations but keeps the
    two terms apart, in mamba-ssm's convention (hidden = mixer output, residual = the stream it is
    added to), reduces both with one plan, then adds them. Every block is still called through
    `nn.Module.__call__`, so hooks on `backbone.layers[i]` fire (at an anchor they see the reduced
    length);
  * the anchor mixer's importance sources (out_proj input y, the timescale for the Delta metrics, and
    Delta, B, C for the hidden-attention metrics, from the same in_proj / x_proj output) are read with
    hooks inside `handle.tap()` around the mixer call and returned to the block.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys

import torch

from .handle import (Handle, delta_mamba1, delta_mamba2, hook_delta_source, hook_ssm_output, scan_mamba1,
                     scan_mamba2, tap)

# the reducer of the forward running in this thread (set by the backbone loop, read by anchor blocks)
_REDUCER: contextvars.ContextVar = contextvars.ContextVar("utrc_hf_reducer", default=None)


def _delta_reader(mixer):
    """(module whose output carries dt, function of that output -> (B, N, H or Di) Delta)."""
    if hasattr(mixer, "dt_bias"):  # Mamba-2: dt is the last H channels of in_proj's output
        return mixer.in_proj, lambda out: delta_mamba2(out, mixer.dt_bias, mixer.num_heads,
                                                       mixer.time_step_limit)
    return mixer.x_proj, lambda out: delta_mamba1(out, mixer.dt_proj, mixer.time_step_rank)


def _scan_reader(mixer):
    """Function (hooked output of _delta_reader's module, attention mask or None) -> hattn.ScanParams."""
    if hasattr(mixer, "dt_bias"):
        return lambda out, mask: scan_mamba2(out, mixer, heads=mixer.num_heads, groups=mixer.n_groups,
                                             state=mixer.ssm_state_size, limit=mixer.time_step_limit,
                                             mask=mask)
    return lambda out, mask: scan_mamba1(out, mixer, mixer.time_step_rank)


def install(model, handle: Handle) -> None:
    """Patch `model` (instance attributes and hooks only, undone by handle.remove())."""
    backbone = model.backbone
    config = handle.config
    for i in handle.schedule.layers:
        block = backbone.layers[i]
        mixer = block.mixer
        read_delta = read_scan = None
        if config.needs_ssm_output:
            handle.add_hook(hook_ssm_output(mixer.out_proj))
        if config.needs_delta or config.needs_scan:
            module, read_delta = _delta_reader(mixer)
            handle.add_hook(hook_delta_source(module))
            if config.needs_scan:
                read_delta, read_scan = None, _scan_reader(mixer)
        handle.set_attr(block, "forward", _anchor_forward(block, i, read_delta, read_scan))

    lm_forward = model.forward  # bound class method
    backbone_forward = backbone.forward

    signature = inspect.signature(backbone_forward)

    @functools.wraps(backbone_forward)  # same signature: generate() inspects it
    def patched_backbone_forward(*args, **kwargs):
        bound = _bind(signature, args, kwargs)
        embeds, ids = bound.get("inputs_embeds"), bound.get("input_ids")
        if (ids is None) == (embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        n = (embeds if embeds is not None else ids).shape[1]
        if backbone.training and n > 1:
            handle.warn_training()
        if n <= 1 or backbone.training or _continues(bound.get("cache")):  # decoding step, continuation
            return backbone_forward(*args, **kwargs)                         # of a filled cache, training
        return _reduced_forward(backbone, handle, bound)

    @functools.wraps(lm_forward)
    def patched_lm_forward(*args, logits_to_keep=0, **kwargs):
        before = handle.last_reducer
        with handle.last_token_mode(isinstance(logits_to_keep, int) and logits_to_keep == 1):
            out = lm_forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        return handle.mark_absent(out, before)

    handle.set_attr(backbone, "forward", patched_backbone_forward)
    handle.set_attr(model, "forward", patched_lm_forward)


def _continues(cache) -> bool:
    """True when `cache` already holds a state (a question continuing a prefilled context,
    utrc_lib.generate_from): such a forward is not a prefill and is never reduced."""
    if cache is None or not hasattr(cache, "get_conv_state"):
        return False
    try:
        return cache.get_conv_state(0) is not None
    except (IndexError, ValueError, AttributeError):  # no layer initialised yet
        return False


def _bind(signature, args, kwargs) -> dict:
    """Arguments of a backbone call by name; the cache argument as "cache" whatever transformers
    calls it (cache_params up to 5.23, cache from 5.24)."""
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    extra = bound.pop("kwargs", {}) or {}
    bound.update(extra)
    if "cache_params" in bound:
        bound["cache"] = bound.pop("cache_params")
    return bound


def _anchor_forward(block, layer: int, read_delta, read_scan=None):
    """The block's forward with the reduction after its mixer (see the module doc)."""

    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.pop("cache_params", cache)
        reducer = _REDUCER.get()
        residual = hidden_states
        normed = block.norm(hidden_states.to(dtype=block.norm.weight.dtype))
        if block.residual_in_fp32:
            residual = residual.to(torch.float32)
        if reducer is None or not reducer.wants(layer):  # outside a reduced prefill: the block as is
            return residual + block.mixer(normed, cache, attention_mask=attention_mask)
        with tap() as got:
            mixed = block.mixer(normed, cache, attention_mask=attention_mask)
        delta = read_delta(got.delta) if read_delta is not None and got.delta is not None else None
        scan = read_scan(got.delta, attention_mask) if read_scan is not None and got.delta is not None else None
        extra = {} if scan is None else {"scan": scan}  # (reducer subclasses without `scan` keep working)
        mixed, residual = reducer.step(layer, mixed, residual, features=got.ssm, delta=delta, **extra)  # (B, N', D)
        return residual + mixed

    return forward


def _reduced_forward(backbone, handle: Handle, bound: dict):
    from transformers.cache_utils import DynamicCache

    cfg = backbone.config
    input_ids, inputs_embeds = bound.get("input_ids"), bound.get("inputs_embeds")
    cache, attention_mask = bound.get("cache"), bound.get("attention_mask")
    output_hidden_states = bound.get("output_hidden_states")
    output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
    use_cache = bound.get("use_cache")
    use_cache = use_cache if use_cache is not None else cfg.use_cache
    return_dict = bound.get("return_dict")
    return_dict = return_dict if return_dict is not None else cfg.return_dict
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.embeddings(input_ids)
    if use_cache and cache is None:
        cache = DynamicCache(config=cfg)
    B, N, _ = inputs_embeds.shape

    mask = None
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B
                                       or attention_mask.shape[1] < N):
        raise ValueError(f"attention_mask must be (batch, length) = ({B}, {N}) (or longer, left-aligned as "
                         f"generate() passes it), got {tuple(attention_mask.shape)}")
    if attention_mask is not None:
        attention_mask = attention_mask[:, -N:]
        if not bool((attention_mask == 1).all()):
            mask = attention_mask
    valid = torch.ones(B, N, dtype=torch.bool, device=inputs_embeds.device) if mask is None else mask.bool()
    reducer = handle.new_reducer(valid)
    anchors = reducer.layers if reducer.active else ()

    stream = inputs_embeds
    all_hidden = () if output_hidden_states else None
    token = _REDUCER.set(reducer)
    try:
        for i, block in enumerate(backbone.layers):
            stream = block(stream, cache, attention_mask=mask)
            if i in anchors:
                mask = reducer.attention_mask
            if output_hidden_states:
                all_hidden = all_hidden + (stream,)
    finally:
        _REDUCER.reset(token)
    hidden = backbone.norm_f(stream)
    hidden = handle.output(reducer, hidden)
    if output_hidden_states:
        all_hidden = all_hidden + (hidden,)
    if not return_dict:
        return tuple(v for v in (hidden, cache, all_hidden) if v is not None)
    module = sys.modules[type(backbone).__module__]
    output_cls = getattr(module, "Mamba2Output", None) or getattr(module, "MambaOutput")
    # positional: the cache field is `cache_params` up to transformers 5.23 and `cache` from 5.24
    return output_cls(hidden, cache if use_cache else None, all_hidden)

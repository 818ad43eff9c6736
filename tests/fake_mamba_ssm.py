"""A CPU stand-in for the parts of mamba-ssm that the generation path uses (tests only).

mamba-ssm needs CUDA. To test our code around it on CPU, this module provides, written for these
tests (not taken from mamba-ssm), objects with the same interface:

  * `MambaLMHeadModel`: the class name the host registry dispatches on; `backbone` with
    `embedding`, `layers` (blocks called as `block(hidden, residual, inference_params=...)` ->
    (mixer output, residual stream)), `norm_f`, `fused_add_norm=False`; `forward(input_ids,
    position_ids, inference_params, num_last_tokens)` -> object with `.logits`;
    `allocate_inference_cache(batch, max_seqlen, dtype)` -> {layer: (conv_state, ssm_state)}; a
    greedy `generate(input_ids, max_length, cg)`.
  * each mixer: a depthwise causal conv (width K) then a diagonal linear recurrence
    s_t = a * s_(t-1) + c_t, y = s (exact in both forms), out_proj(silu(y)). With inference params it
    reads / writes `key_value_memory_dict[layer_idx]` in place: the full form at seqlen_offset 0
    (conv state = last K inputs, SSM state = s_N), one step when seqlen_offset > 0.
  * `install(monkeypatch)`: `mamba_ssm.utils.generation` with `InferenceParams` and an eager
    `update_graph_cache` (its `run` calls the model; `captures` counts how often one is built).
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class InferenceParams:
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None


class Mixer(nn.Module):
    def __init__(self, d_model, d_inner, k, layer_idx):
        super().__init__()
        self.layer_idx, self.k, self.d_inner = layer_idx, k, d_inner
        self.in_proj = nn.Linear(d_model, d_inner)
        self.conv_weight = nn.Parameter(torch.randn(d_inner, k) / k)
        self.decay = nn.Parameter(torch.randn(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model)
        self.use_fast_path = True  # the host switches it off while patched (attribute only)

    def _states(self, params, batch):
        if self.layer_idx not in params.key_value_memory_dict:
            params.key_value_memory_dict[self.layer_idx] = self.allocate(batch)
        return params.key_value_memory_dict[self.layer_idx]

    def allocate(self, batch, dtype=None):
        w = self.conv_weight
        return (torch.zeros(batch, self.d_inner, self.k, dtype=dtype or w.dtype),
                torch.zeros(batch, self.d_inner, dtype=dtype or w.dtype))

    def forward(self, u, inference_params=None):
        x = self.in_proj(u)  # (B, N, Di)
        a = torch.sigmoid(self.decay)
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._states(inference_params, u.shape[0])
            if inference_params.seqlen_offset > 0:
                return self._step(x, a, conv_state, ssm_state)
        xt = x.transpose(1, 2)  # (B, Di, N)
        c = F.conv1d(F.pad(xt, (self.k - 1, 0)), self.conv_weight[:, None, :], groups=self.d_inner)
        s = torch.zeros_like(c[..., 0])
        ys = []
        for t in range(c.shape[-1]):
            s = a * s + c[..., t]
            ys.append(s)
        y = torch.stack(ys, 1)  # (B, N, Di)
        if conv_state is not None:
            n = xt.shape[-1]
            conv_state.copy_(F.pad(xt, (self.k - n, 0)) if n < self.k else xt[..., -self.k:])
            ssm_state.copy_(s)
        return self.out_proj(F.silu(y))

    def _step(self, x, a, conv_state, ssm_state):
        conv_state.copy_(torch.roll(conv_state, -1, dims=-1))
        conv_state[..., -1] = x[:, 0]
        c = (conv_state * self.conv_weight).sum(-1)
        ssm_state.copy_(a * ssm_state + c)
        return self.out_proj(F.silu(ssm_state))[:, None]


class Block(nn.Module):
    def __init__(self, d_model, d_inner, k, layer_idx):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = Mixer(d_model, d_inner, k, layer_idx)

    def forward(self, hidden, residual=None, inference_params=None):
        residual = hidden + residual if residual is not None else hidden
        return self.mixer(self.norm(residual), inference_params=inference_params), residual


class Backbone(nn.Module):
    def __init__(self, vocab, d_model, d_inner, k, n_layer):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(Block(d_model, d_inner, k, i) for i in range(n_layer))
        self.norm_f = nn.LayerNorm(d_model)
        self.fused_add_norm = False
        self.residual_in_fp32 = False

    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, inference_params=inference_params)
        return self.norm_f(hidden + residual)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class MambaLMHeadModel(nn.Module):
    def __init__(self, vocab=64, d_model=32, d_inner=48, k=4, n_layer=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = Backbone(vocab, d_model, d_inner, k, n_layer)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2:
                    p.mul_(2.0)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return {i: layer.mixer.allocate(batch_size, dtype) for i, layer in enumerate(self.backbone.layers)}

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        hidden = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return _Out(self.lm_head(hidden))

    @torch.inference_mode()
    def generate(self, input_ids, max_length, cg=False, **kwargs):
        """Greedy: the prompt, then max_length - N tokens (an eager loop; `cg` is accepted, unused)."""
        params = InferenceParams(max_seqlen=max_length, max_batch_size=input_ids.shape[0])
        seq = [input_ids]
        logits = self(input_ids, inference_params=params, num_last_tokens=1).logits[:, -1]
        params.seqlen_offset = input_ids.shape[1]
        while sum(s.shape[1] for s in seq) < max_length:
            tok = logits.argmax(-1, keepdim=True)
            seq.append(tok)
            if sum(s.shape[1] for s in seq) == max_length:
                break
            logits = self(tok, inference_params=params, num_last_tokens=1).logits[:, -1]
            params.seqlen_offset += 1
        return torch.cat(seq, 1)


def install(monkeypatch):
    """Make `mamba_ssm.utils.generation` this module's InferenceParams / eager update_graph_cache."""
    gen = types.ModuleType("mamba_ssm.utils.generation")
    gen.InferenceParams = InferenceParams
    gen.captures = []

    def update_graph_cache(model, cache, batch_size, seqlen_og, max_seqlen, **kwargs):
        if cache is None or batch_size > cache.max_batch_size or max_seqlen > cache.max_seqlen:
            params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch_size,
                                     key_value_memory_dict=model.allocate_inference_cache(batch_size, max_seqlen))
            cache = types.SimpleNamespace(max_batch_size=batch_size, max_seqlen=max_seqlen, inference_params=params)
            gen.captures.append((batch_size, max_seqlen))

            def run(input_ids, position_ids, seqlen):
                assert params.seqlen_offset == seqlen > 0
                return model(input_ids, position_ids=position_ids, inference_params=params, num_last_tokens=1).logits

            cache.run = run
        cache.inference_params.seqlen_offset = 0
        return cache

    gen.update_graph_cache = update_graph_cache
    pkg, utils = types.ModuleType("mamba_ssm"), types.ModuleType("mamba_ssm.utils")
    pkg.utils, utils.generation = utils, gen
    for name, mod in (("mamba_ssm", pkg), ("mamba_ssm.utils", utils), ("mamba_ssm.utils.generation", gen)):
        monkeypatch.setitem(sys.modules, name, mod)
    return gen

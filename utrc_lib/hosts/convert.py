"""Convert between mamba-ssm ``MambaLMHeadModel`` checkpoints and transformers Mamba/Mamba2.

Pure functions on state dicts and config dicts: no mamba-ssm import is needed, so the
mapping is testable on CPU.

mamba-ssm names                         transformers names
  backbone.embedding.weight               backbone.embeddings.weight
  backbone.layers.{i}.mixer.*             backbone.layers.{i}.mixer.*   (same leaf names)
  backbone.layers.{i}.norm.weight         backbone.layers.{i}.norm.weight
  backbone.norm_f.weight                  backbone.norm_f.weight
  lm_head.weight                          lm_head.weight (tied to the embedding)

The mamba-ssm model configuration is described by a plain dict with the fields of
``mamba_ssm.models.config_mamba.MambaConfig`` (d_model, d_intermediate, n_layer,
vocab_size, ssm_cfg, rms_norm, residual_in_fp32, fused_add_norm,
pad_vocab_size_multiple, tie_embeddings). ``ssm_cfg`` holds the mixer arguments that
differ from mamba-ssm's defaults; the defaults used here are those of mamba-ssm 2.3, and the
config is read by `utrc_lib.core.shapes.read_mamba_ssm_config` (the parser the FLOPs accounting uses).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core.shapes import (MAMBA1_DEFAULTS, MAMBA2_DEFAULTS, MambaSSMConfig, padded_vocab,  # noqa: F401
                           read_mamba_ssm_config)

__all__ = ["mamba_ssm_to_hf_config", "hf_to_mamba_ssm_config", "convert_mamba_ssm_state_dict",
           "hf_to_mamba_ssm_state_dict", "padded_vocab", "MAMBA1_DEFAULTS", "MAMBA2_DEFAULTS", "NORM_EPS"]

NORM_EPS = 1e-5  # mamba-ssm Block RMSNorm and Mamba2 RMSNormGated default


def _read(arch: str, ssm_config: Mapping[str, Any]) -> MambaSSMConfig:
    """The config read once by `core.shapes` (defaults filled in), checked for a transformers equivalent."""
    m = read_mamba_ssm_config(ssm_config, arch)
    if m.unknown:
        raise ValueError(f"unsupported ssm_cfg fields for {arch}: {list(m.unknown)}")
    if m.d_intermediate:
        raise ValueError("d_intermediate > 0 (MLP blocks) has no transformers equivalent")
    if m.attn_layer_idx:
        raise ValueError("attention layers have no transformers Mamba equivalent")
    if not m.rms_norm:
        raise ValueError("transformers Mamba/Mamba2 use RMSNorm; rms_norm=False is not supported")
    if not m.tie_embeddings:
        raise ValueError("only tied embeddings are supported")
    x = m.mixer
    if arch == "mamba2":
        if not x["rmsnorm"] or x["norm_before_gate"] or x["D_has_hdim"]:
            raise ValueError("Mamba2 needs rmsnorm=True, norm_before_gate=False, D_has_hdim=False")
        if x["d_ssm"] not in (None, m.d_inner):
            raise ValueError("d_ssm != d_inner is not supported by transformers Mamba2")
    return m


def mamba_ssm_to_hf_config(arch: str, ssm_config: Mapping[str, Any], *, bos_token_id: int = 0,
                           eos_token_id: int = 0, pad_token_id: int = 0):
    """The transformers config equivalent to a mamba-ssm MambaConfig dict."""
    from transformers import Mamba2Config, MambaConfig

    spec = _read(arch, ssm_config)
    m = spec.mixer
    common = dict(
        vocab_size=spec.padded_vocab, hidden_size=spec.d_model, state_size=int(m["d_state"]),
        num_hidden_layers=spec.n_layer, layer_norm_epsilon=NORM_EPS,
        expand=int(m["expand"]), conv_kernel=int(m["d_conv"]), use_bias=bool(m["bias"]),
        use_conv_bias=bool(m["conv_bias"]), hidden_act="silu",
        residual_in_fp32=bool(spec.residual_in_fp32),
        time_step_min=float(m["dt_min"]), time_step_max=float(m["dt_max"]),
        time_step_floor=float(m["dt_init_floor"]), tie_word_embeddings=True,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    if arch == "mamba":
        cfg = MambaConfig(**common, time_step_rank=spec.dt_rank, time_step_scale=float(m["dt_scale"]),
                          time_step_init_scheme=str(m["dt_init"]))
    else:
        cfg = Mamba2Config(**common, num_heads=spec.n_heads, head_dim=int(m["headdim"]),
                           n_groups=int(m["ngroups"]), chunk_size=int(m["chunk_size"]),
                           time_step_limit=tuple(float(x) for x in m["dt_limit"]))
    # fields mamba-ssm-derived checkpoints on the hub carry (state-spaces/mamba-130m-hf)
    cfg.rms_norm = True
    cfg.fused_add_norm = bool(spec.fused_add_norm)
    cfg.pad_vocab_size_multiple = int(spec.pad_vocab_size_multiple)
    cfg.architectures = ["MambaForCausalLM" if arch == "mamba" else "Mamba2ForCausalLM"]
    return cfg


def hf_to_mamba_ssm_config(hf_config) -> tuple[str, dict]:
    """(arch, mamba-ssm MambaConfig dict) for a transformers Mamba/Mamba2 config."""
    mt = hf_config.model_type
    if mt not in ("mamba", "mamba2"):
        raise ValueError(f"not a Mamba config: model_type {mt!r}")
    c = hf_config
    ssm = dict(d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand, dt_min=c.time_step_min,
               dt_max=c.time_step_max, dt_init_floor=c.time_step_floor, conv_bias=c.use_conv_bias,
               bias=c.use_bias)
    if mt == "mamba":
        ssm.update(layer="Mamba1", dt_rank=int(c.time_step_rank), dt_scale=c.time_step_scale,
                   dt_init=c.time_step_init_scheme)
    else:
        ssm.update(layer="Mamba2", headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size,
                   dt_limit=tuple(c.time_step_limit))
    cfg = dict(d_model=c.hidden_size, d_intermediate=0, n_layer=c.num_hidden_layers,
               vocab_size=c.vocab_size, ssm_cfg=ssm, rms_norm=True,
               residual_in_fp32=c.residual_in_fp32,
               fused_add_norm=bool(getattr(c, "fused_add_norm", True)),
               pad_vocab_size_multiple=int(getattr(c, "pad_vocab_size_multiple", 8)),
               tie_embeddings=bool(c.tie_word_embeddings))
    return mt, cfg


def _rename(key: str, to_hf: bool) -> str:
    a, b = ("backbone.embedding.", "backbone.embeddings.") if to_hf else \
           ("backbone.embeddings.", "backbone.embedding.")
    return b + key[len(a):] if key.startswith(a) else key


def _expected_shapes(arch: str, hf_cfg) -> dict[str, tuple[int, ...]]:
    d, v, n = hf_cfg.hidden_size, hf_cfg.vocab_size, hf_cfg.state_size
    di = hf_cfg.expand * d
    k = hf_cfg.conv_kernel
    shapes = {"backbone.embeddings.weight": (v, d), "backbone.norm_f.weight": (d,)}
    for i in range(hf_cfg.num_hidden_layers):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        if arch == "mamba":
            r = hf_cfg.time_step_rank
            layer = {"in_proj.weight": (2 * di, d), "conv1d.weight": (di, 1, k),
                     "x_proj.weight": (r + 2 * n, di), "dt_proj.weight": (di, r),
                     "dt_proj.bias": (di,), "A_log": (di, n), "D": (di,),
                     "out_proj.weight": (d, di)}
            if hf_cfg.use_conv_bias:
                layer["conv1d.bias"] = (di,)
        else:
            h, g = hf_cfg.num_heads, hf_cfg.n_groups
            conv = di + 2 * g * n
            layer = {"in_proj.weight": (di + conv + h, d), "conv1d.weight": (conv, 1, k),
                     "dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (di,),
                     "out_proj.weight": (d, di)}
            if hf_cfg.use_conv_bias:
                layer["conv1d.bias"] = (conv,)
        if hf_cfg.use_bias:
            layer["in_proj.bias"] = (layer["in_proj.weight"][0],)
            layer["out_proj.bias"] = (d,)
        shapes.update({p + "mixer." + kk: vv for kk, vv in layer.items()})
    return shapes


def convert_mamba_ssm_state_dict(sd: Mapping[str, torch.Tensor], arch: str,
                                 ssm_config: Mapping[str, Any], *, dtype: torch.dtype | None = None,
                                 bos_token_id: int = 0, eos_token_id: int = 0,
                                 pad_token_id: int = 0):
    """mamba-ssm MambaLMHeadModel state dict -> (transformers config, transformers state dict).

    ``ssm_config`` is the mamba-ssm MambaConfig as a dict. Every tensor is checked
    against the shape the transformers model expects; unknown or missing keys raise.
    ``dtype`` optionally casts floating tensors (e.g. torch.float16 for the release).
    """
    hf_cfg = mamba_ssm_to_hf_config(arch, ssm_config, bos_token_id=bos_token_id,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    expected = _expected_shapes(arch, hf_cfg)
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if k == "lm_head.weight":
            continue
        hk = _rename(k, to_hf=True)
        if hk not in expected:
            raise KeyError(f"unexpected mamba-ssm key {k!r} for {arch}")
        if tuple(t.shape) != expected[hk]:
            raise ValueError(f"{k}: shape {tuple(t.shape)} != expected {expected[hk]}")
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[hk] = t.contiguous()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise KeyError(f"mamba-ssm state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"].detach().cpu(),
                                                  sd["backbone.embedding.weight"].detach().cpu()):
        raise ValueError("lm_head.weight differs from the embedding, but only tied embeddings are supported")
    out["lm_head.weight"] = out["backbone.embeddings.weight"]
    return hf_cfg, out


def hf_to_mamba_ssm_state_dict(hf_sd: Mapping[str, torch.Tensor], hf_config):
    """transformers Mamba/Mamba2 state dict -> (arch, mamba-ssm config dict, mamba-ssm state dict)."""
    arch, cfg = hf_to_mamba_ssm_config(hf_config)
    expected = _expected_shapes(arch, hf_config)
    sd: dict[str, torch.Tensor] = {}
    for k, t in hf_sd.items():
        if k == "lm_head.weight":
            continue
        if k not in expected:
            raise KeyError(f"unexpected transformers key {k!r}")
        sd[_rename(k, to_hf=False)] = t.detach().cpu().contiguous()
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    return arch, cfg, sd

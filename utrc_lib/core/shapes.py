"""Mamba model shapes: the mamba-ssm configuration format, read in one place, and the named shapes.

mamba-ssm describes a language model with ``mamba_ssm.models.config_mamba.MambaConfig`` (d_model,
d_intermediate, n_layer, vocab_size, ssm_cfg, attn_layer_idx, rms_norm, residual_in_fp32,
fused_add_norm, pad_vocab_size_multiple, tie_embeddings); ``ssm_cfg`` holds the mixer arguments that
differ from the mixer's defaults (``layer`` picks "Mamba1" or "Mamba2"). `read_mamba_ssm_config`
turns such a config (a dict or an object with those attributes) into a `MambaSSMConfig` with every
default filled in; the FLOPs accounting (`core.flops`) and the mamba-ssm <-> transformers conversion
(`hosts.convert`) both read configs through it.

`SHAPES` is the one table of named model shapes: the four models of the paper (random weights are
enough for FLOPs and timing) and two tiny ones for CPU smoke tests. `shape_config(name)` gives the
full mamba-ssm config of a name; `PAPER_NAMES` maps the paper's model names to the table's names.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

# mamba-ssm 2.3 mixer defaults (mamba_ssm/modules/mamba_simple.py, mamba2.py)
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                       dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False)
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1,
                       dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")),
                       bias=False, conv_bias=True, chunk_size=256, rmsnorm=True,
                       norm_before_gate=False, D_has_hdim=False)
# mamba-ssm 2.3 MambaConfig defaults of the fields that are not the model's size
MODEL_DEFAULTS = dict(d_intermediate=0, attn_layer_idx=(), rms_norm=True, residual_in_fp32=True,
                      fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)
LAYER_ARCH = {"Mamba1": "mamba", "Mamba2": "mamba2"}
KERNEL_CHOICES = ("use_fast_path", "use_mem_eff_path")   # how a mixer runs, not what it computes


def _get(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


@dataclasses.dataclass(frozen=True, eq=False)
class MambaSSMConfig:
    """A mamba-ssm MambaConfig with every default filled in.

    arch: "mamba" (Mamba1 mixer) or "mamba2"; vocab_size as given (`padded_vocab` is what the
    embedding and head have); mixer: the mixer arguments (ssm_cfg over the mixer defaults, without
    "layer" and the kernel choices); unknown: ssm_cfg fields the mixer does not take.
    """

    arch: str
    d_model: int
    n_layer: int
    vocab_size: int
    mixer: dict
    unknown: tuple = ()
    d_intermediate: int = 0
    attn_layer_idx: tuple = ()
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    @property
    def layer(self) -> str:
        return "Mamba2" if self.arch == "mamba2" else "Mamba1"

    @property
    def padded_vocab(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple (mamba-ssm pads the embedding)."""
        return padded_vocab(self.vocab_size, self.pad_vocab_size_multiple)

    @property
    def d_inner(self) -> int:
        return int(self.mixer["expand"] * self.d_model)

    @property
    def dt_rank(self) -> int:
        """Mamba1 only: the dt projection rank ("auto" = ceil(d_model / 16))."""
        r = self.mixer.get("dt_rank", "auto")
        return math.ceil(self.d_model / 16) if r == "auto" else int(r)

    @property
    def n_heads(self) -> int:
        """Mamba2 only: d_inner / headdim (raises when it does not divide)."""
        head_dim = int(self.mixer["headdim"])
        if self.d_inner % head_dim:
            raise ValueError(f"d_inner {self.d_inner} is not a multiple of headdim {head_dim}")
        return self.d_inner // head_dim


def padded_vocab(vocab_size: int, multiple: int) -> int:
    multiple = max(1, int(multiple or 1))
    return vocab_size + (multiple - vocab_size % multiple) % multiple


def read_mamba_ssm_config(cfg: Any, arch: Optional[str] = None) -> MambaSSMConfig:
    """Read a mamba-ssm MambaConfig (dataclass, object or dict) once, defaults filled in.

    Args:
        cfg: has d_model, n_layer, vocab_size (required) and optionally the other MambaConfig fields.
        arch: "mamba" or "mamba2" when the caller knows it (then ssm_cfg["layer"] defaults to it and
            must agree with it); None: from ssm_cfg["layer"] (mamba-ssm's default "Mamba1").
    Raises:
        ValueError naming the field: a missing size field, an unknown arch or layer, a mismatch.
    """
    if arch is not None and arch not in ("mamba", "mamba2"):
        raise ValueError(f"arch must be 'mamba' or 'mamba2', not {arch!r}")
    sizes = {}
    for name in ("d_model", "n_layer", "vocab_size"):
        value = _get(cfg, name)
        if value is None:
            raise ValueError(f"mamba-ssm config lacks {name!r} (needs d_model, n_layer, vocab_size)")
        sizes[name] = int(value)
    ssm = dict(_get(cfg, "ssm_cfg") or {})
    default_layer = "Mamba2" if arch == "mamba2" else "Mamba1"
    layer = ssm.pop("layer", default_layer)
    if layer not in LAYER_ARCH:
        raise ValueError(f"unsupported mamba-ssm layer {layer!r}; supported: 'Mamba1', 'Mamba2'")
    if arch is not None and LAYER_ARCH[layer] != arch:
        raise ValueError(f"arch {arch!r} does not match ssm_cfg layer {layer!r}")
    for k in KERNEL_CHOICES:
        ssm.pop(k, None)
    defaults = MAMBA2_DEFAULTS if layer == "Mamba2" else MAMBA1_DEFAULTS
    unknown = tuple(sorted(set(ssm) - set(defaults)))
    rest = {}
    for k, default in MODEL_DEFAULTS.items():
        value = _get(cfg, k)
        rest[k] = default if value is None else value
    rest["attn_layer_idx"] = tuple(rest["attn_layer_idx"] or ())
    return MambaSSMConfig(arch=LAYER_ARCH[layer], mixer={**defaults, **ssm}, unknown=unknown, **sizes, **rest)


# -- the named shapes -----------------------------------------------------------------------------
# name: (paper name, arch, mamba-ssm MambaConfig size fields). Vocabulary 50277, padded to 50280.
SHAPES: dict[str, dict] = {
    "mamba2-2.7b": dict(paper="Mamba-2-2.7B", arch="mamba2", d_model=2560, n_layer=64, vocab_size=50277,
                        ssm_cfg=dict(layer="Mamba2", d_state=128, headdim=64, expand=2, ngroups=1)),
    "mamba2-1.3b": dict(paper="Mamba-2-1.3B", arch="mamba2", d_model=2048, n_layer=48, vocab_size=50277,
                        ssm_cfg=dict(layer="Mamba2", d_state=128, headdim=64, expand=2, ngroups=1)),
    "mamba-2.8b": dict(paper="Mamba-2.8B", arch="mamba", d_model=2560, n_layer=64, vocab_size=50277,
                       ssm_cfg=dict(layer="Mamba1", d_state=16, expand=2)),
    "mamba-1.4b": dict(paper="Mamba-1.4B", arch="mamba", d_model=2048, n_layer=48, vocab_size=50277,
                       ssm_cfg=dict(layer="Mamba1", d_state=16, expand=2)),
    # tiny shapes for CPU smoke tests and GPU equivalence tests (not in the paper)
    "tiny-mamba": dict(paper=None, arch="mamba", d_model=64, n_layer=8, vocab_size=256,
                       ssm_cfg=dict(layer="Mamba1", d_state=8, expand=2)),
    "tiny-mamba2": dict(paper=None, arch="mamba2", d_model=64, n_layer=8, vocab_size=256,
                        ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, expand=2, ngroups=1, chunk_size=16)),
}
PAPER_NAMES: dict[str, str] = {spec["paper"]: name for name, spec in SHAPES.items() if spec["paper"]}


def shape_config(name: str) -> tuple[str, dict]:
    """(arch, full mamba-ssm MambaConfig dict) of a name of `SHAPES` or of `PAPER_NAMES`."""
    name = PAPER_NAMES.get(name, name)
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; valid: {', '.join(SHAPES)} (or {', '.join(PAPER_NAMES)})")
    spec = SHAPES[name]
    cfg = dict(d_model=spec["d_model"], d_intermediate=0, n_layer=spec["n_layer"], vocab_size=spec["vocab_size"],
               ssm_cfg=dict(spec["ssm_cfg"]), rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
               pad_vocab_size_multiple=8, tie_embeddings=True)
    return spec["arch"], cfg

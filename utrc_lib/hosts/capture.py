"""Reading the importance sources inside a mixer call: the SSM output y and the timescale Delta.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, Di SSM inner width, H heads, Rdt dt rank).

apply() registers one forward hook per source module of each anchor mixer (`out_proj` input for y;
`in_proj` / `x_proj` output for Delta). A hook stores its value only inside `tap()`, which a layer
loop opens around the one mixer call it wants to read; the values come back to the loop as the
`Tapped` object `tap()` yields. The current tap lives in a ContextVar, so each thread (and each
forward) reads only its own mixer calls; outside `tap()` the hooks do nothing.

The Delta readers are written once here for both hosts: Mamba-2 keeps dt in the last H channels
of the in_proj output (softplus(dt + dt_bias), clamped to the mixer's limits); Mamba-1 projects the
first R channels of the x_proj output with dt_proj (softplus(dt_proj(dt))).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("utrc_tap", default=None)


class Tapped:
    """What one mixer call produced: `ssm` (B, N, Di) the out_proj input, `delta` the raw Delta source."""

    __slots__ = ("ssm", "delta")

    def __init__(self):
        self.ssm: Optional[Tensor] = None
        self.delta: Optional[Tensor] = None


@contextlib.contextmanager
def tap() -> Iterator[Tapped]:
    """Collect the hooked values of the mixer calls inside this block (this thread only)."""
    got = Tapped()
    token = _CURRENT.set(got)
    try:
        yield got
    finally:
        _CURRENT.reset(token)


def _store(name: str, value: Tensor) -> None:
    got = _CURRENT.get()
    if got is not None:
        setattr(got, name, value)


def hook_ssm_output(module: torch.nn.Module):
    """Forward pre-hook on `out_proj`: its input is y (gated) for both mixer generations."""
    return module.register_forward_pre_hook(lambda mod, args: _store("ssm", args[0]))


def hook_delta_source(module: torch.nn.Module):
    """Forward hook on the module whose output carries dt (Mamba-2 `in_proj`, Mamba-1 `x_proj`)."""
    return module.register_forward_hook(lambda mod, args, out: _store("delta", out))


# -- Delta readers ---------------------------------------------------------------------------------
def delta_mamba2(zxbcdt: Tensor, dt_bias: Tensor, num_heads: int, limit: tuple[float, float],
                 shape: Optional[tuple[int, int]] = None) -> Tensor:
    """(B, N, d_in_proj) (or (B N, d_in_proj) with shape=(B, N)) in_proj output -> (B, N, H)
    softplus(dt + dt_bias), clamped to `limit` when it is not (0, inf)."""
    if shape is not None:
        zxbcdt = zxbcdt.reshape(*shape, -1)
    dt = F.softplus(zxbcdt[..., -num_heads:].float() + dt_bias.float())
    lo, hi = limit
    if lo > 0.0 or hi != float("inf"):
        dt = torch.clamp(dt, lo, hi)
    return dt


def delta_mamba1(x_dbl: Tensor, dt_proj: torch.nn.Linear, rank: int,
                 shape: Optional[tuple[int, int]] = None) -> Tensor:
    """(B, N, Rdt + 2 S) (or flattened with shape=(B, N)) x_proj output -> (B, N, Di)
    softplus(dt_proj(dt))."""
    if shape is not None:
        x_dbl = x_dbl.reshape(*shape, -1)
    dt = F.linear(x_dbl[..., :rank], dt_proj.weight, dt_proj.bias)  # (B, N, Di)
    return F.softplus(dt.float())


DeltaReader = Callable[[Tensor, Optional[tuple[int, int]]], Tensor]


# -- scan readers (hidden-attention metrics): the same hooked output -> core.hattn.ScanParams -------------
def scan_mamba1(x_dbl: Tensor, mixer, rank: int, shape: Optional[tuple[int, int]] = None):
    """Mamba-1 x_proj output -> ScanParams (Delta, B, C from x_proj; A = -exp(mixer.A_log))."""
    from ..core import hattn

    return hattn.from_mamba1(x_dbl, mixer.dt_proj.weight, mixer.dt_proj.bias, rank, mixer.A_log, shape)


def scan_mamba2(zxbcdt: Tensor, mixer, *, heads: int, groups: int, state: int, limit, mask=None,
                shape: Optional[tuple[int, int]] = None):
    """Mamba-2 in_proj output -> ScanParams (B, C through the mixer's own conv filters and SiLU)."""
    from ..core import hattn

    return hattn.from_mamba2(zxbcdt, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log,
                             heads=heads, groups=groups, state=state, limit=limit, mask=mask, shape=shape)

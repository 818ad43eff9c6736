"""Inference settings that make the transformers torch paths fast without changing what they compute.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, H heads, c chunk size).

Two settings, both exact up to float rounding (the tests compare against the model as loaded):
  * Mamba-2 (`Mamba2Mixer.torch_forward`, the path without mamba-ssm kernels) computes the SSD scan
    in chunks of `config.chunk_size` (256 in every released checkpoint) and pads the sequence up to a
    multiple of it, so a 128-token input pays for 256. The result does not depend on the chunk size
    (SSD is an exact block decomposition). `chunk_size_for(n)` picks a chunk for an n-token input; a
    forward pre-hook on each mixer sets it from the length that mixer actually sees (after a
    reduction the sequence is shorter).
  * Mamba-1 (`MambaMixer` without kernels) runs its selective scan (transformers'
    `mamba_selective_scan`) as a loop over the tokens that first materialises exp(dt A) and dt B u for
    every token, (B, Di, N, S) tensors far larger than the CPU caches, and then reads them with a
    stride. `selective_scan` runs the same recurrence with each token's terms computed when they are
    used, on a (B, Di, S) state that stays in cache (5-10x faster on 2 cores; mambapy's parallel
    scan, the mixer's `use_mambapy` switch, was slower than both here). Within `fast_inference` the
    module's function is replaced by a dispatcher that takes CPU inference calls and hands every other
    call (CUDA, autograd) to the original.
With mamba-ssm's CUDA kernels in use (CUDA tensors, mamba_ssm importable) the chunk stays the
checkpoint's; the Mamba-1 dispatcher passes CUDA tensors on unchanged.

    with speed.fast_inference(model):     # settings on, restored on exit (nestable, per model)
        logits = model(ids).logits

`fast_inference` changes instance attributes and hooks only; on exit every attribute is back to the
value it had and every hook is removed (patch then unpatch leaves the model as it was).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import threading
from typing import Iterator

import torch

# Chunk sizes tried for the Mamba-2 torch path (powers of two; 256 is what checkpoints ship with).
CHUNK_SIZES = (16, 32, 64, 128, 256)

_LOCK = threading.Lock()
_ACTIVE: dict = {}   # id(model) -> nesting depth


def chunk_size_for(n: int, default: int = 256) -> int:
    """Chunk size for an `n`-token Mamba-2 torch-path scan.

    The scan costs about n*c (work inside chunks) + (n/c)^2 (the decay between chunks) plus the
    padding of n up to a multiple of c; its minimum lies near c = 4 n^(1/3), i.e. 16-32 for 128-512
    tokens and 64 at 2048-4096. Returns the power of two in CHUNK_SIZES nearest to that (in log
    scale), never above `default`.
    """
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    target = 4.0 * n ** (1.0 / 3.0)
    best = min(CHUNK_SIZES, key=lambda c: abs(math.log2(c) - math.log2(target)))
    return int(min(best, default))


def _mamba2_mixers(model):
    for block in getattr(getattr(model, "backbone", None), "layers", ()):
        m = getattr(block, "mixer", None)
        if m is not None and hasattr(m, "chunk_size") and hasattr(m, "dt_bias") and hasattr(m, "num_heads"):
            yield m


def _mamba1_mixers(model):
    for block in getattr(getattr(model, "backbone", None), "layers", ()):
        m = getattr(block, "mixer", None)
        if m is not None and hasattr(m, "use_mambapy") and hasattr(m, "x_proj"):
            yield m


def _input_of(args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_states"))
    return x if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def kernels_available() -> bool:
    """mamba-ssm's CUDA kernels are importable (transformers then uses them for CUDA tensors)."""
    return importlib.util.find_spec("mamba_ssm") is not None


@contextlib.contextmanager
def fast_inference(model, *, chunk: bool = True, scan: bool = True) -> Iterator[dict]:
    """Within the block, `model` runs with the fast settings (module doc); yields what was set:
    {"mamba2_chunk": bool, "mamba1_scan": bool}. Nested calls on one model are no-ops inside
    the outermost one."""
    key = id(model)
    with _LOCK:
        depth = _ACTIVE.get(key, 0)
        _ACTIVE[key] = depth + 1
    if depth:
        try:
            yield {"nested": True}
        finally:
            with _LOCK:
                _ACTIVE[key] -= 1
        return
    hooks, saved = [], []
    info = {"mamba2_chunk": False, "mamba1_scan": False}
    scan_patched = False
    try:
        if chunk:
            for mixer in _mamba2_mixers(model):
                default = int(mixer.chunk_size)
                saved.append((mixer, "chunk_size", default))

                def pre(module, args, kwargs, _default=default):
                    x = _input_of(args, kwargs)
                    if x is None or x.shape[1] <= 1:
                        return
                    if x.is_cuda and kernels_available():   # the kernels' own tuned chunk
                        module.chunk_size = _default
                    else:
                        module.chunk_size = chunk_size_for(int(x.shape[1]), _default)

                hooks.append(mixer.register_forward_pre_hook(pre, with_kwargs=True))
                info["mamba2_chunk"] = True
        if scan and any(True for _ in _mamba1_mixers(model)):
            scan_patched = _patch_scan(+1)
            info["mamba1_scan"] = scan_patched
        yield info
    finally:
        if scan_patched:
            _patch_scan(-1)
        for h in hooks:
            h.remove()
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        with _LOCK:
            if _ACTIVE.get(key, 1) <= 1:
                _ACTIVE.pop(key, None)
            else:
                _ACTIVE[key] -= 1


# -- Mamba-1 selective scan -------------------------------------------------------------------------
_SCAN = {"depth": 0, "original": None}


def _scan_module():
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError:  # pragma: no cover - transformers without Mamba
        return None
    return modeling_mamba if hasattr(modeling_mamba, "mamba_selective_scan") else None


def _patch_scan(step: int) -> bool:
    """Reference-counted swap of transformers' Mamba-1 scan for the dispatcher (process-wide: the
    dispatcher computes the same function, so other models running meanwhile are unaffected)."""
    module = _scan_module()
    if module is None:
        return False
    with _LOCK:
        if step > 0:
            if _SCAN["depth"] == 0:
                _SCAN["original"] = module.mamba_selective_scan
                module.mamba_selective_scan = _dispatch_scan
            _SCAN["depth"] += 1
        else:
            _SCAN["depth"] -= 1
            if _SCAN["depth"] == 0:
                module.mamba_selective_scan = _SCAN["original"]
                _SCAN["original"] = None
    return True


def _dispatch_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **kwargs):
    original = _SCAN["original"]
    if hidden_states.is_cuda or torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden_states, dt, A, B, C, D, z)):
        return original(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
    return selective_scan(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus, return_last_state=return_last_state)


def selective_scan(u, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Mamba-1 selective scan, transformers' `mamba_selective_scan` convention: u, dt, z (b, Di, N);
    A (Di, S); B, C (b, S, N); D (Di,). y_t = C_t . h_t (+ D u_t, gated by silu(z)), with
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, h_0 = 0. Float32 inside; returns y in u's dtype (and
    the last state (b, Di, S) with return_last_state). The twin is transformers' own function."""
    import torch.nn.functional as F

    dtype = u.dtype
    b, di, n = u.shape
    dt = dt.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.float()
    dt_t = dt.permute(2, 0, 1).contiguous()                   # (N, b, Di)
    du_t = (dt * uf).permute(2, 0, 1).contiguous()            # (N, b, Di)
    b_t = B.float().permute(2, 0, 1).contiguous()             # (N, b, S)
    c_t = C.float().permute(2, 0, 1).unsqueeze(-1).contiguous()   # (N, b, S, 1)
    Af = A.float()
    h = torch.zeros(b, di, Af.shape[-1], dtype=torch.float32, device=u.device)
    decay = torch.empty_like(h)
    y = torch.empty(n, b, di, 1, dtype=torch.float32, device=u.device)
    for t in range(n):
        torch.mul(dt_t[t].unsqueeze(-1), Af, out=decay)
        decay.exp_()
        h.mul_(decay).addcmul_(du_t[t].unsqueeze(-1), b_t[t].unsqueeze(1))
        torch.bmm(h, c_t[t], out=y[t])
    out = y.squeeze(-1).permute(1, 2, 0)                      # (b, Di, N)
    if D is not None:
        out = out + uf * D.float()[None, :, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype)
    if return_last_state:
        return out, h.to(dtype)
    return out


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; any other value is returned as given
    (after checking that torch can use it)."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use device='auto' or 'cpu'")
    return device

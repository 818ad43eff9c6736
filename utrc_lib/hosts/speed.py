"""Inference settings that make the transformers torch paths fast without changing what they compute.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, H heads, c chunk size).

Two settings, both exact up to float rounding (the tests compare against the model as loaded):
  * Mamba-2 (`Mamba2Mixer.torch_forward`, the path without mamba-ssm kernels) computes the SSD scan
    in chunks of `config.chunk_size` (256 in every released checkpoint) and pads the sequence up to a
    multiple of it, so a 128-token input pays for 256. The result does not depend on the chunk size
    (SSD is an exact block decomposition). `chunk_size_for(n)` picks a chunk for an n-token input; a
    forward pre-hook on each mixer sets it from the length that mixer actually sees (after a
    reduction the sequence is shorter).
  * Mamba-1 (`MambaMixer` without kernels) runs its selective scan as a Python loop over the tokens.
    With `mambapy` installed the same recurrence runs as a parallel (Blelloch) scan: the mixer's own
    `use_mambapy` switch, which transformers reads only from the config.
With mamba-ssm's CUDA kernels in use (CUDA tensors, mamba_ssm importable) the chunk stays the
checkpoint's and the Mamba-1 switch is not read.

    with speed.fast_inference(model):     # settings on, restored on exit (nestable, per model)
        logits = model(ids).logits

`fast_inference` changes instance attributes and hooks only; on exit every attribute is back to the
value it had and every hook is removed (patch then unpatch leaves the model as it was).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
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


def mambapy_available() -> bool:
    return importlib.util.find_spec("mambapy") is not None


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
def fast_inference(model, *, chunk: bool = True, mambapy: bool = True) -> Iterator[dict]:
    """Within the block, `model` runs with the fast settings (module doc); yields what was set:
    {"mamba2_chunk": bool, "mamba1_mambapy": bool}. Nested calls on one model are no-ops inside
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
    info = {"mamba2_chunk": False, "mamba1_mambapy": False}
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
        if mambapy and mambapy_available():
            for mixer in _mamba1_mixers(model):
                saved.append((mixer, "use_mambapy", mixer.use_mambapy))
                mixer.use_mambapy = True
                info["mamba1_mambapy"] = True
        yield info
    finally:
        for h in hooks:
            h.remove()
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        with _LOCK:
            if _ACTIVE.get(key, 1) <= 1:
                _ACTIVE.pop(key, None)
            else:
                _ACTIVE[key] -= 1


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


def default_threads() -> int:
    """Threads for CPU inference: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)

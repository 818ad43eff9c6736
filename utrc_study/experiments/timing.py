"""Timing and memory measurement, the one place for it (style.md 11): warm-up, synchronize, CUDA
events on a GPU (perf_counter on CPU), median of repeats, peak memory by max_memory_allocated.

Used by the benchmark CLI (`utrc_study.experiments.bench`), the CPU analyses
(`utrc_study.experiments.analysis`) and the notebooks.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


class Stamp:
    """One interval: CUDA events on a GPU, the wall clock (perf_counter) on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.b.record()
        else:
            self.t1 = time.perf_counter()

    def ms(self) -> float:
        return self.a.elapsed_time(self.b) if self.cuda else (self.t1 - self.t0) * 1e3


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn() after `warmup` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t = Stamp(device)
        fn()
        t.stop()
        synchronize(device)
        out.append(t.ms())
    return out


def warm_up(fn: Callable[[], object], device, min_calls: int = 3, max_calls: int = 8,
            rel_tol: float = 0.15) -> list[float]:
    """Call fn() until two consecutive calls agree within `rel_tol` (at least `min_calls`, at most
    `max_calls` calls); returns their milliseconds.

    One warm-up call is not always enough: the first calls after a model is built also pay for
    first-touch memory, allocator growth and kernel selection (on CPU the first configuration of a
    benchmark once took 35x the time of the next). Time a configuration only after this.
    """
    times: list[float] = []
    for _ in range(max(1, max_calls)):
        t = Stamp(device)
        fn()
        t.stop()
        synchronize(device)
        times.append(t.ms())
        if len(times) >= max(2, min_calls) and abs(times[-1] - times[-2]) <= rel_tol * min(times[-2:]):
            break
    return times


def peak_memory_gb(fn: Callable[[], object], device) -> Optional[float]:
    """max_memory_allocated during fn() in GB (weights included); None on CPU."""
    if torch.device(device).type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) / 1e9


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def progress_log(path, tag: str, start: Optional[float] = None) -> Callable[[str], None]:
    """`say(msg)` for a long run: prints "[tag +Ns] msg" (N seconds since `start`, default now) and
    appends the same line to the file `path` (flushed, so a killed run keeps its log)."""
    t0 = time.time() if start is None else start
    f = open(path, "a", encoding="utf-8")

    def say(msg: str) -> None:
        line = f"[{tag} +{time.time() - t0:.0f}s] {msg}"
        print(line, flush=True)
        f.write(line + "\n")
        f.flush()
    return say

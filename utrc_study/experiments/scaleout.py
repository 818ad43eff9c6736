"""Spread a (model, method, cut) sweep over several GPUs (or CPU worker processes), resumably.

    python -m utrc_study.scaleout --models tiny-mamba2,tiny-mamba --methods utrc,evit,pumer \
        --cuts 0.1,0.2,0.3 --tasks cloze,choice4,choice2,ppl --limit 100 [--devices cuda:0,cuda:1] \
        [--workers N] [--cache .cache/sweeps/eval.jsonl]

One worker process per device (multiprocessing "spawn"; default: every visible GPU, else --workers
CPU processes). Workers pull configurations from a shared queue and compute each with
`utrc_study.experiments.sweep.evaluate_config` (the function the notebooks use) on their own device; only the
parent writes the cache through the steps of `sweep.run` (`sweep.pending`, `sweep.compute`,
`sweep.record`), so the cache file and row keys are exactly those of `sweep.run`: the notebooks read
rows computed here, and this runner skips rows the notebooks (or an earlier, interrupted run) already
finished. A configuration that raises is recorded as an "error" row (not retried unless
--retry-errors).

The row key is the configuration, not the device: a row's numbers do not depend on the device (up
to floating point), which is what lets the notebooks and this runner share rows. What does depend on
the device is never stored under that key: an error of the device or the machine (a device that
cannot be used, out of memory, a CUDA error, a worker that died) is reported as an error row of this
run but not cached, so a rerun (e.g. on a working device) computes the configuration. Requested
devices are checked before any worker starts, and the cache for writability.

Configurations (as in notebooks 01 / 04): the dense baseline (method "none", cut 0) per model
(unless --no-dense) plus every (model, method, cut), each with `fingerprint=model_fingerprint(model)`
and the common parameters tasks / limit / seed / batch_size.
"""
from __future__ import annotations

import argparse
import functools
import os
import queue as queue_mod
import sys
import warnings
from typing import Callable, Iterable, Optional, Sequence

from . import sweep

DEFAULT_CACHE = sweep.DEFAULT_CACHE_DIR / "eval.jsonl"   # the notebooks' cache (../.cache/sweeps/eval.jsonl)


# -- devices --------------------------------------------------------------------------------------
def default_devices(workers: Optional[int] = None) -> list[str]:
    """Every visible GPU ("cuda:0", ...), else `workers` (default 1) CPU workers."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        devs = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return devs[:workers] if workers else devs
    return ["cpu"] * max(1, workers or 1)


def _pin(device: str, n_cpu_workers: int) -> None:
    """Pin this worker to its device; CPU workers share the cores instead of oversubscribing them."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, n_cpu_workers)))


def check_devices(devices: Sequence[str]) -> None:
    """Raise ValueError naming the first requested device this host cannot use."""
    import torch

    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"--devices: {d!r} is not a device name ({exc})") from None
        if dev.type == "cpu":
            continue
        if dev.type != "cuda":
            raise ValueError(f"--devices: {d!r}: only 'cpu' and 'cuda[:i]' devices are supported")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--devices: {d!r} requested, but this host has no usable CUDA GPU "
                             f"(torch {torch.__version__}); use --devices cpu or leave --devices out")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--devices: {d!r} requested, but this host has {count} GPU(s) "
                             f"(cuda:0..cuda:{count - 1})")


def _loader_kwargs(fn: Callable[..., dict], device: str) -> dict:
    """Keyword arguments that make `fn` load its models on `device` (a `model_loader` when `fn` takes
    one, as `sweep.evaluate_config` does); they do not enter the row."""
    import inspect

    if device == "cpu":
        return {}
    try:
        takes = "model_loader" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    return {"model_loader": functools.partial(sweep.get_model, device=device)} if takes else {}


# -- worker ---------------------------------------------------------------------------------------
def _worker(wid: int, device: str, n_cpu_workers: int, fn: Callable[..., dict], tasks, results) -> None:
    """Pull (index, params) from `tasks` until None; send ("start" | "row", wid, index, payload) back."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C and stops the workers
    parent = os.getppid()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
    try:
        _pin(device, n_cpu_workers)
        extra = _loader_kwargs(fn, device)
    except Exception as exc:   # a device that cannot be used: fail its configurations (not cached)
        setup_error = f"DeviceUnavailable: {type(exc).__name__} on {device}: {exc}"
    else:
        setup_error = None
    while True:
        item = tasks.get()
        if item is None or os.getppid() != parent:   # done, or the parent is gone: stop
            return
        i, params = item
        results.put(("start", wid, i, None))
        if setup_error:
            out = dict(status="error", result=None, error=setup_error, traceback=None, transient=True, seconds=0.0)
        else:
            out = sweep.compute(fn, params, **extra)
        out["device"] = device
        results.put(("row", wid, i, out))


# -- parent ---------------------------------------------------------------------------------------
def configurations(models: Sequence[str], methods: Sequence[str], cuts: Sequence[float], *,
                   dense: bool = True, fingerprint: bool = True) -> list[dict]:
    """The notebooks' grid: dense per model (method "none", cut 0) + every (model, method, cut)."""
    configs = (sweep.grid(model=list(models), method=["none"], cut=[0.0]) if dense else []) \
        + sweep.grid(model=list(models), method=list(methods), cut=[float(c) for c in cuts])
    return sweep.with_fingerprints(configs) if fingerprint else configs


def run(configs: Iterable[dict], cache=DEFAULT_CACHE, *, devices: Optional[Sequence[str]] = None,
        workers: Optional[int] = None, fn: Callable[..., dict] = sweep.evaluate_config,
        common: Optional[dict] = None, version: Optional[str] = None, retry_errors: bool = False,
        progress: bool = True, desc: str = "scaleout") -> sweep.SweepResult:
    """`sweep.run` over one worker process per device; same cache file, keys and rows.

    Args:
        configs / common / version / retry_errors: as in `sweep.run`.
        devices: e.g. ["cuda:0", "cuda:1"] or ["cpu", "cpu"]; default `default_devices(workers)`.
        fn: module-level function (picklable for "spawn"), default `sweep.evaluate_config`; when it
            takes `model_loader`, a worker on a GPU passes one that loads models on its device.
    Returns:
        sweep.SweepResult in configuration order (computed now / read from the cache).
    Raises:
        ValueError (a requested device this host cannot use) or OSError (an unwritable cache),
        before any worker starts, when there is something to compute.
    """
    import multiprocessing as mp

    from tqdm.auto import tqdm

    p = sweep.pending(configs, cache, common=common, version=version, retry_errors=retry_errors)
    devices = list(devices) if devices else default_devices(workers)
    if p.todo:
        check_devices(devices)
    devices = devices[:max(1, len(p.todo))]
    bar = tqdm(total=len(p.configs), initial=p.cached, desc=desc, disable=not progress, dynamic_ncols=True)
    computed = 0
    if p.todo:
        ctx = mp.get_context("spawn")
        tasks, results = ctx.Queue(), ctx.Queue()
        for i in p.todo:
            tasks.put((i, p.configs[i]))
        for _ in devices:
            tasks.put(None)
        n_cpu = sum(1 for d in devices if not d.startswith("cuda"))
        procs = [ctx.Process(target=_worker, args=(w, d, n_cpu, fn, tasks, results), daemon=True,
                             name=f"utrc-scaleout-{w}") for w, d in enumerate(devices)]
        for proc in procs:
            proc.start()
        current: dict[int, Optional[int]] = {w: None for w in range(len(procs))}
        remaining = set(p.todo)

        def record(i: int, out: dict) -> None:
            nonlocal computed
            sweep.record(p, i, out)
            remaining.discard(i)
            computed += 1
            bar.update(1)
            if out["status"] != "ok":
                c = p.configs[i]
                bar.write(f"FAILED {c.get('model')} {c.get('method')} {c.get('cut')} on {out.get('device')}: "
                          f"{out['error']}" + (" (not cached)" if out.get("transient") else ""))

        import signal
        import threading

        def _terminate(signum, frame):   # SIGTERM (kill, job schedulers): stop like Ctrl-C
            raise KeyboardInterrupt(f"signal {signum}")

        old_term = (signal.signal(signal.SIGTERM, _terminate)
                    if threading.current_thread() is threading.main_thread() else None)
        try:
            while remaining:
                try:
                    kind, w, i, out = results.get(timeout=1.0)
                except queue_mod.Empty:
                    kind = None
                if kind == "start":
                    current[w] = i
                    bar.set_postfix_str(f"{devices[w]}: " + ", ".join(
                        f"{k}={v}" for k, v in p.configs[i].items() if k in ("model", "method", "cut"))[:80])
                elif kind == "row":
                    current[w] = None
                    if i in remaining:
                        record(i, out)
                for w, proc in enumerate(procs):   # a crashed worker fails its current configuration
                    if not proc.is_alive() and proc.exitcode not in (0, None) and current[w] is not None:
                        i, current[w] = current[w], None
                        if i in remaining:   # OOM kill, segfault: the machine's failure, not cached
                            record(i, dict(status="error", result=None, traceback=None, seconds=None,
                                           transient=True, device=devices[w],
                                           error=f"WorkerDied: the worker on {devices[w]} exited with code "
                                                 f"{proc.exitcode}"))
                if kind is None and remaining and not any(proc.is_alive() for proc in procs) and results.empty():
                    raise RuntimeError(f"all workers exited with {len(remaining)} configurations left")
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            bar.close()
            for proc in procs:
                proc.join(timeout=5 if not remaining else 0.1)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=5)
    else:
        bar.close()
    return p.result(computed)   # duplicates of a computed configuration share its row


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m utrc_study.scaleout", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-mamba2,tiny-mamba", help="names or checkpoint paths")
    ap.add_argument("--methods", default="utrc,evit,pumer", help="comma list of reduction methods (default utrc,evit,pumer)")
    ap.add_argument("--cuts", default="0.1,0.2,0.3", help="token-layer cuts (the paper's FLOPs definition), comma list")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline rows")
    ap.add_argument("--tasks", default="cloze,choice4,choice2,ppl", help="comma list of offline tasks (default cloze,choice4,choice2,ppl)")
    ap.add_argument("--limit", type=int, default=30, help="items per task (the notebooks' default: 30)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random metric / method (default 0)")
    ap.add_argument("--batch-size", type=int, default=16, help="requests per forward (default 16)")
    ap.add_argument("--devices", default=None, help="e.g. cuda:0,cuda:1 (default: all visible GPUs, else CPU)")
    ap.add_argument("--workers", type=int, default=None,
                    help="number of workers without --devices (CPU: default 1; GPUs: default all)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="JSON-lines row cache (shared with the notebooks)")
    ap.add_argument("--retry-errors", action="store_true", help="recompute configurations cached as errors")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    ns = parse_args(argv)
    configs = configurations(_split(ns.models), _split(ns.methods), [float(c) for c in _split(ns.cuts)],
                             dense=not ns.no_dense)
    common = dict(tasks=_split(ns.tasks), limit=ns.limit, seed=ns.seed, batch_size=ns.batch_size)
    devices = _split(ns.devices) if ns.devices else None
    try:
        res = run(configs, ns.cache, devices=devices, workers=ns.workers, common=common,
                  retry_errors=ns.retry_errors, progress=not ns.no_progress)
    except (ValueError, OSError) as exc:   # an unusable device or cache: nothing was computed
        print(f"python -m utrc_study.scaleout: error: {exc}", file=sys.stderr)
        return 2
    print(res.report())
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())

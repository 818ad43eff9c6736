"""Cached, resumable parameter sweeps (one JSON line per finished configuration).

    rows = sweep.run(sweep.evaluate_config, sweep.grid(model=["tiny-mamba2"], method=["utrc", "evit"],
                     cut=[0.1, 0.2]), cache=".cache/sweeps/main.jsonl", common=dict(limit=100))
    df = rows.frame()

Every finished configuration is appended to the cache file (flushed and fsynced) under a key that
hashes its parameters and the code version (a hash of the library sources that change the numbers,
the benchmark manifest and the model weights). Re-running a sweep computes only the configurations
whose key is not in the cache, so an interrupted sweep (Ctrl-C, a killed kernel) resumes without
recomputing or losing rows. A configuration that raises is recorded as an "error" row with its
message and traceback and reported at the end (not silently dropped); by default it is not retried
until the code version changes (`retry_errors=True` retries it).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from ..environment import REPO
DEFAULT_CACHE_DIR = REPO / ".cache" / "sweeps"

# Library files that do not change any computed number (plots, reports, runners).
# files (relative to utrc_lib/) that cannot change a computed number: presentation, CLIs, conversion
_NOT_NUMERIC = {"bench.py", "flops.py", "figures.py", "scaleout.py", "environment.py", "experiments/bench.py",
                "experiments/scaleout.py", "hosts/convert.py"}
_NOT_NUMERIC_DIRS = ("report/",)


# -- keys -----------------------------------------------------------------------------------------
def _hash_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """Hash of the library sources that affect computed numbers, and of the benchmark manifest."""
    root = REPO / "utrc_lib"
    chunks = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel in _NOT_NUMERIC or rel.startswith(_NOT_NUMERIC_DIRS):
            continue
        chunks += [str(p.relative_to(root)).encode(), p.read_bytes()]
    manifest = REPO / "data" / "benchmarks" / "manifest.json"
    if manifest.is_file():
        chunks.append(manifest.read_bytes())
    return _hash_bytes(*chunks)[:16]


def _canonical(obj: Any) -> Any:
    """JSON-stable form of a parameter value (tuples -> lists, floats rounded to 12 digits)."""
    if isinstance(obj, float):
        return round(obj, 12)
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def row_key(params: dict, version: str = "") -> str:
    """Cache key of one configuration: sha256 of its canonical parameters and the code version."""
    text = json.dumps({"params": _canonical(params), "version": version}, sort_keys=True)
    return _hash_bytes(text.encode())[:20]


def grid(**axes: Sequence) -> list[dict]:
    """Cartesian product of the given axes: grid(a=[1, 2], b=["x"]) -> [{a:1,b:'x'}, {a:2,b:'x'}]."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(list(axes[n]) for n in names))]


# -- cache file -----------------------------------------------------------------------------------
class RowCache:
    """Append-only JSON-lines file of finished rows; the last row of a key wins.

    A truncated last line (the process died mid-write) is ignored with a warning.
    """

    def __init__(self, path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        with self.path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path}:{n}: unreadable cache line ignored (interrupted write?)")
                    continue
                if isinstance(row, dict) and "key" in row:
                    rows[row["key"]] = row
        return rows

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, default=_json_default) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- running --------------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepResult:
    """Rows of one sweep, in configuration order.

    rows: {"key", "params", "status" ("ok" | "error"), "result" (dict), "error", "traceback",
           "seconds", "version", "finished"} per configuration.
    computed / cached: how many rows were computed now / read from the cache.
    """

    rows: list
    computed: int
    cached: int
    cache_path: str

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]

    def frame(self, errors: bool = False):
        """pandas DataFrame: one row per configuration, parameter columns then result columns."""
        import pandas as pd

        recs = []
        for r in self.rows:
            if r["status"] != "ok" and not errors:
                continue
            rec = {k: (tuple(v) if isinstance(v, list) else v) for k, v in r["params"].items()}
            rec.update(r.get("result") or {})
            if errors:
                rec["status"], rec["error"] = r["status"], r.get("error")
            recs.append(rec)
        return pd.DataFrame.from_records(recs)

    def report(self) -> str:
        lines = [f"{len(self.rows)} configurations: {self.computed} computed, {self.cached} from cache "
                 f"({self.cache_path}); {len(self.errors)} failed"]
        for r in self.errors:
            lines.append(f"  FAILED {r['params']}: {r.get('error')}")
        return "\n".join(lines)


def run(fn: Callable[..., dict], configs: Iterable[dict], cache, *, common: Optional[dict] = None,
        version: Optional[str] = None, desc: str = "sweep", retry_errors: bool = False,
        progress: bool = True) -> SweepResult:
    """Run `fn(**params)` for every configuration not yet in `cache`, appending each finished row.

    Args:
        fn: returns a JSON-serialisable dict of results for one configuration.
        configs: parameter dicts (e.g. from `grid`); `common` parameters are added to each.
        cache: path of the JSON-lines cache file (created on demand).
        version: code version in the key (default `code_version()`).
        retry_errors: recompute configurations whose cached row is an error.
    Returns:
        SweepResult (rows in configuration order). Failed configurations appear as "error" rows and
        are listed by `SweepResult.report()` (also warned about).
    KeyboardInterrupt is not caught: rows finished before it are already on disk.
    """
    from tqdm.auto import tqdm

    version = code_version() if version is None else version
    store = RowCache(cache)
    done = store.load()
    configs = [{**(common or {}), **c} for c in configs]
    keys = [row_key(c, version) for c in configs]
    todo = [i for i, k in enumerate(keys)
            if k not in done or (retry_errors and done[k]["status"] != "ok")]
    cached = len(configs) - len(todo)
    bar = tqdm(total=len(configs), initial=cached, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for i in todo:
            params, key = configs[i], keys[i]
            bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in params.items()
                                          if not isinstance(v, (list, tuple, dict)))[:80])
            t = time.perf_counter()
            row = {"key": key, "params": _canonical(params), "version": version}
            try:
                result = fn(**params)
                row.update(status="ok", result=_canonical(result), error=None, traceback=None)
            except Exception as exc:  # record the failure; KeyboardInterrupt propagates
                row.update(status="error", result=None, error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc(limit=20))
            row["seconds"] = round(time.perf_counter() - t, 3)
            row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            store.append(row)
            done[key] = row
            bar.update(1)
    finally:
        bar.close()
    out = SweepResult([done[k] for k in keys], computed=len(todo), cached=cached, cache_path=str(cache))
    if out.errors:
        warnings.warn(out.report())
    return out


# -- evaluation rows ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def get_model(name: str):
    """(model, tokenizer) by name ("tiny-mamba2", "tiny-mamba") or path; cached per process, eval mode."""
    from .. import load_model

    model, tok = load_model(name)
    return model.eval(), tok


@functools.lru_cache(maxsize=None)
def model_fingerprint(name: str) -> str:
    """Hash of a model's config and weight files (so retraining a model invalidates its rows)."""
    try:
        from ..hosts.models import resolve_path  # optional helper of utrc_lib.models
        path = Path(resolve_path(name))
    except Exception:
        path = Path(name) if Path(name).exists() else REPO / "data" / "models" / name
    if not path.is_dir():
        return "unknown"
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def make_config(method: str, cut: float, *, metric: str = "clip", layers=None, q: float = 0.5,
                hidden_rule=None, residual_rule=None, causal: Optional[bool] = None, seed: int = 0,
                metric_source: str = "ssm"):
    """ReductionConfig for a sweep row, or None for the dense model (method "none" or cut 0)."""
    from ..core.config import ReductionConfig
    from ..core.methods import get_method

    if method in ("none", "dense") or not cut:
        return None
    if causal is None:
        causal = get_method(method).causal_capable
    return ReductionConfig(method=method, metric=metric, layers=None if layers is None else tuple(layers),
                           flops_reduction=float(cut), q=q, hidden_rule=hidden_rule,
                           residual_rule=residual_rule, causal=causal, seed=seed,
                           metric_source=metric_source)


def _evaluate(model, tok, tasks, config, limit, batch_size, protect: bool, seed: int):
    """utrc_lib.eval.scorer.evaluate with protection of the scored continuation on (default) or off.

    evaluate() always protects; when it has no `protect` switch the unprotected run goes through
    the same steps with `loglikelihood_tokens(..., protect=False)` (the config applied unchanged).
    """
    from ..eval import scorer as ev

    params = inspect.signature(ev.evaluate).parameters
    if protect or "protect" in params:
        kwargs = {} if protect else {"protect": False}
        return ev.evaluate(model, tok, tasks=tuple(tasks), config=config, limit=limit, batch_size=batch_size,
                           progress=False, **kwargs)
    results = {}
    model.eval()
    for task in tasks:
        t0 = time.perf_counter()
        toks, extra = ev._task_requests(tok, task, limit)
        res = ev.loglikelihood_tokens(model, toks, config, batch_size, pad_token_id=ev._pad_id(tok),
                                      progress=False, protect=False)
        results[task] = ev._score_task(task, extra["items"], extra["texts"], res, toks)
        results[task]["seconds"] = time.perf_counter() - t0
    results["meta"] = {"protect": "none (unprotected: scored positions may be removed / merged)",
                       "method": "dense" if config is None else config.method, "limit": limit,
                       "batch_size": batch_size}
    return results


def flatten_scores(res: dict) -> dict:
    """{task: {metric: v, "n": n}, "meta": {...}} -> {"task/metric": v, "task/n": n}."""
    out = {}
    for task, metrics in res.items():
        if task == "meta" or not isinstance(metrics, dict):
            continue
        for m, v in metrics.items():
            if isinstance(v, (int, float)) or v is None:
                out[f"{task}/{m}"] = v
    return out


def evaluate_config(model: str, method: str, cut: float, *, tasks: Sequence[str] = ("cloze", "choice4", "choice2", "ppl"),
                    limit: Optional[int] = 100, seed: int = 0, batch_size: int = 16, protect: bool = True,
                    flops_seq_len: int = 128, fingerprint: str = "", **config_kwargs) -> dict:
    """One sweep row: evaluate `model` with `method` at FLOPs cut `cut` (dense for "none" / 0).

    Returns the flattened task metrics ("cloze/acc", ...), the keep ratio and layers used, the
    token-layer FLOPs cut (the paper's definition) and the analytic FLOPs cut at `flops_seq_len`
    tokens (LM head on the last position), and the evaluator's meta ("meta/<key>").
    `fingerprint` only enters the cache key (pass `model_fingerprint(model)`).
    """
    import torch

    from ..core.flops import flops
    from ..core.schedule import token_layer_fraction

    torch.manual_seed(seed)
    mdl, tok = get_model(model)
    cfg = make_config(method, cut, seed=seed, **config_kwargs)
    res = _evaluate(mdl, tok, tasks, cfg, limit, batch_size, protect, seed)
    out = flatten_scores(res)
    meta = res.get("meta", {}) if isinstance(res, dict) else {}
    for k, v in meta.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[f"meta/{k}"] = v
    out["protect"] = bool(protect)
    rep = flops(mdl, flops_seq_len, cfg, logits="last")
    L = rep.tokens_per_layer and len(rep.tokens_per_layer)
    if cfg is None:
        out.update(keep_ratio=1.0, layers=[], token_layer_cut=0.0)
    else:
        layers = cfg.resolve_layers(L)
        rho = cfg.resolve_keep_ratio(L)
        out.update(keep_ratio=rho, layers=list(layers),
                   token_layer_cut=1.0 - token_layer_fraction(L, layers, rho))
    out["analytic_flops_cut"] = rep.flops_cut
    out["analytic_flops_seq_len"] = flops_seq_len
    return out


def with_fingerprints(configs: Iterable[dict]) -> list[dict]:
    """Add `fingerprint=model_fingerprint(model)` to each configuration (a retrained model gets new keys)."""
    return [{**c, "fingerprint": model_fingerprint(c["model"])} for c in configs]

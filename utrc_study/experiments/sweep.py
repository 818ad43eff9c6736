"""Cached, resumable parameter sweeps (one JSON line per finished configuration).

    rows = sweep.run(sweep.evaluate_config, sweep.grid(model=["tiny-mamba2"], method=["utrc", "evit"],
                     cut=[0.1, 0.2]), cache=".cache/sweeps/main.jsonl", common=dict(limit=100))
    df = rows.frame()

Every finished configuration is appended to the cache file (flushed and fsynced) under a key that
hashes its parameters and the code version (a hash of the library sources that change the numbers
and the benchmark manifest). Each row also stores "deps" (`dependency_key`): the model's files
(weights, config, tokenizer) and the content hash of every benchmark file its tasks read, under the
current UTRC_DATA_DIR. A cached row whose deps differ from today's (an edited JSONL, another data
folder, the v1 / v2 suite, retrained weights), or that has none, is computed again, never served.
Re-running a sweep computes only the configurations
whose key is not in the cache, so an interrupted sweep (Ctrl-C, a killed kernel) resumes without
recomputing or losing rows (a row torn by a kill mid-write is cut off before the next append and
computed again). A configuration that raises is recorded as an "error" row with its message and
traceback and reported at the end (not silently dropped); by default it is not retried until the
code version changes (`retry_errors=True` retries it). Errors of the device or the machine (out of
memory, CUDA errors, an unusable device) and of the network (a hub dataset or model unreachable, or
HF_HUB_OFFLINE) are reported but never cached: the next run retries them.
The cache is checked for writability before the first configuration runs.

Item-level outcomes (opt-in: `run(..., items=True)`, `evaluate_config(..., items=True)`): a row then
also holds row["items"][task] = {"id", "correct", "ll", "ll_per_token", "kl", "kl_per_token", "top1",
"tokens", "gold_tokens", ...} (per-item arrays in task order; `utrc_study.eval.scorer._item_outcomes`),
beside the unchanged aggregates in row["result"]. Whether a row has items does not enter its key: a
cached row without items (written before, or by a run without items) still loads, and a run with
items=True recomputes it (the new row replaces it; its aggregates are the same numbers).
`utrc_study.experiments.stats` turns the arrays into paired intervals and tests.

`pending` (what is left to compute), `compute` (one configuration) and `record` (its row, appended)
are the steps `run` is made of; `utrc_study.experiments.scaleout` runs the same steps over several
processes, so both write the same rows under the same keys.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from utrc_lib.environment import CACHE, code_version, ensure_writable

try:  # advisory lock around each append (POSIX); without it appends are still whole writes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

DEFAULT_CACHE_DIR = CACHE / "sweeps"

__all__ = ["run", "grid", "row_key", "code_version", "RowCache", "SweepResult", "Pending", "pending", "compute",
           "record", "get_model", "model_fingerprint", "dependencies", "dependency_key", "make_config", "evaluate_config",
           "check_tasks", "flatten_scores",
           "with_fingerprints", "is_environment_error", "DEFAULT_CACHE_DIR"]


# -- keys -----------------------------------------------------------------------------------------
def _hash_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


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

    A torn last line (the process died mid-write) is skipped by `load` with a warning, and cut off by
    the next `append` before it writes, so the new row starts on a line of its own. A line that
    holds a torn row followed by a whole one (caches written before this repair) yields the whole one.
    Appends take an advisory lock (fcntl) and write each row with one system call, so two processes
    appending to the same cache do not interleave.
    """

    _ROW_START = '{"key": '   # how json.dumps begins every row

    def __init__(self, path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = self._parse(line)
                if row is None:
                    warnings.warn(f"{self.path}:{n}: unreadable cache line ignored (interrupted write?)")
                    continue
                if isinstance(row, dict) and "key" in row:
                    rows[row["key"]] = row
        return rows

    @classmethod
    def _parse(cls, line: str):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            pass
        start = line.rfind(cls._ROW_START)
        if start > 0:   # a torn row with a whole row appended to it
            try:
                return json.loads(line[start:])
            except json.JSONDecodeError:
                pass
        return None

    def append(self, row: dict) -> None:
        """Append one row (flushed and fsynced), after cutting off a torn last line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(row, default=_json_default) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._mend_tail(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)   # releases the lock

    def _mend_tail(self, fd: int) -> None:
        """Make the file end with a newline: a last line without one is a complete row (its newline
        was lost: add it) or a torn write (cut it off, with a warning; its configuration is not in
        the cache, so it is computed again)."""
        size = os.fstat(fd).st_size
        if size == 0:
            return
        os.lseek(fd, size - 1, os.SEEK_SET)
        if os.read(fd, 1) == b"\n":
            return
        start, pos = 0, size
        while pos > 0:   # find where the last line begins
            step = min(1 << 16, pos)
            os.lseek(fd, pos - step, os.SEEK_SET)
            cut = os.read(fd, step).rfind(b"\n")
            if cut >= 0:
                start = pos - step + cut + 1
                break
            pos -= step
        os.lseek(fd, start, os.SEEK_SET)
        tail = os.read(fd, size - start)
        try:
            complete = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False
        if complete:
            os.write(fd, b"\n")
        else:
            os.ftruncate(fd, start)
            warnings.warn(f"{self.path}: cut off a torn last line ({size - start} bytes, an interrupted write) "
                          f"before appending")


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


# -- errors of the machine, not of the configuration ------------------------------------------------
_ENVIRONMENT_TYPES = {"MemoryError", "OutOfMemoryError", "AcceleratorError", "CudaError", "DeviceUnavailable",
                      "WorkerDied", "ConnectionError", "OfflineModeIsEnabled"}
_ENVIRONMENT_TEXT = re.compile(r"^(WorkerDied|DeviceUnavailable)\b|OutOfMemoryError|out of memory|\bCUDA\b|cuDNN|"
                               r"\bNCCL\b|\bno kernel image\b|OfflineModeIsEnabled|Couldn't reach .* on the Hub|"
                               r"HF_HUB_OFFLINE is set",
                               re.IGNORECASE)


def is_environment_error(exc: BaseException) -> bool:
    """True for a failure of the device or the machine (out of memory, CUDA errors, an unusable
    device) or of the network (an lm-eval task's dataset or a hub model that the Hugging Face hub
    could not serve: offline, unreachable), which another run may not hit: such errors are never
    cached."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & _ENVIRONMENT_TYPES) or bool(_ENVIRONMENT_TEXT.search(f"{type(exc).__name__}: {exc}"))


def _environmental(row: dict) -> bool:
    """An error row that came from the device / machine (marked "transient", or, in caches written
    before that mark, recognised by its message): it does not count as done."""
    return bool(row.get("transient")) or bool(_ENVIRONMENT_TEXT.search(str(row.get("error") or "")))


def _needs_run(row: Optional[dict], retry_errors: bool, items: bool = False, deps: Optional[str] = None) -> bool:
    if row is None:
        return True
    if deps is not None and row.get("deps") != deps:   # its data, model or tokenizer changed: recompute
        return True
    if row.get("status") == "ok":
        return bool(items) and not isinstance(row.get("items"), dict)
    return retry_errors or _environmental(row)


# -- running --------------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepResult:
    """Rows of one sweep, in configuration order.

    rows: {"key", "params", "status" ("ok" | "error"), "result" (dict), "error", "traceback",
           "seconds", "version", "finished"} per configuration ("transient": True on an error of the
           device / machine, which is not cached; "device" on rows computed by scale-out; "items":
           {task: per-item arrays} on rows computed with items=True).
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
            note = " (device / machine error: not cached, retried by the next run)" if r.get("transient") else ""
            lines.append(f"  FAILED {r['params']}: {r.get('error')}{note}")
        return "\n".join(lines)


@dataclasses.dataclass
class Pending:
    """A sweep's configurations against its cache: what `sweep.run` and `scaleout.run` compute.

    configs: parameter dicts (common parameters merged in); keys: their row keys; todo: indices of
    the configurations to compute (not cached, or cached as an error to retry, or cached without
    item arrays when `items` is asked for; a configuration listed twice is computed once); done:
    key -> row (cached rows, then the rows `record` adds).
    """

    configs: list
    keys: list
    todo: list
    done: dict
    store: RowCache
    version: str
    deps: list = dataclasses.field(default_factory=list)   # dependency_key of each configuration

    @property
    def cached(self) -> int:
        return len(self.configs) - len(self.todo)

    def result(self, computed: int) -> SweepResult:
        """The SweepResult in configuration order (warns when rows failed)."""
        out = SweepResult([self.done[k] for k in self.keys], computed=computed, cached=self.cached,
                          cache_path=str(self.store.path))
        if out.errors:
            warnings.warn(out.report())
        return out


def pending(configs: Iterable[dict], cache, *, common: Optional[dict] = None, version: Optional[str] = None,
            retry_errors: bool = False, items: bool = False) -> Pending:
    """Read `cache` and list the configurations still to compute (see `Pending`); with `items`, an
    ok row without item arrays counts as still to compute."""
    version = code_version() if version is None else version
    store = RowCache(cache)
    done = store.load()
    configs = [{**(common or {}), **c} for c in configs]
    keys = [row_key(c, version) for c in configs]
    deps = [dependency_key(c) for c in configs]
    todo, seen = [], set()
    for i, k in enumerate(keys):
        if k not in seen and _needs_run(done.get(k), retry_errors, items, deps[i]):
            todo.append(i)
        seen.add(k)
    if todo:   # fail now, not after the work
        ensure_writable(store.path, "sweep cache")
    return Pending(configs, keys, todo, done, store, version, deps)


def compute(fn: Callable[..., dict], params: dict, **extra) -> dict:
    """Run `fn(**params, **extra)` once: {"status", "result", "error", "traceback", "seconds"}, and
    "transient": True when the error is the device's or the machine's (`is_environment_error`).
    `extra` (e.g. a model loader, items=True) does not enter the row's parameters. A result dict
    with an "items" entry (per-item arrays) has it moved to the row: outcome["items"].
    KeyboardInterrupt propagates."""
    t = time.perf_counter()
    try:
        result = fn(**params, **extra)
        item_arrays = result.pop("items", None) if isinstance(result, dict) else None
        out = dict(status="ok", result=_canonical(result), error=None, traceback=None)
        if item_arrays is not None:
            out["items"] = _canonical(item_arrays)
    except Exception as exc:  # record the failure
        out = dict(status="error", result=None, error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=20))
        if is_environment_error(exc):
            out["transient"] = True
    out["seconds"] = round(time.perf_counter() - t, 3)
    return out


def record(p: Pending, i: int, outcome: dict) -> dict:
    """The row of configuration `i` from its `compute` outcome: appended to the cache unless it is
    transient (a device / machine error), and entered in `p.done`."""
    deps = {"deps": p.deps[i]} if p.deps else {}
    row = {"key": p.keys[i], "params": _canonical(p.configs[i]), "version": p.version, **deps, **outcome,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not row.get("transient"):
        p.store.append(row)
    p.done[p.keys[i]] = row
    return row


def run(fn: Callable[..., dict], configs: Iterable[dict], cache, *, common: Optional[dict] = None,
        version: Optional[str] = None, desc: str = "sweep", retry_errors: bool = False,
        progress: bool = True, items: bool = False) -> SweepResult:
    """Run `fn(**params)` for every configuration not yet in `cache`, appending each finished row.

    Args:
        fn: returns a JSON-serialisable dict of results for one configuration.
        configs: parameter dicts (e.g. from `grid`); `common` parameters are added to each.
        cache: path of the JSON-lines cache file (created on demand; checked for writability before
            the first configuration runs).
        version: code version in the key (default `code_version()`).
        retry_errors: recompute configurations whose cached row is an error.
        items: keep per-item outcomes: `fn` is called with items=True (it must accept it, as
            `evaluate_config` does) and returns them under "items", which goes to row["items"];
            cached rows without item arrays are recomputed.
    Returns:
        SweepResult (rows in configuration order). Failed configurations appear as "error" rows and
        are listed by `SweepResult.report()` (also warned about). Errors of the device / machine
        (out of memory, CUDA) are reported but not cached.
    KeyboardInterrupt is not caught: rows finished before it are already on disk.
    """
    from tqdm.auto import tqdm

    p = pending(configs, cache, common=common, version=version, retry_errors=retry_errors, items=items)
    extra = {"items": True} if items else {}
    bar = tqdm(total=len(p.configs), initial=p.cached, desc=desc, disable=not progress, dynamic_ncols=True)
    report = Progress(desc, len(p.configs), p.cached)
    try:
        for i in p.todo:
            params = p.configs[i]
            label = ", ".join(f"{k}={v}" for k, v in params.items()
                              if not isinstance(v, (list, tuple, dict)) and k not in ("fingerprint",))
            bar.set_postfix_str(label[:80])
            record(p, i, compute(fn, params, **extra))
            bar.update(1)
            report.step(label)
    finally:
        bar.close()
    return p.result(computed=len(p.todo))


PROGRESS_ENV = "UTRC_PROGRESS_FILE"


class Progress:
    """One line per finished configuration ("<desc>: i/n configurations (...), elapsed, ~remaining"),
    appended to the file named by $UTRC_PROGRESS_FILE when it is set: the figures runner sets it and
    prints the lines while a notebook runs (a notebook kernel's own output reaches only the notebook)."""

    def __init__(self, desc: str, total: int, cached: int):
        self.desc, self.total, self.done, self.cached = desc, total, cached, cached
        self.t0 = time.perf_counter()
        self.path = os.environ.get(PROGRESS_ENV)
        if cached and self.path:
            self._write(f"{desc}: {cached}/{total} configurations already cached")

    def step(self, label: str) -> None:
        self.done += 1
        if not self.path:
            return
        el = time.perf_counter() - self.t0
        computed = self.done - self.cached
        left = el / computed * (self.total - self.done) if computed else float("nan")
        self._write(f"{self.desc}: {self.done}/{self.total} configurations ({label}), "
                    f"{_fmt_s(el)} elapsed, ~{_fmt_s(left)} left")

    def _write(self, line: str) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:  # progress is advisory: never fail a sweep over it
            pass


def _fmt_s(s: float) -> str:
    if s != s:
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -- evaluation rows ------------------------------------------------------------------------------
def get_model(name: str, device: str = "auto"):
    """(model, tokenizer) by name ("tiny-mamba2", "tiny-mamba") or path, on `device` ("auto": CUDA
    when torch sees a GPU, else CPU; float32 either way, so that the numbers agree); cached per
    process (four models), eval mode."""
    from utrc_lib.hosts.speed import resolve_device

    return _load_model(str(name), resolve_device(device))


@functools.lru_cache(maxsize=4)
def _load_model(name: str, device: str):
    from utrc_lib.hosts.models import load_model

    model, tok = load_model(name, device=device)
    return model.eval(), tok


_FINGERPRINTS: dict = {}   # (folder, ((file, size, mtime_ns), ...)) -> fingerprint


def model_fingerprint(name: str) -> str:
    """Hash of a model's config, tokenizer and weight files (.json, .safetensors, .bin), so
    retraining a model (or another tokenizer) invalidates its rows.

    The files of what `load_model(name)` loads: an embedded model's folder (under the current
    UTRC_DATA_DIR), else a local checkpoint directory; for a hub id "hub:<id>@<commit>" of the
    revision it loads (the local Hugging Face cache's, else the hub's when online), else "unknown".
    Memoised by the files' sizes and modification times, so a file changed in a running process is
    hashed again."""
    from utrc_lib.hosts.models import EMBEDDED, embedded_path

    path = embedded_path(name) if name in EMBEDDED else Path(name).expanduser()
    if not path.is_dir():
        return _hub_revision(name)
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")]
    stamp = (str(path.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    hit = _FINGERPRINTS.get(stamp)
    if hit is None:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        hit = _FINGERPRINTS[stamp] = h.hexdigest()[:16]
    return hit


@functools.lru_cache(maxsize=64)
def _hub_revision(name: str) -> str:
    """"hub:<id>@<commit>" of a hub model: the snapshot in the local Hugging Face cache, else (online)
    the hub's current commit; "unknown" when neither answers (not a hub id, no network)."""
    from utrc_lib.environment import hf_offline

    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return f"hub:{name}@{Path(cached).parent.name}"
        if not hf_offline():
            from huggingface_hub import HfApi

            return f"hub:{name}@{HfApi().model_info(name).sha}"
    except Exception:   # not a repo id, no network: nothing to pin
        pass
    return "unknown"


DEFAULT_TASKS = ("cloze", "choice4", "choice2", "ppl")   # evaluate_config's default tasks


def dependencies(params: dict) -> dict:
    """What a row's numbers depend on besides its parameters and the code version (which the key
    holds): for a row with a "model", the model's files (`model_fingerprint`: weights, config,
    tokenizer) and the content hash of every benchmark file its tasks read (`suite.task_signature`,
    under the current UTRC_DATA_DIR). {} for rows without a model (other sweep functions)."""
    model = params.get("model")
    if not isinstance(model, str):
        return {}
    from ..eval import suite

    tasks = params.get("tasks", DEFAULT_TASKS)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks or ())
    data = {}
    for t in tasks:
        try:
            data[str(t)] = [digest for _, digest in suite.task_signature(str(t))]
        except (ValueError, OSError):   # an lm-eval task, or an unknown one (the row's own run reports it)
            data[str(t)] = _lm_eval_dependencies(str(t))
    return {"model": model_fingerprint(model), "data": data}


def _lm_eval_dependencies(task: str) -> list:
    """What an lm-eval task's numbers depend on: the lm-eval version, and for a local YAML
    (`utrc_study.eval.lm_eval_rows.local_source`) the YAML file and the JSONL it reads."""
    from importlib import metadata

    from ..eval import TASKS_DIR, lm_eval_rows, suite

    try:
        out = [f"lm-eval {metadata.version('lm_eval')}"]
    except metadata.PackageNotFoundError:
        return ["unknown"]
    source = lm_eval_rows.local_source(task)
    yaml = TASKS_DIR / f"{task}.yaml"
    if source is not None and yaml.is_file():
        out.append(suite.file_digest(yaml))
        out += [digest for _, digest in suite.task_signature(source)]
    return out


def dependency_key(params: dict) -> str:
    """Hash of `dependencies(params)`, stored in each row as "deps": a cached row whose "deps" differ
    (or that has none) is computed again, never served."""
    return _hash_bytes(json.dumps(dependencies(params), sort_keys=True).encode())[:20]


def make_config(method: str, cut: float, **kwargs):
    """ReductionConfig of a sweep row, or None for the dense model (method "none" / "dense", or cut 0).

    Built by `utrc_lib.core.config.config_from_args(method, flops_reduction=cut, **kwargs)`: keyword
    arguments are its fields (metric, layers, q, hidden_rule, residual_rule, causal, seed,
    metric_source, align, ...), with its defaults (`causal`: the method's own). The dense rows of a
    sweep are (method "none", cut 0); a dense method ignores `cut`.
    """
    from utrc_lib.core.config import config_from_args

    if method in ("none", "dense") or not cut:
        return None
    return config_from_args(method, flops_reduction=float(cut), **kwargs)


DEFAULT_MAX_LENGTH = 1024   # utrc_study.eval.scorer.evaluate's default input length


ENGINES = ("classic", "fast", "fast_ssm", "fast_ssm_bf16")
# (id(model), engine, task, limit, max_length) -> (weakref to the model, FastReference of its dense pass); an
# entry whose model is gone is never served (an id can be reused) and is dropped on the next store
_FAST_REFERENCES: dict = {}


def _cached(cache: dict, key: tuple, model):
    """The value stored under `key` for this very `model` (None for another object with a reused id)."""
    hit = cache.get(key)
    return hit[1] if hit is not None and hit[0]() is model else None


def _store(cache: dict, key: tuple, model, value) -> None:
    import weakref

    for k in [k for k, (ref, _) in cache.items() if ref() is None]:
        del cache[k]
    cache[key] = (weakref.ref(model), value)


def _evaluate(model, tok, tasks, config, limit, batch_size, protect: bool, items: bool = False,
              max_length: int = DEFAULT_MAX_LENGTH, protocol: Optional[str] = None, engine: str = "classic"):
    """utrc_study.eval.scorer.evaluate, with protection of the scored continuation on or off, or under
    an evaluation protocol (utrc_study.eval.protocol). `engine` other than "classic": the fast path
    (`utrc_study.eval.fast.evaluate_fast`) on the transformers model ("fast") or on its mamba-ssm
    conversion in float32 ("fast_ssm") or under bf16 autocast ("fast_ssm_bf16"); the dense references
    of the fast path are kept per (model, engine, task, limit) for the process's later rows."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if engine == "classic":
        from ..eval import scorer as ev

        kw = {"items": True} if items else {}
        if protocol is not None:
            kw["protocol"] = protocol
        return ev.evaluate(model, tok, tasks=tuple(tasks), config=config, limit=limit, batch_size=batch_size,
                           progress=False, protect=protect, max_length=max_length, **kw)
    if protocol not in (None, "leak_free"):
        raise ValueError(f"engine {engine!r} scores the leak-free protocol only (got protocol={protocol!r})")
    import torch

    from ..eval import fast

    run_model, kw = model, {}
    if engine.startswith("fast_ssm"):
        run_model = _ssm_twin(model)
        if engine == "fast_ssm_bf16":
            kw["autocast"] = torch.bfloat16
    refs = None
    if items:
        refs = {t: _cached(_FAST_REFERENCES, (id(run_model), engine, t, limit, max_length), run_model) for t in tasks}
        refs = {t: r for t, r in refs.items() if r is not None}
    res = fast.evaluate_fast(run_model, tok, tuple(tasks), config, limit=limit, max_length=max_length,
                             protect=protect, items=items, reference=refs, hf_model=model, **kw)
    for t, ref in (res.pop("references", None) or {}).items():
        _store(_FAST_REFERENCES, (id(run_model), engine, t, limit, max_length), run_model, ref)
    return res


_SSM_TWINS: dict = {}   # (id(transformers model),) -> (weakref to it, its mamba-ssm conversion on the same device)


def _ssm_twin(model):
    from ..eval.fast import mamba_ssm_model

    twin = _cached(_SSM_TWINS, (id(model),), model)
    if twin is None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise RuntimeError("the fast_ssm engines need the model on a CUDA device (mamba-ssm's kernels)")
        twin = mamba_ssm_model(model, device=str(device))
        _store(_SSM_TWINS, (id(model),), model, twin)
    return twin


def check_tasks(tasks: Sequence[str]) -> tuple[list, list]:
    """(built-in tasks, lm-eval tasks) of `tasks` (`evaluate_config` scores the first itself and runs
    the second through lm-eval); ValueError naming any task that is neither built-in nor known to
    lm-eval (local YAMLs included), with the closest names. A notebook calls it before its sweep, so
    a misspelt name fails at once instead of as one error row per configuration."""
    from ..eval import lm_eval_rows

    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    lm_eval_rows.check_tasks(tasks)
    return lm_eval_rows.split_tasks(tasks)


def flatten_scores(res: dict) -> dict:
    """{task: {metric: v, "n": n}, "meta": {...}} -> {"task/metric": v, "task/n": n} ("items" skipped)."""
    out = {}
    for task, metrics in res.items():
        if task in ("meta", "items") or not isinstance(metrics, dict):
            continue
        for m, v in metrics.items():
            if isinstance(v, (int, float)) or v is None:
                out[f"{task}/{m}"] = v
    return out


def evaluate_config(model: str, method: str, cut: float, *, tasks: Sequence[str] = DEFAULT_TASKS,
                    limit: Optional[int] = 100, seed: int = 0, batch_size: int = 16, protect: bool = True,
                    flops_seq_len: int = 128, fingerprint: str = "",
                    model_loader: Optional[Callable[[str], tuple]] = None, items: bool = False,
                    max_length: int = DEFAULT_MAX_LENGTH, protocol: Optional[str] = None,
                    engine: str = "classic", **config_kwargs) -> dict:
    """One sweep row: evaluate `model` with `method` at FLOPs cut `cut` (dense for "none" / 0).

    `model`: an embedded name, a checkpoint directory or a hub id (`utrc_lib.hosts.models.load_model`).
    `tasks`: built-in suite tasks (`utrc_study.eval.scorer.evaluate`) and / or lm-eval task names
    (lambada_openai, hellaswag, ..., or the local YAMLs utrc_cloze, ...): those run through lm-eval
    (`utrc_study.eval.lm_eval_rows.evaluate`: `lm_eval.simple_evaluate` with the adapter around the
    same model and config, `log_samples=True`), and their aggregates ("<task>/acc", ...) and with
    items=True their per-item arrays (correct, correct_norm, ll, gold_tokens, tokens, kl, top1) have the
    built-in tasks' layout; "meta/evaluator" names lm-eval. A name that is neither raises ValueError
    (before the model loads).

    `protocol` ("leak_free" / "authors", utrc_study.eval.protocol) overrides `protect`; the row's
    "protocol" says how it was scored ("leak_free", "authors" or "unprotected").

    Returns the flattened task metrics ("cloze/acc", ...), the keep ratio and layers used, the
    token-layer FLOPs cut (the paper's definition) and the analytic FLOPs cut at `flops_seq_len`
    tokens (LM head on the last position), and the evaluator's meta ("meta/<key>").
    `fingerprint` only enters the cache key (pass `model_fingerprint(model)`). `model_loader(name)`
    returns (model, tokenizer), default `get_model` (CPU); scale-out passes one that loads on its
    worker's device (the default loads on CUDA when present, else CPU: `get_model`). It is not a
    parameter of the row (rows are keyed without it; the row's "meta/device" says where it ran), nor is `items`:
    items=True adds "items" ({task: per-item arrays}, see the module doc), which `compute` moves to
    the row; the other entries are the same numbers as without it.
    `max_length`: the scorer's input length (default 1024, as before; the v2 long tasks need 4096). A
    row's key holds only the parameters its configuration lists, so pass max_length in a configuration
    only where it differs from the default: rows without it keep their keys and numbers.
    `engine` ("classic", "fast", "fast_ssm", "fast_ssm_bf16"; `_evaluate`): how it is scored; the same
    rule holds (a configuration names it only where it is not "classic"). It applies to the built-in
    tasks; lm-eval tasks are always scored by the adapter (the classic scorer).
    """
    import torch

    from utrc_lib.core.flops import flops
    from utrc_lib.core.config import token_layer_fraction

    from ..eval import lm_eval_rows

    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    builtin, external = lm_eval_rows.split_tasks(tasks)
    lm_eval_rows.check_tasks(external)   # an unknown name fails here, before the model loads
    torch.manual_seed(seed)
    mdl, tok = (model_loader or get_model)(model)
    cfg = make_config(method, cut, seed=seed, **config_kwargs)
    res = {}
    if builtin or not external:
        res = _evaluate(mdl, tok, builtin, cfg, limit, batch_size, protect, items, max_length=int(max_length),
                        protocol=protocol, engine=engine)
    if external:   # lm-eval tasks: simple_evaluate with the adapter and log_samples -> the same row layout
        ext = lm_eval_rows.evaluate(mdl, tok, external, cfg, limit=limit, batch_size=batch_size, protect=protect,
                                    items=items, max_length=int(max_length), protocol=protocol, seed=seed)
        meta = res.get("meta") or ext["meta"]
        meta["evaluator"] = ("built-in + " if builtin else "") + ext["meta"]["evaluator"]
        res = {**{k: v for k, v in res.items() if k not in ("meta", "items")},
               **{k: v for k, v in ext.items() if k not in ("meta", "items")}, "meta": meta,
               **({"items": {**res.get("items", {}), **ext.get("items", {})}} if items else {})}
    out = flatten_scores(res)
    meta = res.get("meta", {}) if isinstance(res, dict) else {}
    for k, v in meta.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[f"meta/{k}"] = v
    out["protect"] = meta.get("protocol", "leak_free") == "leak_free"
    out["protocol"] = meta.get("protocol", "leak_free" if protect else "unprotected")
    if protocol is not None and cfg is not None:   # the flops of what ran (the authors' methods)
        from ..eval.protocol import resolve_protocol
        cfg = resolve_protocol(cfg, protocol)[0]
    rep = flops(mdl, flops_seq_len, cfg, logits="last")
    L = rep.tokens_per_layer and len(rep.tokens_per_layer)
    if cfg is None:
        out.update(keep_ratio=1.0, layers=[], token_layer_cut=0.0)
    else:
        layers = cfg.resolve_layers(L)
        rho = cfg.resolve_keep_ratio(L)
        out.update(keep_ratio=rho, layers=list(layers),
                   token_layer_cut=1.0 - token_layer_fraction(L, layers, rho))
    # the achieved token-layer cut beside the requested one: mean over the tasks' requests
    achieved = [(m.get("achieved_token_layer_cut", 0.0), m.get("n", 0)) for t, m in res.items()
                if t not in ("meta", "items") and isinstance(m, dict)]
    n_all = sum(n for _, n in achieved)
    out["achieved_token_layer_cut"] = sum(a * n for a, n in achieved) / n_all if n_all else 0.0
    out["analytic_flops_cut"] = rep.flops_cut
    out["analytic_flops_seq_len"] = flops_seq_len
    if items:
        out["items"] = res.get("items", {})
    return out


def with_fingerprints(configs: Iterable[dict]) -> list[dict]:
    """Add `fingerprint=model_fingerprint(model)` to each configuration (a retrained model gets new keys)."""
    return [{**c, "fingerprint": model_fingerprint(c["model"])} for c in configs]

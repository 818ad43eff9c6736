"""The offline benchmark suite (data/benchmarks/*.jsonl): task names, loading, caching.

Items are text (tokenisation happens at evaluation time). Data is found in `$UTRC_DATA_DIR`
(a folder holding the jsonl files, or one holding `benchmarks/`) or else in `data/benchmarks` of
the repository this package lives in.

Tasks:
    cloze    LAMBADA style: {"id", "context", "target"}; the target (with leading space) is the word
             that ends the passage and occurs earlier in it. Metrics: acc (greedy), ppl.
    choice4  HellaSwag style: {"id", "context", "endings"[4], "label"}. Metrics: acc, acc_norm.
    choice2  two options continuing a shared prefix: {"id", "context", "options"[2], "label"}. acc.
    ppl      {"id", "context" (192 tokens), "continuation" (64 tokens)}: token perplexity of the
             continuation given the context (the continuation is protected from reduction).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from utrc_lib import environment
from typing import Optional

TASKS = ("cloze", "choice4", "choice2", "ppl")
# suite v2: task -> scoring kind (one of TASKS)
TASKS_V2 = {"cloze_v2": "cloze", "choice4_v2": "choice4", "choice2_v2": "choice2",
            **{f"lr_cloze_{n}": "cloze" for n in (512, 1024, 2048)},
            **{f"passkey_{n}": "choice4" for n in (512, 1024, 2048)},   # 4 candidate keys
            **{f"longppl_{n}": "ppl" for n in (1024, 2048)}}

_REQUIRED = {
    "cloze": ("id", "context", "target"),
    "choice4": ("id", "context", "endings", "label"),
    "choice2": ("id", "context", "options", "label"),
    "ppl": ("id", "context", "continuation"),
}


def data_dir() -> Path:
    """Folder holding the benchmark jsonl files."""
    env = os.environ.get("UTRC_DATA_DIR")
    if env:
        p = Path(env).expanduser()
        if (p / "benchmarks").is_dir():
            p = p / "benchmarks"
        return p.resolve()
    return (environment.data_dir() / "benchmarks").resolve()


def data_dir_v2() -> Path:
    """Folder holding suite v2 (`$UTRC_DATA_DIR/benchmarks_v2`, else data/benchmarks_v2)."""
    env = os.environ.get("UTRC_DATA_DIR")
    if env and (Path(env).expanduser() / "benchmarks_v2").is_dir():
        return (Path(env).expanduser() / "benchmarks_v2").resolve()
    return (environment.data_dir() / "benchmarks_v2").resolve()


def available_tasks(suite: str = "v1") -> list[str]:
    """Task names of suite "v1" (default), "v2" or "all"."""
    v = {"v1": list(TASKS), "v2": list(TASKS_V2), "all": list(TASKS) + list(TASKS_V2)}
    if suite not in v:
        raise ValueError(f"unknown suite {suite!r}; valid: v1, v2, all")
    return v[suite]


def task_kind(name: str) -> str:
    """How a task is scored: itself for v1 tasks, TASKS_V2[name] for v2 tasks."""
    if name in TASKS:
        return name
    if name in TASKS_V2:
        return TASKS_V2[name]
    raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks('all'))}")


def task_path(name: str) -> Path:
    if name in TASKS_V2:
        return data_dir_v2() / f"{name}.jsonl"
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks('all'))}")
    return data_dir() / f"{name}.jsonl"


class BenchmarkItemError(ValueError):
    """A benchmark file holds an item that cannot be scored; the message names the file, the line,
    the field and what was expected."""


# (resolved path, size, mtime_ns) -> sha256 of the content: a file is hashed again only when its
# size or modification time changes
_DIGESTS: dict = {}


def file_digest(path) -> str:
    """sha256 (hex) of a file's content, memoised by (path, size, mtime_ns)."""
    import hashlib

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    hit = _DIGESTS.get(key)
    if hit is None:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        hit = _DIGESTS[key] = h.hexdigest()
    return hit


def task_files(name: str) -> list[Path]:
    """The files task `name` reads: its jsonl, and for a v2 task the suite's docs.jsonl (long items
    refer to its documents)."""
    path = task_path(name)
    files = [path]
    if name in TASKS_V2 and (path.parent / "docs.jsonl").is_file():
        files.append(path.parent / "docs.jsonl")
    return files


def task_signature(name: str) -> tuple:
    """((path, sha256 of the content), ...) of the files task `name` reads: what the in-process
    caches (here and in the scorer) and the sweep cache key are keyed by, so an edited file or
    another `UTRC_DATA_DIR` never serves old items."""
    out = []
    for f in task_files(name):
        out.append((str(f), file_digest(f) if f.is_file() else "missing"))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _docs(path: str, digest: str = "") -> dict:
    """doc_id -> text of a v2 `docs.jsonl` (cached per path and content digest)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found (long v2 items refer to its documents); rebuild with "
                                f"`python data/benchmarks_v2/build_benchmarks_v2.py`")
    out = {}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out[d["id"]] = d["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BenchmarkItemError(f"{p}:{n}: expected a JSON object with \"id\" and \"text\" "
                                         f"({type(e).__name__}: {e}); fix or rebuild the file") from None
    return out


def _join_parts(item: dict, path: Path) -> dict:
    """Replace `context_parts` / `continuation_parts` by the joined `context` / `continuation`."""
    for key in ("context", "continuation"):
        parts = item.pop(key + "_parts", None)
        if parts is not None:
            docs_path = path.parent / "docs.jsonl"
            docs = _docs(str(docs_path), file_digest(docs_path) if docs_path.is_file() else "")
            item[key] = "".join(x if isinstance(x, str) else docs[x[0]][x[1]:x[2]] for x in parts)
    return item


# scoring kind -> (field, what it must be); choice lists: their length
_CHOICES = {"choice4": ("endings", 4), "choice2": ("options", 2)}


def _nonempty_text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


def validate_item(item, kind: str, where: str) -> None:
    """Raise BenchmarkItemError (naming `where` = "file:line", the field and what was expected) for
    an item task kind `kind` cannot score: a missing field, a wrong type, an empty context / target /
    continuation / choice, a label out of range."""
    def bad(field, expected, value):
        ident = item.get("id") if isinstance(item, dict) else None
        raise BenchmarkItemError(f"{where}: item {ident!r}: field {field!r}: expected {expected}, got {value!r:.80}")

    if not isinstance(item, dict):
        raise BenchmarkItemError(f"{where}: expected a JSON object (one item per line), got {type(item).__name__}")
    missing = [k for k in _REQUIRED[kind] if k not in item]
    if missing:
        raise BenchmarkItemError(f"{where}: item {item.get('id')!r} lacks field(s) {missing} "
                                 f"(a {kind} item needs {list(_REQUIRED[kind])})")
    if not isinstance(item["id"], (str, int)) or isinstance(item["id"], bool):
        bad("id", "a string", item["id"])
    if not _nonempty_text(item["context"]):
        bad("context", "a non-empty string", item["context"])
    if kind == "cloze" and not _nonempty_text(item["target"]):
        bad("target", "a non-empty string", item["target"])
    if kind == "ppl" and not _nonempty_text(item["continuation"]):
        bad("continuation", "a non-empty string", item["continuation"])
    if kind in _CHOICES:
        field, n = _CHOICES[kind]
        choices = item[field]
        if not isinstance(choices, list) or len(choices) != n:
            bad(field, f"a list of {n} strings", choices)
        for i, c in enumerate(choices):
            if not _nonempty_text(c):
                bad(f"{field}[{i}]", "a non-empty string", c)
        label = item["label"]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n:
            bad("label", f"an integer in [0, {n - 1}]", label)


@functools.lru_cache(maxsize=64)
def _load(path: str, name: str, signature: tuple = ()) -> tuple:
    """Validated items of one task file; cached per (path, task, content signature)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"benchmark file for task {name!r} not found at {p}; build it with "
            f"`python data/benchmarks{'_v2' if name in TASKS_V2 else ''}/build_benchmarks"
            f"{'_v2' if name in TASKS_V2 else ''}.py` or set UTRC_DATA_DIR")
    kind = task_kind(name)
    items = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkItemError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                         f"fix or remove the line") from None
            if isinstance(raw, dict):
                try:
                    raw = _join_parts(raw, p)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    if isinstance(e, BenchmarkItemError):
                        raise
                    raise BenchmarkItemError(f"{where}: item {raw.get('id')!r}: its *_parts do not resolve "
                                             f"against {p.parent / 'docs.jsonl'} ({type(e).__name__}: {e})") from None
            validate_item(raw, kind, where)
            items.append(raw)
    return tuple(items)


def load_task(name: str, limit: Optional[int] = None) -> list[dict]:
    """Items of task `name` (first `limit` of them; file order is fixed), each validated on load
    (`validate_item`: BenchmarkItemError naming file, line and field). Cached per file path and
    content (`task_signature`), so an edited file or another data folder is read again."""
    path = task_path(name)
    items = _load(str(path), name, task_signature(name))
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        items = items[:limit]
    return [dict(it) for it in items]

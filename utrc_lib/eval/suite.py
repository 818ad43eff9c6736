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

from .. import environment
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


@functools.lru_cache(maxsize=4)
def _docs(path: str) -> dict:
    """doc_id -> text of a v2 `docs.jsonl`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found (long v2 items refer to its documents); rebuild with "
                                f"`python data/benchmarks_v2/build_benchmarks_v2.py`")
    with p.open(encoding="utf-8") as f:
        return {d["id"]: d["text"] for d in map(json.loads, f) if d}


def _join_parts(item: dict, path: Path) -> dict:
    """Replace `context_parts` / `continuation_parts` by the joined `context` / `continuation`."""
    for key in ("context", "continuation"):
        parts = item.pop(key + "_parts", None)
        if parts is not None:
            docs = _docs(str(path.parent / "docs.jsonl"))
            item[key] = "".join(x if isinstance(x, str) else docs[x[0]][x[1]:x[2]] for x in parts)
    return item


@functools.lru_cache(maxsize=None)
def _load(path: str, name: str) -> tuple:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"benchmark file for task {name!r} not found at {p}; build it with "
            f"`python data/benchmarks{'_v2' if name in TASKS_V2 else ''}/build_benchmarks"
            f"{'_v2' if name in TASKS_V2 else ''}.py` or set UTRC_DATA_DIR")
    items = []
    with p.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = _join_parts(json.loads(line), p)
                missing = [k for k in _REQUIRED[task_kind(name)] if k not in item]
                if missing:
                    raise ValueError(f"{p}: item {item.get('id')!r} lacks fields {missing}")
                items.append(item)
    return tuple(items)


def load_task(name: str, limit: Optional[int] = None) -> list[dict]:
    """Items of task `name` (first `limit` of them; file order is fixed). Cached per file."""
    path = task_path(name)
    items = _load(str(path), name)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        items = items[:limit]
    return [dict(it) for it in items]

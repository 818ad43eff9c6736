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


def available_tasks() -> list[str]:
    return list(TASKS)


def task_path(name: str) -> Path:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return data_dir() / f"{name}.jsonl"


@functools.lru_cache(maxsize=None)
def _load(path: str, name: str) -> tuple:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"benchmark file for task {name!r} not found at {p}; build it with "
            f"`python data/benchmarks/build_benchmarks.py` or set UTRC_DATA_DIR")
    items = []
    with p.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                missing = [k for k in _REQUIRED[name] if k not in item]
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

#!/usr/bin/env python
"""Scale x length evaluation (issue 13): dense and UTRC / EViT / PuMer / ToMe / utrc_reference on the v2 suite, cached.

Every configuration is one sweep row (one model, one method, one cut, one task), computed with item
arrays (paired statistics) and appended to a resumable cache (`utrc_study.experiments.sweep`):

    PYTHONPATH=. python scripts/scale_length_eval.py --cache .cache/sweeps/scale_length.jsonl \
        --deadline-s 390                                           # the GPU run (scripts/gpu_scale_length.sh)
    PYTHONPATH=. python scripts/scale_length_eval.py --models tiny-mamba2 --tasks cloze_v2 passkey_512 \
        --limit 4 --cache /tmp/sl.jsonl                            # a CPU check
    python scripts/scale_length_eval.py --plan                     # list the work and a token estimate only

Order of the work (most important first), each phase in model order small -> tiny:
    1. dense, Mamba-2 models, every v2 task            3. cuts 0.2 / 0.1, Mamba-2 models
    2. cut 0.3, Mamba-2 models, every task, UTRC first  4. dense, Mamba-1 models (own, smaller limits)
    5. reduced rows of Mamba-1 models (only the methods in --mamba1-methods; none by default)
Short tasks (cloze_v2 / choice4_v2 / choice2_v2, ~60-150 tokens) are the 128-token point of the
length axis; the long tasks are scored with max_length 4096 and their analytic FLOPs cut is taken at
their own length (flops_seq_len = 512 / 1024 / 2048; 128 for the short tasks).

Robustness: an error of a configuration is a cached error row (the run goes on); a device error (out
of memory, CUDA) is not cached, and an out-of-memory row is retried at once with half the batch
(results do not depend on the batch size; the renderer matches rows without it). `--deadline-s`
stops starting new configurations after that many seconds; a rerun computes only what is missing (a
configuration with an ok row at any batch size counts as done). Progress: one line per row on stdout
and in <cache>.log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHORT = ("cloze_v2", "choice4_v2", "choice2_v2")
LONG = ("lr_cloze_512", "passkey_512", "longppl_1024", "lr_cloze_1024", "passkey_1024",
        "lr_cloze_2048", "passkey_2048", "longppl_2048")
ALL_TASKS = SHORT + LONG
MAMBA2 = ("small-mamba2", "tiny-mamba2")
MAMBA1 = ("small-mamba", "tiny-mamba")
METHODS = ("utrc", "evit", "pumer", "tome", "utrc_reference")   # utrc_reference: the authors' released code
CUTS = (0.3, 0.2, 0.1)
LONG_MAX_LENGTH = 4096
SHORT_SEQ_LEN = 128


def task_length(task: str) -> int:
    """Nominal input length of a v2 task (v2-tokenizer tokens): 128 for the short tasks."""
    return SHORT_SEQ_LEN if task in SHORT else int(task.rsplit("_", 1)[1])


def requests_per_item(task: str) -> int:
    return 4 if task.startswith(("passkey", "choice4")) else 2 if task.startswith("choice2") else 1


def is_mamba1(model: str) -> bool:
    return model in MAMBA1 or Path(model).name in MAMBA1



def config(model: str, method: str, cut: float, task: str, *, limit, batch_size: int, seed: int,
           fingerprint: str, task_sha: str) -> dict:
    """Sweep parameters of one row; max_length only for the long tasks (default 1024 otherwise)."""
    dense = method == "none"
    c = dict(model=model, method=method, cut=0.0 if dense else float(cut), tasks=[task], limit=limit, seed=seed,
             batch_size=batch_size, flops_seq_len=task_length(task), fingerprint=fingerprint, task_sha=task_sha,
             study="scale_length")
    if task not in SHORT:
        c["max_length"] = LONG_MAX_LENGTH
    return c


def label(params: dict) -> tuple:
    """What a row measures, without the batch size: (model, method, cut, task, limit, max_length, ...)."""
    skip = {"batch_size"}
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in params.items() if k not in skip))


def plan(args) -> list[dict]:
    """Every configuration of the run, most important first (see the module doc)."""
    from utrc_study.experiments import sweep

    fps = {m: sweep.model_fingerprint(m) for m in args.models}
    from utrc_study.report.scale_length import task_fingerprints

    tsha = task_fingerprints()
    tasks = [t for t in ALL_TASKS if t in args.tasks]
    m2 = [m for m in args.models if not is_mamba1(m)]
    m1 = [m for m in args.models if is_mamba1(m)]

    def row(model, method, cut, task):
        short = task in SHORT
        if is_mamba1(model):
            limit = args.limit_mamba1_short if short else args.limit_mamba1_long
        else:
            limit = (args.limit_dense_short if method == "none" else args.limit_short) if short else args.limit_long
        if args.limit is not None:
            limit = args.limit
        return config(model, method, cut, task, limit=limit, batch_size=args.batch_short if short else args.batch_long,
                      seed=args.seed, fingerprint=fps[model], task_sha=tsha.get(task, "?"))

    cuts = sorted(args.cuts, reverse=True)
    methods = [m for m in args.methods if m != "none"]
    out = [row(m, "none", 0.0, t) for m in m2 for t in tasks]                                     # 1
    if cuts:
        out += [row(m, meth, cuts[0], t) for m in m2 for t in tasks for meth in methods]          # 2
        out += [row(m, meth, c, t) for c in cuts[1:] for m in m2 for t in tasks for meth in methods]   # 3
    out += [row(m, "none", 0.0, t) for m in m1 for t in tasks]                                    # 4
    m1_methods = [m for m in args.mamba1_methods if m != "none"]
    out += [row(m, meth, c, t) for c in cuts for m in m1 for t in tasks for meth in m1_methods]   # 5
    return out


def estimate_tokens(configs: list[dict]) -> dict:
    """Rough input tokens per model (forwards of reduced rows count twice: their dense reference is
    computed once per (model, task), so this is an upper bound)."""
    tot: dict = {}
    for c in configs:
        t = c["tasks"][0]
        n = c["limit"] if c["limit"] is not None else (1000 if t in SHORT else 500)
        tot[c["model"]] = tot.get(c["model"], 0) + n * requests_per_item(t) * task_length(t)
    return tot


ROW_ONLY = ("task_sha", "study")   # row parameters that identify the data / study, not arguments


def evaluate_row(**params) -> dict:
    """`sweep.evaluate_config` of one row, without the parameters that only key it (ROW_ONLY)."""
    from utrc_study.experiments import sweep

    return sweep.evaluate_config(**{k: v for k, v in params.items() if k not in ROW_ONLY})


def make_loader(device: str):
    from utrc_study.experiments import sweep

    return lambda name: sweep.get_model(name, device=device)


def _free_device_memory() -> None:
    try:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cache", type=Path, default=REPO / ".cache/sweeps/scale_length.jsonl")
    ap.add_argument("--models", nargs="+", default=list(MAMBA2 + MAMBA1))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--mamba1-methods", nargs="*", default=[],
                    help="reduced methods for the Mamba-1 models (default none: dense only; their transformers "
                         "path without mamba-ssm loops over tokens in Python)")
    ap.add_argument("--cuts", nargs="*", type=float, default=list(CUTS))
    ap.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=list(ALL_TASKS))
    ap.add_argument("--limit", type=int, default=None, help="items per task for every row (overrides the others)")
    ap.add_argument("--limit-short", type=int, default=500, help="items per short task, reduced rows (Mamba-2)")
    ap.add_argument("--limit-dense-short", type=int, default=1000,
                    help="items per short task, dense rows (Mamba-2); the paired deltas use the common first items")
    ap.add_argument("--limit-long", type=int, default=100, help="items per long task (Mamba-2; passkey: 4 requests each)")
    ap.add_argument("--limit-mamba1-short", type=int, default=200)
    ap.add_argument("--limit-mamba1-long", type=int, default=20)
    ap.add_argument("--batch-long", type=int, default=32)
    ap.add_argument("--batch-short", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no configuration after this many seconds")
    ap.add_argument("--retry-errors", action="store_true", help="recompute configurations cached as errors")
    ap.add_argument("--plan", action="store_true", help="print the configurations still to compute and exit")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()

    from utrc_study.experiments import sweep

    configs = plan(args)
    p = sweep.pending(configs, args.cache, retry_errors=args.retry_errors, items=True)
    done_labels = {label(r["params"]) for r in p.done.values() if r.get("status") == "ok" and isinstance(r.get("items"), dict)}
    todo = [i for i in p.todo if label(p.configs[i]) not in done_labels]
    est = estimate_tokens([p.configs[i] for i in todo])
    print(f"{len(configs)} configurations, {len(configs) - len(todo)} cached, {len(todo)} to compute; "
          f"input tokens to run (upper bound) per model: " + ", ".join(f"{m} {v / 1e6:.1f}M" for m, v in est.items()),
          flush=True)
    if args.plan:
        for i in todo:
            c = p.configs[i]
            print(f"  {c['model']:13s} {c['method']:5s} {c['cut']:.1f} {c['tasks'][0]:13s} limit {c['limit']} "
                  f"batch {c['batch_size']}")
        return 0
    loader = make_loader(args.device)
    log = Path(str(args.cache) + ".log.jsonl")
    computed = failed = skipped = 0
    for n, i in enumerate(todo):
        el = time.perf_counter() - t0
        if args.deadline_s is not None and el > args.deadline_s:
            skipped = len(todo) - n
            print(f"deadline {args.deadline_s:.0f} s reached after {el:.0f} s: {skipped} configurations left "
                  f"for the next run", flush=True)
            break
        params = p.configs[i]
        outcome = sweep.compute(evaluate_row, params, items=True, model_loader=loader)
        if outcome.get("transient") and "memory" in str(outcome.get("error", "")).lower() and params["batch_size"] > 1:
            _free_device_memory()
            smaller = {**params, "batch_size": max(1, params["batch_size"] // 2)}
            print(f"  out of memory at batch {params['batch_size']}: retrying at {smaller['batch_size']}", flush=True)
            p.configs.append(smaller)
            p.keys.append(sweep.row_key(smaller, p.version))
            i = len(p.configs) - 1
            outcome = sweep.compute(evaluate_row, smaller, items=True, model_loader=loader)
        row = sweep.record(p, i, outcome)
        ok = row["status"] == "ok"
        computed += ok
        failed += not ok
        c = row["params"]
        msg = (f"[{time.perf_counter() - t0:6.0f} s] {n + 1}/{len(todo)} {c['model']} {c['method']} {c['cut']} "
               f"{c['tasks'][0]} limit {c['limit']}: {row['status']} in {row['seconds']:.1f} s")
        if not ok:
            msg += f" ({row.get('error')}{'; not cached' if row.get('transient') else ''})"
            _free_device_memory()
        print(msg, flush=True)
        with log.open("a") as f:
            f.write(json.dumps({"key": row["key"], "model": c["model"], "method": c["method"], "cut": c["cut"],
                                "task": c["tasks"][0], "status": row["status"], "seconds": row["seconds"],
                                "error": row.get("error"), "device": (row.get("result") or {}).get("meta/device"),
                                "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
    print(f"done: {computed} computed, {failed} failed, {skipped} left by the deadline, "
          f"{len(configs) - len(todo)} were cached; {time.perf_counter() - t0:.0f} s; cache {args.cache}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Committed evidence: the per-item rows behind the figures of 01 / 02 / 04 / 08 / 09, and what reads them.

A sweep row with item arrays (`sweep.run(..., items=True)`) is what every interval, test and table of
those notebooks is computed from. An evidence folder holds such rows for every configuration of a
notebook, small enough to commit (`figures/01_main_results/evidence/`, read by 01, 04 and, for its dense
and UTRC rows, 09; `figures/02_design_choices/evidence/`; `figures/09_ssm_methods/evidence/`):

    configs.json    one record per configuration: "config" (its number), "params" (the sweep parameters,
                    as computed: model, method, cut, fingerprint, tasks, limit, seed, batch_size and the
                    design parameters of 02), "result" (the evaluator's per-configuration numbers: task
                    accuracies, ppl, achieved token-layer cut, dense fallbacks, schedule, analytic FLOPs
                    cut; floats to 6 significant digits), "device" (where it ran)
    items.parquet   one row per (configuration, task, item): config, model, method, cut, protect
                    (protocol: True = the scored continuation protected from reduction), task, item
                    (position in the task file), id, correct (0/1; cloze greedy match, choice acc; null
                    for ppl), correct_norm (choice4 acc_norm), ll (gold log-likelihood, nats), gold_tokens,
                    tokens (scored positions of all the item's requests), kl (KL(dense || method) summed
                    over them, nats; null for dense rows), top1 (share of them whose argmax equals the
                    dense model's). Floats to 6 significant digits. ll_per_token = ll / gold_tokens and
                    kl_per_token = kl / tokens are derived on load.
    manifest.json   what made it: the command, the code version and commit, seed, sizes (configurations,
                    items per task, rows), the device and the library versions of the machine that
                    computed the rows, and each file's bytes and sha256.

`load(folder)` rebuilds sweep rows from it; `run(...)` is `sweep.run` that takes every configuration
the evidence holds (same parameters but the batch size, which does not change a number, and the same
`limit`) from it and computes only the rest. `verify(...)` recomputes the first items of every
configuration here and compares them with the committed rows item by item.

    python -m utrc_study.report.evidence show figures/01_main_results/evidence
    python -m utrc_study.report.evidence verify figures/01_main_results/evidence --items 20
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from utrc_lib.environment import REPO
from .provenance import DIGITS, round_floats   # DIGITS: significant digits of every stored float

FORMAT = "utrc-evidence-1"
CONFIGS, ITEMS, MANIFEST = "configs.json", "items.parquet", "manifest.json"
ITEM_FIELDS = ("correct", "correct_norm", "ll", "gold_tokens", "tokens", "kl", "top1")
IGNORED_PARAMS = ("batch_size",)            # parameters that do not change a number (not matched)

# where each notebook's evidence is (01 and 04 share one set: 04's configurations are 01's)
PROTOCOLS_04 = "04_protocols"      # a part of notebook 04 with its own evidence folder (its parameters are 04's)
FOLDERS = {"01_main_results": "figures/01_main_results/evidence",
           "02_design_choices": "figures/02_design_choices/evidence",
           "04_failure_of_transformer_methods": "figures/01_main_results/evidence",
           # 04's protocol comparison (issue 26): the same grid scored under the authors' protocol
           PROTOCOLS_04: "figures/04_failure_of_transformer_methods/evidence",
           "08_depth": "figures/08_depth/evidence",     # scripts/gpu_depth_eval.py
           "09_ssm_methods": "figures/09_ssm_methods/evidence"}
# configurations a notebook shares with another one's evidence: read from there, not computed again, not
# copied (09's dense and UTRC rows are 01's: the same models, tasks, items, seed and protocol)
SHARED = {"09_ssm_methods": ("01_main_results",)}
# a smaller run kept apart until the full evidence exists: (its evidence, where it renders); `make figures`
# renders it there, labelled, when FOLDERS[name] is missing (never into figures/<name> itself)
PILOTS = {"08_depth": ("figures/08_depth/cpu_pilot/evidence", "figures/08_depth/cpu_pilot"),
          "09_ssm_methods": ("figures/09_ssm_methods/cpu_pilot/evidence", "figures/09_ssm_methods/cpu_pilot")}
# pilots of notebooks that read their rows by configuration (`run`: same parameters and `limit`): the runner
# renders them at the pilot's items per task (its manifest's "limit"); 08 reads every row of its folder
SIZED_PILOTS = ("09_ssm_methods",)

# tolerance of `verify` (the GPU-tier test's, tests/test_gpu_eval.py): |ll - committed| <= ATOL + RTOL |committed|
LL_ATOL, LL_RTOL = 2e-3, 2e-4
# outcome flips / lls outside the tolerance allowed, as a share of the compared ones: near ties (of two
# options, or of two merge partners in a reduction's matching) resolved the other way by float rounding
# on another device; every one is listed. A code or data change moves far more than this.
MAX_FLIP_SHARE = 0.005


# -- matching --------------------------------------------------------------------------------------
def match_key(params: dict) -> str:
    """The configuration a row answers, without the parameters that do not change a number."""
    from ..experiments.sweep import _canonical

    return json.dumps(_canonical({k: v for k, v in params.items() if k not in IGNORED_PARAMS}), sort_keys=True)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- write -----------------------------------------------------------------------------------------
def _scalar_result(result: dict) -> dict:
    return {k: v for k, v in (result or {}).items() if not isinstance(v, (dict, list)) or k == "layers"}


def write(rows: Sequence[dict], folder, *, command: str, machine: Optional[dict] = None,
          notebooks: Sequence[str] = (), extra: Optional[dict] = None) -> dict:
    """Write the ok rows (with item arrays) of `rows` to evidence `folder`; returns the manifest.

    Rows are stored in the order given (duplicates of a configuration: the last one wins). machine:
    the computing machine's device and versions (default `machine_info()` of this process)."""
    import pandas as pd

    from utrc_lib.environment import code_version, git_commit

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chosen: dict = {}
    for r in rows:
        if r.get("status") == "ok" and isinstance(r.get("items"), dict):
            chosen.pop(match_key(r["params"]), None)
            chosen[match_key(r["params"])] = r
    configs, frames = [], []
    for i, r in enumerate(chosen.values()):
        p, res = r["params"], r.get("result") or {}
        configs.append({"config": i, "params": p, "result": round_floats(_scalar_result(res)),
                        "device": r.get("device") or res.get("meta/device")})
        for task in p.get("tasks") or list(r["items"]):
            it = r["items"][task]
            n = len(it["id"])
            col = {"config": [i] * n, "model": [p.get("model")] * n, "method": [p.get("method")] * n,
                   "cut": [float(p.get("cut", 0.0))] * n, "protect": [bool(p.get("protect", True))] * n,
                   "task": [task] * n, "item": list(range(n)), "id": [str(v) for v in it["id"]]}
            for f in ITEM_FIELDS:
                vals = it.get(f)
                col[f] = [None] * n if vals is None else [round_floats(v) for v in vals]
            frames.append(pd.DataFrame(col))
    df = pd.concat(frames, ignore_index=True)
    types = {"config": "int16", "cut": "float64", "item": "int32", "correct": "Int8", "correct_norm": "Int8",
             "ll": "float64", "gold_tokens": "int32", "tokens": "int32", "kl": "Float64", "top1": "Float64"}
    df = df.astype(types)
    df.to_parquet(folder / ITEMS, index=False, compression="zstd")
    (folder / CONFIGS).write_text(json.dumps(configs, indent=0, default=str) + "\n")
    per_task: dict = {}
    for c in configs:
        for task in c["params"].get("tasks", []):
            n = int(c["result"].get(f"{task}/n", 0) or 0)
            per_task[task] = max(per_task.get(task, 0), n)
    manifest = {"format": FORMAT, "notebooks": list(notebooks), "command": command,
                "code_version": code_version(), "git_commit": git_commit(),
                "seed": sorted({c["params"].get("seed") for c in configs}, key=str),
                "limit": sorted({str(c["params"].get("limit")) for c in configs}),
                "configurations": len(configs), "item_rows": int(len(df)), "items_per_task": per_task,
                "machine": machine or machine_info(),
                "files": {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
                          for name in (CONFIGS, ITEMS)},
                **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest


def machine_info() -> dict:
    """Device and library versions of this process's machine (what computed the rows)."""
    import platform

    import torch

    from utrc_lib.environment import versions

    dev = {"torch_device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        dev.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version(),
                   allow_tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32})
    v = versions()
    v.pop("git_commit", None)
    for pkg in ("pandas", "pyarrow", "scipy"):
        try:
            v[pkg] = __import__(pkg).__version__
        except ImportError:
            v[pkg] = None
    return {"host_platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            **dev, "versions": v}


# -- read ------------------------------------------------------------------------------------------
class Evidence:
    """The rows of one evidence folder: `rows` (sweep rows, configuration order), `manifest`, and
    `lookup(params)` (the row of a configuration, or None)."""

    def __init__(self, folder, rows: list, manifest: dict):
        self.folder, self.rows, self.manifest = Path(folder), rows, manifest
        self._by = {match_key(r["params"]): r for r in rows}

    def lookup(self, params: dict) -> Optional[dict]:
        r = self._by.get(match_key(params))
        return r if r is not None and r["params"].get("limit") == params.get("limit") else None

    def __len__(self):
        return len(self.rows)


def stale_reason(manifest: dict, params: dict) -> Optional[str]:
    """Why the rows of a configuration are known not to be what today's code computes (a fix since the
    rows were computed), from the manifest's "stale" list ({"reason", and the parameters an entry matches:
    "method", optionally "cut", ...}); None when they are current. `make figures` renders such rows but
    does not verify them (it says so); scripts/gpu_evidence.py recomputes them."""
    for st in manifest.get("stale", []):
        if all(params.get(k) == v for k, v in st.items() if k != "reason"):
            return st.get("reason", "stale")
    return None


def provenance(folder) -> dict:
    """What results.json says about the evidence it was rendered from: the folder (relative to the
    repository), sizes, code version, command and the computing machine (from the manifest)."""
    f = Path(folder)
    if not f.is_absolute():
        f = (REPO / "notebooks" / f)
    f = f.resolve()
    if not exists(f):
        return {"folder": str(folder), "present": False}
    man = json.loads((f / MANIFEST).read_text())
    try:
        rel = f.relative_to(REPO.resolve()).as_posix()
    except ValueError:
        rel = str(f)
    keep = ("format", "configurations", "item_rows", "items_per_task", "seed", "limit", "code_version", "git_commit",
            "command", "complete", "machine", "stale")
    return {"folder": rel, **{k: man[k] for k in keep if k in man}}


def computed_on(*results) -> list:
    """Where the rows of sweep results were computed, for results.json's "computed_on": one record per
    source, {"source", "rows", "devices", "machine"}: an evidence folder's rows with its manifest's
    machine (device, GPU, library versions of the computing machine) and code version; the rows this
    run computed or read from its local cache with "machine": "the rendering machine (rendered_on)".
    Each argument is a sweep result (its .rows) or a list of rows."""
    groups: dict = {}
    for r in (row for result in results for row in getattr(result, "rows", result)):
        if r is None or r.get("status") != "ok":
            continue
        g = groups.setdefault(r.get("source") or "", {"rows": 0, "devices": set()})
        g["rows"] += 1
        dev = r.get("device") or (r.get("result") or {}).get("meta/device")
        if dev:
            g["devices"].add(str(dev))
    out = []
    for src, g in groups.items():
        rec = {"rows": g["rows"], "devices": sorted(g["devices"])}
        if src:
            prov = provenance(src)
            rec = {"source": prov.get("folder", src), **rec, "machine": prov.get("machine"),
                   "code_version": prov.get("code_version"), "git_commit": prov.get("git_commit")}
        else:
            rec = {"source": "this run (computed, or read from the local sweep cache)", **rec,
                   "machine": "the rendering machine (rendered_on)"}
        out.append(rec)
    return out


def exists(folder) -> bool:
    f = Path(folder)
    return all((f / n).is_file() for n in (CONFIGS, ITEMS, MANIFEST))


def load(folder, check: bool = True) -> Evidence:
    """Rebuild the sweep rows of evidence `folder`. check: the files' sha256 must be the manifest's,
    and every stored per-task accuracy / item count must equal what its items give (the rows are
    consistent with the numbers the evaluator reported)."""
    import pandas as pd

    from ..experiments.sweep import row_key

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if check:
        for name, f in manifest.get("files", {}).items():
            got = sha256(folder / name)
            if got != f["sha256"]:
                raise ValueError(f"{folder / name}: sha256 {got[:12]} is not the manifest's {f['sha256'][:12]} "
                                 f"(the file changed after the manifest was written)")
    configs = json.loads((folder / CONFIGS).read_text())
    df = pd.read_parquet(folder / ITEMS)
    version = manifest.get("code_version", "")
    rows = []
    groups = {k: g for k, g in df.groupby(["config", "task"], sort=False)}
    for c in configs:
        items = {}
        for task in c["params"].get("tasks", []):
            g = groups.get((c["config"], task))
            if g is None:
                raise ValueError(f"{folder}: configuration {c['config']} has no items for task {task}")
            g = g.sort_values("item")
            it = {"id": g["id"].tolist()}
            for f in ITEM_FIELDS:
                col = g[f]
                if col.isna().all() and f in ("correct", "correct_norm"):
                    continue
                it[f] = [None if pd.isna(v) else (int(v) if f in ("correct", "correct_norm", "gold_tokens", "tokens")
                                                  else float(v)) for v in col]
            it["ll_per_token"] = [ll / n for ll, n in zip(it["ll"], it["gold_tokens"])]
            it["kl_per_token"] = [None if k is None else k / n for k, n in zip(it["kl"], it["tokens"])]
            if check:
                _check_task(folder, c, task, it)
            items[task] = it
        p = c["params"]
        rows.append({"key": row_key(p, version), "params": p, "status": "ok", "version": version,
                     "result": c["result"], "items": items, "device": c.get("device"), "source": str(folder)})
    return Evidence(folder, rows, manifest)


def _check_task(folder, c, task, it) -> None:
    res = c["result"]
    n = res.get(f"{task}/n")
    if n is not None and int(n) != len(it["id"]):
        raise ValueError(f"{folder}: configuration {c['config']} {task}: {len(it['id'])} items, the result says {n}")
    for field, metric in (("correct", "acc"), ("correct_norm", "acc_norm")):
        stored = res.get(f"{task}/{metric}")
        if field in it and stored is not None:
            mean = sum(it[field]) / len(it[field])
            if abs(mean - stored) > 5e-6:
                raise ValueError(f"{folder}: configuration {c['config']} {task}/{metric} = {stored}, its items give {mean}")


# -- the notebooks' configurations ------------------------------------------------------------------
def notebook_defaults(name: str) -> dict:
    """The default parameters of notebook `name` (its parameters cell, evaluated as literals)."""
    import ast

    from .notebooks import parameters_cell

    out = {}
    for node in ast.parse(parameters_cell(name)).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            try:
                out[node.target.id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def present(configs: Iterable[dict], folder, common: Optional[dict] = None) -> tuple[list, list]:
    """Split `configs` into those evidence `folder` holds (with `common` merged, as `run` looks them up)
    and those it does not: ([held], [missing]); every configuration is missing without the folder."""
    ev = load(folder) if folder and exists(folder) else None
    held, missing = [], []
    for c in configs:
        (held if ev is not None and ev.lookup({**(common or {}), **c}) is not None else missing).append(c)
    return held, missing


def protocol_grid(model_names, methods, cuts, protocol: str = "authors") -> list:
    """Notebook 04's protocol comparison: dense and every method at every cut, scored under `protocol`
    (utrc_study.eval.protocol; the leak-free rows of the same grid are 01's)."""
    from ..experiments import analysis

    return [{**c, "protocol": protocol} for c in analysis.method_grid(model_names, methods, cuts)]


def design_groups(model_names, cut, branch_cut, metrics, starts, qs, residual_rules,
                  matching=("utrc", "utrc_alternate", "merge_only", "tome")) -> dict:
    """Notebook 02's sweeps, {group: configurations (with model fingerprints)}. "matching" crosses the
    split (importance: utrc, merge_only; alternate: utrc_alternate, tome) with the hidden rule (hybrid:
    utrc, utrc_alternate; merge: merge_only, tome)."""
    from ..experiments import analysis, sweep

    groups = {
        "dense": sweep.grid(model=model_names, method=["none"], cut=[0.0]),
        "metric": sweep.grid(model=model_names, method=["utrc"], cut=[cut], metric=metrics),
        "location": sweep.grid(model=model_names, method=["utrc"], cut=[cut],
                               layers=[analysis.anchor_schedule(s) for s in starts]),   # 4 anchors, every 2 layers
        "hidden_q": sweep.grid(model=model_names, method=["utrc"], cut=[branch_cut],
                               hidden_rule=[f"hybrid({q})" for q in qs], residual_rule=["merge"]),
        "residual_rule": sweep.grid(model=model_names, method=["utrc"], cut=[branch_cut], hidden_rule=["hybrid(0.5)"],
                                    residual_rule=residual_rules),
        "matching": sweep.grid(model=model_names, method=list(matching), cut=[cut]),
        "modes": sweep.grid(model=model_names, method=["utrc"], cut=[cut], causal=[True, False], protect=[True, False])
                 + sweep.grid(model=model_names, method=["utrc_reference"], cut=[cut], causal=[False], protect=[True, False])
                 + sweep.grid(model=model_names, method=["none"], cut=[0.0], protect=[False]),
    }
    return {g: sweep.with_fingerprints(c) for g, c in groups.items()}


def notebook_configs(name: str, **overrides) -> tuple[list, dict]:
    """(configurations, common parameters) of notebook `name` at its defaults (and `overrides`), the
    configurations of every group in the order the notebook runs them (duplicates removed)."""
    from ..experiments import analysis

    p = {**notebook_defaults("04_failure_of_transformer_methods" if name == PROTOCOLS_04 else name), **overrides}
    common = dict(tasks=p["tasks"], limit=p["limit"], seed=p["seed"], batch_size=p["batch_size"])
    if name in ("01_main_results", "04_failure_of_transformer_methods"):
        configs = analysis.method_grid(p["model_names"], p["methods"], p["cuts"])
    elif name == PROTOCOLS_04:
        configs = protocol_grid(p["model_names"], p["protocol_methods"], p["cuts"])
    elif name == "09_ssm_methods":
        from .ssm_methods import grid

        configs = grid(p["model_names"], p["methods"], p["cuts"])
    elif name == "02_design_choices":
        configs = [c for g in design_groups(p["model_names"], p["cut"], p["branch_cut"], p["metrics"], p["starts"],
                                            p["qs"], p["residual_rules"], p["matching"]).values() for c in g]
    else:
        raise ValueError(f"notebook {name} has no evidence")
    seen, out = set(), []
    for c in configs:
        k = match_key({**common, **c})
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out, common


# -- a sweep that reads the evidence first -----------------------------------------------------------
def run(fn: Callable[..., dict], configs: Iterable[dict], cache, *, evidence=None, common: Optional[dict] = None,
        desc: str = "sweep", progress: bool = True):
    """`sweep.run(fn, configs, cache, common=common, items=True)`, except that every configuration
    evidence folder `evidence` holds (same parameters but the batch size, same `limit`) is taken
    from it; only the others are computed (into `cache`). `evidence` may be a list of folders (a
    notebook's own and those it shares rows with, `SHARED`): the first that holds a configuration gives
    it; missing or empty entries are skipped. Returns a `sweep.SweepResult` in configuration order
    ("cached" counts the rows taken from the evidence)."""
    from ..experiments import sweep

    configs = [{**(common or {}), **c} for c in configs]
    folders = [f for f in ([evidence] if isinstance(evidence, (str, Path)) else list(evidence or [])) if f]
    hits: dict = {}
    for folder in folders:
        ev = load(folder) if exists(folder) else None
        for i, c in enumerate(configs):
            r = ev.lookup(c) if ev is not None and i not in hits else None
            if r is not None:
                hits[i] = r
    todo = [i for i in range(len(configs)) if i not in hits]
    if hits:
        where = ", ".join(str(f) for f in folders if exists(f))
        _progress_line(f"{desc}: {len(hits)}/{len(configs)} configurations from the evidence {where}"
                       + (f"; {len(todo)} to compute" if todo else ""))
    computed = sweep.run(fn, [configs[i] for i in todo], cache, desc=desc, items=True, progress=progress) if todo \
        else None
    rows = [None] * len(configs)
    for i, r in hits.items():
        rows[i] = r
    for j, i in enumerate(todo):
        rows[i] = computed.rows[j]
    return sweep.SweepResult(rows, computed=computed.computed if computed else 0,
                             cached=len(hits) + (computed.cached if computed else 0),
                             cache_path=", ".join(str(f) for f in folders) if not todo else str(cache))


def _progress_line(line: str) -> None:
    import os

    from ..experiments.sweep import PROGRESS_ENV

    print(line, flush=True)
    path = os.environ.get(PROGRESS_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass


# -- verification ------------------------------------------------------------------------------------
def verify(folder, *, items: int = 20, ppl_items: Optional[int] = None, cache=None, batch_size: int = 16,
           cuts: Optional[Sequence[float]] = None, log=print) -> dict:
    """Recompute the first `items` items of every task (`ppl_items` perplexity windows, default
    `items`) of every configuration of evidence `folder` (with `cuts`: the dense ones and those at
    these cuts) here (CPU when no GPU), and compare item by
    item with the committed rows: the same outcome (correct / correct_norm) and the gold
    log-likelihood within LL_ATOL + LL_RTOL |ll|. Returns the agreement numbers; "ok" is False when
    an ll is outside the tolerance or more than MAX_FLIP_SHARE of the outcomes flip."""
    from ..experiments import sweep

    ev = load(folder)
    cache = Path(cache or REPO / ".cache" / "sweeps" / "verify.jsonl")
    t0 = time.time()
    stats = {"configurations": 0, "outcomes": 0, "outcome_flips": 0, "ll_compared": 0, "ll_outside": 0,
             "ll_max_abs_diff": 0.0, "kl_max_abs_diff": 0.0, "flips": [], "outside": [], "items": items,
             "ppl_items": ppl_items or items, "cuts": "all" if cuts is None else list(cuts),
             "of_configurations": len(ev.rows)}
    rows = [r for r in ev.rows if cuts is None or r["params"].get("method") in ("none", "dense")
            or any(abs(float(r["params"].get("cut", 0)) - float(c)) < 1e-9 for c in cuts)]
    why = [stale_reason(ev.manifest, r["params"]) for r in rows]
    stats["stale"] = [f"{r['params'].get('model')} {r['params'].get('method')} cut {r['params'].get('cut')}: {w}"
                      for r, w in zip(rows, why) if w]
    rows = [r for r, w in zip(rows, why) if not w]
    n_rows = len(rows)
    for k, r in enumerate(rows):
        p = dict(r["params"])
        got: dict = {}
        for task in p.get("tasks", []):
            lim = (ppl_items or items) if task == "ppl" else items
            got.setdefault(lim, []).append(task)
        for lim, tasks in got.items():
            q = {**p, "tasks": tasks, "limit": lim, "batch_size": batch_size}
            res = sweep.run(sweep.evaluate_config, [q], cache, desc="verify", items=True, progress=False)
            row = res.rows[0]
            if row.get("status") != "ok":
                raise RuntimeError(f"verification run failed for {q}: {row.get('error')}")
            for task in tasks:
                mine, theirs = row["items"][task], r["items"][task]
                idx = {v: j for j, v in enumerate(theirs["id"])}
                for j, iid in enumerate(mine["id"]):
                    t = idx.get(str(iid))
                    if t is None:
                        raise RuntimeError(f"item {iid} of {task} is not in the evidence {folder}")
                    for f in ("correct", "correct_norm"):
                        if f in mine and f in theirs:
                            stats["outcomes"] += 1
                            if int(mine[f][j]) != int(theirs[f][t]):
                                stats["outcome_flips"] += 1
                                stats["flips"].append(_where(p, task, iid, f, mine[f][j], theirs[f][t]))
                    a, b = float(mine["ll"][j]), float(theirs["ll"][t])
                    d = abs(a - b)
                    stats["ll_compared"] += 1
                    stats["ll_max_abs_diff"] = max(stats["ll_max_abs_diff"], d)
                    if d > LL_ATOL + LL_RTOL * abs(b):
                        stats["ll_outside"] += 1
                        stats["outside"].append(_where(p, task, iid, "ll", a, b))
                    if mine.get("kl") and theirs.get("kl") and mine["kl"][j] is not None and theirs["kl"][t] is not None:
                        stats["kl_max_abs_diff"] = max(stats["kl_max_abs_diff"],
                                                       abs(float(mine["kl"][j]) - float(theirs["kl"][t])))
        stats["configurations"] += 1
        el = time.time() - t0
        log(f"verify {Path(folder).parent.name}: {k + 1}/{n_rows} configurations ({p.get('model')}, {p.get('method')}, "
            f"cut {p.get('cut')}), {sweep._fmt_s(el)} elapsed, ~{sweep._fmt_s(el / (k + 1) * (n_rows - k - 1))} left")
    stats["ok"] = (stats["ll_outside"] <= MAX_FLIP_SHARE * stats["ll_compared"]
                   and stats["outcome_flips"] <= MAX_FLIP_SHARE * stats["outcomes"])
    stats["tolerance"] = {"ll_atol": LL_ATOL, "ll_rtol": LL_RTOL, "max_flip_share": MAX_FLIP_SHARE}
    return stats


def _where(p, task, iid, field, mine, theirs) -> str:
    extra = {k: v for k, v in p.items() if k not in ("model", "method", "cut", "fingerprint", "tasks", "limit",
                                                        "seed", "batch_size")}
    return (f"{p.get('model')} {p.get('method')} cut {p.get('cut')} {extra or ''} {task} item {iid}: {field} "
            f"here {mine} vs committed {theirs}")


def verify_report(stats: dict, folder) -> str:
    lines = [f"verification of {folder}: {stats['configurations']} of its {stats['of_configurations']} configurations "
             f"(dense and cuts {stats['cuts']}), first {stats['items']} items per task ({stats['ppl_items']} ppl windows) "
             f"recomputed here",
             f"  outcomes equal: {stats['outcomes'] - stats['outcome_flips']}/{stats['outcomes']} "
             f"(flips allowed: {MAX_FLIP_SHARE:.1%})",
             f"  gold log-likelihoods within {LL_ATOL} + {LL_RTOL}|ll| nats: {stats['ll_compared'] - stats['ll_outside']}"
             f"/{stats['ll_compared']} (outside allowed: {MAX_FLIP_SHARE:.1%}; largest difference "
             f"{stats['ll_max_abs_diff']:.2e} nats); largest KL difference "
             f"{stats['kl_max_abs_diff']:.2e} nats"]
    for w in stats.get("stale", []):
        lines.append(f"  NOT VERIFIED (stale rows, rendered as committed until a GPU recomputes them) {w}")
    for w in stats["flips"][:20]:
        lines.append(f"  FLIP {w}")
    for w in stats["outside"][:20]:
        lines.append(f"  OUTSIDE TOLERANCE {w}")
    lines.append("  verification PASSED" if stats["ok"] else "  VERIFICATION FAILED: the committed rows are not what "
                                                             "this code computes")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m utrc_study.report.evidence", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="the manifest and sizes of an evidence folder")
    s.add_argument("folder")
    v = sub.add_parser("verify", help="recompute the first items of every configuration and compare")
    v.add_argument("folder")
    v.add_argument("--items", type=int, default=20)
    v.add_argument("--ppl-items", type=int, default=None)
    v.add_argument("--cuts", default="all", help="comma list of cuts to verify besides dense (default all)")
    a = ap.parse_args(argv)
    if a.cmd == "show":
        ev = load(a.folder)
        print(json.dumps({k: v for k, v in ev.manifest.items() if k != "files"}, indent=1))
        print(f"{len(ev)} configurations")
        return 0
    stats = verify(a.folder, items=a.items, ppl_items=a.ppl_items,
                   cuts=None if a.cuts == "all" else [float(c) for c in a.cuts.split(",")])
    print(verify_report(stats, a.folder))
    return 0 if stats["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

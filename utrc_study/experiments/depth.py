"""The depth family's analysis (issue 27, notebook 08_depth): UTRC minus each baseline against depth.

Input: evidence rows (`utrc_study.report.evidence.load(folder).rows`, written by
scripts/gpu_depth_eval.py): one row per (model, method, cut, anchors), every row over the same items.
A row's schedule is named from its anchors (`schedule_of`: "library" = `utrc_lib.default_layers`,
"relative" = the paper's 64-layer anchors at the same fractions of the stack).

Per (depth, schedule, cut, baseline), paired on the same items (`margins`):
  acc      mean over the accuracy tasks of (UTRC accuracy - baseline accuracy), points of accuracy;
           task accuracy: cloze kind `correct`, choice kinds `correct_norm` (choice4) / `correct` (choice2),
           as the main run (`paired.TASK_ACC`);
  norm     acc / (dense accuracy - chance), the mean over tasks of each task's share of the gap the
           dense model has above chance (0.25 for four choices, 0.5 for two, 0 for cloze), so that
           depths with different dense accuracy compare; NaN where a task's gap is below 1 point;
  kl       mean over tasks of (baseline KL - UTRC KL) per scored token (KL(dense || method), nats):
           positive favours UTRC, as acc does.
Intervals: percentile bootstrap (10,000 resamples by default), items resampled within each task, the
same draws for UTRC and the baseline; p: two-sided bootstrap p of "margin = 0", reported as
p < 1/resamples when no draw crosses zero.
Across depths (`slopes`): the least-squares slope of the margin against log2(layers), its interval from
the same resampling done independently at every depth (the depths are different models on the same
items); "grows" / "shrinks" / "unresolved" by whether the interval excludes 0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from . import stats
from .paired import TASK_ACC

CHANCE = {"cloze": 0.0, "choice4": 0.25, "choice2": 0.5}
# the grid of scripts/gpu_depth_eval.py
METHODS = ("utrc", "evit", "pumer", "tome", "merge_only", "prune_only", "random", "utrc_reference")
CUTS = (0.2, 0.1, 0.3)                          # the first one first
TASKS = ("cloze_v2", "choice4_v2", "choice2_v2", "lr_cloze_512", "lr_cloze_1024", "lr_cloze_2048",
         "passkey_512", "passkey_1024", "passkey_2048", "longppl_1024", "longppl_2048")
MAX_LENGTH = 4096                               # the long tasks' inputs (2048 tokens and their context)
PAPER_64 = (12, 17, 22, 27, 32, 37, 42)
SCHEDULES = ("library", "relative")
METRICS = ("acc", "norm", "kl")
DENSE = ("none", "dense")


def schedule_layers(schedule: str, num_layers: int) -> list[int]:
    """The anchors of `schedule` ("library" or "relative") at depth `num_layers`."""
    from utrc_lib import default_layers

    if schedule == "library":
        return list(default_layers(num_layers))
    if schedule == "relative":
        return sorted({min(num_layers - 1, max(0, round(num_layers * a / 64))) for a in PAPER_64})
    raise ValueError(f"unknown schedule {schedule!r}; one of {', '.join(SCHEDULES)}")


def schedule_of(num_layers: int, layers) -> str:
    """The name of the schedule whose anchors are `layers` at this depth ("custom" for neither; at 64
    layers both schedules are the paper's anchors and the name is "library")."""
    for s in SCHEDULES:
        if list(layers) == schedule_layers(s, num_layers):
            return s
    return "custom"


def depth_of(model: str) -> int:
    """Number of layers of an embedded model or local checkpoint (from its config.json)."""
    from utrc_lib.hosts.models import model_depth

    L = model_depth(model)
    if L is None:
        raise ValueError(f"no local config.json for model {model!r}")
    return int(L)


def with_weights(models, log=print) -> list[str]:
    """The models of `models` whose weights are on this machine (an embedded model's folder holds its
    safetensors, or a local checkpoint directory); the others are named as skipped (the depth family's
    12 / 24 / 48-layer weights are rebuilt from their cards: scripts/train/depth_family.sh)."""
    from utrc_lib.hosts.models import EMBEDDED, embedded_path

    keep = []
    for m in models:
        folder = embedded_path(m) if m in EMBEDDED else Path(str(m)).expanduser()
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
            keep.append(m)
        else:
            log(f"skipped {m}: no weights in {folder}")
    return keep


def plan(models, methods=METHODS, cuts=CUTS, schedules=SCHEDULES, tasks=TASKS, limit=None,
         engine: str = "classic") -> list[dict]:
    """Configurations in the order of work: per model, dense, then every schedule at the first cut, then
    every schedule at the other cuts, each over `methods`; a configuration two schedules share (at 64
    layers both are the paper's anchors) appears once."""
    import json

    from .sweep import _canonical, model_fingerprint

    def match_key(cfg):
        return json.dumps(_canonical(cfg), sort_keys=True)

    out, seen = [], set()
    common = {"tasks": list(tasks), "limit": limit, "seed": 0, "max_length": MAX_LENGTH}
    if engine != "classic":
        common["engine"] = engine
    cuts = [float(c) for c in cuts]
    for m in models:
        L, fp = depth_of(m), model_fingerprint(m)
        out.append({"model": m, "method": "none", "cut": 0.0, "fingerprint": fp, **common})
        order = [(s, c) for s in schedules for c in cuts[:1]] + [(s, c) for s in schedules for c in cuts[1:]]
        for s, c in order:
            for meth in methods:
                cfg = {"model": m, "method": meth, "cut": c, "layers": schedule_layers(s, L), "fingerprint": fp,
                       **common}
                if match_key(cfg) not in seen:
                    seen.add(match_key(cfg))
                    out.append(cfg)
    return out


def _kind(task: str) -> str:
    from ..eval.suite import task_kind

    return task_kind(task)


def _acc_field(task: str) -> Optional[str]:
    return TASK_ACC.get(_kind(task))


def cells(rows: Sequence[dict], depth_of) -> dict:
    """{(model, schedule, cut, method): items} and {model: dense items} from evidence rows.
    `depth_of(model)` -> number of layers."""
    reduced, dense = {}, {}
    for r in rows:
        if r.get("status", "ok") != "ok" or "items" not in r:
            continue
        p = r["params"]
        if p["method"] in DENSE:
            dense.setdefault(p["model"], r["items"])
            continue
        L = depth_of(p["model"])
        layers = p.get("layers") or schedule_layers("library", L)
        reduced.setdefault((p["model"], schedule_of(L, layers), float(p["cut"]), p["method"]), r["items"])
    return {"reduced": reduced, "dense": dense}


def _task_arrays(items: dict, tasks: Sequence[str]):
    """Per task: accuracy array (None for a perplexity task), KL array, scored-token array."""
    out = []
    for t in tasks:
        it = items[t]
        f = _acc_field(t)
        acc = None if f is None or it.get(f) is None else np.asarray(it[f], dtype=float)
        kl = None if it.get("kl") is None else np.asarray([np.nan if v is None else v for v in it["kl"]], dtype=float)
        tok = np.asarray(it.get("tokens") or it.get("gold_tokens"), dtype=float)
        out.append((acc, kl, tok))
    return out


def _draws(ref, base, dense, tasks, metric: str, resamples: int, rng) -> tuple[float, np.ndarray]:
    """(estimate, bootstrap draws) of one margin (module doc), items resampled within each task."""
    acc_tasks = [i for i, t in enumerate(tasks) if ref[i][0] is not None and base[i][0] is not None]
    kl_tasks = [i for i, t in enumerate(tasks) if ref[i][1] is not None and base[i][1] is not None]
    use = acc_tasks if metric in ("acc", "norm") else kl_tasks
    if not use:
        return float("nan"), np.full(resamples, np.nan)
    est_parts, draw_parts = [], []
    for i in use:
        n = len(ref[i][2])
        idx = rng.integers(0, n, size=(resamples, n))
        if metric in ("acc", "norm"):
            d_est = ref[i][0].mean() - base[i][0].mean()
            d = ref[i][0][idx].mean(1) - base[i][0][idx].mean(1)
            if metric == "norm":
                gap = -1.0 if dense[i][0] is None else dense[i][0].mean() - CHANCE.get(_kind(tasks[i]), 0.0)
                if gap < 0.01:
                    return float("nan"), np.full(resamples, np.nan)
                d_est, d = d_est / gap, d / gap
        else:
            tok = ref[i][2]
            kr, kb = np.nan_to_num(ref[i][1]), np.nan_to_num(base[i][1])
            d_est = kb.sum() / tok.sum() - kr.sum() / tok.sum()
            t = tok[idx].sum(1)
            d = (kb[idx].sum(1) - kr[idx].sum(1)) / t
        est_parts.append(d_est)
        draw_parts.append(d)
    return float(np.mean(est_parts)), np.mean(draw_parts, axis=0)


def margins(rows: Sequence[dict], depth_of, *, reference: str = "utrc", baselines: Optional[Iterable[str]] = None,
            tasks: Optional[Sequence[str]] = None, resamples: int = stats.DEFAULT_RESAMPLES,
            seed: int = stats.DEFAULT_SEED, level: float = stats.DEFAULT_LEVEL):
    """DataFrame per (model, layers, schedule, cut, baseline, metric): margin, low, high, p, n_items,
    and the bootstrap draws (column "draws", for `slopes`). `tasks`: default every task of the rows."""
    import pandas as pd

    c = cells(rows, depth_of)
    red, dense = c["reduced"], c["dense"]
    recs = []
    for (model, sched, cut, method), items in sorted(red.items(), key=lambda kv: str(kv[0])):
        if method != reference or model not in dense:
            continue
        ts = list(tasks or items)
        ref = _task_arrays(items, ts)
        den = _task_arrays(dense[model], ts)
        for b in sorted({k[3] for k in red if k[:3] == (model, sched, cut) and k[3] != reference}):
            if baselines is not None and b not in set(baselines):
                continue
            base = _task_arrays(red[(model, sched, cut, b)], ts)
            for j, metric in enumerate(METRICS):
                rng = np.random.default_rng([seed, j])       # the same draws for every cell of a metric
                est, d = _draws(ref, base, den, ts, metric, resamples, rng)
                ok = d[np.isfinite(d)]
                lo, hi = stats._percentiles(ok, level) if ok.size else (float("nan"), float("nan"))
                p = stats._boot_p(ok) if ok.size else float("nan")
                recs.append(dict(model=model, layers=depth_of(model), schedule=sched, cut=cut, baseline=b,
                                 metric=metric, margin=est, low=lo, high=hi, p=p,
                                 n_items=int(sum(len(a[2]) for a in ref)), resamples=resamples, draws=d))
    return pd.DataFrame.from_records(recs)


def slopes(table, *, level: float = stats.DEFAULT_LEVEL):
    """Per (schedule, cut, baseline, metric) over the depths present: least-squares slope of the margin
    against log2(layers) with its bootstrap interval, the first depth where the margin's interval lies
    above 0 ("beats_from"), and a verdict: "grows" / "shrinks" / "unresolved" (fewer than 2 depths:
    "one depth")."""
    import pandas as pd

    recs = []
    for key, g in table.groupby(["schedule", "cut", "baseline", "metric"], sort=True):
        g = g.sort_values("layers")
        x = np.log2(g["layers"].to_numpy(dtype=float))
        y = g["margin"].to_numpy(dtype=float)
        rec = dict(zip(("schedule", "cut", "baseline", "metric"), key), depths=list(map(int, g["layers"])))
        above = g[g["low"] > 0]
        rec["beats_from"] = int(above["layers"].iloc[0]) if len(above) else None
        if len(g) < 2 or not np.isfinite(y).all():
            rec.update(slope=float("nan"), low=float("nan"), high=float("nan"), verdict="one depth" if len(g) < 2
                       else "unresolved")
            recs.append(rec)
            continue
        xc = x - x.mean()
        slope = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
        D = np.stack(list(g["draws"]))                       # (depths, resamples)
        keep = np.isfinite(D).all(0)
        sd = (xc[:, None] * (D[:, keep] - D[:, keep].mean(0))).sum(0) / (xc ** 2).sum()
        lo, hi = stats._percentiles(sd, level)
        verdict = "grows" if lo > 0 else "shrinks" if hi < 0 else "unresolved"
        rec.update(slope=slope, low=lo, high=hi, verdict=verdict)
        recs.append(rec)
    out = pd.DataFrame.from_records(recs)
    if len(out):
        out["beats_from"] = out["beats_from"].astype("Int64")   # a depth, or <NA> where UTRC is ahead at none
    return out


def collapsed(rows: Sequence[dict], depth_of, *, resamples: int = stats.DEFAULT_RESAMPLES,
              seed: int = stats.DEFAULT_SEED, level: float = stats.DEFAULT_LEVEL):
    """Per (model, schedule, cut, method): mean accuracy over the accuracy tasks minus their chance level,
    with its interval; "at_chance" when the interval contains 0 (the paper's "collapse")."""
    import pandas as pd

    c = cells(rows, depth_of)
    recs = []
    for (model, sched, cut, method), items in sorted(c["reduced"].items(), key=lambda kv: str(kv[0])):
        groups = [np.asarray(items[t][_acc_field(t)], dtype=float) - CHANCE.get(_kind(t), 0.0)
                  for t in items if _acc_field(t) and items[t].get(_acc_field(t)) is not None]
        if not groups:
            continue
        from .paired import stratified_bootstrap

        ci = stratified_bootstrap(groups, resamples=resamples, seed=seed, level=level)
        recs.append(dict(model=model, layers=depth_of(model), schedule=sched, cut=cut, method=method,
                         above_chance=ci.estimate, low=ci.low, high=ci.high, at_chance=bool(ci.low <= 0 <= ci.high)))
    return pd.DataFrame.from_records(recs)


def p_text(p: float, resamples: int) -> str:
    """A bootstrap p-value as text: "p < 1/resamples" for 0 (no draw crossed zero)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p n/a"
    return f"p < {1 / resamples:.0e}" if p <= 0 else f"p = {p:.2g}"

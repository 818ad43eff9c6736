"""Tables and the margin figure of the scale x length study (scripts/scale_length_eval.py's cache).

    rows = load_rows("figures/07_scale_and_length/cache.jsonl")      # ok rows, one per measurement
    dense = dense_table(rows)           # each v2 task x model: dense accuracy / ppl with 95% CI, chance
    long = long_context_table(rows)     # model x method x cut x task: value, CI, paired delta vs dense,
                                        # token-layer cut and analytic FLOPs cut side by side
    margin = margin_table(rows)         # UTRC minus each baseline per (model, cut, length): paired CI
    fig = plot_margins(margin, cut=0.3)

Per-task accuracy: cloze-kind tasks (cloze_v2, lr_cloze_*) greedy match, choice4_v2 acc_norm (what the
calibration and the v1 paired analysis use), passkey_* and choice2_v2 acc; longppl_* perplexity
(token-weighted), compared through the gold log-likelihood per token (higher is better). Rows of one
(model, task) score the same items in the same order; when a dense row has more items than a reduced
one (its own limit) the pair uses their common first items (ids checked). Intervals: percentile
bootstrap (`utrc_study.experiments.stats`), paired; at one length the accuracy margin is the mean over
that length's accuracy tasks, resampled per task (`paired.stratified_bootstrap`). Lives under
report/ (not part of the code version: rendering does not change a computed number).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..experiments import paired, stats

SHORT = ("cloze_v2", "choice4_v2", "choice2_v2")
BASELINES = ("evit", "pumer", "tome")
MODEL_ORDER = ("tiny-mamba2", "small-mamba2", "tiny-mamba", "small-mamba")
SHORT_LENGTH = 128

__all__ = ["slim_cache", "load_rows", "stale_rows", "task_fingerprints", "task_length", "acc_field", "dense_table", "long_context_table", "margin_table",
           "plot_margins", "markdown"]


def task_length(task: str) -> int:
    return SHORT_LENGTH if task in SHORT else int(task.rsplit("_", 1)[1])


def acc_field(task: str) -> Optional[str]:
    """Item array of a task's accuracy ("correct" / "correct_norm"), None for the ppl tasks."""
    if task.startswith("longppl"):
        return None
    return "correct_norm" if task == "choice4_v2" else "correct"


KEEP_FIELDS = ("id", "correct", "correct_norm")                    # accuracy tasks
KEEP_FIELDS_PPL = ("id", "ll", "gold_tokens", "ll_per_token")       # longppl


def slim_cache(src, dst, digits: int = 5) -> dict:
    """Copy the ok rows of cache `src` to `dst` with only what the tables use (item arrays: id and the
    accuracy field, or for longppl ll / gold_tokens / ll_per_token rounded to `digits` decimals; the
    result's scalar entries), small enough to commit. Returns {"rows": n, "bytes": size}."""
    from ..experiments.sweep import RowCache

    rows = load_rows(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            t = r["params"]["tasks"][0]
            it = r["items"][t]
            keep = KEEP_FIELDS if acc_field(t) else KEEP_FIELDS_PPL
            slim = {k: ([round(float(v), digits) for v in it[k]] if k in ("ll", "ll_per_token") else it[k])
                    for k in keep if k in it}
            res = {k: v for k, v in (r.get("result") or {}).items() if not isinstance(v, (dict, list)) or k == "layers"}
            out = {k: r[k] for k in ("key", "params", "status", "version", "seconds", "finished") if k in r}
            f.write(json.dumps({**out, "result": res, "items": {t: slim}}) + "\n")
    tmp.replace(dst)
    RowCache(dst).load()   # readable
    return {"rows": len(rows), "bytes": dst.stat().st_size}


def load_rows(cache) -> list[dict]:
    """The ok rows with item arrays of a scale-length cache (one per model, method, cut, task: the last
    one written wins; rows that differ only by batch size are one measurement)."""
    from ..experiments.sweep import RowCache

    out: dict = {}
    for r in RowCache(cache).load().values():
        if r.get("status") != "ok" or not isinstance(r.get("items"), dict):
            continue
        key = _row_key(r["params"])
        prev = out.get(key)
        if prev is None or r.get("finished", "") >= prev.get("finished", ""):
            out[key] = r
    return [out[k] for k in sorted(out, key=lambda k: (_model_rank(k[0]), k[1], k[2], k[3]))]


def stale_rows(rows, manifest: Optional[dict] = None) -> list[dict]:
    """Rows measured on other weights or another task file than the ones here now: the row's
    `fingerprint` differs from `sweep.model_fingerprint(model)` or its `task_sha` from the v2 manifest's
    sha256 (16 hex). [] when every row is current; rows without those parameters are not judged."""
    from ..experiments.sweep import model_fingerprint

    tsha = task_fingerprints(manifest)
    fps: dict = {}
    out = []
    for r in rows:
        p = r["params"]
        t = p["tasks"][0]
        why = []
        if "fingerprint" in p:
            fp = fps.setdefault(p["model"], model_fingerprint(p["model"]))
            if fp != p["fingerprint"]:
                why.append(f"weights {p['fingerprint']} -> {fp}")
        if "task_sha" in p and t in tsha and tsha[t] != p["task_sha"]:
            why.append(f"task file {p['task_sha']} -> {tsha[t]}")
        if why:
            out.append({"model": p["model"], "method": p["method"], "cut": p["cut"], "task": t, "why": "; ".join(why)})
    return out


def _model_rank(m: str):
    return (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m)


def _row_key(p: dict) -> tuple:
    """(model, method, cut, task) of a row's params; every dense method is ("none", 0.0)."""
    dense = p["method"] in paired.DENSE_METHODS
    return (p["model"], "none" if dense else p["method"], 0.0 if dense else round(float(p["cut"]), 6), p["tasks"][0])


def _index(rows) -> dict:
    return {_row_key(r["params"]): r for r in rows}


def _pair(a: dict, b: dict):
    """Common first items of two item-array dicts of one task (ids checked): (n, slice)."""
    n = min(len(a["id"]), len(b["id"]))
    if list(a["id"][:n]) != list(b["id"][:n]):
        raise ValueError("rows score different items: their first item ids differ")
    return n


def _arr(items: dict, field: str, n: Optional[int] = None) -> np.ndarray:
    v = np.asarray(items[field], dtype=float)
    return v if n is None else v[:n]


def task_fingerprints(manifest: Optional[dict] = None) -> dict:
    """sha256 (16 hex) of each v2 task file, from the v2 manifest (`suite.data_dir_v2()`, the folder the
    evaluator reads): the `task_sha` of scripts/scale_length_eval.py's rows, so a rebuilt (recalibrated)
    task gets new rows (the code version hashes only the v1 manifest)."""
    return {k: v["sha256"][:16] for k, v in (manifest or _manifest())["tasks"].items()}


def _manifest(path=None) -> dict:
    from ..eval.suite import data_dir_v2

    p = Path(path) if path else data_dir_v2() / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {"tasks": {}}


def dense_table(rows, *, resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED,
                manifest: Optional[dict] = None):
    """DataFrame per (task, model) of the dense rows: metric (acc / acc_norm / ppl), value, low, high,
    n, chance (manifest), level (short tasks' calibration level)."""
    import pandas as pd

    man = manifest or _manifest()
    recs = []
    for r in rows:
        p = r["params"]
        if p["method"] not in paired.DENSE_METHODS:
            continue
        t = p["tasks"][0]
        it = r["items"][t]
        f = acc_field(t)
        if f is None:
            ci = stats.bootstrap_ppl(_arr(it, "ll"), _arr(it, "gold_tokens"), resamples=resamples, seed=seed)
            metric = "ppl"
        else:
            ci = paired.stratified_bootstrap([_arr(it, f)], resamples=resamples, seed=seed)
            metric = "acc_norm" if f == "correct_norm" else "acc"
        info = man.get("tasks", {}).get(t, {})
        recs.append(dict(task=t, length=task_length(t), model=p["model"], metric=metric, value=ci.estimate,
                         low=ci.low, high=ci.high, n=ci.n, chance=None if f is None else info.get("chance"),
                         level=info.get("level")))
    df = pd.DataFrame.from_records(recs)
    if len(df):
        df = df.sort_values(["length", "task", "model"], key=lambda s: s.map(_model_rank) if s.name == "model" else s)
    return df.reset_index(drop=True)


def long_context_table(rows, *, tasks: Optional[Iterable[str]] = None, resamples: int = stats.DEFAULT_RESAMPLES,
                       seed: int = stats.DEFAULT_SEED):
    """DataFrame per reduced row (model, method, cut, task): value with 95% CI, paired delta vs the
    model's dense row (accuracy points, or ppl) with CI and p (McNemar for accuracies, bootstrap for
    ppl), the target and achieved token-layer cut and the analytic FLOPs cut at the task's length."""
    import pandas as pd

    idx = _index(rows)
    want = set(tasks) if tasks is not None else None
    recs = []
    for (model, method, cut, t), r in idx.items():
        if method == "none" or (want is not None and t not in want):
            continue
        it = r["items"][t]
        res = r["result"]
        dense = idx.get((model, "none", 0.0, t))
        f = acc_field(t)
        rec = dict(model=model, method=method, cut=cut, task=t, length=task_length(t))
        n = _pair(it, dense["items"][t]) if dense else None
        if f is None:
            tok = _arr(it, "gold_tokens", n)
            ci = stats.bootstrap_ppl(_arr(it, "ll", n), tok, resamples=resamples, seed=seed)
            rec.update(metric="ppl")
            if dense:
                d = stats.paired_bootstrap_ppl(_arr(it, "ll", n), _arr(dense["items"][t], "ll", n), tok,
                                               resamples=resamples, seed=seed)
        else:
            a = _arr(it, f, n)
            ci = paired.stratified_bootstrap([a], resamples=resamples, seed=seed)
            rec.update(metric="acc_norm" if f == "correct_norm" else "acc")
            if dense:
                b = _arr(dense["items"][t], f, n)
                d = paired.stratified_bootstrap([a], [b], resamples=resamples, seed=seed)
                d = stats.Interval(d.estimate, d.low, d.high, d.level, d.n, d.resamples, d.seed,
                                   stats.mcnemar_exact(a, b).p_value)
        rec.update(value=ci.estimate, low=ci.low, high=ci.high, n=ci.n)
        if dense:
            rec.update(delta=d.estimate, delta_low=d.low, delta_high=d.high, p_vs_dense=d.p_value)
        rec.update(token_layer_cut=res.get("token_layer_cut"),
                   achieved_token_layer_cut=res.get(f"{t}/achieved_token_layer_cut"),
                   analytic_flops_cut=res.get("analytic_flops_cut"),
                   analytic_flops_seq_len=res.get("analytic_flops_seq_len"))
        recs.append(rec)
    df = pd.DataFrame.from_records(recs)
    if len(df):
        df["_m"] = df["model"].map(_model_rank)
        df = df.sort_values(["_m", "cut", "length", "task", "method"]).drop(columns="_m")
    return df.reset_index(drop=True)


def margin_table(rows, *, reference: str = "utrc", baselines: Sequence[str] = BASELINES,
                 resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED):
    """DataFrame per (model, cut, length, measure, baseline): reference minus baseline, paired, with 95%
    CI and p. measure "acc": mean accuracy over that length's accuracy tasks present for both (stratified
    bootstrap; points of accuracy), "ll": longppl gold log-likelihood per token (nats; higher is better)."""
    import pandas as pd

    idx = _index(rows)
    groups = sorted({(m, c) for (m, meth, c, _) in idx if meth == reference}, key=lambda g: (_model_rank(g[0]), g[1]))
    recs = []
    for model, cut in groups:
        lengths = sorted({task_length(t) for (m, meth, c, t) in idx if (m, meth, c) == (model, reference, cut)})
        for L in lengths:
            for b in baselines:
                ga, gb, tasks_acc, ll = [], [], [], None
                for (m, meth, c, t), r in idx.items():
                    if (m, meth, c) != (model, reference, cut) or task_length(t) != L:
                        continue
                    rb = idx.get((model, b, cut, t))
                    if rb is None:
                        continue
                    ia, ib = r["items"][t], rb["items"][t]
                    n = _pair(ia, ib)
                    f = acc_field(t)
                    if f is None:
                        ll = (_arr(ia, "ll_per_token", n), _arr(ib, "ll_per_token", n), t)
                    else:
                        ga.append(_arr(ia, f, n))
                        gb.append(_arr(ib, f, n))
                        tasks_acc.append(t)
                base = dict(model=model, cut=cut, length=L, reference=reference, baseline=b)
                if ga:
                    ci = paired.stratified_bootstrap(ga, gb, resamples=resamples, seed=seed)
                    recs.append({**base, "measure": "acc", "tasks": ",".join(sorted(tasks_acc)), "delta": ci.estimate,
                                 "low": ci.low, "high": ci.high, "p": ci.p_value, "n": ci.n})
                if ll is not None:
                    ci = stats.paired_bootstrap(ll[0], ll[1], resamples=resamples, seed=seed)
                    recs.append({**base, "measure": "ll", "tasks": ll[2], "delta": ci.estimate, "low": ci.low,
                                 "high": ci.high, "p": ci.p_value, "n": ci.n})
    return pd.DataFrame.from_records(recs)


def plot_margins(margin, cuts: Sequence[float] = (0.3,), measures: Sequence[str] = ("acc", "ll")):
    """Figure: one column per model (scale), one row per measure; x: input length (log2 axis), one line
    per baseline (UTRC minus it, 95% CI bars), linestyle per cut; a dashed zero line."""
    import matplotlib.pyplot as plt

    from . import plotting

    if margin is None or not len(margin):
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, "no UTRC / baseline pairs in the cache", ha="center", va="center")
        ax.set_axis_off()
        return fig
    models = sorted(margin["model"].unique(), key=_model_rank)
    measures = [m for m in measures if (margin["measure"] == m).any()]
    fig, axes = plt.subplots(len(measures), len(models), figsize=(max(6.0, 3.6 * len(models)), 2.9 * len(measures)),
                             squeeze=False, sharex=True)
    styles = ["-", "--", ":"]
    for i, meas in enumerate(measures):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ax.axhline(0, color="k", lw=0.8, ls="--")
            for k, cut in enumerate(cuts):
                sub = margin[(margin["model"] == model) & (margin["measure"] == meas) & np.isclose(margin["cut"], cut)]
                for b in sorted(sub["baseline"].unique()):
                    s = sub[sub["baseline"] == b].sort_values("length")
                    scale = 100 if meas == "acc" else 1
                    y = s["delta"] * scale
                    err = np.vstack([(s["delta"] - s["low"]) * scale, (s["high"] - s["delta"]) * scale])
                    off = 1 + 0.03 * (sorted(sub["baseline"].unique()).index(b) - 1)
                    ax.errorbar(s["length"] * off, y, yerr=err, marker="o", ms=3.5, capsize=2,
                                ls=styles[k % len(styles)], color=plotting.style(b)["color"],
                                label=f"vs {b}" + (f" @ {cut:.0%}" if len(cuts) > 1 else ""))
            ax.set_xscale("log", base=2)
            ax.set_xticks([128, 512, 1024, 2048])
            ax.set_xticklabels(["128", "512", "1024", "2048"])
            if i == 0:
                ax.set_title(model)
            if i == len(measures) - 1:
                ax.set_xlabel("input length (tokens; 128 = short tasks)")
            if j == 0:
                ax.set_ylabel("UTRC - baseline, acc points" if meas == "acc" else "UTRC - baseline, ll/token (nats)")
            if i == 0 and j == len(models) - 1:
                ax.legend(fontsize=7, loc="best")
    title = "UTRC's margin over each baseline (paired 95% CI) at " + ", ".join(f"{c:.0%}" for c in cuts) + " cut"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _fmt(v, lo, hi, scale=100.0, digits=1):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{scale * v:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def markdown(dense, long, margin=None) -> dict:
    """{"dense_accuracy.md": text, "long_context_table.md": text} from the tables."""
    import pandas as pd

    out = {}
    lines = ["# Dense accuracy of the v2 tasks (95% bootstrap CI)", "",
             "Accuracy in % (choice4_v2: acc_norm; cloze tasks: greedy match), longppl: perplexity. "
             "n = items scored.", ""]
    if len(dense):
        models = sorted(dense["model"].unique(), key=_model_rank)
        lines.append("| task | length | level | chance | " + " | ".join(f"{m}" for m in models) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(models))
        for t in dict.fromkeys(dense["task"]):
            s = dense[dense["task"] == t].set_index("model")
            first = s.iloc[0]
            cells = []
            for m in models:
                if m not in s.index:
                    cells.append("")
                    continue
                r = s.loc[m]
                ppl = r["metric"] == "ppl"
                cells.append(f"{_fmt(r['value'], r['low'], r['high'], 1 if ppl else 100, 1)} (n {int(r['n'])})")
            chance = "" if pd.isna(first["chance"]) or first["chance"] is None else f"{100 * first['chance']:.0f}"
            level = first["level"] if isinstance(first["level"], str) else ""
            lines.append(f"| {t} | {int(first['length'])} | {level} | {chance} | " + " | ".join(cells) + " |")
    else:
        lines.append("(no dense rows in the cache)")
    out["dense_accuracy.md"] = "\n".join(lines) + "\n"
    lines = ["# Reduced models on the v2 tasks: value, paired change vs dense, cuts side by side", "",
             "value: accuracy % (choice4_v2 acc_norm) or perplexity (longppl) with 95% CI; vs dense: paired "
             "difference (accuracy points / ppl) with 95% CI and p (McNemar exact / paired bootstrap). "
             "token-layer cut: the schedule's (the paper's FLOPs definition; target = achieved up to "
             "rounding and the protected tail); analytic FLOPs cut: `utrc_lib.core.flops` at the task's "
             "length (short tasks: 128), LM head on the last position.", ""]
    if len(long):
        lines.append("| model | method | cut | task | n | value [95% CI] | vs dense [95% CI] | p | token-layer cut "
                     "(achieved) | analytic FLOPs cut |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in long.itertuples():
            ppl = r.metric == "ppl"
            sc = 1 if ppl else 100
            delta = _fmt(getattr(r, "delta", None), getattr(r, "delta_low", None), getattr(r, "delta_high", None),
                         sc, 2 if ppl else 1) if hasattr(r, "delta") else ""
            p = getattr(r, "p_vs_dense", float("nan"))
            ach = r.achieved_token_layer_cut
            lines.append(f"| {r.model} | {r.method} | {r.cut:.0%} | {r.task} | {r.n} | {_fmt(r.value, r.low, r.high, sc)} | "
                         f"{delta} | {'' if p is None or np.isnan(p) else f'{p:.3g}'} | "
                         f"{r.token_layer_cut:.1%} ({'' if ach is None or np.isnan(ach) else f'{ach:.1%}'}) | "
                         f"{r.analytic_flops_cut:.1%} @ {r.analytic_flops_seq_len} |")
    else:
        lines.append("(no reduced rows in the cache)")
    if margin is not None and len(margin):
        lines += ["", "## UTRC minus each baseline (the figure's numbers)", "",
                  "| model | cut | length | measure | baseline | delta [95% CI] | p | n | tasks |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in margin.itertuples():
            sc, dg = (100, 1) if r.measure == "acc" else (1, 4)
            lines.append(f"| {r.model} | {r.cut:.0%} | {r.length} | {r.measure} | {r.baseline} | "
                         f"{_fmt(r.delta, r.low, r.high, sc, dg)} | {r.p:.3g} | {r.n} | {r.tasks} |")
    out["long_context_table.md"] = "\n".join(lines) + "\n"
    return out


def main(argv=None) -> int:
    """python -m utrc_study.report.scale_length slim SRC DST: the committed, slimmed copy of a GPU cache."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("command", choices=["slim"])
    ap.add_argument("src")
    ap.add_argument("dst", nargs="?", default="figures/07_scale_and_length/cache.jsonl")
    a = ap.parse_args(argv)
    info = slim_cache(a.src, a.dst)
    print(f"{info['rows']} rows -> {a.dst} ({info['bytes'] / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Tables and the margin figure of the scale x length study (scripts/scale_length_eval.py's cache).

    rows = load_rows("figures/07_scale_and_length/cache.jsonl")      # ok rows, one per measurement
    dense = dense_table(rows)           # each v2 task x model: dense accuracy / ppl with 95% CI, chance
    long = long_context_table(rows)     # model x method x cut x task: value, CI, paired delta vs dense,
                                        # token-layer cut and analytic FLOPs cut side by side
    margin = margin_table(rows)         # UTRC minus each baseline per (model, cut, task): paired CI, p,
                                        # Holm over every comparison at that cut (one figure's family)
    fig = plot_margins(margin, cuts=[0.3])
    cut_agreement(long), margin_summary(margin), missing_methods(rows, methods), computed_on(rows, source)
                                        # the notebook's sentences and provenance, rendered from the rows

Per-task accuracy: cloze-kind tasks (cloze_v2, lr_cloze_*) greedy match, choice4_v2 acc_norm (what the
calibration and the v1 paired analysis use), passkey_* and choice2_v2 acc; longppl_* perplexity
(token-weighted), compared through the gold log-likelihood per token (higher is better). Rows of one
(model, task) score the same items in the same order; when a dense row has more items than a reduced
one (its own limit) the pair uses their common first items (ids checked). Intervals: percentile
bootstrap (`utrc_study.experiments.stats`), paired; every task is its own comparison (passkey
retrieval and long-range cloze measure different things and are never averaged). Bootstrap p-values
below 1 / resamples print as "< 1/resamples". Lives under report/ (not part of the code version:
rendering does not change a computed number).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..experiments import paired, stats
from ..experiments.stats import format_p

SHORT = ("cloze_v2", "choice4_v2", "choice2_v2")
BASELINES = ("utrc_reference", "evit", "pumer", "tome")
METHODS = ("utrc",) + BASELINES
AGREE_POINTS = 2.0   # token-layer and analytic FLOPs cut "agree" within this many points (cut_agreement)
MODEL_ORDER = ("tiny-mamba2", "small-mamba2", "tiny-mamba", "small-mamba")
SHORT_LENGTH = 128

__all__ = ["slim_cache", "load_rows", "stale_rows", "task_fingerprints", "task_length", "task_family", "acc_field",
           "dense_table", "long_context_table", "margin_table", "plot_margins", "markdown", "cut_agreement",
           "margin_summary", "missing_methods", "computed_on"]


def task_length(task: str) -> int:
    return SHORT_LENGTH if task in SHORT else int(task.rsplit("_", 1)[1])


def task_family(task: str) -> str:
    """cloze (cloze_v2 at 128 tokens, lr_cloze_* beyond), passkey, choice4, choice2 or longppl."""
    if task == "cloze_v2" or task.startswith("lr_cloze"):
        return "cloze"
    for fam in ("passkey", "longppl", "choice4", "choice2"):
        if task.startswith(fam):
            return fam
    return task


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
                 holm_over: Sequence[str] = ("cut",), alpha: float = 0.05,
                 resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED):
    """DataFrame per (model, cut, task, baseline): reference minus baseline, paired, with 95% CI
    (unadjusted) and bootstrap p. measure "acc": the task's accuracy (points), "ll": longppl gold
    log-likelihood per token (nats; higher is better). Every task is its own comparison (never averaged
    with another task of its length). p_holm / verdict: Holm over the rows that share `holm_over`
    (default: one cut = every comparison one margin figure shows); family_size says how many."""
    import pandas as pd

    idx = _index(rows)
    groups = sorted({(m, c) for (m, meth, c, _) in idx if meth == reference}, key=lambda g: (_model_rank(g[0]), g[1]))
    recs = []
    for model, cut in groups:
        tasks = sorted({t for (m, meth, c, t) in idx if (m, meth, c) == (model, reference, cut)},
                       key=lambda t: (task_length(t), t))
        for t in tasks:
            r = idx[(model, reference, cut, t)]
            for b in baselines:
                rb = idx.get((model, b, cut, t))
                if rb is None:
                    continue
                ia, ib = r["items"][t], rb["items"][t]
                n = _pair(ia, ib)
                f = acc_field(t)
                base = dict(model=model, cut=cut, length=task_length(t), task=t, family=task_family(t),
                            reference=reference, baseline=b, measure="acc" if f else "ll")
                field = f or "ll_per_token"
                ci = stats.paired_bootstrap(_arr(ia, field, n), _arr(ib, field, n), resamples=resamples, seed=seed)
                recs.append({**base, "delta": ci.estimate, "low": ci.low, "high": ci.high, "p": ci.p_value,
                             "resamples": resamples, "n": ci.n})
    df = pd.DataFrame.from_records(recs)
    if not len(df):
        return df
    df["p_holm"], df["verdict"], df["family_size"] = 1.0, "unresolved", 0
    for _, g in df.groupby(list(holm_over), sort=False):
        adj = stats.holm({i: stats.p_floor(df.at[i, "p"], resamples) for i in g.index})
        for i in g.index:
            df.at[i, "p_holm"], df.at[i, "family_size"] = adj[i], len(g)
            if adj[i] < alpha and df.at[i, "delta"] != 0:
                df.at[i, "verdict"] = "beats" if df.at[i, "delta"] > 0 else "beaten"
    df["holm_over"] = ",".join(holm_over)
    return df


# rows of the margin figure: (name, task families, axis label)
FIGURE_ROWS = (("cloze", ("cloze",), "cloze (128: cloze_v2,\nlonger: lr_cloze)"),
               ("passkey", ("passkey",), "passkey retrieval"),
               ("choice", ("choice4", "choice2"), "choice4_v2 (o), choice2_v2 (s)\n(128 tokens only)"),
               ("longppl", ("longppl",), "held-out text"))


def plot_margins(margin, cuts: Sequence[float] = (0.3,)):
    """Figure: one column per model (scale), one row per task family (cloze, passkey, choice, longppl:
    every task on its own, never averaged); x: input length (log2 axis), one line per baseline (UTRC
    minus it, unadjusted 95% CI bars), linestyle per cut; filled markers: Holm-significant over the
    table's family (`margin_table`: every comparison at that cut), open markers: not. Dashed zero line."""
    import matplotlib.pyplot as plt

    from . import plotting

    if margin is None or not len(margin):
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, "no UTRC / baseline pairs in the cache", ha="center", va="center")
        ax.set_axis_off()
        return fig
    models = sorted(margin["model"].unique(), key=_model_rank)
    shown = margin[np.isclose(margin["cut"].to_numpy(float)[:, None], np.asarray(cuts, float)[None, :]).any(1)]
    rows = [r for r in FIGURE_ROWS if shown["family"].isin(r[1]).any()]
    fig, axes = plt.subplots(len(rows), len(models), figsize=(max(6.0, 3.6 * len(models)), 2.5 * len(rows) + 0.9),
                             squeeze=False, sharex=True)
    styles = ["-", "--", ":"]
    baselines = list(dict.fromkeys(shown["baseline"]))
    for i, (row, fams, name) in enumerate(rows):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ax.axhline(0, color="k", lw=0.8, ls="--")
            for k, cut in enumerate(cuts):
                sub = shown[(shown["model"] == model) & np.isclose(shown["cut"], cut)]
                for bi, b in enumerate(baselines):
                    fb = sub[(sub["baseline"] == b) & sub["family"].isin(fams)]
                    # one line per task kind: lr_cloze_* across lengths; cloze_v2 / choice tasks: single points
                    for si, (kind, s) in enumerate(fb.groupby(fb["task"].str.replace(r"_\d+$", "", regex=True), sort=False)):
                        s = s.sort_values("length")
                        scale = 100 if s["measure"].iloc[0] == "acc" else 1
                        wide = 0.07 if row == "choice" else 0.035
                        off = 1 + wide * (bi - (len(baselines) - 1) / 2) + (0.02 if kind == "choice2_v2" else 0)
                        col, mk = plotting.style(b)["color"], "s" if kind == "choice2_v2" else "o"
                        xs, y = (s["length"] * off).to_numpy(), (s["delta"] * scale).to_numpy()
                        err = np.vstack([(s["delta"] - s["low"]) * scale, (s["high"] - s["delta"]) * scale])
                        ax.errorbar(xs, y, yerr=err, ls=styles[k % len(styles)], color=col, capsize=2, lw=1.0,
                                    label=None if si else f"vs {b}" + (f" @ {cut:.0%}" if len(cuts) > 1 else ""))
                        sig = (s["verdict"] != "unresolved").to_numpy()
                        ax.plot(xs[sig], y[sig], mk, color=col, ms=5, ls="none")
                        ax.plot(xs[~sig], y[~sig], mk, color=col, mfc="white", ms=5, ls="none")
            ax.set_xscale("log", base=2)
            ax.set_xticks([128, 512, 1024, 2048])
            ax.set_xticklabels(["128", "512", "1024", "2048"])
            if i == 0:
                ax.set_title(model)
            if i == len(rows) - 1:
                ax.set_xlabel("input length (tokens; 128 = short tasks)")
            if j == 0:
                unit = "ll/token (nats)" if row == "longppl" else "acc points"
                ax.set_ylabel(f"{name}\nUTRC - baseline, {unit}", fontsize=7.5)
            if i == 0 and j == len(models) - 1:
                ax.legend(fontsize=7, loc="best")
    sizes = "/".join(str(int(v)) for v in sorted(set(shown["family_size"])))
    fig.suptitle("UTRC's margin over each baseline at " + ", ".join(f"{c:.0%}" for c in cuts) + " cut. Bars: "
                 f"unadjusted 95% CI. Filled marker: Holm-significant over the {sizes} comparisons at that cut "
                 "(every model, task and baseline); open: not", fontsize=8.5)
    fig.tight_layout()
    return fig


def cut_agreement(long, *, within: float = AGREE_POINTS) -> str:
    """Markdown: per input length and method, the range (over models and target cuts) of the
    token-layer cut minus the analytic FLOPs cut in points, and a sentence naming where the two agree
    within `within` points and where they are furthest apart (all read from `long`)."""
    if long is None or not len(long) or "analytic_flops_cut" not in long:
        return "(no reduced rows: no cuts to compare)"
    d = long.dropna(subset=["analytic_flops_cut"]).copy()
    d["gap"] = 100 * (d["token_layer_cut"] - d["analytic_flops_cut"])
    methods = list(dict.fromkeys(d["method"]))
    lines = ["Token-layer cut minus analytic FLOPs cut, in percentage points (range over models and target cuts; "
             "positive: the analytic cut is smaller):", "",
             "| length | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    agree: dict = {}
    for L, g in d.groupby("length"):
        cells = []
        for m in methods:
            s = g[g["method"] == m]["gap"]
            cells.append(f"{s.min():.1f} to {s.max():.1f}" if len(s) else "")
            if len(s) and s.abs().max() <= within:
                agree.setdefault(int(L), []).append(m)
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    worst = d.loc[d["gap"].abs().idxmax()]
    spread = d.assign(a=d["gap"].abs()).groupby(["length", "method"])["a"].max()
    (bl, bm), best = spread.idxmin(), spread.min()
    said = "; ".join(f"at {L} tokens for {', '.join(ms)}" for L, ms in sorted(agree.items())) or "at no length"
    lines += ["", f"The two cuts agree within {within:g} points (every model and target cut) {said}; they are "
              f"closest for {bm} at {int(bl)} tokens (at most {best:.1f} points apart) and "
              f"furthest apart for {worst['method']} at {int(worst['length'])} tokens ({worst['model']}, target "
              f"{worst['cut']:.0%}: analytic FLOPs cut {worst['analytic_flops_cut']:.1%}). The analytic cut also "
              f"counts the reduction's own FLOPs (importance, similarity, merges) and the unreduced costs "
              f"(embedding, LM head)."]
    return "\n".join(lines)


def margin_summary(margin) -> str:
    """Markdown: per cut, how many comparisons survive the Holm correction over that cut's family (the
    figure's) and which, with their margins; per task family, the range of the margins."""
    if margin is None or not len(margin):
        return "No UTRC / baseline pairs in the cache."
    out = []
    for cut, g in sorted(margin.groupby("cut"), key=lambda x: -x[0]):
        sig = g[g["verdict"] != "unresolved"]
        head = (f"* **{cut:.0%} cut**: {len(sig)} of {len(g)} comparisons (models x tasks x baselines) survive the "
                f"Holm correction over them")
        items = []
        for (verdict, task, b), h in sig.groupby(["verdict", "task", "baseline"], sort=True):
            sc, dg, unit = (100, 1, " points") if h["measure"].iloc[0] == "acc" else (1, 3, " nats/token of gold log-likelihood")
            where = (f"{h['model'].iloc[0]}, {sc * h['delta'].iloc[0]:+.{dg}f}{unit}" if len(h) == 1 else
                     f"{len(h)} models, {sc * h['delta'].min():+.{dg}f} to {sc * h['delta'].max():+.{dg}f}{unit}")
            items.append(f"{'better' if verdict == 'beats' else 'worse'} than {b} on {task} ({where})")
        out.append(head + (": UTRC " + "; ".join(items) if items else "") + ".")
        for fam, f in g.groupby("family", sort=False):
            sc, dg, unit = (100, 1, "points") if f["measure"].iloc[0] == "acc" else \
                (1, 3, "nats/token of gold log-likelihood (positive: UTRC closer to the gold text)")
            out.append(f"  * {fam} ({', '.join(dict.fromkeys(f['task']))}): UTRC minus baseline from "
                       f"{sc * f['delta'].min():+.{dg}f} to {sc * f['delta'].max():+.{dg}f} {unit}; "
                       f"{int(((f['low'] > 0) | (f['high'] < 0)).sum())} of {len(f)} unadjusted intervals exclude 0")
    return "\n".join(out)


def missing_methods(rows, methods: Sequence[str]) -> list:
    """The reduced methods of `methods` without a single row in `rows` (e.g. the cache predates them)."""
    have = {r["params"]["method"] for r in rows}
    return [m for m in methods if m not in paired.DENSE_METHODS and m not in have]


def computed_on(rows, source) -> list:
    """results.json's "computed_on" of a scale-length cache: one record per device of the rows (row count,
    code versions of the rows) with the machines the run logs beside the cache name (the "host ..." and
    "torch ... transformers ... cuda ..." lines the scripts print, and each log's header comments)."""
    import re

    src = Path(source)
    logs = []
    for log in sorted(src.parent.glob("*.log")) if src.parent.is_dir() else []:
        text = log.read_text(errors="replace").splitlines()
        m = {"log": log.name, "header": " ".join(l[2:] for l in text[:20] if l.startswith("# "))}
        host = next((l[5:] for l in text if l.startswith("host ")), None)
        tv = next((l.split() for l in text if re.match(r"^torch \S+ transformers \S+", l)), None)
        if host:
            m["host"] = host
        if tv:
            m.update(dict(zip(tv[::2], tv[1::2])))
        logs.append(m)
    groups: dict = {}
    for r in rows:
        g = groups.setdefault(str((r.get("result") or {}).get("meta/device") or "?"), {"rows": 0, "versions": set()})
        g["rows"] += 1
        g["versions"].add(r.get("version"))
    out = []
    for dev, g in sorted(groups.items()):
        match = [m for m in logs if (m.get("cuda") == "True") == dev.startswith("cuda")]
        out.append({"source": src.name, "device": dev, "rows": g["rows"],
                    "code_versions": sorted(v for v in g["versions"] if v),
                    "machine": match or "no run log beside the cache names this machine"})
    return out


def _fmt(v, lo, hi, scale=100.0, digits=1):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{scale * v:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def markdown(dense, long, margin=None, *, resamples: int = stats.DEFAULT_RESAMPLES) -> dict:
    """{"dense_accuracy.md": text, "long_context_table.md": text} from the tables (`resamples`: of the
    bootstrap p-values, printed "< 1/resamples" below that)."""
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
            p_text = format_p(p, resamples if ppl else None)   # ppl: paired bootstrap; accuracy: exact McNemar
            lines.append(f"| {r.model} | {r.method} | {r.cut:.0%} | {r.task} | {r.n} | {_fmt(r.value, r.low, r.high, sc)} | "
                         f"{delta} | {p_text} | "
                         f"{r.token_layer_cut:.1%} ({'' if ach is None or np.isnan(ach) else f'{ach:.1%}'}) | "
                         f"{r.analytic_flops_cut:.1%} @ {r.analytic_flops_seq_len} |")
    else:
        lines.append("(no reduced rows in the cache)")
    if margin is not None and len(margin):
        sizes = "/".join(str(int(v)) for v in sorted(set(margin["family_size"])))
        lines += ["", "## UTRC minus each baseline (the figures' numbers)", "",
                  f"Every task on its own (acc: points; ll: longppl log-likelihood per token, nats); 95% CI "
                  f"unadjusted; p: paired bootstrap ({resamples} resamples); p_holm: Holm over every comparison "
                  f"at the same cut ({sizes} comparisons: models x tasks x baselines, one margin figure).", "",
                  "| model | cut | length | task | measure | baseline | delta [95% CI] | p | p_holm | verdict | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in margin.itertuples():
            sc, dg = (100, 1) if r.measure == "acc" else (1, 4)
            lines.append(f"| {r.model} | {r.cut:.0%} | {r.length} | {r.task} | {r.measure} | {r.baseline} | "
                         f"{_fmt(r.delta, r.low, r.high, sc, dg)} | {format_p(r.p, r.resamples)} | "
                         f"{format_p(r.p_holm)} | {r.verdict} | {r.n} |")
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

"""Notebook 09 (issue 31): the SSM-native token-reduction methods beside UTRC, from paired per-item rows.

    configs = grid(model_names, methods, cuts)        # dense + every method (presets expanded) at every cut
    res = labelled(res, preset_labels(...))           # a preset's rows carry the preset's name ("topvim")
    cmp = comparisons(res, baselines=..., ...)        # UTRC minus each method: one Holm family, + family intervals
    best = best_per_cell(res, methods, ...)           # best method per (model, cut, measure), tested vs the others
    cost = scoring_cost(model_names, methods, cuts)   # analytic reduction FLOPs per anchor (utrc_lib.core.flops)
    gpu = gpu_ms_per_anchor(bench_json, methods)      # measured GPU ms per anchor, where a bench recorded them
    fates = first_anchor_fates(model, tok, text, ...) # which tokens each method keeps / prunes / merges
    figures: accuracy_kl_figure, margins_figure, cost_keep_figure, fates_figure; text: findings, cost_text

A preset (`utrc_lib.core.presets`, e.g. ToP-ViM's schedule "topvim") is not a method: its rows are ordinary
sweep rows (method "prune_only", metric "clip", the preset's anchors), named back to the preset by
`labelled` for the tables, figures and text. Every number here is computed from the rows; none is typed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..experiments import paired, stats
from . import plotting
from .prose import clauses, fmt_ci, join, label, short

SSM_METHODS = ("decimamba", "hattn_prune", "mtr_style", "adjacent_merge")
MEASURES = {paired.AVG: ("mean accuracy", 100.0, 1, "points"), "kl:ppl": ("KL to dense on the ppl task", 1.0, 4,
                                                                          "nats/token")}
# the token-fate picture: what happened to each token at the method's first anchor
FATES = ("kept", "pruned", "merged", "hybrid", "later", "protected")
FATE_COLOURS = ("#FFFFFF", "#D55E00", "#0072B2", "#CC79A7", "#D9D9D9", "#F0E442")
FATE_NAMES = {"kept": "kept through the first anchor", "pruned": "pruned at the first anchor",
              "merged": "merged at the first anchor", "hybrid": "hybrid at the first anchor (pruned in the hidden "
              "branch, merged in the residual)", "later": "removed at a later anchor (digit: the layer)",
              "protected": "protected"}


def presets() -> tuple:
    """The preset names (`utrc_lib.core.presets.PRESETS`)."""
    from utrc_lib.core.presets import PRESETS

    return tuple(PRESETS)


# -- the grid --------------------------------------------------------------------------------------------
def depth(model: str) -> int:
    """Layers of `model` (its config.json; a hub id is loaded once through the sweep's model cache)."""
    from utrc_lib.hosts.models import model_depth

    L = model_depth(model)
    if L is None:
        from ..experiments.sweep import get_model

        L = int(get_model(model)[0].config.num_hidden_layers)
    return int(L)


def fields(method: str, model: str) -> dict:
    """The sweep fields of `method` on `model`: {"method": method}, or a preset's configuration (method,
    metric, its anchors on this depth; the grid's cut sets the keep ratio, so rows are cut-matched)."""
    from utrc_lib.core.presets import PRESETS

    if method not in PRESETS:
        return {"method": method}
    p = dict(PRESETS[method])
    p.pop("keep_ratio", None)
    p["layers"] = list(p["layers"](depth(model)))
    return p


def grid(model_names: Sequence[str], methods: Sequence[str], cuts: Sequence[float]) -> list[dict]:
    """Sweep configurations (with model fingerprints): dense, then every method at every cut, per model
    (a preset name of `utrc_lib.core.presets.PRESETS` becomes its ordinary configuration)."""
    from ..experiments import sweep

    out = sweep.grid(model=list(model_names), method=["none"], cut=[0.0])
    for model in model_names:
        for m in methods:
            out += [{"model": model, "cut": c, **fields(m, model)} for c in cuts]
    return sweep.with_fingerprints(out)


def _key(params: dict) -> str:
    from .evidence import match_key

    return match_key({k: v for k, v in params.items() if k not in ("fingerprint", "ran_as")})


def preset_labels(model_names, methods, cuts, common: dict) -> dict:
    """{match key of a preset's row: the preset's name}, for `labelled`."""
    from utrc_lib.core.presets import PRESETS

    return {_key({**common, "model": model, "cut": c, **fields(m, model)}): m
            for m in methods if m in PRESETS for model in model_names for c in cuts}


def labelled(result, labels: dict):
    """`result` (a sweep.SweepResult) with the rows of a preset renamed to it: params["method"] = the
    preset, params["ran_as"] = the method that ran; the other rows unchanged."""
    from ..experiments.sweep import SweepResult

    rows = []
    for r in result.rows:
        name = labels.get(_key(r["params"])) if r and r.get("params") else None
        rows.append({**r, "params": {**r["params"], "method": name, "ran_as": r["params"]["method"]}} if name else r)
    return SweepResult(rows, computed=result.computed, cached=result.cached, cache_path=result.cache_path)


def source(evidence: str, shared: str, limit) -> str:
    """Where the rows come from, in words for every figure title and results.json: the evidence's label
    ("CPU pilot, n=40 items per task") or its sizes, else "computed here, n=... items per task"."""
    from . import evidence as ev

    if evidence and ev.exists(evidence):
        man = json.loads((Path(evidence) / ev.MANIFEST).read_text())
        if man.get("run_label"):
            return man["run_label"]
        n = sorted(set(man.get("items_per_task", {}).values()))
        what = "every item" if man.get("limit") == ["None"] else f"n={'/'.join(map(str, n))} items per task"
        return f"committed evidence, {what}" + (f" (dense and UTRC rows from {Path(shared).parent.name})"
                                                 if shared and ev.exists(shared) else "")
    return f"computed here, n={'all' if limit is None else limit} items per task"


# -- statistics --------------------------------------------------------------------------------------------
def _point(items: dict, metric: str) -> Optional[float]:
    """The point estimate of `metric` of one row's items (mean accuracy over tasks; token-weighted KL)."""
    if metric == paired.AVG:
        groups = paired._metric_arrays(items, metric)
        return float(np.mean([g.mean() for g in groups])) if groups else None
    kind, _, task = metric.partition(":")
    it = items.get(task)
    if kind != "kl" or not it or any(v is None for v in it["kl"]):
        return None
    return float(np.sum(it["kl"]) / np.sum(it["tokens"]))


def family_intervals(result, cmp, *, resamples: int, seed: int, alpha: float = 0.05):
    """`cmp` (a paired.comparison_table) with the family-corrected interval of every margin: the
    Bonferroni (simultaneous) 1 - alpha / m interval, m = the comparisons of its Holm family, from the same
    bootstrap draws (seed, resamples) as the unadjusted one: columns low_family, high_family, family_level.
    Every family interval excludes 0 only where Holm resolves the comparison too (Holm may resolve more)."""
    cmp = cmp.copy()
    rows = paired.items_by_row(result)
    lows, highs, levels = [], [], []
    for r in cmp.itertuples():
        level = 1.0 - alpha / int(r.family_size)
        a = paired._metric_arrays(rows[(r.model, r.reference, r.cut)], r.metric)
        b = paired._metric_arrays(rows[(r.model, r.baseline, r.cut)], r.metric)
        boot = paired.stratified_bootstrap if r.metric == paired.AVG else stats.paired_bootstrap
        ci = boot(a, b, resamples=resamples, seed=seed, level=level)
        lows.append(ci.low)
        highs.append(ci.high)
        levels.append(level)
    cmp["low_family"], cmp["high_family"], cmp["family_level"] = lows, highs, levels
    return cmp


def comparisons(result, *, baselines, metrics, resamples: int, seed: int, reference: str = "utrc",
                alpha: float = 0.05):
    """`reference` minus each baseline on `metrics` at every model and cut: one Holm family over the whole
    table (what the margins figure shows), unadjusted and family-corrected 95% intervals."""
    cmp = paired.comparison_table(result, reference=reference, baselines=baselines, metrics=metrics, holm_over=(),
                                  alpha=alpha, resamples=resamples, seed=seed)
    return family_intervals(result, cmp, resamples=resamples, seed=seed, alpha=alpha)


def best_per_cell(result, methods: Sequence[str], metrics: Sequence[str], *, resamples: int, seed: int,
                  alpha: float = 0.05):
    """Per (model, cut, measure): the best method of `methods` (highest mean accuracy; lowest KL) and the
    paired test of it against each other method there (Holm over the cell's comparisons). One row per
    other method: best, estimate, other, other_estimate, delta (best minus other), low / high (unadjusted
    95%), p_holm, verdict ("resolved" where the best is better after Holm, else "unresolved")."""
    import pandas as pd

    from ..experiments.sweep import SweepResult

    rows = paired.items_by_row(result)
    recs = []
    for model, cut in dict.fromkeys((k[0], k[2]) for k in rows if k[1] in methods):   # the grid's order
        for metric in metrics:
            vals = {m: _point(rows[(model, m, cut)], metric) for m in methods if (model, m, cut) in rows}
            vals = {m: v for m, v in vals.items() if v is not None}
            if len(vals) < 2:
                continue
            best = (min if metric.startswith("kl") else max)(vals, key=vals.get)
            cell = SweepResult([r for r in result.rows if r and r.get("status") == "ok" and
                                paired.row_label(r["params"])[0] == model and paired.row_label(r["params"])[2] == cut],
                               computed=0, cached=0, cache_path="")
            cmp = paired.comparison_table(cell, reference=best, baselines=[m for m in vals if m != best],
                                          metrics=[metric], alpha=alpha, resamples=resamples, seed=seed)
            for r in cmp[(cmp["model"] == model) & np.isclose(cmp["cut"], cut)].itertuples():
                recs.append(dict(model=model, cut=cut, metric=metric, best=best, estimate=vals[best], other=r.baseline,
                                 other_estimate=vals[r.baseline], delta=r.delta, low=r.low, high=r.high,
                                 p_holm=r.p_holm, family_size=r.family_size,
                                 verdict="resolved" if r.verdict == "beats" else "unresolved"))
    return pd.DataFrame.from_records(recs, columns=["model", "cut", "metric", "best", "estimate", "other",
                                                    "other_estimate", "delta", "low", "high", "p_holm",
                                                    "family_size", "verdict"])


# -- cost ----------------------------------------------------------------------------------------------------
def scoring_cost(model_names, methods, cuts, *, seq_len: int = 128):
    """Analytic cost of each method's reductions at `seq_len` tokens (`utrc_lib.core.flops.flops`, logits at
    the last position as the rows' analytic FLOPs cut): importance score (Delta / hidden-attention scores
    by `scoring_flops`), similarity and merge or gather, summed over the anchors (reduction_overhead), per
    anchor and as a share of the dense forward; the analytic FLOPs cut (overhead included) beside it."""
    import pandas as pd
    from transformers import AutoConfig

    from utrc_lib.core.flops import flops
    from utrc_lib.hosts.models import EMBEDDED, embedded_path

    from ..experiments.sweep import make_config

    recs = []
    for model in model_names:
        hf = AutoConfig.from_pretrained(str(embedded_path(model) if model in EMBEDDED else model))
        for m in methods:
            f = fields(m, model)
            method = f.pop("method")
            for c in cuts:
                cfg = make_config(method, c, **f)
                rep = flops(hf, seq_len, cfg, logits="last")
                anchors = len(rep.layers)
                parts = {k: v for k, v in rep.breakdown["reduced"].items() if k.startswith("reduction_")}
                recs.append(dict(model=model, method=m, cut=float(c), anchors=anchors, seq_len=seq_len,
                                 scoring_metric=cfg.scoring_metric, overhead_flops=rep.reduction_overhead,
                                 flops_per_anchor=rep.reduction_overhead / max(1, anchors),
                                 share_of_dense=rep.reduction_overhead / rep.dense,
                                 analytic_flops_cut=rep.flops_cut, **parts))
    return pd.DataFrame.from_records(recs)


def gpu_ms_per_anchor(path, methods: Sequence[str]):
    """GPU reduction milliseconds per anchor of `methods` in a bench JSON (`python -m utrc_study.bench`
    records with "reduction_ms_per_anchor" on a CUDA device); an empty frame when the file or such
    records are missing. Columns: method, model_shape, gpu, flops_cut, batch, seq_len, ms_per_anchor."""
    import pandas as pd

    from utrc_lib.core.presets import PRESETS

    from ..experiments.sweep import make_config

    cols = ["method", "model_shape", "gpu", "flops_cut", "batch", "seq_len", "ms_per_anchor"]
    p = Path(path) if path else None
    data = json.loads(p.read_text()) if p is not None and p.is_file() else []
    recs = data if isinstance(data, list) else data.get("records", [])
    names = {}   # the bench's names of each method: "m", and "m@metric" with the method's own default metric
    for m in methods:
        names[m] = m
        if m not in PRESETS:
            names[f"{m}@{make_config(m, 0.2).scoring_metric}"] = m
    out = [dict(method=names[r["method"]], model_shape=r.get("model_shape"), gpu=r.get("gpu"),
                flops_cut=r.get("flops_cut"), batch=r.get("batch"), seq_len=r.get("seq_len"),
                ms_per_anchor=r["reduction_ms_per_anchor"])
           for r in recs if isinstance(r, dict) and r.get("method") in names and r.get("device") == "cuda"
           and r.get("reduction_ms_per_anchor")]
    return pd.DataFrame.from_records(out, columns=cols)


# -- token fates -----------------------------------------------------------------------------------------
def first_anchor_fates(model, tokenizer, text: str, methods: Sequence[str], cut: float, *, model_name: str,
                       max_tokens: int, seed: int = 0) -> dict:
    """Per method, what happened to each token of `text` (first `max_tokens`) at the method's first anchor
    (`analysis.trace`: the reducer's recorded plans, `analysis.token_fates`): {"tokens", "methods": {m:
    {"anchors", "first_anchor", "fates" (FATES names), "layer" (removal layer or None), "into" (the kept token
    a merged one joined), "counts"}}}. Nothing is protected: no continuation is scored here."""
    from ..experiments import analysis, sweep

    out = {"tokens": None, "methods": {}}
    for m in methods:
        f = fields(m, model_name)
        t = analysis.trace(model, tokenizer, text, sweep.make_config(f.pop("method"), cut, seed=seed, **f),
                           max_tokens=max_tokens)
        anchors = sorted(set(t["anchors"]))
        first = anchors[0] if anchors else None
        fates = [x["fate"] if x["layer"] in (None, first) else "later" for x in t["fates"]]
        out["tokens"] = t["tokens"]
        out["methods"][m] = {"anchors": anchors, "first_anchor": first, "fates": fates,
                             "layer": [x["layer"] for x in t["fates"]], "into": [x["into"] for x in t["fates"]],
                             "counts": {k: fates.count(k) for k in FATES if fates.count(k)}}
    return out


# -- figures -----------------------------------------------------------------------------------------------
def _title(fig, text: str, src: str) -> None:
    fig.suptitle(f"{text}\n[{src}]", fontsize=9)


def accuracy_kl_figure(acc, fid, *, model_names, methods, src: str):
    """Mean accuracy and KL(dense || method) per token on the ppl task against the token-layer cut, 95%
    bootstrap intervals, the dense model's accuracy as a band; one row per model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(model_names), 2, figsize=(11, 3.3 * len(model_names)), squeeze=False)
    for r, name in enumerate(model_names):
        t = acc[(acc["model"] == name) & (acc["metric"] == paired.AVG)]
        dn = t[t["method"] == "none"]
        dense = (dn.acc.iloc[0], dn.acc_low.iloc[0], dn.acc_high.iloc[0]) if len(dn) else None
        plotting.interval_vs_cut(axes[r, 0], t[t["method"] != "none"], "acc", "acc_low", "acc_high", methods=methods,
                                 dense=dense, ylabel="mean accuracy of 3 tasks (%)", title=f"{short(name)}: mean accuracy")
        k = fid[(fid["model"] == name) & (fid["task"] == "ppl") & (fid["measure"] == "kl_per_token")]
        plotting.interval_vs_cut(axes[r, 1], k, "estimate", "low", "high", methods=methods, scale=1.0,
                                 ylabel="KL(dense || method) per token (nats)",
                                 title=f"{short(name)}: KL to dense, ppl task (lower = closer)")
    plotting.legend_below(fig, axes.ravel(), ncol=4)
    _title(fig, "Every method against the token-layer cut (95% bootstrap intervals over items)", src)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return fig


def margins_figure(cmp, *, model_names, cuts, baselines, src: str):
    """UTRC minus each method per model, measure and cut: thin bars = the family-corrected (Bonferroni)
    95% intervals over every comparison shown, thick = unadjusted 95%; colour = the Holm verdict."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(model_names), 2, figsize=(11, 3.4 * len(model_names)), squeeze=False)
    for r, name in enumerate(model_names):
        for c, metric in enumerate((paired.AVG, "kl:ppl")):
            ax, (what, scale, _, unit) = axes[r, c], MEASURES[metric]
            d = cmp[(cmp["model"] == name) & (cmp["metric"] == metric)]
            for j, b in enumerate(baselines):
                for k, cut in enumerate(cuts):
                    e = d[(d["baseline"] == b) & np.isclose(d["cut"], cut)]
                    if e.empty:
                        continue
                    e, x = e.iloc[0], j + (k - (len(cuts) - 1) / 2) * 0.22
                    st = plotting.VERDICT_STYLE[e["verdict"]]
                    ax.plot([x, x], [scale * e["low_family"], scale * e["high_family"]], color=st["color"], lw=0.8)
                    ax.plot([x, x], [scale * e["low"], scale * e["high"]], color=st["color"], lw=3, alpha=0.6)
                    ax.plot([x], [scale * e["delta"]], marker=st["marker"], color=st["color"], ms=4, ls="",
                            label=st["label"])
                    ax.text(x, scale * e["high_family"], f"{100 * cut:.0f}", ha="center", va="bottom", fontsize=5.5)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(range(len(baselines)), [label(b) for b in baselines], rotation=25, ha="right", fontsize=7)
            ax.set_ylabel(f"UTRC minus method ({unit})")
            ax.set_title(f"{short(name)}: {what}" + (" (above 0: UTRC better)" if scale == 100 else
                                                    " (below 0: UTRC closer to dense)"), fontsize=8)
    plotting.legend_below(fig, axes.ravel(), ncol=3)
    fam = paired.holm_family(cmp)
    _title(fig, f"UTRC minus each method (labels: cut %). Thin bars: 95% intervals corrected over {fam} (Bonferroni); "
                f"thick: unadjusted 95%; colour: Holm verdict", src)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    return fig


def cost_keep_figure(cost, acc, gpu, *, model_names, methods, src: str):
    """What each method costs (x: analytic reduction FLOPs per anchor, or measured GPU ms per anchor where
    a bench recorded every method) against what it keeps (y: mean accuracy change from dense, points,
    paired 95% interval); one point per method and cut (labels: cut %), one panel per model."""
    import matplotlib.pyplot as plt

    measured = len(gpu) and set(methods) <= set(gpu["method"])
    fig, axes = plt.subplots(1, len(model_names), figsize=(6.4 * len(model_names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], model_names):
        a = acc[(acc["model"] == name) & (acc["metric"] == paired.AVG)]
        for m in methods:
            st = plotting.style(m)
            for e in a[a["method"] == m].itertuples():
                if measured:
                    g = gpu[(gpu["method"] == m) & np.isclose(gpu["flops_cut"], e.cut)]
                    x = float(g["ms_per_anchor"].median()) if len(g) else np.nan
                else:
                    x = float(cost[(cost["model"] == name) & (cost["method"] == m) & np.isclose(cost["cut"], e.cut)]
                              ["flops_per_anchor"].iloc[0])
                ax.errorbar([x], [100 * e.delta], yerr=[[100 * (e.delta - e.delta_low)], [100 * (e.delta_high - e.delta)]],
                            color=st["color"], marker=st["marker"], ms=5, capsize=2, elinewidth=0.8, label=st["label"])
                ax.annotate(f"{100 * e.cut:.0f}", (x, 100 * e.delta), textcoords="offset points", xytext=(4, 3),
                            fontsize=6)
        ax.axhline(0, color="black", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("what it costs: " + ("GPU ms per anchor (measured)" if measured else
                                           f"reduction FLOPs per anchor\n(analytic, {int(cost['seq_len'].iloc[0])} tokens)"))
        ax.set_ylabel("what it keeps:\nmean accuracy minus dense (points)")
        ax.set_title(short(name), fontsize=9)
    plotting.legend_below(fig, axes.ravel(), ncol=3)
    missing = [m for m in methods if m not in set(gpu["method"])]
    note = "" if measured else (f"GPU ms per anchor not measured yet for {len(missing)} of the {len(methods)} methods "
                                f"({', '.join(missing)}): the cost axis is analytic")
    _title(fig, "What does it cost, what does it keep (paired 95% intervals; labels: cut %)"
           + (f"\n{note}" if note else ""), src)
    fig.tight_layout(rect=(0, 0.12, 1, 0.88))
    return fig


def fates_figure(fates_by_model: dict, *, cut: float, src: str):
    """One heatmap per model (seaborn): rows = methods, columns = the tokens of one text, colour = the
    token's fate at the method's first anchor (`FATES`); tokens removed later carry their layer."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n_models = len(fates_by_model)
    some = next(iter(fates_by_model.values()))
    n_tok, n_m = len(some["tokens"]), len(some["methods"])
    fig, axes = plt.subplots(n_models, 1, figsize=(max(9, 0.3 * n_tok), (0.42 * n_m + 1.6) * n_models), squeeze=False)
    for ax, (name, fa) in zip(axes[:, 0], fates_by_model.items()):
        ms = list(fa["methods"])
        codes = np.array([[FATES.index(f) for f in fa["methods"][m]["fates"]] for m in ms])
        annot = np.array([[str(layer) if f == "later" else "" for f, layer in zip(fa["methods"][m]["fates"],
                                                                                 fa["methods"][m]["layer"])] for m in ms])
        sns.heatmap(codes, ax=ax, cmap=ListedColormap(FATE_COLOURS), vmin=-0.5, vmax=len(FATES) - 0.5, cbar=False,
                    annot=annot, fmt="", annot_kws={"fontsize": 5.5}, linewidths=0.4, linecolor="#AAAAAA",
                    xticklabels=[t.replace("\n", "\u21b5") for t in fa["tokens"]],
                    yticklabels=[f"{label(m)} (first anchor: layer {fa['methods'][m]['first_anchor']})" for m in ms])
        ax.tick_params(axis="x", labelsize=6.5, rotation=90)
        ax.tick_params(axis="y", labelsize=7, rotation=0)
        ax.set_title(f"{short(name)}: the first {n_tok} tokens of the first ppl passage at a {cut:.0%} token-layer cut",
                     fontsize=8, loc="left")
    fig.legend(handles=[Patch(facecolor=c, edgecolor="#888888", label=FATE_NAMES[f]) for f, c in zip(FATES, FATE_COLOURS)
                        if f != "protected"], loc="lower center", ncol=3, fontsize=7, frameon=False)
    _title(fig, "Which tokens each method keeps, prunes or merges at its first anchor", src)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return fig


# -- text --------------------------------------------------------------------------------------------------
def margins_markdown(cmp, src: str) -> str:
    """UTRC minus each method, both measures: unadjusted and family-corrected 95% intervals, p, Holm p, verdict."""
    from .prose import fmt_p

    head = (f"{src}\n\nUTRC minus each method; Holm over {paired.holm_family(cmp)}; family-corrected intervals: "
            f"Bonferroni 1 - 0.05/m from the same bootstrap draws; accuracy in points, KL in nats/token.\n\n")
    if not len(cmp):
        return head + "(no comparisons)\n"
    recs = []
    for r in cmp.itertuples():
        what, scale, digits, _ = MEASURES.get(r.metric, (r.metric, 1.0, 4, ""))
        recs.append({"model": short(r.model), "cut": r.cut, "measure": what, "method": r.baseline,
                     "UTRC minus method [95% CI]": fmt_ci(r.delta, r.low, r.high, scale, digits),
                     "family-corrected CI": f"[{scale * r.low_family:.{digits}f}, {scale * r.high_family:.{digits}f}]",
                     "p": fmt_p(r.p, r.resamples if r.resamples == r.resamples else None), "p_holm": fmt_p(r.p_holm),
                     "verdict": r.verdict})
    import pandas as pd

    return head + pd.DataFrame(recs).to_markdown(index=False) + "\n"


def findings(best, cmp, *, src: str) -> str:
    """Markdown rendered from the numbers: per model and cut, the best method on each measure, whom it is
    resolved above and against whom it is unresolved (Holm within the cell); then UTRC against each
    SSM-native method (Holm over the margins figure's family)."""
    out = [f"Rows: {src}. Intervals: paired 95% bootstrap. Per cut below, \"resolved\" = Holm-corrected test at "
           f"5% within that model, cut and measure (a small family); the table after it corrects over every "
           f"comparison of the margins figure, so a difference resolved here can be unresolved there."]
    for model in dict.fromkeys(best["model"]):
        out.append(f"\n**{short(model)}**\n")
        b = best[best["model"] == model]
        for cut in sorted(set(b["cut"])):
            parts = []
            for metric in dict.fromkeys(b["metric"]):
                c = b[(b["metric"] == metric) & np.isclose(b["cut"], cut)]
                if c.empty:
                    continue
                what, scale, digits, unit = MEASURES[metric]
                top = c.iloc[0]
                above = [f"{label(r.other)} ({fmt_ci(r.delta, r.low, r.high, scale, digits)})"
                         for r in c[c["verdict"] == "resolved"].itertuples()]
                tied = [label(r.other) for r in c[c["verdict"] == "unresolved"].itertuples()]
                value = f"{scale * top['estimate']:.{digits}f}" + ("%" if scale == 100 else f" {unit}")
                same = [label(r.other) for r in c.itertuples() if r.other_estimate == top["estimate"]]
                value += f" (the same point estimate as {join(same)})" if same else ""
                parts.append(f"{what}: best is {label(top['best'])} at {value}; " + clauses(
                    [("resolved ahead of (best minus each)", above), ("unresolved against", tied)],
                    "no other method") + ".")
            out.append(f"* {cut:.0%} cut: " + " ".join(parts))
    if len(cmp):
        out.append(f"\n**UTRC against each method** (Holm over {paired.holm_family(cmp)}; UTRC minus method, "
                   f"unadjusted 95% interval [family-corrected interval]):\n")
        for metric in dict.fromkeys(cmp["metric"]):
            what, scale, digits, unit = MEASURES[metric]
            for b in dict.fromkeys(cmp["baseline"]):
                s = cmp[(cmp["metric"] == metric) & (cmp["baseline"] == b)]
                cells = [f"{short(r.model)} {r.cut:.0%}: {fmt_ci(r.delta, r.low, r.high, scale, digits)} "
                         f"[{scale * r.low_family:.{digits}f}, {scale * r.high_family:.{digits}f}] {r.verdict}"
                         for r in s.itertuples()]
                good, bad = ("UTRC better", "worse") if scale == 100 else ("UTRC closer to dense", "further")
                n_b, n_w = int((s["verdict"] == "beats").sum()), int((s["verdict"] == "beaten").sum())
                out.append(f"* {what} ({unit}), {label(b)}: {good} in {n_b}, {bad} in {n_w}, unresolved in "
                           f"{len(s) - n_b - n_w} of {len(s)} cells; " + "; ".join(cells) + ".")
    return "\n".join(out)


def cost_text(cost, gpu, methods) -> str:
    """The cost paragraph: analytic reduction FLOPs per anchor, cheapest and dearest per model (at the
    largest cut), and which methods have measured GPU ms per anchor (and which have not, yet)."""
    top_cut = cost["cut"].max()
    out = []
    for model in dict.fromkeys(cost["model"]):
        c = cost[(cost["model"] == model) & np.isclose(cost["cut"], top_cut)].sort_values("flops_per_anchor")
        lo, hi = c.iloc[0], c.iloc[-1]
        out.append(f"{short(model)} at {top_cut:.0%} ({int(lo['seq_len'])} tokens): reduction FLOPs per anchor from "
                   f"{lo['flops_per_anchor']:.3g} ({label(lo['method'])}) to {hi['flops_per_anchor']:.3g} "
                   f"({label(hi['method'])}, {hi['flops_per_anchor'] / max(lo['flops_per_anchor'], 1):.1f}x); all "
                   f"reductions together cost {100 * c['share_of_dense'].min():.2f}-{100 * c['share_of_dense'].max():.2f}% "
                   f"of the dense forward.")
    have = [m for m in methods if m in set(gpu["method"])]
    missing = [m for m in methods if m not in have]
    out.append(("GPU ms per anchor measured for " + join(label(m) for m in have) + "; " if have else "")
               + (f"not measured yet for {join(label(m) for m in missing)} (`python -m utrc_study.bench --methods "
                  f"ssm` on a GPU records it): the cost axis is analytic." if missing else "every method measured."))
    return " ".join(out)

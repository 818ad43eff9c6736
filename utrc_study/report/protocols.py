"""Notebook 04's protocol comparison (issue 26): the same methods, cuts and items scored under the
leak-free protocol (ours, 01's rows) and under the authors' protocol (`utrc_study.eval.protocol`:
unprotected scoring of the shortened sequence, non-causal merges, a batch-level ratio, their EViT and
their "PuMer"), with paired statistics:

  margins   UTRC minus each baseline under each protocol (mean accuracy, 95% CI, Holm over the table);
  cost      each method's accuracy under the leak-free protocol minus under the authors' (95% CI);
  explained the share of a method's accuracy loss under the authors' protocol that the protocol alone
            accounts for: (leak-free - authors) / (dense - authors), a point estimate (NaN when the
            authors'-protocol loss is not positive).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..experiments import paired, stats
from ..experiments.sweep import SweepResult


SHORT = {"utrc": "UTRC", "utrc_reference": "UTRC (authors' code)"}


def combine(leak_free: SweepResult, authors: SweepResult) -> SweepResult:
    """One result whose rows all carry "protocol" ("leak_free" where a row has none)."""
    rows = []
    for res, name in ((leak_free, "leak_free"), (authors, "authors")):
        for r in res.rows:
            p = dict(r["params"])
            p["protocol"] = p.get("protocol") or name
            if p["protocol"] != name:
                raise ValueError(f"a row of the {name} sweep was scored under {p['protocol']!r}: {r['params']}")
            rows.append({**r, "params": p})
    return SweepResult(rows=rows, computed=leak_free.computed + authors.computed,
                       cached=leak_free.cached + authors.cached, cache_path=leak_free.cache_path)


def authors_grid(model_names, methods, cuts, *, evidence: str, common: dict, render_only: bool):
    """(configurations to render, missing ones, coverage sentence) of the authors'-protocol grid. With
    `render_only` (a full-size render from committed rows) only those the `evidence` folder holds are
    kept: the rest are never computed at full size on this machine; the sentence names the missing ones
    and those the manifest marks stale (empty when there are none)."""
    from . import evidence as ev
    from .prose import short

    def names(cs):
        return ", ".join(f"{short(c['model'])} {c['method']} {c['cut']:.0%}" for c in cs)

    grid, missing = ev.protocol_grid(model_names, methods, cuts), []
    if render_only:
        grid, missing = ev.present(grid, evidence, common)
    text = "" if not missing else (
        f"**Partial:** the authors'-protocol evidence holds {len(grid)} of {len(grid) + len(missing)} configurations; "
        f"missing (scripts/gpu_evidence.py computes them): {names(missing)}.\n\n")
    if render_only and ev.exists(evidence):
        manifest = ev.load(evidence).manifest
        stale = [c for c in grid if ev.stale_reason(manifest, c)]
        text += "" if not stale else (
            f"**Stale:** {len(stale)} of them were computed before a later fix and are shown as committed until a "
            f"GPU recomputes them: {names(stale)}.\n\n")
    return grid, missing, text


def margins(combined: SweepResult, baselines: Sequence[str], *, resamples: int = stats.DEFAULT_RESAMPLES,
            seed: int = stats.DEFAULT_SEED):
    """UTRC minus each baseline on mean accuracy, per (model, cut, protocol); Holm over the whole table."""
    return paired.comparison_table(combined, baselines=list(baselines), metrics=[paired.AVG], extra=("protocol",),
                                   holm_over=(), resamples=resamples, seed=seed)


def cost(combined: SweepResult, methods: Sequence[str], *, resamples: int = stats.DEFAULT_RESAMPLES,
         seed: int = stats.DEFAULT_SEED):
    """Per (model, cut, method): leak-free minus authors' mean accuracy (paired over items), Holm over the table."""
    tab = paired.comparison_table(combined, reference="leak_free", baselines=["authors"], metrics=[paired.AVG],
                                  by="protocol", extra=("method",), holm_over=(), resamples=resamples, seed=seed)
    return tab[tab["method"].isin(list(methods))].reset_index(drop=True)


def drops(combined: SweepResult, *, resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED):
    """Mean accuracy and its change against the dense row of the same protocol, per (model, method, cut, protocol)."""
    acc = paired.accuracy_table(combined, extra=("protocol",), resamples=resamples, seed=seed)
    return acc[acc["metric"] == paired.AVG].reset_index(drop=True)


def explained(drop_table):
    """Per (model, method, cut): drop under each protocol and the share of the authors'-protocol drop that
    the protocol alone explains."""
    d = drop_table[drop_table["method"] != "none"]
    wide = d.pivot_table(index=["model", "method", "cut"], columns="protocol", values="delta").reset_index()
    if "authors" not in wide or "leak_free" not in wide:
        return wide
    wide = wide.rename(columns={"authors": "drop_authors", "leak_free": "drop_leak_free"})
    loss = (-wide["drop_authors"]).where(lambda x: x > 0)      # NaN where the authors' protocol loses nothing
    wide["explained_by_protocol"] = (wide["drop_leak_free"] - wide["drop_authors"]) / loss
    return wide


def fallbacks(result: SweepResult):
    """Per (model, method, cut, task) of the authors'-protocol rows: how many requests (one per choice of an
    item) were scored dense because the reduction left fewer rows than the continuation has tokens
    (unprotected scoring refuses them: `utrc_lib.scoring`), out of how many requests. Such items score as dense, so a large share pulls that cell
    toward dense."""
    import pandas as pd

    out = []
    for r in result.rows:
        p, res = r["params"], r.get("result", {})
        if p.get("method") in ("none", "dense"):
            continue
        for task in p.get("tasks", []):
            n = res.get(f"{task}/n")
            if n is None:
                continue
            k = int(res.get(f"{task}/dense_fallback", 0))
            requests = int(n) * requests_per_item(task)
            out.append({"model": p["model"], "method": p["method"], "cut": p["cut"], "task": task,
                        "dense_fallback": k, "n": requests, "share": k / requests if requests else float("nan")})
    return pd.DataFrame(out, columns=["model", "method", "cut", "task", "dense_fallback", "n", "share"])


def requests_per_item(task: str) -> int:
    """Scored requests per item of a built-in task (one per choice of a multiple-choice item, else one):
    dense fallbacks are counted per request, so their share is out of the requests."""
    from ..eval.suite import _CHOICES, task_kind

    try:
        kind = task_kind(task)
    except ValueError:
        return 1
    return _CHOICES[kind][1] if kind in _CHOICES else 1


def figure(drop_table, methods: Sequence[str], model_names: Sequence[str], cuts: Sequence[float], label: str):
    """Per model (rows) and cut (columns): each method's mean-accuracy change against dense, leak-free and
    authors' protocol side by side, 95% CIs; "n/c" where a configuration was not computed."""
    import matplotlib.pyplot as plt

    from . import plotting

    fig, axes = plt.subplots(len(model_names), len(cuts), figsize=(3.6 * len(cuts), 2.9 * len(model_names)),
                             sharey=True, squeeze=False)
    x = np.arange(len(methods))
    for i, name in enumerate(model_names):
        for j, cut in enumerate(cuts):
            ax = axes[i, j]
            for k, (proto, hatch, alpha) in enumerate((("leak_free", "", 0.9), ("authors", "//", 0.45))):
                d = drop_table[(drop_table["model"] == name) & (drop_table["protocol"] == proto)
                               & np.isclose(drop_table["cut"], cut)].set_index("method").reindex(list(methods))
                ax.bar(x + (k - 0.5) * 0.38, 100 * d["delta"], 0.38,
                       yerr=[100 * (d["delta"] - d["delta_low"]), 100 * (d["delta_high"] - d["delta"])], capsize=2, hatch=hatch, alpha=alpha,
                       color=[plotting.style(m)["color"] for m in methods], edgecolor="black", lw=0.4,
                       error_kw=dict(elinewidth=0.7), label="leak-free (ours)" if proto == "leak_free" else
                       "authors' protocol")
                for xi in np.flatnonzero(d["delta"].isna().to_numpy()):   # not in the evidence (yet)
                    ax.text(x[xi] + (k - 0.5) * 0.38, 0, "n/c", rotation=90, ha="center", va="top", fontsize=6,
                            color="0.4")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(x, [SHORT.get(m, plotting.style(m)["label"]) for m in methods], rotation=45, ha="right",
                          fontsize=7)
            ax.set_title(f"{name}, {cut:.0%} token-layer cut", fontsize=8.5)
            if j == 0:
                ax.set_ylabel("mean accuracy minus dense (points)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"The same methods and items under two protocols ({label}; 95% CI)", fontsize=9)
    fig.tight_layout()
    return fig


def table_markdown(margins, explained) -> str:
    """table_protocols.md: UTRC minus each baseline per protocol (points, 95% CI; p as printed, a bootstrap
    p below 1 / resamples reading "< 1/resamples"; Holm over the table) and the share of each method's loss
    under the authors' protocol that the protocol alone explains."""
    from .main_results import margin_cells

    if margins is None or not len(margins):
        return "(no comparisons)\n"
    c = margin_cells(margins.copy())
    c["cut"] = [f"{v:.0%}" for v in c["cut"]]
    head = (f"UTRC minus each baseline under each protocol (mean accuracy over the three tasks); Holm over "
            f"{paired.holm_family(margins)}; p: {c['test'].iloc[0]} ({int(c['resamples'].iloc[0])} resamples; a p below "
            f"1/resamples reads \"< 1/resamples\"); intervals unadjusted.\n\n")
    cols = ["model", "cut", "protocol", "baseline", "UTRC minus baseline, points [95% CI]", "p", "p_holm", "verdict"]
    e = explained.copy() if explained is not None else None
    tail = ""
    if e is not None and len(e):
        e["cut"] = [f"{v:.0%}" for v in e["cut"]]
        for col in ("drop_authors", "drop_leak_free"):
            e[col] = ["n/c" if v != v else f"{100 * v:+.1f}" for v in e[col]]
        e["explained_by_protocol"] = ["-" if v != v else f"{100 * v:.0f}%" for v in e["explained_by_protocol"]]
        e = e.rename(columns={"drop_authors": "change from dense, authors' protocol (points)",
                              "drop_leak_free": "change from dense, leak-free (points)",
                              "explained_by_protocol": "share of the authors'-protocol loss the protocol explains"})
        tail = "\n" + e.to_markdown(index=False, disable_numparse=True) + "\n"
    return head + c[cols].to_markdown(index=False, disable_numparse=True) + "\n" + tail

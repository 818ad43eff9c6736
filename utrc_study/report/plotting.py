"""Plot helpers shared by the notebooks: one style, one colour per method, figure saving.

Every figure is saved as PNG (200 dpi) and PDF by `save`, and its name is remembered so that the
notebook's results.json can list the files it wrote. Saved files carry no creation date and no
software version (`SAVE_METADATA`), so the same figure saved twice, or by another matplotlib release
that draws it the same way, gives byte-identical files.

Axis labels name the cut they plot (utrc_lib/GLOSSARY.md, "Two FLOPs cuts"): `TOKEN_LAYER_CUT_LABEL`
for the token-layer cut (the paper's FLOPs definition, the x-axis of every accuracy figure),
`ANALYTIC_CUT_LABEL` for the analytic FLOPs cut of `utrc_lib.flops`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

# One colour / marker per method across all notebooks (Okabe-Ito palette: colour-blind safe).
METHOD_STYLE = {
    "dense": dict(color="#000000", marker="s", label="dense"),
    "none": dict(color="#000000", marker="s", label="dense"),
    "utrc": dict(color="#D55E00", marker="o", label="UTRC (ours, paper text, causal)"),
    "utrc_reference": dict(color="#CC79A7", marker="P", label="UTRC (authors' code, non-causal)"),
    "utrc_causal": dict(color="#E69F00", marker="X", label="UTRC causal"),
    "evit": dict(color="#0072B2", marker="^", label="EViT"),
    "pumer": dict(color="#009E73", marker="v", label="PuMer"),
    "tome": dict(color="#56B4E9", marker="D", label="ToMe"),
    "prune_only": dict(color="#F0E442", marker="<", label="prune-only"),
    "merge_only": dict(color="#999999", marker=">", label="merge-only"),
    "utrc_alternate": dict(color="#8C510A", marker="h", label="UTRC rules, alternate split"),
    "random": dict(color="#7F3C8D", marker="x", label="random drop"),
    "slice": dict(color="#555555", marker=".", label="free slicing (bound)"),
    # SSM-native methods and presets (issue 31, docs/ssm_methods.md; notebook 09)
    "decimamba": dict(color="#1B9E77", marker="v", label="DeciMamba (anchor form)"),
    "hattn_prune": dict(color="#7570B3", marker="^", label="hidden-attention prune (ours)"),
    "mtr_style": dict(color="#E7298A", marker="D", label="MTR-style merge"),
    "adjacent_merge": dict(color="#66A61E", marker=">", label="adjacent merge (ours, STM-inspired)"),
    "topvim": dict(color="#A6761D", marker="<", label="ToP-ViM schedule (preset: prune-only, clip)"),
}

# 02's matching sweep: which split and which hidden-branch rule each method uses
SPLIT_RULE_LABELS = {"utrc": "importance split\nhybrid (UTRC)", "utrc_alternate": "alternate split\nhybrid",
                     "merge_only": "importance split\nmerge", "tome": "alternate split\nmerge (ToMe)"}

TOKEN_LAYER_CUT_LABEL = "token-layer cut (%, paper's FLOPs definition)"
ANALYTIC_CUT_LABEL = "analytic FLOPs cut (%, utrc_lib.flops)"

# Metadata written into every saved file: no timestamps, no version strings (byte-stable outputs).
# PDF: matplotlib writes no /ID; CreationDate None drops the date (SOURCE_DATE_EPOCH is not needed).
SAVE_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
}

SHORT_LABELS = {
    "cloze/acc": "cloze acc", "cloze/ppl": "cloze ppl", "choice4/acc": "choice4 acc",
    "choice4/acc_norm": "choice4 acc_norm", "choice2/acc": "choice2 acc", "ppl/ppl": "held-out ppl",
    "avg_acc": "mean acc (3 tasks)",
}

TASK_LABELS = {
    "cloze/acc": "cloze acc (LAMBADA-style)",
    "cloze/ppl": "cloze target perplexity",
    "choice4/acc": "choice4 acc (HellaSwag-style)",
    "choice4/acc_norm": "choice4 acc_norm (HellaSwag-style)",
    "choice2/acc": "choice2 acc (PIQA-style)",
    "ppl/ppl": "held-out perplexity (64-token tails)",
    "avg_acc": "mean accuracy of the 3 tasks",
}


def style(method: str) -> dict:
    """Matplotlib kwargs (color, marker, label) for a method name."""
    return dict(METHOD_STYLE.get(method, dict(color=None, marker="o", label=method)))


def setup(font_size: float = 9.0) -> None:
    """Print-readable defaults (font sizes, grid, tight bounding boxes)."""
    import matplotlib as mpl

    mpl.rcParams.update({
        "font.size": font_size, "axes.titlesize": font_size + 1, "axes.labelsize": font_size,
        "legend.fontsize": font_size - 1, "xtick.labelsize": font_size - 1, "ytick.labelsize": font_size - 1,
        "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100, "savefig.dpi": 200,
        "savefig.bbox": "tight", "pdf.fonttype": 42, "axes.spines.top": False, "axes.spines.right": False,
    })


class FigureSaver:
    """save(fig, "name") -> writes out_dir/name.png and .pdf; .names lists what was written."""

    def __init__(self, out_dir, label: str = ""):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self.label = label   # e.g. "fresh run, n=20 items per task (CPU)": stamped on every figure saved

    def __call__(self, fig, name: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
        paths = []
        stamp = fig.text(0.003, 0.999, self.label.upper(), ha="left", va="top", fontsize=9, color="#b00000",
                         fontweight="bold") if self.label else None
        try:
            for fmt in formats:
                p = self.out_dir / f"{name}.{fmt}"
                fig.savefig(p, metadata=SAVE_METADATA.get(fmt))
                paths.append(p)
                self.names.append(p.name)
        finally:
            if stamp is not None:
                stamp.remove()
        return paths


def metric_vs_cut(ax, df, metric: str, *, methods: Optional[Iterable[str]] = None, dense: Optional[float] = None,
                  x: str = "cut", err: Optional[str] = None, title: Optional[str] = None,
                  ylabel: Optional[str] = None, percent: bool = True) -> None:
    """One line per method: `metric` against the token-layer cut; the dense value as a dashed line.

    df: rows with columns method, `x` (the target token-layer cut), `metric` (and optionally `err`
    standard errors).
    """
    methods = list(methods) if methods is not None else list(dict.fromkeys(df["method"]))
    scale = 100.0 if percent and not metric.endswith("ppl") else 1.0
    for m in methods:
        d = df[df["method"] == m].sort_values(x)
        if d.empty:
            continue
        st = style(m)
        xs, ys = list(100 * d[x]), list(scale * d[metric])
        if dense is not None:  # every curve starts at the dense model (0 % cut)
            xs, ys = [0.0] + xs, [scale * dense] + ys
        ax.plot(xs, ys, color=st["color"], marker=st["marker"], label=st["label"], lw=1.4, ms=5)
        if err and err in d and d[err].notna().any():
            ax.fill_between(100 * d[x], scale * (d[metric] - d[err]), scale * (d[metric] + d[err]),
                            color=st["color"], alpha=0.12, lw=0)
    if dense is not None:
        ax.axhline(scale * dense, color="black", ls="--", lw=1, label="dense (no reduction)")
    ax.set_xlabel(TOKEN_LAYER_CUT_LABEL)
    unit = " (%)" if scale == 100.0 else ""
    ax.set_ylabel(ylabel or TASK_LABELS.get(metric, metric) + unit)
    if metric.endswith("ppl"):
        ax.set_yscale("log")
    if title:
        ax.set_title(title)


def legend_below(fig, axes, ncol: int = 4) -> None:
    """One legend for all axes, under the figure (deduplicated labels)."""
    handles, labels = {}, []
    for ax in (axes if hasattr(axes, "__iter__") else [axes]):
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
                labels.append(l)
    fig.legend([handles[l] for l in labels], labels, loc="lower center", ncol=ncol, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.subplots_adjust(bottom=0.2)


def annotate_source(fig, text: str, *, top: bool = False) -> None:
    """Small provenance line at the bottom-right (or top-right) of a figure (model, limit, device ...)."""
    fig.text(0.99, 0.995 if top else 0.005, text, ha="right", va="top" if top else "bottom", fontsize=6.5,
             color="#555555")


def bar_panel(ax, f, x: str, labels, title: str, highlight=None, *, dense, model_names: Sequence[str]) -> None:
    """Mean accuracy (%) of one design-choice sweep as bars, one group of bars per model (02_design_choices).

    f: sweep rows (columns model, `x`, avg_acc, optional status); one bar per row, in row order. labels:
    function value of `x` -> tick label. highlight: the value of `x` drawn orange (the paper's choice).
    dense: frame of the dense rows (model, avg_acc), drawn as a dashed line per model. Failed rows
    (status != "ok") are marked "failed". The y-axis starts at zero (a truncated axis makes differences
    of one or two items look large); with `avg_acc_low` / `avg_acc_high` columns each bar carries its
    95% interval (else, with an `avg_acc_stderr` column, +-1 s.e.).
    """
    import numpy as np

    for i, name in enumerate(model_names):
        d = f[f["model"] == name]
        xs = np.arange(len(d)) + 0.38 * (i - (len(model_names) - 1) / 2)
        if "avg_acc_low" in d and d["avg_acc_low"].notna().any():   # 95% interval (asymmetric)
            yerr = [100 * (d["avg_acc"] - d["avg_acc_low"]).fillna(0), 100 * (d["avg_acc_high"] - d["avg_acc"]).fillna(0)]
        else:
            yerr = 100 * d["avg_acc_stderr"].fillna(0) if "avg_acc_stderr" in d else None
        ax.bar(xs, 100 * d["avg_acc"].fillna(0), width=0.36 if len(model_names) > 1 else 0.6, label=Path(name).name,
               color=["#D55E00" if (highlight is not None and v == highlight) else "#888888" for v in d[x]],
               edgecolor="black", alpha=1.0 if i == 0 else 0.6, yerr=yerr, capsize=2,
               error_kw=dict(elinewidth=0.8, ecolor="#333333"))
        ax.axhline(100 * float(dense[dense["model"] == name]["avg_acc"].iloc[0]), color="black", ls="--", lw=1,
                   label=f"dense {Path(name).name}")
        for xx, (_, row) in zip(xs, d.iterrows()):
            if row.get("status", "ok") != "ok":
                ax.text(xx, 1, "failed", rotation=90, ha="center", va="bottom", fontsize=7, color="red")
    d0 = f[f["model"] == model_names[0]]
    ax.set_xticks(np.arange(len(d0)), [labels(v) for v in d0[x]], rotation=0)
    ax.set_ylabel("mean accuracy of 3 tasks (%)")
    ax.set_title(title)
    ax.set_ylim(0, None)


def protection_bars(ax, d, metric: str, modes: Sequence[str], tick_labels: Sequence[str]) -> None:
    """One metric of the UTRC-modes sweep: per mode an unprotected and a protected bar (02_design_choices).

    d: rows of one model with columns mode, protect, `metric`; a missing (mode, protect) is NaN.
    Accuracies are drawn in %, perplexities as they are; every axis is linear from zero (bars on a
    truncated or log axis exaggerate small differences).
    """
    import numpy as np

    scale = 1 if metric.endswith("ppl") else 100
    for j, prot in enumerate([False, True]):
        vals, lo, hi = [], [], []
        for m in modes:
            sel = d[(d["mode"] == m) & (d["protect"] == prot)]
            v = float(sel[metric].iloc[0]) if len(sel) else np.nan
            vals.append(v)
            has = len(sel) and f"{metric}_low" in sel and np.isfinite(sel[f"{metric}_low"].iloc[0])
            lo.append(v - float(sel[f"{metric}_low"].iloc[0]) if has else 0.0)
            hi.append(float(sel[f"{metric}_high"].iloc[0]) - v if has else 0.0)
        ax.bar(np.arange(len(modes)) + 0.4 * j - 0.2, np.array(vals) * scale, width=0.4,
               yerr=[np.array(lo) * scale, np.array(hi) * scale], capsize=2, error_kw=dict(elinewidth=0.8),
               color="#0072B2" if prot else "#E69F00", label="protected (leak-free)" if prot else "unprotected")
    ax.set_xticks(np.arange(len(modes)), list(tick_labels), fontsize=7)
    ax.set_title(TASK_LABELS.get(metric, metric), fontsize=8)
    ax.set_ylabel("perplexity" if metric.endswith("ppl") else "accuracy (%)")
    ax.set_ylim(0, None)


def gpu_prefill_figure(gpu):
    """Figure of GPU prefill benchmark rows (`utrc_study.experiments.analysis.load_gpu_bench`), one row of
    four panels per (model_shape, align, device, dtype, batch, seq_len): speed-up vs dense, peak memory
    with last-token logits, peak memory with full-sequence (solid) / kept-only (dashed) logits, and the
    reduction overhead (solid: reduction steps; dotted: end to end minus free slicing) against the 3 % target.
    """
    import matplotlib.pyplot as plt

    keys = [k for k in ["model_shape", "align", "device", "dtype", "batch", "seq_len"] if k in gpu]
    groups = list(gpu.groupby(keys)) if keys else [("all", gpu)]
    fig, axes = plt.subplots(len(groups), 4, figsize=(17, 3.4 * len(groups)), squeeze=False)
    for (key, g), row in zip(groups, axes):
        kv = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        label = ", ".join(f"{k}={v}" for k, v in kv.items() if k in ("model_shape", "align", "batch", "seq_len"))
        for m, e in g[~g["method"].isin(["dense"])].groupby("method"):
            e = e.sort_values("flops_cut")
            st = style(m)
            kw = dict(color=st["color"], marker=st["marker"], label=st["label"] if m in METHOD_STYLE else m)
            if "speedup_vs_dense" in e:
                row[0].plot(100 * e["flops_cut"], e["speedup_vs_dense"], **kw)
            for col, ax in (("peak_mem_gb_last_token", row[1]), ("peak_mem_gb_full_logits", row[2])):
                if col in e and e[col].notna().any():
                    ax.plot(100 * e["flops_cut"], e[col], **kw)
            if "peak_mem_gb_kept_logits" in e and e["peak_mem_gb_kept_logits"].notna().any():
                row[2].plot(100 * e["flops_cut"], e["peak_mem_gb_kept_logits"], **dict(kw, ls="--", label=None))
            if m != "slice" and "reduction_overhead_vs_dense" in e and e["reduction_overhead_vs_dense"].notna().any():
                row[3].plot(100 * e["flops_cut"], 100 * e["reduction_overhead_vs_dense"], **kw)
            if m != "slice" and "overhead_vs_slice_of_dense" in e and e["overhead_vs_slice_of_dense"].notna().any():
                row[3].plot(100 * e["flops_cut"], 100 * e["overhead_vs_slice_of_dense"], **dict(kw, ls=":", label=None))
        row[3].axhline(3.0, color="grey", ls="--", lw=0.8, label="target 3%")
        row[3].set_ylabel("overhead (% of dense prefill)")
        row[3].text(0.02, 0.97, "solid: reduction steps (CUDA events)\ndotted: end to end, minus free slicing",
                    transform=row[3].transAxes, fontsize=6, va="top")
        dn = g[g["method"] == "dense"]
        for col, ax in (("peak_mem_gb_last_token", row[1]), ("peak_mem_gb_full_logits", row[2])):
            if col in dn and len(dn):
                ax.axhline(float(dn[col].iloc[0]), color="black", ls="--", label="dense")
        row[0].axhline(1.0, color="black", ls="--", lw=0.8)
        row[0].set_ylabel("prefill speed-up vs dense (x)")
        row[1].set_ylabel("peak memory (GB), last-token logits")
        row[2].set_ylabel("peak memory (GB), full-sequence logits")
        row[2].text(0.02, 0.03, "solid: logits at all N positions\ndashed: logits at kept tokens only (kept_only)",
                    transform=row[2].transAxes, fontsize=6, va="bottom")
        for ax in row:
            ax.set_xlabel(TOKEN_LAYER_CUT_LABEL)
            ax.set_title(label, fontsize=7)
        row[0].legend(fontsize=6.5)
    names = ", ".join(sorted(set(gpu["gpu"].dropna()))) if "gpu" in gpu else "GPU"
    fig.suptitle(f"GPU prefill on {names}, fp16 (torch.cuda.max_memory_allocated; CUDA-event timing, median)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def paper_efficiency_figure(paper: dict):
    """The paper's A100 efficiency numbers (data/paper_results.json "efficiency"): throughput speed-up and
    peak-memory reduction against the FLOPs cut the paper reports (its token-layer definition), one
    line per paper model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    for pm, ls in zip(paper["throughput_speedup"], ["-", "--"]):
        cs = sorted(paper["throughput_speedup"][pm], key=float)
        axes[0].plot([0] + [100 * float(c) for c in cs], [1] + [paper["throughput_speedup"][pm][c] for c in cs],
                     ls=ls, marker="o", color="#D55E00", label=pm)
        axes[1].plot([0] + [100 * float(c) for c in cs], [0] + [paper["peak_memory_reduction_pct"][pm][c] for c in cs],
                     ls=ls, marker="o", color="#D55E00", label=pm)
    axes[0].set_ylabel("throughput speed-up (x)")
    axes[1].set_ylabel("peak-memory reduction (%)")
    for ax in axes:
        ax.set_xlabel(TOKEN_LAYER_CUT_LABEL)
        ax.legend(fontsize=7)
    axes[0].set_title("THEIRS (paper, A100): batch 16, 2048 + 100 tokens", fontsize=8)
    axes[1].set_title("THEIRS (paper, A100): NVML memory, batch 96 x 2048, full logits", fontsize=8)
    fig.tight_layout()
    return fig


# -- interval figures (experiments.paired tables) ------------------------------------------------------
VERDICT_STYLE = {"beats": dict(color="#D55E00", marker="o", label="UTRC better (Holm-corrected, 5%)"),
                 "beaten": dict(color="#0072B2", marker="s", label="UTRC worse (Holm-corrected, 5%)"),
                 "unresolved": dict(color="#999999", marker="o", label="unresolved after Holm correction")}


def interval_vs_cut(ax, tab, y: str, low: str, high: str, *, methods: Sequence[str], dense=None,
                    title: Optional[str] = None, ylabel: Optional[str] = None, scale: float = 100.0,
                    log: bool = False, x: str = "cut") -> None:
    """One line per method of `tab` (columns method, `x`, `y`, `low`, `high`) with its 95% interval
    as error bars (points dodged a little along x so that the bars stay apart); `dense` = (estimate,
    low, high) of the dense model drawn as a dashed line with a grey band."""
    methods = [m for m in methods if (tab["method"] == m).any()]
    width = 0.8 * max(1, len(methods) - 1)   # total dodge (points of cut)
    for i, m in enumerate(methods):
        d = tab[tab["method"] == m].sort_values(x)
        st = style(m)
        off = (i - (len(methods) - 1) / 2) * (width / max(1, len(methods) - 1)) if len(methods) > 1 else 0.0
        xs = 100 * d[x].to_numpy() + off
        ys = scale * d[y].to_numpy()
        err = [ys - scale * d[low].to_numpy(), scale * d[high].to_numpy() - ys]
        ax.errorbar(xs, ys, yerr=err, color=st["color"], marker=st["marker"], label=st["label"], lw=1.2, ms=4,
                    capsize=2, elinewidth=0.8)
    if dense is not None:
        est, lo, hi = dense
        ax.axhline(scale * est, color="black", ls="--", lw=1, label="dense (no reduction), 95% CI band")
        ax.axhspan(scale * lo, scale * hi, color="black", alpha=0.07, lw=0)
    ax.set_xlabel(TOKEN_LAYER_CUT_LABEL)
    if ylabel:
        ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)


def margin_panel(ax, cmp, metric: str, *, cuts: Sequence[float], baselines: Sequence[str], scale: float = 100.0,
                 title: Optional[str] = None, ylabel: Optional[str] = None) -> None:
    """UTRC minus each baseline (comparison_table rows of one model and `metric`) with their unadjusted
    95% intervals, grouped by baseline, one point per cut, coloured by the Holm-corrected verdict of the
    table's family (say both on the axis: a bar can exclude 0 where the corrected test does not)."""
    import numpy as np

    d = cmp[cmp["metric"] == metric]
    for j, b in enumerate(baselines):
        for k, c in enumerate(cuts):
            r = d[(d["baseline"] == b) & (np.isclose(d["cut"], c))]
            if r.empty:
                continue
            r = r.iloc[0]
            st = VERDICT_STYLE[r["verdict"]]
            xx = j + (k - (len(cuts) - 1) / 2) * 0.22
            ax.errorbar([xx], [scale * r["delta"]], yerr=[[scale * (r["delta"] - r["low"])], [scale * (r["high"] - r["delta"])]],
                        color=st["color"], marker=st["marker"], ms=4, capsize=2, elinewidth=0.9, label=st["label"])
            ax.text(xx, scale * r["high"], f"{100 * c:.0f}", ha="center", va="bottom", fontsize=5.5, color="#444444")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(baselines)), [style(b)["label"] for b in baselines], rotation=30, ha="right", fontsize=7)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=8)


def gpu_generation_figure(gen_table, gpus=()):
    """Notebook 03's generation figure from `utrc_study.experiments.bench.generation_table` rows (a
    DataFrame with paper_speedup): per model shape, the end-to-end speed-up against the cut (Amdahl bound
    dotted), against the number of new tokens, and decoding ms per step against its bandwidth bound;
    None when there is no CUDA-graph row."""
    import matplotlib.pyplot as plt
    import numpy as np

    cg = gen_table[gen_table["decoding"] == "cuda_graph"]
    shapes = sorted(cg["model_shape"].unique())
    if not len(shapes):
        return None
    fig, axes = plt.subplots(len(shapes), 3, figsize=(15, 3.6 * len(shapes)), squeeze=False)
    for shape, row in zip(shapes, axes):
        g = cg[cg["model_shape"] == shape]
        for n, col in zip(sorted(g["new_tokens"].unique()), ["#0072B2", "#E69F00", "#009E73", "#CC79A7"]):
            for m, ls in (("utrc", "-"), ("slice", "--")):
                e = g[(g["method"].isin([m, "dense"])) & (g["new_tokens"] == n)].sort_values("flops_cut")
                e = e[e["e2e_speedup_vs_dense"].notna()]
                if len(e) > 1:
                    row[0].plot(100 * e["flops_cut"], e["e2e_speedup_vs_dense"], ls=ls, marker="o", color=col,
                                label=f"{style(m)['label'] if m == 'utrc' else 'free slicing'}, {n} tokens")
            b = g[(g["method"] == "utrc") & (g["new_tokens"] == n)].sort_values("flops_cut")
            if len(b):
                row[0].plot(100 * b["flops_cut"], b["amdahl_bound"], ls=":", color=col, lw=1)
        p = g[g["paper_speedup"].notna()]
        if len(p):
            row[0].plot(100 * p["flops_cut"], p["paper_speedup"].astype(float), "k*", ms=9, label="paper (A100, 100 tokens)")
        row[0].axhline(1.0, color="black", lw=0.6)
        row[0].set_xlabel(TOKEN_LAYER_CUT_LABEL); row[0].set_ylabel("end-to-end speed-up vs dense (x)")
        row[0].set_title(f"{shape}: dotted = Amdahl bound from the dense prefill share", fontsize=8)
        row[0].legend(fontsize=6)
        top = g[g["flops_cut"] == g["flops_cut"].max()]
        for m, ls, col in (("utrc", "-", "#0072B2"), ("slice", "--", "#009E73")):
            e = top[top["method"] == m].sort_values("new_tokens")
            if len(e):
                row[1].plot(e["new_tokens"], e["e2e_speedup_vs_dense"], ls=ls, marker="o", color=col,
                            label=style(m)["label"] if m == "utrc" else "free slicing")
                if m == "utrc":
                    row[1].plot(e["new_tokens"], e["amdahl_bound"], ls=":", color="grey", label="Amdahl bound")
        d = g[g["method"] == "dense"].sort_values("new_tokens")
        if len(d):
            ax2 = row[1].twinx()
            ax2.plot(d["new_tokens"], 100 * (d["prefill_ms"] / d["e2e_ms"]), color="#D55E00", marker="s", lw=0.8)
            ax2.set_ylabel("dense prefill share (%)", color="#D55E00")
        ns = sorted(g["new_tokens"].unique())
        row[1].set_xscale("log"); row[1].set_xticks(ns, [str(n) for n in ns]); row[1].minorticks_off()
        row[1].axhline(1.0, color="black", lw=0.6)
        row[1].set_xlabel("new tokens"); row[1].set_ylabel(f"speed-up at {100 * g['flops_cut'].max():.0f}% cut (x)")
        row[1].set_title("the reduction's share falls as generation grows", fontsize=8); row[1].legend(fontsize=6)
        dd = (g.sort_values("new_tokens", ascending=False).drop_duplicates(["method", "flops_cut"])
              .sort_values(["method", "flops_cut"]))   # each configuration's longest run
        x = np.arange(len(dd))
        row[2].bar(x, dd["decode_ms_per_token"], color="#0072B2", label="decode ms/token (median)")
        if dd["decode_bound_ms"].notna().any():
            row[2].axhline(float(dd["decode_bound_ms"].dropna().iloc[0]), color="black", ls="--",
                           label="bound: weights + 2 x state / copy bandwidth")
        row[2].set_xticks(x, [f"{m}\n{c:.0%}\n{n} tok" for m, c, n in zip(dd["method"], dd["flops_cut"], dd["new_tokens"])],
                          fontsize=7)
        row[2].set_ylabel("ms per decoding step"); row[2].legend(fontsize=6)
        row[2].set_title("decoding (CUDA graphs) does not depend on the method", fontsize=8)
    fig.suptitle(f"Generation with CUDA-graph decoding on {', '.join(gpus) or 'GPU'}, batch 16 x 2048, fp16")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig

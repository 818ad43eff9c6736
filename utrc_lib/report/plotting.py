"""Plot helpers shared by the notebooks: one style, one colour per method, figure saving.

Every figure is saved as PNG (200 dpi) and PDF by `save`, and its name is remembered so that the
notebook's results.json can list the files it wrote.
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
    "random": dict(color="#7F3C8D", marker="x", label="random drop"),
    "slice": dict(color="#555555", marker=".", label="free slicing (bound)"),
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

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []

    def __call__(self, fig, name: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
        paths = []
        for fmt in formats:
            p = self.out_dir / f"{name}.{fmt}"
            fig.savefig(p)
            paths.append(p)
            self.names.append(p.name)
        return paths


def metric_vs_cut(ax, df, metric: str, *, methods: Optional[Iterable[str]] = None, dense: Optional[float] = None,
                  x: str = "cut", err: Optional[str] = None, title: Optional[str] = None,
                  ylabel: Optional[str] = None, percent: bool = True) -> None:
    """One line per method: `metric` against the FLOPs cut; the dense value as a dashed line.

    df: rows with columns method, `x`, `metric` (and optionally `err` standard errors).
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
    ax.set_xlabel("FLOPs cut (%, token-layer fraction)")
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


def annotate_source(fig, text: str) -> None:
    """Small provenance line at the bottom-right of a figure (model, limit, device ...)."""
    fig.text(0.99, 0.005, text, ha="right", va="bottom", fontsize=6.5, color="#555555")

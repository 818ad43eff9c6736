"""Tables and figures of notebook 01 (main results), from the paired tables of `experiments.paired`.

    table = main_table(df)                        # every task, method, cut (Tables 1-2 analog)
    ci = interval_table(acc, ppl)                 # mean accuracy, change from dense, held-out ppl: 95% CIs
    v = verdict_table(cmp)                        # per model and cut: whom UTRC beats / is beaten by (Holm)
    margins_markdown(cmp)                         # UTRC minus each baseline, CI, p (bootstrap p: "< 1/n"), Holm
    accuracy_figure / fidelity_figure / margins_figure / paper_figure -> matplotlib figures

`figure_metrics(tasks)` are the comparisons the margins figure shows (one Holm family, `holm_over=()`):
mean accuracy and KL per token on `paired.kl_task(tasks)` ("ppl" for the built-in suite, FIGURE_METRICS);
`task_metrics(tasks)` the per-task ones (results.json only, their own family; TASK_METRICS built in).
Every function takes lm-eval task names as well as the built-in ones (`paired.accuracy_tasks`).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..experiments import paired
from . import plotting
from .prose import fmt_ci, fmt_p, short

FIGURE_METRICS = (paired.AVG, "kl:ppl")
TASK_METRICS = ("cloze", "choice4", "choice2", "ll:ppl")
ACC_COLUMNS = ("cloze/acc", "choice4/acc_norm", "choice2/acc")
PAPER_METHODS = ("utrc", "evit", "pumer")

__all__ = ["FIGURE_METRICS", "TASK_METRICS", "figure_metrics", "task_metrics", "main_table", "interval_table", "verdict_table", "margins_markdown",
           "accuracy_figure", "fidelity_figure", "margins_figure", "paper_figure", "model_parameters"]


def figure_metrics(tasks) -> tuple:
    """Mean accuracy and KL per token on the KL task of `tasks` (FIGURE_METRICS for the built-in suite)."""
    return (paired.AVG, f"kl:{paired.kl_task(tasks)}")


def task_metrics(tasks) -> tuple:
    """Each accuracy task and the gold log-likelihood change on the KL task (TASK_METRICS built in)."""
    return tuple(paired.accuracy_tasks(tasks)) + (f"ll:{paired.kl_task(tasks)}",)


def main_table(df, acc_columns: Sequence[str] = ACC_COLUMNS):
    """(table, formats) of every row: target and achieved token-layer cut, keep ratio, analytic FLOPs cut,
    mean and per-task accuracy, cloze and held-out perplexity. achieved = the token-layer cut the
    forwards reached (mean over requests, then tasks): below the target where inputs are short, kept
    counts round up and the scored tail is protected."""
    df = df.copy()
    achieved = [c for c in df if c.endswith("/achieved_token_layer_cut")]
    df["achieved_token_layer_cut"] = df[achieved].mean(axis=1) if achieved else float("nan")
    cols = ["model", "method", "cut", "achieved_token_layer_cut", "keep_ratio", "analytic_flops_cut", "avg_acc",
            *acc_columns, "cloze/ppl", "ppl/ppl"]
    table = df[[c for c in cols if c in df]].sort_values(["model", "cut", "method"]).reset_index(drop=True)
    table = table.rename(columns={"cut": "target_token_layer_cut"})   # the two cuts named apart
    pct = {c: "{:.1%}" for c in ["target_token_layer_cut", "achieved_token_layer_cut", "analytic_flops_cut",
                                 "avg_acc", *acc_columns]}
    return table, {**pct, "keep_ratio": "{:.3f}", "cloze/ppl": "{:.1f}", "ppl/ppl": "{:.1f}"}


def interval_table(acc, ppl):
    """Mean accuracy with its 95% CI, the paired change from dense and the held-out ppl with its CI."""
    avg = acc[acc["metric"] == paired.AVG].copy()
    avg["mean acc % [95% CI]"] = [fmt_ci(r.acc, r.acc_low, r.acc_high) for r in avg.itertuples()]
    avg["vs dense, points [95% CI]"] = ["" if r.method == "none" else fmt_ci(r.delta, r.delta_low, r.delta_high)
                                        for r in avg.itertuples()]
    pp = ppl[ppl["task"] == "ppl"].set_index(["model", "method", "cut"])
    cells = []
    for r in avg.itertuples():
        k = (r.model, r.method, r.cut)
        cells.append(fmt_ci(pp.loc[k, "ppl"], pp.loc[k, "ppl_low"], pp.loc[k, "ppl_high"], scale=1, digits=2)
                     if k in pp.index else "")
    avg["held-out ppl [95% CI]"] = cells
    return avg[["model", "method", "cut", "n", "mean acc % [95% CI]", "vs dense, points [95% CI]",
                "held-out ppl [95% CI]"]].sort_values(["model", "cut", "method"]).reset_index(drop=True)


def verdict_table(cmp, kl_metric: str = "kl:ppl"):
    """Per (model, cut): the baselines UTRC beats / is beaten by / does not separate from, on mean
    accuracy and on KL (`kl_metric`), after the Holm correction of `cmp`."""
    import pandas as pd

    out = []
    kl_all = paired.verdicts(cmp, kl_metric)
    for (model, cut), v in sorted(paired.verdicts(cmp).items()):
        kl = kl_all.get((model, cut), {})
        out.append({"model": model, "cut": cut, "UTRC beats (mean acc)": ", ".join(v["beats"]) or "-",
                    "beaten by (mean acc)": ", ".join(v["beaten"]) or "-",
                    "unresolved (mean acc)": ", ".join(v["unresolved"]) or "-",
                    f"UTRC beats (KL, {kl_metric.split(':', 1)[1]} task)": ", ".join(kl.get("beats", [])) or "-",
                    "beaten by (KL)": ", ".join(kl.get("beaten", [])) or "-"})
    return pd.DataFrame(out)


def margin_cells(c):
    """`c` (comparison rows) with the printed columns: "UTRC minus baseline, points [95% CI]", p and p_holm
    (a bootstrap p below 1 / resamples reads "< 1/resamples")."""
    c["UTRC minus baseline, points [95% CI]"] = [fmt_ci(r.delta, r.low, r.high) for r in c.itertuples()]
    c["p"] = [fmt_p(r.p, r.resamples if r.resamples == r.resamples else None) for r in c.itertuples()]
    c["p_holm"] = [fmt_p(r.p_holm) for r in c.itertuples()]
    return c


def margins_markdown(cmp, metric: str = paired.AVG) -> str:
    """UTRC minus each baseline on `metric` (points, 95% CI), p and Holm-adjusted p as printed (a
    bootstrap p below 1 / resamples reads "< 1/resamples"), and the Holm family in a header line."""
    c = cmp[cmp["metric"] == metric].copy()
    if c.empty:
        return "(no comparisons)\n"
    c = margin_cells(c)
    head = (f"Holm correction over {paired.holm_family(cmp)} (metrics: {', '.join(dict.fromkeys(cmp['metric']))}); "
            f"p: {c['test'].iloc[0]} ({int(c['resamples'].iloc[0])} resamples; a p below 1/resamples reads "
            f"\"< 1/resamples\"); intervals unadjusted.\n\n")
    cols = ["model", "cut", "baseline", "UTRC minus baseline, points [95% CI]", "p", "p_holm", "verdict"]
    return head + c[cols].to_markdown(index=False) + "\n"


def accuracy_figure(acc, ppl, *, model_names, methods, tasks, note: str = ""):
    """Mean and per-task accuracy and held-out ppl against the token-layer cut, 95% CIs, dense band."""
    import matplotlib.pyplot as plt

    panels = [paired.AVG] + [t for t in paired.accuracy_tasks(tasks) if t in set(acc["metric"])] + \
        (["ppl"] if "ppl" in tasks else [])
    fig, axes = plt.subplots(len(model_names), len(panels), figsize=(3.1 * len(panels), 2.9 * len(model_names)),
                             squeeze=False)
    for r, name in enumerate(model_names):
        for c, metric in enumerate(panels):
            ax = axes[r, c]
            if metric == "ppl":
                t = ppl[(ppl["model"] == name) & (ppl["task"] == "ppl")]
                dn = t[t["method"] == "none"].iloc[0]
                plotting.interval_vs_cut(ax, t[t["method"] != "none"], "ppl", "ppl_low", "ppl_high", methods=methods,
                                         scale=1, dense=(dn.ppl, dn.ppl_low, dn.ppl_high),
                                         ylabel="held-out perplexity", title=f"{short(name)}: held-out ppl")
                continue
            t = acc[(acc["model"] == name) & (acc["metric"] == metric)]
            dn = t[t["method"] == "none"].iloc[0]
            plotting.interval_vs_cut(ax, t[t["method"] != "none"], "acc", "acc_low", "acc_high", methods=methods,
                                     dense=(dn.acc, dn.acc_low, dn.acc_high), ylabel="accuracy (%)",
                                     title=f"{short(name)}: {plotting.SHORT_LABELS.get(metric, metric + ' acc')}")
    plotting.legend_below(fig, axes.ravel(), ncol=5)
    plotting.annotate_source(fig, note, top=True)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def fidelity_figure(fid, *, model_names, methods, tasks, note: str = ""):
    """KL(dense || method) per token and the gold log-likelihood change per token, 95% CIs."""
    import matplotlib.pyplot as plt

    fid_tasks = [t for t in ("ppl", "cloze", "choice4") if t in tasks] or \
        [t for t in tasks if not paired._builtin(t)][:3]      # lm-eval tasks
    fig, axes = plt.subplots(len(model_names), 2 * len(fid_tasks),
                             figsize=(3.0 * 2 * len(fid_tasks), 2.9 * len(model_names)), squeeze=False)
    for r, name in enumerate(model_names):
        for j, t in enumerate(fid_tasks):
            for k, (measure, label) in enumerate([("kl_per_token", "KL(dense || method) per token (nats)"),
                                                  ("delta_ll_per_token", "gold log-lik. change per token (nats)")]):
                f = fid[(fid["model"] == name) & (fid["task"] == t) & (fid["measure"] == measure)]
                ax = axes[r, 2 * j + k]
                plotting.interval_vs_cut(ax, f, "estimate", "low", "high", methods=methods, scale=1.0, ylabel=label,
                                         title=f"{short(name)}, {t}: {'KL' if k == 0 else 'delta ll'}")
                if k == 1:
                    ax.axhline(0, color="black", lw=0.8, ls="--")
    plotting.legend_below(fig, axes.ravel(), ncol=5)
    plotting.annotate_source(fig, note, top=True)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def margins_figure(cmp, *, model_names, cuts, baselines, tasks=("ppl",)):
    """UTRC minus each baseline on mean accuracy and on KL (`paired.kl_task(tasks)`): unadjusted 95% intervals,
    coloured by the Holm-corrected verdict over the comparisons the figure shows (said on the axes)."""
    import matplotlib.pyplot as plt

    family = paired.holm_family(cmp)
    fig, axes = plt.subplots(len(model_names), 2, figsize=(11, 3.3 * len(model_names)), squeeze=False)
    for r, name in enumerate(model_names):
        d = cmp[cmp["model"] == name]
        plotting.margin_panel(axes[r, 0], d, paired.AVG, cuts=cuts, baselines=baselines,
                              ylabel="UTRC minus baseline (points)\nbars: unadjusted 95% CI",
                              title=f"{short(name)}: mean accuracy, UTRC minus baseline (labels: cut %)")
        kl_task = paired.kl_task(tasks)
        plotting.margin_panel(axes[r, 1], d, f"kl:{kl_task}", cuts=cuts, baselines=baselines, scale=1.0,
                              ylabel="UTRC minus baseline (nats/token)\nbars: unadjusted 95% CI",
                              title=f"{short(name)}: KL per token on the {kl_task} task (lower = closer to dense)")
    plotting.legend_below(fig, axes.ravel(), ncol=3)
    fig.suptitle(f"Colour: Holm-corrected verdict over {family} (both measures, every model, cut and baseline); "
                 f"bars: unadjusted 95% intervals, so a bar can exclude 0 where the corrected test does not",
                 fontsize=7.5)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    return fig


def model_parameters(model_names) -> dict:
    """{model name: parameter count} (loads each model through the sweep's cache)."""
    from ..experiments import sweep

    out = {}
    for name in model_names:
        model, _ = sweep.get_model(name)
        out[name] = int(sum(p.numel() for p in model.parameters()))
    return out


PAPER_MODELS = ("Mamba-2-2.7B", "Mamba-2.8B")   # the paper's checkpoints drawn beside ours (Tables 1-2)


def paper_figure(acc, paper: Sequence[dict], *, model_names, methods, sizes: Optional[dict] = None,
                 paper_models: Sequence[str] = PAPER_MODELS):
    """Left: OUR mean accuracy (3 local tasks, our models, leak-free) per method with 95% CIs; right: the
    paper's published mean of 6 lm-eval accuracies for its checkpoints (Zhan et al., Tables 1-2). Every
    label says whose number it is and which model it comes from; the models differ."""
    import matplotlib.pyplot as plt
    import pandas as pd

    pdf = pd.DataFrame(paper)
    sizes = sizes or {}
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2))
    ours = [m for m in ("utrc", "utrc_reference", "evit", "pumer") if m in methods] or list(methods[:3])
    avg = acc[acc["metric"] == paired.AVG]
    for k, (name, ls) in enumerate(zip(model_names, ["-", "--", ":", "-."])):
        d = avg[avg["model"] == name]
        dense = d[d["method"] == "none"].iloc[0]
        size = f", {sizes[name] / 1e6:.1f}M params" if name in sizes else ""
        for i, m in enumerate(ours):
            e = d[d["method"] == m].sort_values("cut")
            st = plotting.style(m)
            xs = [0.0] + list(100 * e["cut"] + 0.4 * (i - (len(ours) - 1) / 2) + 0.2 * k)
            ys = [100 * dense.acc] + list(100 * e["acc"])
            lo = [100 * (dense.acc - dense.acc_low)] + list(100 * (e["acc"] - e["acc_low"]))
            hi = [100 * (dense.acc_high - dense.acc)] + list(100 * (e["acc_high"] - e["acc"]))
            axes[0].errorbar(xs, ys, yerr=[lo, hi], ls=ls, color=st["color"], marker=st["marker"], ms=4, capsize=2,
                             elinewidth=0.8, label=f"ours: {_our_label(m)} on {short(name)}{size}")
    axes[0].set_title("OUR numbers: our implementation on our tiny models,\n3 local tasks, leak-free, 95% CI",
                      fontsize=8.5)
    for pm, ls in zip(paper_models, ["-", "--", ":", "-."]):
        for m in PAPER_METHODS:
            e = pdf[(pdf["model"] == pm) & (pdf["method"].isin([m, "dense"]))].sort_values("cut")
            if (e["method"] == m).any():
                st = plotting.style(m)
                axes[1].plot(100 * e["cut"], e["avg"], ls=ls, color=st["color"], marker=st["marker"],
                             label=f"paper's {_paper_label(m)} on {pm} (their numbers)")
    axes[1].set_title(f"THE PAPER'S numbers (Zhan et al. 2024, Tables 1-2): their code on their\n"
                      f"{' / '.join(paper_models)} checkpoints, 6 lm-eval tasks, no intervals published", fontsize=8.5)
    for ax in axes:
        ax.set_xlabel(plotting.TOKEN_LAYER_CUT_LABEL)
        ax.set_ylabel("mean accuracy (%)")
        ax.legend(fontsize=6)
    plotting.annotate_source(fig, "different models, tasks and scoring on the two sides: compare the drop from dense "
                                  "and the ordering, not the values")
    fig.tight_layout()
    return fig


def _our_label(m: str) -> str:
    return {"utrc": "UTRC (paper text, causal)", "utrc_reference": "UTRC as the authors' code does it",
            "none": "dense"}.get(m, plotting.style(m)["label"])


def _paper_label(m: str) -> str:
    return {"utrc": "UTRC", "evit": "EViT", "pumer": "PuMer"}.get(m, m)


def plot_note(n_items: dict, resamples: int, seed: int, devices: Sequence[str]) -> str:
    return (f"ours: tiny models, items per task {n_items}, leak-free evaluation; bars = 95% bootstrap CI "
            f"({resamples} resamples, seed {seed}); rows computed on {', '.join(devices)}")

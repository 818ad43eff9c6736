# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 Depth: does UTRC's margin over the baselines grow with the number of layers?
#
# The paper's headline (UTRC 5.7-13.1 points ahead of EViT and PuMer, which collapse) is measured on 48-
# and 64-layer models. The depth family (`depth-mamba2-{12,24,48,64}`, `figures/depth_family/`) changes
# depth alone: one width, tokenizer, corpus, token count and recipe. Every row here is a configuration of
# `scripts/gpu_depth_eval.py` (model, method, token-layer cut, anchors), scored on the same items; the
# anchors follow one of two schedules: `library` (the paper's anchors at 48 and 64 layers, its rule scaled
# elsewhere: 4 anchors at 12 layers, 8 at 24) and `relative` (the paper's 64-layer anchors at the same
# fractions of the stack, 7 at every depth), so that "deeper model" and "more anchors" can be told apart.
#
# Figures: `depth_margins` (UTRC minus each baseline against depth: accuracy in points, the normalised
# margin as a share of the dense model's gap above chance, and KL to dense per token; paired 95% bootstrap
# intervals; one line per cut and schedule) and `depth_accuracy_vs_cut` (mean accuracy against the cut,
# one panel per depth). The text after them is generated from the numbers.

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False
evidence: str = "../figures/08_depth/evidence"   # per-item rows of scripts/gpu_depth_eval.py; empty: compute here
model_names: list = ["depth-mamba2-12", "depth-mamba2-24", "depth-mamba2-48", "depth-mamba2-64"]
methods: list = ["utrc", "evit", "pumer", "tome", "merge_only", "prune_only", "random", "utrc_reference"]
cuts: list = [0.2, 0.1, 0.3]
schedules: list = ["library", "relative"]
tasks: list = ["cloze_v2", "choice4_v2", "choice2_v2"]   # accuracy and KL are averaged over these tasks
limit: int = 2                               # items per task when computing here (no evidence)
seed: int = 0
resamples: int = 10000                       # bootstrap resamples of every interval
out_dir: str = ""                            # empty: scratch .cache/notebooks/<name>; `make figures` passes figures/<name>

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from utrc_study.experiments import depth, paired, stats, sweep
from utrc_study.report import evidence as ev, plotting
from utrc_study.report.notebooks import setup

ctx = setup("08_depth", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:   # two small models of different depth, computed here
    model_names, methods, cuts, schedules = ["tiny-mamba2", "small-mamba2"], ["utrc", "tome"], [0.2], ["library"]
    tasks, limit, resamples, evidence = ["choice2_v2"], 2, min(resamples, 300), ""
if evidence and ev.exists(evidence):
    loaded = ev.load(evidence)
    rows = [r for r in loaded.rows if r["params"]["model"] in model_names]
    # the effective parameters (recorded in results.json) are what the evidence holds
    methods = [m for m in methods if m in {r["params"]["method"] for r in rows}]
    cuts = [c for c in cuts if any(np.isclose(c, float(r["params"]["cut"])) for r in rows)]
    schedules = [s for s in schedules if s in {depth.schedule_of(depth.depth_of(r["params"]["model"]), r["params"]["layers"])
                                               for r in rows if r["params"].get("layers")}]
    limit = next((int(v) for v in loaded.manifest.get("limit", []) if str(v).isdigit()), None)   # None: every item
    where = Path(evidence).resolve()
    source = f"evidence {where.relative_to(Path('..').resolve()) if where.is_relative_to(Path('..').resolve()) else where}"
else:
    model_names = depth.with_weights(model_names)   # a clean clone has only the 64-layer weights of the family
    configs = depth.plan(model_names, methods, cuts, schedules, tasks, limit, engine="fast")
    res = sweep.run(sweep.evaluate_config, configs, out / "cache.jsonl", items=True, desc="08 depth")
    rows = [r for r in res.rows if r.get("status") == "ok"]
    source = f"computed here ({limit} items per task)"
layers = {m: depth.depth_of(m) for m in sorted({r["params"]["model"] for r in rows})}
sizes = {t: len(rows[0]["items"][t]["id"]) for t in tasks if rows and t in rows[0]["items"]}
print(f"{len(rows)} rows ({source}); depths {sorted(layers.values())}; items per task {sizes}")

# %%
table = depth.margins(rows, layers.get, tasks=tasks, resamples=resamples, seed=seed)
slopes = depth.slopes(table)
chance = depth.collapsed(rows, layers.get, resamples=resamples, seed=seed)
display(table.drop(columns=["draws"]).round(4))

# %%
METRIC_LABEL = {"acc": "UTRC minus baseline\n(accuracy points)", "norm": "normalised margin\n(share of dense gap above chance)",
                "kl": "baseline KL minus UTRC KL\n(nats per token)"}
baselines = [b for b in methods if b != "utrc" and b in set(table["baseline"])]
if baselines:
    fig, axes = plt.subplots(3, len(baselines), figsize=(2.6 * len(baselines) + 1, 7.5), sharex=True, sharey="row",
                             squeeze=False)
    cut_colours = dict(zip(sorted(set(table["cut"])), ["#1b9e77", "#d95f02", "#7570b3"]))
    for j, b in enumerate(baselines):
        for i, metric in enumerate(depth.METRICS):
            ax = axes[i][j]
            for (cut, sched), g in table[(table["baseline"] == b) & (table["metric"] == metric)].groupby(["cut", "schedule"]):
                g = g.sort_values("layers")
                scale = 100 if metric == "acc" else 1
                x = g["layers"] * (1.04 if sched == "relative" else 1.0)
                ax.errorbar(x, scale * g["margin"], yerr=[scale * (g["margin"] - g["low"]), scale * (g["high"] - g["margin"])],
                            color=cut_colours[cut], ls="-" if sched == "library" else "--", marker="o", ms=3.5,
                            capsize=2, lw=1, label=f"{cut:.0%} cut, {sched}")
            ax.axhline(0, color="black", lw=0.7, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(layers.values()), [str(v) for v in sorted(layers.values())])
            if i == 0:
                ax.set_title(f"UTRC vs {plotting.style(b)['label']}", fontsize=9)
            if j == 0:
                ax.set_ylabel(METRIC_LABEL[metric], fontsize=8)
            if i == 2:
                ax.set_xlabel("layers")
    axes[0][0].legend(fontsize=6.5)
    fig.suptitle(f"UTRC's margin against depth (paired 95% bootstrap intervals; {source}; above 0 favours UTRC)", fontsize=9)
    fig.tight_layout(); save(fig, "depth_margins"); plt.show()

# %%
curves = []
for r in rows:
    p = r["params"]
    groups = [np.asarray(r["items"][t][paired.TASK_ACC[depth._kind(t)]], float) for t in tasks
              if depth._kind(t) in paired.TASK_ACC]
    if not groups:
        continue
    ci = paired.stratified_bootstrap(groups, resamples=resamples, seed=seed)
    L = layers[p["model"]]
    sched = "dense" if p["method"] == "none" else depth.schedule_of(L, p.get("layers") or depth.schedule_layers("library", L))
    curves.append(dict(model=p["model"], layers=L, method=p["method"], cut=float(p["cut"]), schedule=sched,
                       acc=ci.estimate, low=ci.low, high=ci.high))
curves = pd.DataFrame(curves)
if len(curves):
    depths = sorted(layers.values())
    fig, axes = plt.subplots(1, len(depths), figsize=(3.2 * len(depths), 3.4), sharey=True, squeeze=False)
    for ax, L in zip(axes[0], depths):
        d = curves[curves["layers"] == L]
        dense = d[d["method"] == "none"]
        for m in methods:
            g = d[(d["method"] == m) & (d["schedule"] == "library")].sort_values("cut")
            if dense.empty or g.empty:
                continue
            g = pd.concat([dense.assign(method=m), g])
            st = plotting.style(m)
            ax.errorbar(100 * g["cut"], 100 * g["acc"], yerr=[100 * (g["acc"] - g["low"]), 100 * (g["high"] - g["acc"])],
                        color=st["color"], marker=st["marker"], ms=3.5, capsize=2, lw=1, label=st["label"])
        ax.set_title(f"{L} layers (library schedule)", fontsize=9)
        ax.set_xlabel(plotting.TOKEN_LAYER_CUT_LABEL, fontsize=8)
    axes[0][0].set_ylabel("mean accuracy over the tasks (%)")
    axes[0][0].legend(fontsize=6.5)
    fig.suptitle(f"Accuracy against the cut at each depth (95% bootstrap intervals; {source})", fontsize=9)
    fig.tight_layout(); save(fig, "depth_accuracy_vs_cut"); plt.show()

# %%
# The answer, generated from the numbers above
lines = [f"Rows: {source}; depths {', '.join(map(str, sorted(layers.values())))}; items per task "
         f"{', '.join(f'{t} {n}' for t, n in sizes.items())}; "
         f"{resamples} bootstrap resamples, 95% intervals."]
for b in baselines:
    s = slopes[(slopes["baseline"] == b)]
    parts = []
    for rec in s.itertuples():
        if rec.metric == "norm":
            continue
        unit = "points per doubling" if rec.metric == "acc" else "nats/token per doubling"
        scale = 100 if rec.metric == "acc" else 1
        slope = "" if not np.isfinite(rec.slope) else \
            f"slope {scale * rec.slope:+.3g} [{scale * rec.low:+.3g}, {scale * rec.high:+.3g}] {unit}, "
        first = (f"UTRC ahead from {int(rec.beats_from)} layers" if pd.notna(rec.beats_from)
                 else "UTRC ahead at no depth")
        parts.append(f"{rec.metric} at {rec.cut:.0%} ({rec.schedule}): {slope}{rec.verdict}; {first}")
    if parts:
        lines.append(f"**UTRC vs {plotting.style(b)['label']}**: " + "; ".join(parts) + ".")
deepest = max(layers.values()) if layers else None
if len(chance) and deepest:
    c = chance[(chance["layers"] == deepest) & (chance["method"] != "utrc")]
    fell = sorted({f"{plotting.style(m)['label']} ({cut:.0%})" for m, cut in c[c["at_chance"]][["method", "cut"]].itertuples(index=False)})
    tested = ", ".join(plotting.style(m)["label"] for m in dict.fromkeys(c["method"]))
    lines.append(f"At {deepest} layers, of the baselines run here ({tested}), those whose mean accuracy is not "
                 f"distinguishable from chance: {', '.join(fell) if fell else 'none'} (the paper reports EViT and PuMer "
                 f"collapsing at this depth).")
display(Markdown("\n\n".join(lines)))

# %%
named = {"cut": "token_layer_cut"}   # the paper's cut definition, named as in every results.json
ctx.write_results(data={"margins": table.drop(columns=["draws"]).rename(columns=named),
                        "slopes": slopes.rename(columns=named), "at_chance": chance.rename(columns=named),
                        "accuracy": curves.rename(columns=named), "depths": layers, "items_per_task": sizes,
                        "source": source}, answer=lines, computed_on=ev.computed_on(rows))

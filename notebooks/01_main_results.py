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
# # 01 Main results (analog of the paper's Tables 1-2)
#
# Accuracy on every local task and perplexity, for UTRC and the baselines (EViT, PuMer, ToMe,
# prune-only, merge-only, random drop) at 10 / 20 / 30 % token-layer cut (the paper's FLOPs definition,
# the x-axis of every figure here; the analytic FLOPs cut of `utrc_lib.flops` is in the table), on both
# tiny models (Mamba-2 and Mamba-1). Evaluation is leak-free: the scored continuation is protected from reduction and scored by
# original position (`utrc_lib.evaluate`). The paper's published numbers are shown beside ours,
# labelled as theirs: they come from their 1.3B-2.8B checkpoints on six lm-eval benchmarks, scored with
# their (non-causal, unprotected) code, so only the ordering of methods is comparable, not the values.
#
# The per-item rows are committed (`figures/01_main_results/evidence/`, computed on a GPU by
# `scripts/gpu_evidence.py`): every configuration they hold is read from them, and only the others are
# computed; every statistic below is recomputed from the rows. Computed rows are cached (`.cache/sweeps/`):
# rerunning after an interruption resumes.
# Each row keeps its per-item outcomes (correct, gold log-likelihood, KL to the dense model at the scored
# positions), so every number below carries a paired 95% interval and every UTRC-vs-baseline difference a
# test (`utrc_study.experiments.paired`): exact McNemar per task, stratified paired bootstrap for the mean
# accuracy and for KL, Holm-corrected over the six baselines at each cut.

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False                          # tiny sizes for tests
model_names: list = ["tiny-mamba2", "tiny-mamba"]  # embedded names, checkpoint paths or hub ids ("state-spaces/mamba2-2.7b")
methods: list = ["utrc", "evit", "pumer", "tome", "prune_only", "merge_only", "random"]
cuts: list = [0.1, 0.2, 0.3]                 # token-layer cuts (paper's FLOPs definition)
tasks: list = ["cloze", "choice4", "choice2", "ppl"]  # built-in tasks and / or lm-eval task names ("lambada_openai", "hellaswag", ...: run through lm-eval)
limit: int = 20                              # items per task (None: all 1000 / 200 windows); `make figures` passes None when the committed evidence holds every item
batch_size: int = 16                         # evaluation batch (results do not depend on it)
evidence: str = "../figures/01_main_results/evidence"   # committed per-item rows (the GPU run, scripts/gpu_evidence.py): configurations it holds at this `limit` are read, not recomputed ("": compute all)
seed: int = 0
resamples: int = 10000                       # bootstrap resamples of every interval (seed = `seed`)
out_dir: str = ""                        # empty: scratch .cache/notebooks/<name> (quick: a temp folder); `make figures` passes figures/<name>
cache_dir: str = "../.cache/sweeps"          # resumable sweep cache (shared by the notebooks)
paper_results: str = "../data/paper_results.json"

# %%
import json
from pathlib import Path
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import display

from utrc_study.experiments import analysis, paired, sweep
from utrc_study.report import evidence as rows, plotting
from utrc_study.report.notebooks import setup

ctx = setup("01_main_results", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:
    methods, cuts, limit, resamples, evidence = methods[:2], cuts[1:2], min(limit or 6, 6), min(resamples, 300), ""
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
builtin_tasks, lm_eval_tasks = sweep.check_tasks(tasks)   # lm-eval names go through lm-eval (per-sample log); unknown names fail here
ACC = analysis.acc_metrics(tasks)   # averaged into avg_acc (paper: mean of accuracies)
configs = analysis.method_grid(model_names, methods, cuts)   # dense + every method at every cut
res = rows.run(sweep.evaluate_config, configs, Path(cache_dir) / "eval.jsonl", evidence=evidence, desc="01 main results",
               common=dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size))
print(res.report())
df = analysis.with_avg_acc(res.frame(), stderr=True)
devices = sorted({str(v) for v in df.get("meta/device", pd.Series(["?"])).dropna()})
acc = paired.accuracy_table(res, resamples=resamples, seed=seed)
ppl = paired.perplexity_table(res, resamples=resamples, seed=seed)
fid = paired.fidelity_table(res, resamples=resamples, seed=seed)
cmp = paired.comparison_table(res, baselines=[m for m in methods if m != "utrc"], resamples=resamples, seed=seed)
power = paired.power_table(res)
n_items = {t: int(df[f"{t}/n"].iloc[0]) for t in tasks if f"{t}/n" in df}
print("items per task:", n_items, "| rows computed on:", devices)

# %% [markdown]
# ## Table: every task, every method, every cut (Tables 1-2 analog)

# %%
# achieved = the token-layer cut the forwards actually reached, mean over requests, then over tasks:
# below the target where inputs are short, kept counts round up and the scored tail is protected
achieved = [c for c in df if c.endswith("/achieved_token_layer_cut")]
df["achieved_token_layer_cut"] = df[achieved].mean(axis=1) if achieved else float("nan")
cols = ["model", "method", "cut", "achieved_token_layer_cut", "keep_ratio", "analytic_flops_cut", "avg_acc"] + ACC \
    + ["cloze/ppl", "ppl/ppl"]
table = df[[c for c in cols if c in df]].sort_values(["model", "cut", "method"]).reset_index(drop=True)
table = table.rename(columns={"cut": "target_token_layer_cut"})   # the two cuts named apart
pct = {c: "{:.1%}" for c in ["target_token_layer_cut", "achieved_token_layer_cut", "analytic_flops_cut",
                             "avg_acc"] + ACC}
display(table.style.format({**pct, "keep_ratio": "{:.3f}", "cloze/ppl": "{:.1f}", "ppl/ppl": "{:.1f}"}))
(out / "table_main.md").write_text(table.to_markdown(index=False, floatfmt=".4g") if hasattr(table, "to_markdown") else table.to_string())

# %% [markdown]
# ## Intervals: mean accuracy and perplexity with 95% intervals, and UTRC against each baseline
#
# Mean accuracy (3 tasks) with its stratified bootstrap interval, the paired change from dense, and the
# held-out perplexity with its interval. Then, for every model and cut, UTRC minus each baseline:
# `beats` / `beaten` where the Holm-corrected test says so at 5%, `unresolved` otherwise.

# %%
def fmt_ci(e, lo, hi, scale=100, digits=1):
    return f"{scale * e:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"

avg = acc[acc["metric"] == paired.AVG].copy()
avg["mean acc % [95% CI]"] = [fmt_ci(r.acc, r.acc_low, r.acc_high) for r in avg.itertuples()]
avg["vs dense, points [95% CI]"] = ["" if r.method == "none" else fmt_ci(r.delta, r.delta_low, r.delta_high)
                                    for r in avg.itertuples()]
pp = ppl[ppl["task"] == "ppl"].set_index(["model", "method", "cut"])
avg["held-out ppl [95% CI]"] = [fmt_ci(pp.loc[(r.model, r.method, r.cut), "ppl"], pp.loc[(r.model, r.method, r.cut), "ppl_low"],
                                       pp.loc[(r.model, r.method, r.cut), "ppl_high"], scale=1, digits=2)
                                if (r.model, r.method, r.cut) in pp.index else "" for r in avg.itertuples()]
ci_table = avg[["model", "method", "cut", "n", "mean acc % [95% CI]", "vs dense, points [95% CI]",
                "held-out ppl [95% CI]"]].sort_values(["model", "cut", "method"]).reset_index(drop=True)
display(ci_table)
(out / "table_intervals.md").write_text(ci_table.to_markdown(index=False))

verdict_rows = []
for (model, cut), v in sorted(paired.verdicts(cmp).items()):
    kl = paired.verdicts(cmp, "kl:ppl").get((model, cut), {})
    verdict_rows.append({"model": model, "cut": cut, "UTRC beats (mean acc)": ", ".join(v["beats"]) or "-",
                         "beaten by (mean acc)": ", ".join(v["beaten"]) or "-",
                         "unresolved (mean acc)": ", ".join(v["unresolved"]) or "-",
                         "UTRC beats (KL, ppl task)": ", ".join(kl.get("beats", [])) or "-",
                         "beaten by (KL)": ", ".join(kl.get("beaten", [])) or "-"})
verdict_table = pd.DataFrame(verdict_rows)
display(verdict_table)
(out / "table_significance.md").write_text(verdict_table.to_markdown(index=False))
c = cmp[cmp["metric"] == paired.AVG].copy()
c["UTRC minus baseline, points [95% CI]"] = [fmt_ci(r.delta, r.low, r.high) for r in c.itertuples()]
(out / "table_margins.md").write_text(c[["model", "cut", "baseline", "UTRC minus baseline, points [95% CI]", "p", "p_holm",
                                         "verdict"]].to_markdown(index=False, floatfmt=".3g"))

# %% [markdown]
# ## Accuracy and perplexity against the token-layer cut (95% intervals)

# %%
panels = [paired.AVG] + [t for t in paired.accuracy_tasks(tasks) if t in set(acc["metric"])] + (["ppl"] if "ppl" in tasks else [])
fig, axes = plt.subplots(len(model_names), len(panels), figsize=(3.1 * len(panels), 2.9 * len(model_names)), squeeze=False)
for r, name in enumerate(model_names):
    for c_, metric in enumerate(panels):
        ax = axes[r, c_]
        if metric == "ppl":
            t = ppl[(ppl["model"] == name) & (ppl["task"] == "ppl")]
            dn = t[t["method"] == "none"].iloc[0]
            plotting.interval_vs_cut(ax, t[t["method"] != "none"], "ppl", "ppl_low", "ppl_high", methods=methods, scale=1,
                                     dense=(dn.ppl, dn.ppl_low, dn.ppl_high), ylabel="held-out perplexity",
                                     title=f"{Path(name).name}: held-out ppl")
            continue
        t = acc[(acc["model"] == name) & (acc["metric"] == metric)]
        dn = t[t["method"] == "none"].iloc[0]
        plotting.interval_vs_cut(ax, t[t["method"] != "none"], "acc", "acc_low", "acc_high", methods=methods,
                                 dense=(dn.acc, dn.acc_low, dn.acc_high), ylabel="accuracy (%)",
                                 title=f"{Path(name).name}: {plotting.SHORT_LABELS.get(metric, metric + ' acc')}")
plotting.legend_below(fig, axes.ravel(), ncol=5)
plotting.annotate_source(fig, f"ours: tiny models, items per task {n_items}, leak-free evaluation; bars = 95% bootstrap CI "
                              f"({resamples} resamples, seed {seed}); device {', '.join(devices)}", top=True)
fig.tight_layout(rect=(0, 0.07, 1, 0.97)); save(fig, "accuracy_vs_flops"); plt.show()

# %% [markdown]
# ## Fidelity to the dense model: KL and log-likelihood change (95% intervals)
#
# Accuracy needs many items to separate methods; the continuous measures need far fewer. KL(dense || method)
# per scored token and the change in gold log-likelihood per token, at the positions the tasks score.

# %%
fid_tasks = [t for t in ("ppl", "cloze", "choice4") if t in tasks] or lm_eval_tasks[:3]
fig, axes = plt.subplots(len(model_names), 2 * len(fid_tasks), figsize=(3.0 * 2 * len(fid_tasks), 2.9 * len(model_names)), squeeze=False)
for r, name in enumerate(model_names):
    for j, t in enumerate(fid_tasks):
        for k, (measure, label, scale) in enumerate([("kl_per_token", "KL(dense || method) per token (nats)", 1.0),
                                                     ("delta_ll_per_token", "gold log-lik. change per token (nats)", 1.0)]):
            f = fid[(fid["model"] == name) & (fid["task"] == t) & (fid["measure"] == measure)]
            ax = axes[r, 2 * j + k]
            plotting.interval_vs_cut(ax, f, "estimate", "low", "high", methods=methods, scale=scale, ylabel=label,
                                     title=f"{Path(name).name}, {t}: {'KL' if k == 0 else 'delta ll'}")
            if k == 1:
                ax.axhline(0, color="black", lw=0.8, ls="--")
plotting.legend_below(fig, axes.ravel(), ncol=5)
plotting.annotate_source(fig, f"95% bootstrap CI over items ({resamples} resamples, seed {seed}); KL token-weighted", top=True)
fig.tight_layout(rect=(0, 0.07, 1, 0.97)); save(fig, "fidelity_vs_flops"); plt.show()

# %% [markdown]
# ## UTRC's margin over each baseline (95% intervals, Holm-corrected verdicts)

# %%
base = [m for m in methods if m != "utrc"]
fig, axes = plt.subplots(len(model_names), 2, figsize=(11, 3.2 * len(model_names)), squeeze=False)
for r, name in enumerate(model_names):
    d = cmp[cmp["model"] == name]
    plotting.margin_panel(axes[r, 0], d, paired.AVG, cuts=cuts, baselines=base, ylabel="UTRC minus baseline (points)",
                          title=f"{Path(name).name}: mean accuracy, UTRC minus baseline (labels: cut %)")
    plotting.margin_panel(axes[r, 1], d, f"kl:{paired.kl_task(tasks)}", cuts=cuts, baselines=base, scale=1.0,
                          ylabel="UTRC minus baseline (nats/token)",
                          title=f"{Path(name).name}: KL per token on the {paired.kl_task(tasks)} task (lower = closer to dense)")
plotting.legend_below(fig, axes.ravel(), ncol=3)
fig.tight_layout(rect=(0, 0.08, 1, 1)); save(fig, "utrc_margins"); plt.show()

# %% [markdown]
# ## What this sample size can resolve
#
# The smallest paired accuracy difference (UTRC vs a baseline) that the items of each task resolve at 95%,
# from the measured discordance (share of items on which the two methods disagree; median over baselines):
# `resolvable` at 50% power, `at_power` with 80% power.

# %%
pw = power.groupby(["model", "task"])[["n", "discordance", "resolvable", "at_power"]].median().reset_index()
display(pw)
(out / "table_power.md").write_text(pw.to_markdown(index=False, floatfmt=".3g"))

# %% [markdown]
# ## Beside the paper (their checkpoints, their benchmarks)
#
# Left: our mean accuracy (3 local tasks) per method. Right: the paper's mean of 6 lm-eval accuracies
# (Zhan et al. 2024, Tables 1-2) for UTRC, EViT and PuMer. Absolute values are not comparable (models 200-400x
# larger, different benchmarks, their scoring leaks the continuation); compare the drop from dense and
# the ordering.

# %%
paper = json.load(open(paper_results))
pdf = pd.DataFrame(paper["main"])
paper_methods = ["utrc", "evit", "pumer"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name, ls in zip(model_names, ["-", "--"]):
    d = df[df["model"] == name]
    dense = float(d[d["method"] == "none"]["avg_acc"].iloc[0])
    for m in [m for m in paper_methods if m in methods] or methods[:3]:
        e = d[d["method"] == m].sort_values("cut")
        st = plotting.style(m)
        axes[0].plot([0] + list(100 * e["cut"]), [100 * dense] + list(100 * e["avg_acc"]), ls=ls, color=st["color"],
                     marker=st["marker"], label=f"{st['label']} - {Path(name).name}")
axes[0].set_title("OURS: tiny models, 3 local tasks (leak-free)")
for pm, ls in zip(["Mamba-2-2.7B", "Mamba-2.8B"], ["-", "--"]):
    for m in paper_methods:
        e = pdf[(pdf["model"] == pm) & (pdf["method"].isin([m, "dense"]))].sort_values("cut")
        st = plotting.style(m)
        axes[1].plot(100 * e["cut"], e["avg"], ls=ls, color=st["color"], marker=st["marker"], label=f"{st['label']} - {pm}")
axes[1].set_title("THEIRS (paper, Tables 1-2): 2.7-2.8B checkpoints, 6 lm-eval tasks")
for ax in axes:
    ax.set_xlabel(plotting.TOKEN_LAYER_CUT_LABEL); ax.set_ylabel("mean accuracy (%)"); ax.legend(fontsize=6.5)
plotting.annotate_source(fig, "paper numbers: Zhan et al., EMNLP 2024 (their code: non-causal merges, unprotected scoring)")
fig.tight_layout(); save(fig, "ours_vs_paper"); plt.show()

# %%
keep = [c for c in df.columns if not c.startswith("meta/") or c in ("meta/protect",)]
ctx.write_results(data={"rows": df[keep], "avg_acc_tasks": ACC, "paper": paper["main"],
                        "paper_source": paper["source"], "items_per_task": n_items, "devices": devices,
                        "accuracy": acc, "perplexity": ppl, "fidelity": fid, "comparisons": cmp, "power": power,
                        "intervals": {"level": 0.95, "resamples": resamples, "seed": seed, "method":
                                      "percentile bootstrap over items (paired; stratified by task for avg_acc); "
                                      "McNemar exact per task; Holm over baselines"}},
                  errors=analysis.sweep_errors(res), protected=bool(df["protect"].all()))

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
# Accuracy on every local task and perplexity, for UTRC and the baselines (UTRC as the authors' released
# code does it (`utrc_reference`), EViT, PuMer, ToMe, prune-only, merge-only, random drop) at the
# token-layer cuts of `cuts` (the paper's FLOPs definition,
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
# accuracy and for KL. The Holm correction covers the family the margins figure shows (mean accuracy and
# KL, every model, cut and baseline); the per-task comparisons in results.json are a second family.
# Every number the text below quotes is rendered from these tables (`utrc_study.report.prose`).

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False                          # tiny sizes for tests
model_names: list = ["tiny-mamba2", "tiny-mamba"]  # embedded names, checkpoint paths or hub ids ("state-spaces/mamba2-2.7b")
methods: list = ["utrc", "utrc_reference", "evit", "pumer", "tome", "prune_only", "merge_only", "random"]
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
from IPython.display import Markdown, display

from utrc_study.experiments import analysis, paired, sweep
from utrc_study.report import evidence as rows, main_results as mr, prose
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
stat = dict(resamples=resamples, seed=seed)
acc, ppl, fid = paired.accuracy_table(res, **stat), paired.perplexity_table(res, **stat), paired.fidelity_table(res, **stat)
baselines = [m for m in methods if m != "utrc"]
# one Holm family = what the margins figure shows (both measures, every model, cut, baseline); per-task: another
cmp = paired.comparison_table(res, baselines=baselines, metrics=mr.figure_metrics(tasks), holm_over=(), **stat)
cmp_tasks = paired.comparison_table(res, baselines=baselines, metrics=mr.task_metrics(tasks), holm_over=(), **stat)
power = paired.power_table(res)
n_items = {t: int(df[f"{t}/n"].iloc[0]) for t in tasks if f"{t}/n" in df}
print("items per task:", n_items, "| rows computed on:", devices)

# %% [markdown]
# ## Table: every task, every method, every cut (Tables 1-2 analog)

# %%
table, formats = mr.main_table(df, ACC)
display(table.style.format(formats))
(out / "table_main.md").write_text(table.to_markdown(index=False, floatfmt=".4g"))

# %% [markdown]
# ## Intervals: mean accuracy and perplexity with 95% intervals, and UTRC against each baseline
#
# Mean accuracy (3 tasks) with its stratified bootstrap interval, the paired change from dense, and the
# held-out perplexity with its interval. Then, for every model and cut, UTRC minus each baseline:
# `beats` / `beaten` where the Holm-corrected test says so at 5%, `unresolved` otherwise. The summary
# under the tables is rendered from them.

# %%
ci_table = mr.interval_table(acc, ppl)
display(ci_table)
(out / "table_intervals.md").write_text(ci_table.to_markdown(index=False))
verdict_table = mr.verdict_table(cmp, mr.figure_metrics(tasks)[1])
display(verdict_table)
(out / "table_significance.md").write_text(f"Holm over {paired.holm_family(cmp)}\n\n" + verdict_table.to_markdown(index=False))
(out / "table_margins.md").write_text(mr.margins_markdown(cmp))
summary = prose.margin_summary(cmp)
display(Markdown(summary))

# %% [markdown]
# ## Accuracy and perplexity against the token-layer cut (95% intervals)

# %%
note = mr.plot_note(n_items, resamples, seed, devices)
fig = mr.accuracy_figure(acc, ppl, model_names=model_names, methods=methods, tasks=tasks, note=note)
save(fig, "accuracy_vs_flops"); plt.show()

# %% [markdown]
# ## Fidelity to the dense model: KL and log-likelihood change (95% intervals)
#
# Accuracy needs many items to separate methods; the continuous measures need far fewer. KL(dense || method)
# per scored token and the change in gold log-likelihood per token, at the positions the tasks score.

# %%
fig = mr.fidelity_figure(fid, model_names=model_names, methods=methods, tasks=tasks,
                         note=f"95% bootstrap CI over items ({resamples} resamples, seed {seed}); KL token-weighted")
save(fig, "fidelity_vs_flops"); plt.show()

# %% [markdown]
# ## UTRC's margin over each baseline (unadjusted 95% intervals, Holm-corrected verdicts)
#
# The colours are the Holm-corrected verdicts over every comparison in the figure; the bars are
# unadjusted 95% intervals (the axes say so), so a bar may exclude zero where the corrected test does not.

# %%
fig = mr.margins_figure(cmp, model_names=model_names, cuts=cuts, baselines=baselines, tasks=tasks)
save(fig, "utrc_margins"); plt.show()

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
# ## Beside the paper: whose numbers are whose
#
# Left: OUR numbers, our implementation on our models (mean accuracy of 3 local tasks, leak-free, 95%
# intervals), including UTRC as the authors' released code does it. Right: THE PAPER'S published numbers
# (Zhan et al. 2024, Tables 1-2: mean of 6 lm-eval accuracies, their code, their checkpoints; no
# intervals published). The models, tasks and scoring differ, so absolute values are not comparable:
# compare the drop from dense and the ordering. The sizes are rendered below.

# %%
paper = json.load(open(paper_results))
sizes = mr.model_parameters(model_names)
fig = mr.paper_figure(acc, paper["main"], model_names=model_names, methods=methods, sizes=sizes)
save(fig, "ours_vs_paper"); plt.show()
scale_note = prose.paper_scale(sizes, mr.PAPER_MODELS)
display(Markdown(scale_note))

# %%
keep = [c for c in df.columns if not c.startswith("meta/") or c in ("meta/protect",)]
ctx.write_results(data={"rows": df[keep], "avg_acc_tasks": ACC, "paper": paper["main"],
                        "paper_source": paper["source"], "items_per_task": n_items, "devices": devices,
                        "model_parameters": sizes, "accuracy": acc, "perplexity": ppl, "fidelity": fid,
                        "comparisons": cmp, "task_comparisons": cmp_tasks, "power": power,
                        "text": {"margin_summary": summary, "paper_scale": scale_note},
                        "intervals": {"level": 0.95, "resamples": resamples, "seed": seed, "method":
                                      "percentile bootstrap over items (paired; stratified by task for avg_acc); "
                                      f"McNemar exact per task; Holm over {paired.holm_family(cmp)} "
                                      f"({', '.join(mr.figure_metrics(tasks))}: the margins figure), separately over "
                                      f"{paired.holm_family(cmp_tasks)} ({', '.join(mr.task_metrics(tasks))}); bootstrap p below 1/resamples: < 1/resamples"}},
                  computed_on=rows.computed_on(res), errors=analysis.sweep_errors(res),
                  protected=bool(df["protect"].all()))

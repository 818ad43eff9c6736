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
# # 09 SSM-native baselines: training-free token reduction for Mamba language models, side by side (issue 31)
#
# The methods that come from the state-space-model literature (`docs/ssm_methods.md`: what each source says,
# what we changed for a causal LM, how faithful each name is) beside UTRC, on 01's grid: both tiny models,
# token-layer cuts 10 / 20 / 30% (the paper's FLOPs definition, the x-axis of every figure), the four
# local tasks, leak-free scoring (the scored continuation is protected and scored by original position):
#
# * `decimamba`: DeciMamba's Delta-norm score and budget, cut at the anchor (`form: "anchor"`);
# * `hattn_prune`: pruning by a hidden-attention score (ours; the matrix is the published one);
# * `mtr_style`: an MTR-like keep / target / source merge (an approximation from a secondary summary);
# * `adjacent_merge`: merging adjacent pairs (ours, STM-inspired);
# * `topvim`: ToP-ViM's released schedule, a preset (prune-only with the clipped score at its anchors), not a method.
#
# Every method runs at the same token-layer cut through the same schedule machinery, so the rows are
# cut-matched; what differs is the score, the action and, for the preset, the anchors. The per-item rows are
# committed evidence (`figures/09_ssm_methods/evidence`, computed on a GPU by `scripts/gpu_evidence.py`);
# the dense and UTRC rows are 01's (`figures/01_main_results/evidence`, read there, not recomputed). Until
# the GPU evidence exists, `make figures` renders a CPU pilot (fewer items, every configuration) into
# `figures/09_ssm_methods/cpu_pilot/`, labelled as such in every figure title and in its results.json.
# Statistics: paired over items (`utrc_study.experiments.paired`): stratified bootstrap for the mean
# accuracy, paired bootstrap for KL, McNemar per task (results.json); against dense and against UTRC. The
# margins against UTRC form one Holm family (both measures, every model, cut and method: what the margins
# figure shows) and carry family-corrected (Bonferroni) intervals beside the unadjusted ones. The text is
# rendered from these numbers (`utrc_study.report.ssm_methods`).

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False                          # tiny sizes for tests
model_names: list = ["tiny-mamba2", "tiny-mamba"]  # embedded names, checkpoint paths or hub ids
methods: list = ["utrc", "decimamba", "hattn_prune", "mtr_style", "adjacent_merge", "topvim"]  # "topvim": ToP-ViM's schedule (a preset)
cuts: list = [0.1, 0.2, 0.3]                 # token-layer cuts (paper's FLOPs definition)
tasks: list = ["cloze", "choice4", "choice2", "ppl"]  # built-in tasks (01's)
limit: int = 20                              # items per task (None: all); `make figures` passes the evidence's size
batch_size: int = 16                         # evaluation batch (results do not depend on it)
evidence: str = "../figures/09_ssm_methods/evidence"   # committed rows of the SSM-native methods (scripts/gpu_evidence.py); "": compute all
shared_evidence: str = "../figures/01_main_results/evidence"   # 01's rows: dense and UTRC are read there, not recomputed
bench: str = "../figures/03_efficiency/gpu_bench.json"   # GPU ms per anchor, where a bench recorded the methods
fate_cut: float = 0.3                        # the cut of the token-fate picture
fate_tokens: int = 40                        # tokens of the first ppl passage drawn there
seed: int = 0
resamples: int = 10000                       # bootstrap resamples of every interval (seed = `seed`)
out_dir: str = ""                            # empty: scratch .cache/notebooks/<name> (quick: a temp folder); `make figures` passes figures/<name>
cache_dir: str = "../.cache/sweeps"          # resumable sweep cache (shared by the notebooks)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from utrc_study.eval.suite import load_task
from utrc_study.experiments import analysis, paired, sweep
from utrc_study.report import evidence as ev, main_results as mr, ssm_methods as ssm
from utrc_study.report.notebooks import setup

ctx = setup("09_ssm_methods", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:
    methods, cuts, limit, resamples, evidence, shared_evidence = ["utrc", "decimamba", "topvim"], cuts[1:2], \
        min(limit or 6, 6), min(resamples, 300), "", ""   # 01's quick size: its dense and UTRC rows are reused
    fate_tokens = min(fate_tokens, 24)
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
sweep.check_tasks(tasks)
common = dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size)
res = ev.run(sweep.evaluate_config, ssm.grid(model_names, methods, cuts), Path(cache_dir) / "eval.jsonl",
             evidence=[evidence, shared_evidence], common=common, desc="09 SSM methods")
res = ssm.labelled(res, ssm.preset_labels(model_names, methods, cuts, common))   # "topvim" rows by name
print(res.report())
src = ssm.source(evidence, shared_evidence, limit)   # on every figure and in results.json
df = analysis.with_avg_acc(res.frame())
stat = dict(resamples=resamples, seed=seed)
acc, ppl, fid = paired.accuracy_table(res, **stat), paired.perplexity_table(res, **stat), paired.fidelity_table(res, **stat)
others = [m for m in methods if m != "utrc"]
cmp = ssm.comparisons(res, baselines=others, metrics=mr.FIGURE_METRICS, **stat)   # one Holm family: the figure
cmp_tasks = paired.comparison_table(res, baselines=others, metrics=mr.TASK_METRICS, holm_over=(), **stat)
best = ssm.best_per_cell(res, methods, mr.FIGURE_METRICS, **stat)
n_items = {t: int(df[f"{t}/n"].iloc[0]) for t in tasks if f"{t}/n" in df}
print(f"{src}; items per task {n_items}")

# %% [markdown]
# ## Every method, every cut: the table, and the change from dense with 95% intervals

# %%
table, formats = mr.main_table(df)
display(table.style.format(formats))
(out / "table_main.md").write_text(f"{src}\n\n" + table.to_markdown(index=False, floatfmt=".4g"))
ci_table = mr.interval_table(acc, ppl)
display(ci_table)
(out / "table_intervals.md").write_text(f"{src}\n\n" + ci_table.to_markdown(index=False))

# %% [markdown]
# ## Accuracy and KL to dense against the cut
#
# Mean accuracy of the three accuracy tasks (stratified bootstrap) and KL(dense || method) per scored
# token on the held-out ppl task (token-weighted), 95% intervals over items.

# %%
fig = ssm.accuracy_kl_figure(acc, fid, model_names=model_names, methods=methods, src=src)
save(fig, "accuracy_kl_vs_cut"); plt.show()

# %% [markdown]
# ## UTRC against each SSM-native method
#
# UTRC minus each method on mean accuracy (above 0: UTRC better) and on KL (below 0: UTRC closer to
# dense). Thick bars are unadjusted 95% intervals, thin bars the intervals corrected over every
# comparison the figure shows; the colour is the Holm-corrected verdict over the same family.

# %%
fig = ssm.margins_figure(cmp, model_names=model_names, cuts=cuts, baselines=others, src=src)
save(fig, "margins_vs_utrc"); plt.show()
(out / "table_margins.md").write_text(ssm.margins_markdown(cmp, src))
verdict_table = mr.verdict_table(cmp)
display(verdict_table)
(out / "table_significance.md").write_text(f"{src}; Holm over {paired.holm_family(cmp)}\n\n"
                                           + verdict_table.to_markdown(index=False))

# %% [markdown]
# ## Which method is best, per model and cut, and where it is unresolved

# %%
summary = ssm.findings(best, cmp, src=src)
display(Markdown(summary))

# %% [markdown]
# ## What does it cost, what does it keep
#
# Cost: the reduction's own work per anchor (score, similarity, merge or gather), measured GPU
# milliseconds where a bench recorded every method, else the analytic count of `utrc_lib.core.flops`
# (which the figure and the text say). Kept: the paired change of mean accuracy from dense.

# %%
cost = ssm.scoring_cost(model_names, methods, cuts)
gpu = ssm.gpu_ms_per_anchor(bench, methods)
fig = ssm.cost_keep_figure(cost, acc, gpu, model_names=model_names, methods=methods, src=src)
save(fig, "cost_and_keep"); plt.show()
cost_note = ssm.cost_text(cost, gpu, methods)
display(Markdown(cost_note))

# %% [markdown]
# ## Token fates on one text
#
# The first ppl passage (its first `fate_tokens` tokens, nothing protected): per method, which tokens its
# first anchor keeps, prunes or merges; tokens removed at a later anchor are grey with their layer.

# %%
text = load_task("ppl", 1)[0]["context"]
fates = {}
for name in model_names:
    model, tokenizer = sweep.get_model(name)
    fates[name] = ssm.first_anchor_fates(model, tokenizer, text, methods, fate_cut, model_name=name,
                                         max_tokens=fate_tokens, seed=seed)
fig = ssm.fates_figure(fates, cut=fate_cut, src=src)
save(fig, "token_fates"); plt.show()
for name, fa in fates.items():
    print(name, {m: v["counts"] for m, v in fa["methods"].items()})

# %%
keep = [c for c in df.columns if not c.startswith("meta/") or c in ("meta/protect",)]
ctx.write_results(data={"source": src, "rows": df[keep], "items_per_task": n_items, "accuracy": acc,
                        "perplexity": ppl, "fidelity": fid, "comparisons": cmp, "task_comparisons": cmp_tasks,
                        "best": best, "cost": cost, "gpu_ms_per_anchor": gpu, "token_fates": fates,
                        "presets": {m: ssm.fields(m, model_names[0]) for m in methods if m in ssm.presets()},
                        "text": {"findings": summary, "cost": cost_note},
                        "intervals": {"level": 0.95, "resamples": resamples, "seed": seed, "method":
                                      "percentile bootstrap over items (paired; stratified by task for avg_acc); "
                                      f"Holm over {paired.holm_family(cmp)} ({', '.join(mr.FIGURE_METRICS)}: the margins "
                                      "figure), family-corrected intervals: Bonferroni 1 - 0.05/m from the same draws; "
                                      f"per task: Holm over {paired.holm_family(cmp_tasks)}; best method per cell: Holm "
                                      "over the cell's comparisons"}},
                  computed_on=ev.computed_on(res), errors=analysis.sweep_errors(res),
                  protected=bool(df["protect"].all()))

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
# # 02 Design choices (analog of the paper's Tables 3-5)
#
# UTRC at a fixed token-layer cut (the paper's FLOPs definition), varying one design choice at a time:
#
# * importance metric: clip (paper), unclipped sum, l1, l2, the timescale Delta (MTR / DeciMamba) and seeded random scores;
# * reduction location: four anchors every 2 layers starting after layer 1, 2, 3 or 4 (12-layer models);
# * hidden-branch rule: hybrid with q = fraction of matched edges pruned (0 = merge only, 1 = prune only);
#   residual-branch rule: merge (paper), prune, hybrid;
# * matching: UTRC's importance split against ToMe's alternate split, each with UTRC's hybrid hidden rule
#   (`utrc`, `utrc_alternate`) and with merging on both branches (`merge_only`, `tome`);
# * the three UTRC modes: the paper's text with non-causal merges, the authors' released behaviour
#   (`utrc_reference`, non-causal) and our causal variant, each scored with and without protection of the
#   scored continuation: how much of each method's score survives a leak-free evaluation.

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False
model_names: list = ["tiny-mamba2"]          # embedded names, checkpoint paths or hub ids ("state-spaces/mamba2-2.7b")
cut: float = 0.2                             # token-layer cut of the metric / location / modes sweeps (paper: 20%)
branch_cut: float = 0.3                      # token-layer cut of the branch-rule sweep (paper: 30%)
metrics: list = ["clip", "sum", "l1", "l2", "delta", "random"]
starts: list = [1, 2, 3, 4]                  # first reduction layer; anchors start, start+2, +4, +6
qs: list = [0.0, 0.25, 0.5, 0.75, 1.0]       # hidden-branch prune fraction (residual: merge)
residual_rules: list = ["merge", "prune", "hybrid"]   # with hidden hybrid(0.5)
matching: list = ["utrc", "utrc_alternate", "merge_only", "tome"]   # split (importance / alternate) x hidden rule (hybrid / merge)
tasks: list = ["cloze", "choice4", "choice2", "ppl"]  # built-in tasks and / or lm-eval task names ("lambada_openai", ...: run through lm-eval)
limit: int = 15                              # items per task (None: all); `make figures` passes None when the committed evidence holds every item
batch_size: int = 16
evidence: str = "../figures/02_design_choices/evidence"   # committed per-item rows (scripts/gpu_evidence.py); "": compute all
seed: int = 0
resamples: int = 10000                       # bootstrap resamples of every interval (seed = `seed`)
out_dir: str = ""                        # empty: scratch .cache/notebooks/<name> (quick: a temp folder); `make figures` passes figures/<name>
cache_dir: str = "../.cache/sweeps"

# %%
from pathlib import Path
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import pandas as pd

from utrc_study.experiments import analysis, paired, sweep
from utrc_study.report import evidence as rows, plotting, prose
from utrc_study.report.notebooks import setup

ctx = setup("02_design_choices", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:
    metrics, starts, qs, residual_rules, limit = metrics[:2], starts[:2], [0.0, 1.0], residual_rules[:2], min(limit or 4, 4)
    matching = matching[:2]
    resamples = min(resamples, 300)
    tasks = [t for t in tasks if t in ("cloze", "choice2")] or tasks  # the two cheapest tasks
    evidence = ""
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
builtin_tasks, lm_eval_tasks = sweep.check_tasks(tasks)   # lm-eval names go through lm-eval (per-sample log); unknown names fail here
ACC = analysis.acc_metrics(tasks)
KL = paired.kl_task(tasks)   # the task of the KL panels: "ppl" (built-in), else utrc_ppl / lambada_openai / the first lm-eval task
common = dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size)
groups = rows.design_groups(model_names, cut, branch_cut, metrics, starts, qs, residual_rules, matching)  # with fingerprints
frames, results = {}, {}
for g, cfgs in groups.items():
    r = rows.run(sweep.evaluate_config, cfgs, Path(cache_dir) / "eval.jsonl", evidence=evidence,
                 desc=f"02 {g}", common=common)
    print(g, "-", r.report())
    f = analysis.with_avg_acc(r.frame(errors=True), stderr=True)
    # each bar's own 95% interval (bootstrap over items; mean accuracy stratified by task) and KL on the ppl task
    frames[g] = pd.concat([f, paired.interval_columns(r, resamples=resamples, seed=seed, kl_task=KL)], axis=1)
    results[g] = r
devices = sorted({str(v) for fr in frames.values() for v in fr.get("meta/device", pd.Series(dtype=str)).dropna()})

# %% [markdown]
# Every bar axis starts at zero and every bar carries the 95% bootstrap interval of its mean accuracy
# (items resampled within each task). Below the bars: KL(dense || setting) per token on the held-out
# windows, which separates settings with far fewer items than accuracy does; and, per sweep, the paired
# test of the paper's choice against each alternative.

# %%
panel = dict(dense=frames["dense"], model_names=model_names)
fig, axes = plt.subplots(2, 3, figsize=(16, 7))
plotting.bar_panel(axes[0, 0], frames["metric"], "metric", str, f"Importance metric (UTRC, {cut:.0%} cut)", "clip", **panel)
plotting.bar_panel(axes[0, 1], frames["location"], "layers", lambda l: f"start {l[0]}\n{tuple(l)}",
                   f"Reduction location (UTRC, {cut:.0%} cut)", None, **panel)
plotting.bar_panel(axes[1, 0], frames["hidden_q"], "hidden_rule", lambda r: "q=" + r[7:-1],
                   f"Hidden branch: prune fraction q (residual merge, {branch_cut:.0%} cut)", "hybrid(0.5)", **panel)
plotting.bar_panel(axes[1, 1], frames["residual_rule"], "residual_rule", str,
                   f"Residual branch rule (hidden hybrid q=0.5, {branch_cut:.0%} cut)", "merge", **panel)
plotting.bar_panel(axes[0, 2], frames["matching"], "method", lambda m: plotting.SPLIT_RULE_LABELS.get(m, m),
                   f"Split x hidden rule ({cut:.0%} cut)", "utrc", **panel)
axes[1, 2].axis("off"); axes[0, 0].legend(fontsize=7)
plotting.annotate_source(fig, f"orange = the paper's choice; {limit or 'all'} items per task, leak-free evaluation; "
                              f"error bars = 95% bootstrap CI ({resamples} resamples); cuts are token-layer cuts; device {', '.join(devices)}")
fig.tight_layout(); save(fig, "design_choices"); plt.show()

# %%
SWEEPS = [("metric", "metric", str, f"Importance metric ({cut:.0%} cut)", "clip"),
          ("location", "layers", lambda l: f"start {l[0]}", f"Reduction location ({cut:.0%} cut)", None),
          ("hidden_q", "hidden_rule", lambda r: "q=" + r[7:-1], f"Hidden branch q ({branch_cut:.0%} cut)", "hybrid(0.5)"),
          ("residual_rule", "residual_rule", str, f"Residual rule ({branch_cut:.0%} cut)", "merge"),
          ("matching", "method", lambda m: plotting.SPLIT_RULE_LABELS.get(m, m), f"Split x hidden rule ({cut:.0%} cut)", "utrc")]
fig, axes = plt.subplots(1, len(SWEEPS), figsize=(16, 3.4))
for ax, (g, x, lab, title, hl) in zip(axes, SWEEPS):
    f = frames[g][frames[g]["model"] == model_names[0]]
    vals = f[f"kl/{KL}"].to_numpy(dtype=float)
    err = [vals - f[f"kl/{KL}_low"].to_numpy(dtype=float), f[f"kl/{KL}_high"].to_numpy(dtype=float) - vals]
    ax.bar(range(len(f)), vals, yerr=err, capsize=2, color=["#D55E00" if v == hl else "#888888" for v in f[x]],
           edgecolor="black", error_kw=dict(elinewidth=0.8))
    ax.set_xticks(range(len(f)), [lab(v) for v in f[x]], fontsize=7)
    ax.set_title(title, fontsize=8); ax.set_ylim(0, None)
axes[0].set_ylabel(f"KL(dense || setting) per token, {KL} task (nats)")
plotting.annotate_source(fig, f"{Path(model_names[0]).name}; 95% bootstrap CI over windows; orange = the paper's choice", top=True)
fig.tight_layout(rect=(0, 0, 1, 0.95)); save(fig, "design_choices_kl"); plt.show()

# %%
# the paper's choice against each alternative of its sweep: mean accuracy and KL, paired (Holm over the alternatives)
choice_tests = []
for g, x, lab, title, hl in SWEEPS:
    if hl is None:
        continue
    for metric in (paired.AVG, f"kl:{KL}"):
        cmp = paired.comparison_table(results[g], reference=str(hl), baselines=[str(v) for v in frames[g][x] if v != hl],
                                      metrics=[metric], by=x, resamples=resamples, seed=seed)
        for rec in cmp.to_dict("records"):
            choice_tests.append({"sweep": g, **rec})
choice_tests = pd.DataFrame(choice_tests)
if len(choice_tests):
    display(choice_tests[["sweep", "metric", "reference", "baseline", "delta", "low", "high", "p_holm", "verdict"]])
    display(Markdown(prose.design_findings(choice_tests)))
    (out / "table_choice_tests.md").write_text(choice_tests[["sweep", "metric", "reference", "baseline", "delta", "low",
                                                            "high", "p_holm", "verdict"]].to_markdown(index=False, floatfmt=".3g"))

# %% [markdown]
# ## Three UTRC modes, with and without protection of the scored continuation
#
# Unprotected = the reduction may drop or merge the very positions whose logits are scored, and (non-causal
# modes) earlier positions may see later tokens: a leak that can inflate accuracy. Protected = our
# leak-free evaluation. "Survives" = protected score / unprotected score.

# %%
mt = analysis.modes_table(frames["modes"], frames["dense"])   # rows labelled by mode, + protected dense
modes = analysis.UTRC_MODES
show = [c for c in ["avg_acc"] + ACC + ["ppl/ppl"] if c in mt]
fig, axes = plt.subplots(1, len(show), figsize=(3.0 * len(show), 3.6))
for ax, metric in zip(axes, show):
    plotting.protection_bars(ax, mt[mt["model"] == model_names[0]], metric, modes,
                             ["dense", "causal\n(ours)", "non-causal", "authors'\ncode"])
axes[0].legend(fontsize=7)
fig.suptitle(f"UTRC modes at {cut:.0%} token-layer cut, {Path(model_names[0]).name}: scored with and without protecting the continuation")
fig.tight_layout(); save(fig, "modes_protection"); plt.show()
piv = analysis.survival_table(mt)
display(piv)

# %%
data = {g: fr[[c for c in fr.columns if not c.startswith("meta/")]] for g, fr in frames.items()}
data["modes_table"] = mt[[c for c in ["model", "mode", "method", "causal", "protect", "avg_acc"] + ACC + ["ppl/ppl"] if c in mt]]
data["avg_acc_tasks"] = [c for c in ACC if c in mt]
data["survival"] = piv.reset_index()
data["choice_tests"] = choice_tests
data["findings"] = prose.design_findings(choice_tests)
data["devices"] = devices
data["intervals"] = {"level": 0.95, "resamples": resamples, "seed": seed,
                     "method": "percentile bootstrap over items (mean accuracy stratified by task); Holm over alternatives"}
errors = analysis.failed_rows(frames, ("model", "method", "cut", "metric", "layers", "hidden_rule",
                                        "residual_rule", "causal", "protect"))
ctx.write_results(data=data, errors=errors, protected="all groups except the unprotected rows of 'modes'",
                  computed_on=rows.computed_on(*results.values()))

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
# # 04 Do transformer token-reduction methods fail on SSMs? (a test of the paper's Figure 1)
#
# The paper's Figure 1 argues that token-reduction methods designed for transformers (EViT, PuMer,
# ToMe) fail on state space models: in an SSM a removed token is also removed from every later token's
# recurrent state, so the error grows with depth, and UTRC is presented as the fix. This notebook asks
# two questions of our tiny models:
#
# * Left: how much of the dense model's mean accuracy does each method keep, against the token-layer
#   cut (the paper's FLOPs definition)?
# * Right: after one single reduction (after layer `error_layer`, same keep ratio for every method, plus
#   random drop as a control), how does the relative L2 error of the residual stream against the dense
#   model (at the kept tokens' original positions) evolve over the later layers, and which method has
#   the smallest error?
#
# The findings under the figure are rendered from this run's numbers (`utrc_study.report.prose`), with
# 95% bootstrap intervals over the passages: the text follows whatever the numbers say.

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False
model_names: list = ["tiny-mamba2", "tiny-mamba"]
methods: list = ["utrc", "evit", "pumer", "tome"]
cuts: list = [0.1, 0.2, 0.3]                 # shares the cached rows of 01_main_results
tasks: list = ["cloze", "choice4", "choice2", "ppl"]
limit: int = 20                              # same as 01_main_results: its cached rows are reused (None: all items)
batch_size: int = 16
evidence: str = "../figures/01_main_results/evidence"   # 01's committed per-item rows (04's configurations are 01's); "": compute
protocol_methods: list = ["utrc", "utrc_reference", "evit", "pumer", "tome", "prune_only", "merge_only"]  # scored under both protocols
protocol_evidence: str = "../figures/04_failure_of_transformer_methods/evidence"   # the authors'-protocol rows (scripts/gpu_evidence.py)
error_layer: int = 2                         # the single reduction happens after this layer
error_keep_ratio: float = 0.6                # tokens kept at that reduction
error_texts: int = 200                       # passages (ppl task contexts, 192 tokens) for the error curves (200: all)
seed: int = 0
resamples: int = 10000                       # bootstrap resamples of the accuracy intervals
out_dir: str = ""                        # empty: scratch .cache/notebooks/<name> (quick: a temp folder); `make figures` passes figures/<name>
cache_dir: str = "../.cache/sweeps"

# %%
from pathlib import Path
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from utrc_study.experiments import analysis, paired, sweep
from utrc_study.report import evidence as rows, plotting, prose
from utrc_study.report.notebooks import setup

ctx = setup("04_failure_of_transformer_methods", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:
    methods, cuts, limit, error_texts, resamples = methods[:2], cuts[1:2], min(limit or 6, 6), 2, min(resamples, 300)
    evidence = ""
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
configs = analysis.method_grid(model_names, methods, cuts)   # dense + every method at every cut (01's rows)
res = rows.run(sweep.evaluate_config, configs, Path(cache_dir) / "eval.jsonl", evidence=evidence, desc="04 accuracy",
               common=dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size))
print(res.report())
df = analysis.with_avg_acc(res.frame())
acc = paired.accuracy_table(res, resamples=resamples, seed=seed)
avg = acc[(acc["metric"] == paired.AVG) & (acc["method"] != "none")]
devices = sorted({str(v) for v in df.get("meta/device", pd.Series(["?"])).dropna()})
dense = df[df["method"] == "none"].set_index("model")["avg_acc"]
df["relative_acc"] = df["avg_acc"] / df["model"].map(dense)

# %% [markdown]
# ## The authors' protocol beside ours
#
# The paper's collapse of EViT and PuMer could come from SSMs or from how the released code scores:
# unprotected continuations, non-causal merges, one ratio for the whole batch, their EViT, and a "PuMer"
# that is ToMe (`utrc_study.eval.protocol`). The same methods, cuts and items under both protocols:
# UTRC's margin over each baseline under each, and how much of each method's loss the protocol alone
# explains. The authors'-protocol rows are committed evidence of their own (`protocol_evidence`).
# One mechanism to keep in mind when reading them: the authors' UTRC (`utrc_reference`) takes its sources
# from the even positions at the start of the segment and folds them into position 1, so it never touches
# the scored tail, and unprotected scoring cannot hurt it; methods that may reduce anywhere can lose the
# continuation's own rows under that protocol.

# %%
from utrc_study.report import protocols
proto = None
if quick or not evidence or rows.exists(protocol_evidence):
    pm = protocol_methods[:2] if quick else protocol_methods
    common = dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size)
    res_lf = rows.run(sweep.evaluate_config, analysis.method_grid(model_names, pm, cuts), Path(cache_dir) / "eval.jsonl",
                      evidence=evidence, desc="04 leak-free", common=common)
    au_grid, au_missing, coverage = protocols.authors_grid(   # full size: only what the GPU computed
        model_names, pm, cuts, evidence=protocol_evidence, common=common, render_only=bool(evidence) and not quick)
    res_au = rows.run(sweep.evaluate_config, au_grid, Path(cache_dir) / "eval.jsonl",
                      evidence=protocol_evidence if evidence else "", desc="04 authors' protocol", common=common)
    both = protocols.combine(res_lf, res_au)
    proto = dict(drops=protocols.drops(both, resamples=resamples, seed=seed),
                 margins=protocols.margins(both, [m for m in pm if m != "utrc"], resamples=resamples, seed=seed),
                 cost=protocols.cost(both, pm, resamples=resamples, seed=seed))
    proto["explained"] = protocols.explained(proto["drops"])
    fig = protocols.figure(proto["drops"], pm, model_names, cuts, f"{limit or 'all'} items per task" + (
        f"; authors' protocol: {len(au_grid)} of {len(au_grid) + len(au_missing)} configurations" if au_missing else ""))
    save(fig, "protocols"); plt.show()
    proto["fallbacks"] = protocols.fallbacks(res_au)
    proto["missing"] = au_missing
    proto["findings"] = prose.protocol_findings(proto["margins"], proto["cost"], proto["explained"],
                                                proto["fallbacks"], coverage)
    display(Markdown(proto["findings"]))
    (out / "table_protocols.md").write_text(protocols.table_markdown(proto["margins"], proto["explained"]))
else:
    print(f"no authors'-protocol evidence at {protocol_evidence} (scripts/gpu_evidence.py computes it): the protocol "
          "comparison is not drawn")

# %%
from utrc_lib.core.config import ReductionConfig
errs, err_stats = [], {}
for name in model_names:
    model, tok = sweep.get_model(name)
    ids = analysis.passage_batch(tok, error_texts)   # (error_texts, n) ppl-task contexts cut to the shortest
    dense = analysis.dense_runs(model, ids, fast=True)   # one dense pass, shared by every method
    items = {m: analysis.layer_error_items(model, ids, ReductionConfig(method=m, layers=(error_layer,), keep_ratio=
                                           error_keep_ratio, seed=seed, causal=True), dense=dense, fast=True)
             for m in methods + ["random"]}
    err_stats[name] = analysis.error_statistics(items, error_layer, resamples=resamples, seed=seed)
    for m, st in err_stats[name]["methods"].items():
        errs.append(dict(model=name, method=m, layer=list(range(len(st["rel_error"]))), anchors=items[m]["anchors"],
                         tokens=items[m]["tokens"], texts=int(ids.shape[0]), kl_last=st["kl_last"]["estimate"],
                         **{k: st[k] for k in ("rel_error", "rel_low", "rel_high")}))
err = pd.DataFrame(errs)
display(err[["model", "method", "kl_last"]])

# %%
fig, axes = plt.subplots(1, 1 + len(model_names), figsize=(4.2 * (1 + len(model_names)), 3.8))
for k, (name, ls) in enumerate(zip(model_names, ["-", "--"])):
    for i, m in enumerate(methods):
        d = avg[(avg["model"] == name) & (avg["method"] == m)].sort_values("cut")
        st = plotting.style(m)
        xs = 100 * d["cut"].to_numpy() + 0.5 * (i - (len(methods) - 1) / 2) + 0.15 * k
        axes[0].errorbar(xs, 100 * d["delta"], yerr=[100 * (d["delta"] - d["delta_low"]), 100 * (d["delta_high"] - d["delta"])],
                         ls=ls, color=st["color"], marker=st["marker"], capsize=2, elinewidth=0.8, ms=4,
                         label=f"{st['label']} - {Path(name).name}")
axes[0].axhline(0, color="black", lw=0.8, ls=":")
axes[0].set_xlabel(plotting.TOKEN_LAYER_CUT_LABEL); axes[0].set_ylabel("mean accuracy minus dense (points)")
axes[0].set_title(f"Accuracy change vs token-layer cut (leak-free, {limit or 'all'} items per task, 95% CI)", fontsize=8)
axes[0].legend(fontsize=6.5)
for ax, name in zip(axes[1:], model_names):
    for m in methods + ["random"]:
        r = err[(err["model"] == name) & (err["method"] == m)].iloc[0]
        st = plotting.style(m)
        ax.plot(r["layer"], r["rel_error"], color=st["color"], marker=st["marker"], label=st["label"], ms=4)
        ax.fill_between(r["layer"], r["rel_low"], r["rel_high"], color=st["color"], alpha=0.18, lw=0)
    ax.axvline(error_layer, color="black", lw=0.8, ls=":")
    ax.set_ylim(bottom=0); ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("relative L2 error of the residual stream")
    ax.set_title(f"{Path(name).name}: one reduction after layer {error_layer}\n(keep {error_keep_ratio:.0%} of tokens; "
                 f"{error_texts} passages, 95% CI band)", fontsize=8.5)
    ax.legend(fontsize=7)
fig.tight_layout(); save(fig, "failure_of_transformer_methods"); plt.show()

# %% [markdown]
# ## What the figure shows (rendered from this run's numbers)
#
# The relative error measures how far the residual stream moves at the kept tokens' original positions,
# not how much the prediction suffers: a merged token differs from the dense token at its position at
# once, a pruned one does not. The next-token KL at the last position, and 01's KL on the scored
# positions of the ppl task (the accuracy panel's rows), measure the prediction. The cell prints which
# method ranks where on each, with intervals, and whether that agrees with the paper's Figure 1.

# %%
cmp = paired.comparison_table(res, baselines=[m for m in methods if m != "utrc"], metrics=[paired.AVG, "kl:ppl"],
                              holm_over=(), resamples=resamples, seed=seed)
findings = prose.failure_findings(err_stats, error_layer=error_layer, texts=error_texts, kl_cmp=cmp,
                                  resamples=resamples)
display(Markdown(findings))
ranking = {name: {"order_small_to_large": sorted(e["methods"], key=lambda m: e["methods"][m]["final"]["estimate"])}
           for name, e in err_stats.items()}
for r in ranking.values():
    r.update(smallest_final_error=r["order_small_to_large"][0], largest_final_error=r["order_small_to_large"][-1])

# %% [markdown]
# Per model and cut: which methods lose significantly against dense, and how UTRC compares with the
# other methods (Holm over every comparison printed), so the verdict on "transformer methods fail on
# SSMs" is read from the tests, not from the heights.

# %%
for (name, c), v in sorted(paired.verdicts(cmp).items()):
    lost = [m for m in methods if ((avg["model"] == name) & (avg["method"] == m) & (avg["cut"] == c)
                                   & (avg["p_vs_dense"] < 0.05) & (avg["delta"] < 0)).any()]
    kl = paired.verdicts(cmp, "kl:ppl").get((name, c), {})
    print(f"{Path(name).name} at {c:.0%}: below dense (p<0.05): {', '.join(lost) or 'none'}; UTRC beats on accuracy: "
          f"{', '.join(v['beats']) or 'none'}, beaten by: {', '.join(v['beaten']) or 'none'}, unresolved: "
          f"{', '.join(v['unresolved']) or 'none'}; on KL beats: {', '.join(kl.get('beats', [])) or 'none'}, "
          f"beaten by: {', '.join(kl.get('beaten', [])) or 'none'}")

# %%
keep = [c for c in df.columns if not c.startswith("meta/") or c == "meta/protect"]
ctx.write_results(data={"accuracy": df[keep], "layer_errors": err, "error_ranking": ranking,
                        "error_statistics": err_stats, "findings": findings,
                        "accuracy_intervals": acc, "comparisons": cmp, "devices": devices,
                        "protocols": proto or "not computed: no authors'-protocol evidence"},
                  computed_on=rows.computed_on(res, *([res_au] if proto else []))
                  + [{"source": "this run: the layer-error curves", "rows": len(err),
                      "machine": "the rendering machine (rendered_on)"}],
                  errors=analysis.sweep_errors(res),
                  protected=bool(df["protect"].all()),
                  error_definition="||h_reduced - h_dense[original positions]|| / ||h_dense[...]|| over kept tokens, per layer")

"""Generate the notebooks (plain .ipynb via nbformat) from the cell sources below.

    .venv/bin/python notebooks/make_notebooks.py        # rewrites notebooks/0?_*.ipynb

Edit the notebooks here, not in Jupyter, so that they stay reviewable in code. Each notebook: a
markdown title, a tagged `parameters` cell (typed, commented; papermill overrides it; `quick=True`
gives tiny sizes for tests), library calls and plots; it writes figures/<notebook>/*.png|pdf and
results.json (plotted numbers, effective parameters, seed, versions, FLOPs definition).
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Shared setup cell: effective parameters, output folder (a temp folder in quick mode unless given).
SETUP = '''\
import os, json, tempfile, warnings
from pathlib import Path
import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt
from IPython.display import HTML, display

import utrc_lib
from utrc_lib.experiments import analysis
from utrc_lib.report import plotting
from utrc_lib.report import provenance as reporting
from utrc_lib.experiments import sweep

torch.set_num_threads(max(1, os.cpu_count() or 1))
torch.manual_seed(seed)
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
NOTEBOOK = "{name}"
if quick and out_dir == DEFAULT_OUT:  # never overwrite the committed figures from a quick run
    out_dir = tempfile.mkdtemp(prefix=f"utrc-{{NOTEBOOK}}-")
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
save = plotting.FigureSaver(out)
plotting.setup()
print("figures and results.json ->", out.resolve())
'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, tags=()):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str):
    return code(text, tags=("parameters",))


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives a byte-identical file
        cell["id"] = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


# -- 00 walkthrough -------------------------------------------------------------------------------
NB00 = [
    md("""
# 00 Walkthrough: what UTRC does to one paragraph

A tiny Mamba language model (12 layers, d_model 256, trained on our offline English corpus) reads one
real paragraph. We look at

1. the importance score of every token after every layer (paper §3: S = mean_d max(0, y_d), y the SSM output);
2. which tokens UTRC removes at each reduction layer, and whether it prunes or merges them;
3. how the sequence shrinks through the layers;
4. how the model's next-token prediction changes (KL divergence from the dense model);

and contrast UTRC with EViT (keep the top-k by importance, fuse the rest) and ToMe (bipartite
merging on alternate tokens) on the same text at the same FLOPs cut.
"""),
    params('''
# Parameters (papermill / `python -m utrc_lib.figures --param key=value` override them)
quick: bool = False                      # tiny sizes for tests (same steps, shorter text)
model_names: list = ["tiny-mamba2"]      # the first one is used: embedded name or checkpoint path
methods: list = ["utrc", "evit", "tome"] # methods contrasted on the paragraph
cut: float = 0.3                         # FLOPs cut (token-layer fraction) of every method
max_tokens: int = 120                    # tokens of the paragraph shown
text_item: int = 3                       # which item of the ppl task supplies the paragraph
seed: int = 0                            # seed (random metric / random method)
DEFAULT_OUT = "../figures/00_walkthrough"
out_dir: str = DEFAULT_OUT               # figures + results.json (quick: a temp folder unless given)
'''),
    code(SETUP.format(name="00_walkthrough")),
    code('''
if quick:
    max_tokens = min(max_tokens, 48)
model, tokenizer = sweep.get_model(model_names[0])
from utrc_lib.eval.suite import load_task
text = load_task("ppl", text_item + 1)[text_item]["context"]
ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
L = len(model.backbone.layers)
print(f"{type(model).__name__}: {L} layers; paragraph of {ids.shape[1]} tokens")
print(tokenizer.decode(ids[0]))
'''),
    md("""
## 1. Token importance after every layer

Clip metric of the paper (mean over channels of max(0, y)), read from the dense model. Bright tokens
are the ones UTRC ranks as important (set B), dark ones the candidates for removal (set A).
"""),
    code('''
imp = analysis.token_importance(model, ids, metric="clip")           # (L, N)
imp_rank = imp.argsort(1).argsort(1).float() / (imp.shape[1] - 1)   # per-layer rank in [0, 1]
fig, ax = plt.subplots(figsize=(10, 3.2))
im = ax.imshow(imp_rank.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
ax.set_xlabel("token position"); ax.set_ylabel("layer (0-based)")
ax.set_title(f"Token importance rank per layer (clip metric; 1 = most important) - {model_names[0]}")
fig.colorbar(im, ax=ax, label="importance rank (0 = lowest)")
save(fig, "importance_heatmap"); plt.show()
top = imp[2].topk(8).indices.tolist()
print("most important tokens after layer 2:", [tokens[i] for i in sorted(top)])
'''),
    md("""
## 2. Which tokens each method removes, and how

Colour = the reduction layer after which a token leaves the sequence (white = kept to the last
layer); hatching = pruned in the hidden branch (UTRC's hybrid rule prunes the least important half of
its matched edges there and merges the rest; the residual branch always merges).
"""),
    code('''
traces = {}
for m in methods:
    cfg = sweep.make_config(m, cut, seed=seed)
    traces[m] = analysis.trace(model, tokenizer, text, cfg, max_tokens=max_tokens)
anchors = traces[methods[0]]["anchors"]
fig, axes = plt.subplots(len(methods), 1, figsize=(11, 2.6 * len(methods)))
for ax, m in zip(np.atleast_1d(axes), methods):
    t = traces[m]
    counts = reporting.token_fate_counts(t["fates"])
    reporting.plot_token_fates(ax, t["tokens"], t["fates"], t["anchors"],
                               title=f"{plotting.style(m)['label']} at {cut:.0%} FLOPs cut: {counts}")
fig.tight_layout()
save(fig, "token_fates"); plt.show()
for m in methods:
    display(HTML(reporting.tokens_html(traces[m]["tokens"], traces[m]["fates"], traces[m]["anchors"],
                                       title=plotting.style(m)["label"])))
'''),
    md("## 3. How the sequence shrinks, and 4. how the prediction changes"),
    code('''
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
ax1.step(range(L), [ids.shape[1]] * L, where="post", color="black", ls="--", label="dense")
for m in methods:
    st = plotting.style(m)
    ax1.step(range(L), traces[m]["tokens_per_layer"], where="post", color=st["color"], label=st["label"])
ax1.set_xlabel("layer (0-based; a reduction after layer l shortens layer l+1 on)")
ax1.set_ylabel("tokens in the residual stream"); ax1.set_title("Sequence length through the model")
ax1.legend()
kls = {m: traces[m]["kl_last"] for m in methods}
ax2.bar([plotting.style(m)["label"] for m in methods], list(kls.values()),
        color=[plotting.style(m)["color"] for m in methods])
ax2.set_ylabel("KL(dense || reduced), nats"); ax2.set_title("Change of the next-token distribution (last position)")
ax2.tick_params(axis="x", rotation=15)
fig.tight_layout(); save(fig, "sequence_and_kl"); plt.show()
rows = [{"method": "dense", "top5": traces[methods[0]]["top_dense"]}] + [
    {"method": m, "top5": traces[m]["top_reduced"], "kl": kls[m]} for m in methods]
display(pd.DataFrame([{"method": r["method"], "KL": r.get("kl", 0.0),
                       "top-5 next tokens": ", ".join(f"{t!r} {p:.2f}" for t, p in r["top5"])} for r in rows]))
'''),
    code('''
# Per-position KL over the whole paragraph (positions before the first reduction are unaffected)
fig, ax = plt.subplots(figsize=(10, 3))
for m in methods:
    lp = traces[m]["logits_dense"].log_softmax(-1); lq = traces[m]["logits_reduced"].log_softmax(-1)
    kl_pos = (lp.exp() * (lp - lq)).sum(-1)
    st = plotting.style(m)
    ax.plot(kl_pos.numpy(), color=st["color"], label=st["label"], lw=1)
ax.set_xlabel("token position"); ax.set_ylabel("KL(dense || reduced), nats"); ax.set_yscale("symlog", linthresh=1e-3)
ax.set_title(f"Next-token KL at every position, {cut:.0%} FLOPs cut"); ax.legend()
save(fig, "kl_per_position"); plt.show()
'''),
    code('''
effective = dict(quick=quick, model_names=model_names, methods=methods, cut=cut, max_tokens=max_tokens,
                 text_item=text_item, seed=seed, out_dir=str(out))
data = {"model": model_names[0], "tokens": tokens, "importance_clip": imp.tolist(),
        "methods": {m: {"fates": traces[m]["fates"], "tokens_per_layer": traces[m]["tokens_per_layer"],
                        "anchors": traces[m]["anchors"], "kl_last": traces[m]["kl_last"],
                        "top_dense": traces[m]["top_dense"], "top_reduced": traces[m]["top_reduced"],
                        "fate_counts": reporting.token_fate_counts(traces[m]["fates"])} for m in methods}}
path = reporting.write_results(out, NOTEBOOK, parameters=effective, data=data, seed=seed, figures=save.names,
                               protected=False, note="walkthrough: no tokens are protected (nothing is scored)")
print("wrote", path)
'''),
]


# -- 01 main results ------------------------------------------------------------------------------
NB01 = [
    md("""
# 01 Main results (analog of the paper's Tables 1-2)

Accuracy on every local task and perplexity, for UTRC and the baselines (EViT, PuMer, ToMe,
prune-only, merge-only, random drop) at 10 / 20 / 30 % FLOPs cut, on both tiny models (Mamba-2 and
Mamba-1). Evaluation is leak-free: the scored continuation is protected from reduction and scored by
original position (`utrc_lib.evaluate`). The paper's published numbers are shown beside ours,
labelled as theirs: they come from their 1.3B-2.8B checkpoints on six lm-eval benchmarks, scored with
their (non-causal, unprotected) code, so only the ordering of methods is comparable, not the values.

Every finished configuration is cached (`.cache/sweeps/`): rerunning after an interruption resumes.
"""),
    params('''
# Parameters (papermill / `python -m utrc_lib.figures --param key=value` override them)
quick: bool = False                          # tiny sizes for tests
model_names: list = ["tiny-mamba2", "tiny-mamba"]  # embedded names or checkpoint paths
methods: list = ["utrc", "evit", "pumer", "tome", "prune_only", "merge_only", "random"]
cuts: list = [0.1, 0.2, 0.3]                 # FLOPs cuts (token-layer fraction)
tasks: list = ["cloze", "choice4", "choice2", "ppl"]
limit: int = 20                              # items per task (None = all 1000 / 200); sized for `make figures` on 2 CPU cores
batch_size: int = 16                         # evaluation batch (results do not depend on it)
seed: int = 0
DEFAULT_OUT = "../figures/01_main_results"
out_dir: str = DEFAULT_OUT                   # figures + results.json (quick: temp folder unless given)
cache_dir: str = "../.cache/sweeps"          # resumable sweep cache (shared by the notebooks)
paper_results: str = "../data/paper_results.json"
'''),
    code(SETUP.format(name="01_main_results")),
    code('''
if quick:
    methods, cuts, limit = methods[:2], cuts[1:2], min(limit or 6, 6)
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
ACC = ["cloze/acc", "choice4/acc_norm", "choice2/acc"]   # averaged into avg_acc (paper: mean of accuracies)
configs = sweep.with_fingerprints(
    sweep.grid(model=model_names, method=["none"], cut=[0.0]) + sweep.grid(model=model_names, method=methods, cut=cuts))
res = sweep.run(sweep.evaluate_config, configs, Path(cache_dir) / "eval.jsonl", desc="01 main results",
                common=dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size))
print(res.report())
df = res.frame()
df["avg_acc"] = df[[c for c in ACC if c in df]].mean(axis=1)
df["avg_acc_stderr"] = np.sqrt((df[[c + "_stderr" for c in ACC if c + "_stderr" in df]] ** 2).sum(axis=1)) / len(ACC)
'''),
    md("## Table: every task, every method, every cut (Tables 1-2 analog)"),
    code('''
cols = ["model", "method", "cut", "keep_ratio", "analytic_flops_cut", "avg_acc"] + ACC + ["cloze/ppl", "ppl/ppl"]
table = df[[c for c in cols if c in df]].sort_values(["model", "cut", "method"]).reset_index(drop=True)
pct = {c: "{:.1%}" for c in ["cut", "analytic_flops_cut", "avg_acc"] + ACC}
display(table.style.format({**pct, "keep_ratio": "{:.3f}", "cloze/ppl": "{:.1f}", "ppl/ppl": "{:.1f}"}))
(out / "table_main.md").write_text(table.to_markdown(index=False, floatfmt=".4g") if hasattr(table, "to_markdown") else table.to_string())
'''),
    md("## Accuracy and perplexity against the FLOPs cut"),
    code('''
metrics = ["avg_acc"] + ACC + ["ppl/ppl"]
fig, axes = plt.subplots(len(model_names), len(metrics), figsize=(3.1 * len(metrics), 2.9 * len(model_names)), squeeze=False)
for r, name in enumerate(model_names):
    d = df[df["model"] == name]
    dense = d[d["method"] == "none"].iloc[0]
    for c, metric in enumerate(metrics):
        plotting.metric_vs_cut(axes[r, c], d[d["method"] != "none"], metric, methods=methods, dense=dense[metric],
                               err=metric + "_stderr" if metric + "_stderr" in d else None,
                               title=f"{Path(name).name}: {plotting.SHORT_LABELS.get(metric, metric)}")
plotting.legend_below(fig, axes.ravel(), ncol=5)
plotting.annotate_source(fig, f"ours: tiny models, {limit} items per task, leak-free evaluation; shaded = +-1 s.e.")
fig.tight_layout(rect=(0, 0.07, 1, 1)); save(fig, "accuracy_vs_flops"); plt.show()
'''),
    md("""
## Beside the paper (their checkpoints, their benchmarks)

Left: our mean accuracy (3 local tasks) per method. Right: the paper's mean of 6 lm-eval accuracies
(Zhan et al. 2024, Tables 1-2) for UTRC, EViT and PuMer. Absolute values are not comparable (models 200-400x
larger, different benchmarks, their scoring leaks the continuation); compare the drop from dense and
the ordering.
"""),
    code('''
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
    ax.set_xlabel("FLOPs cut (%)"); ax.set_ylabel("mean accuracy (%)"); ax.legend(fontsize=6.5)
plotting.annotate_source(fig, "paper numbers: Zhan et al., EMNLP 2024 (their code: non-causal merges, unprotected scoring)")
fig.tight_layout(); save(fig, "ours_vs_paper"); plt.show()
'''),
    code('''
effective = dict(quick=quick, model_names=model_names, methods=methods, cuts=cuts, tasks=tasks, limit=limit,
                 batch_size=batch_size, seed=seed, out_dir=str(out), cache_dir=cache_dir)
keep = [c for c in df.columns if not c.startswith("meta/") or c in ("meta/protect",)]
path = reporting.write_results(out, NOTEBOOK, parameters=effective, seed=seed, figures=save.names,
                               data={"rows": df[keep], "avg_acc_tasks": ACC, "paper": paper["main"],
                                     "paper_source": paper["source"]},
                               errors=[{"params": e["params"], "error": e["error"]} for e in res.errors],
                               protected=bool(df["protect"].all()))
print("wrote", path)
'''),
]


# -- 02 design choices ----------------------------------------------------------------------------
NB02 = [
    md("""
# 02 Design choices (analog of the paper's Tables 3-5)

UTRC at a fixed FLOPs cut, varying one design choice at a time:

* importance metric: clip (paper), unclipped sum, l1, l2, and the timescale Delta (MTR / DeciMamba);
* reduction location: four anchors every 2 layers starting after layer 1, 2, 3 or 4 (12-layer models);
* hidden-branch rule: hybrid with q = fraction of matched edges pruned (0 = merge only, 1 = prune only);
  residual-branch rule: merge (paper), prune, hybrid;
* the three UTRC modes: the paper's text with non-causal merges, the authors' released behaviour
  (`utrc_reference`, non-causal) and our causal variant, each scored with and without protection of the
  scored continuation: how much of each method's score survives a leak-free evaluation.
"""),
    params('''
# Parameters (papermill / `python -m utrc_lib.figures --param key=value` override them)
quick: bool = False
model_names: list = ["tiny-mamba2"]          # embedded names or checkpoint paths
cut: float = 0.2                             # FLOPs cut of the metric / location / modes sweeps (paper: 20%)
branch_cut: float = 0.3                      # FLOPs cut of the branch-rule sweep (paper: 30%)
metrics: list = ["clip", "sum", "l1", "l2", "delta"]
starts: list = [1, 2, 3, 4]                  # first reduction layer; anchors start, start+2, +4, +6
qs: list = [0.0, 0.25, 0.5, 0.75, 1.0]       # hidden-branch prune fraction (residual: merge)
residual_rules: list = ["merge", "prune", "hybrid"]   # with hidden hybrid(0.5)
tasks: list = ["cloze", "choice4", "choice2", "ppl"]
limit: int = 15                              # items per task; sized for `make figures` on 2 CPU cores
batch_size: int = 16
seed: int = 0
DEFAULT_OUT = "../figures/02_design_choices"
out_dir: str = DEFAULT_OUT
cache_dir: str = "../.cache/sweeps"
'''),
    code(SETUP.format(name="02_design_choices")),
    code('''
if quick:
    metrics, starts, qs, residual_rules, limit = metrics[:2], starts[:2], [0.0, 1.0], residual_rules[:2], min(limit or 4, 4)
    tasks = [t for t in tasks if t in ("cloze", "choice2")] or tasks  # the two cheapest tasks
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
ACC = ["cloze/acc", "choice4/acc_norm", "choice2/acc"]
common = dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size)
def schedule(start):  # four anchors every two layers from `start` (a 12-layer model; clipped to the depth)
    return [start + 2 * i for i in range(4)]
groups = {
    "dense": sweep.grid(model=model_names, method=["none"], cut=[0.0]),
    "metric": sweep.grid(model=model_names, method=["utrc"], cut=[cut], metric=metrics),
    "location": sweep.grid(model=model_names, method=["utrc"], cut=[cut], layers=[schedule(s) for s in starts]),
    "hidden_q": sweep.grid(model=model_names, method=["utrc"], cut=[branch_cut],
                           hidden_rule=[f"hybrid({q})" for q in qs], residual_rule=["merge"]),
    "residual_rule": sweep.grid(model=model_names, method=["utrc"], cut=[branch_cut], hidden_rule=["hybrid(0.5)"],
                                residual_rule=residual_rules),
    "modes": sweep.grid(model=model_names, method=["utrc"], cut=[cut], causal=[True, False], protect=[True, False])
             + sweep.grid(model=model_names, method=["utrc_reference"], cut=[cut], causal=[False], protect=[True, False])
             + sweep.grid(model=model_names, method=["none"], cut=[0.0], protect=[False]),
}
frames = {}
for g, cfgs in groups.items():
    r = sweep.run(sweep.evaluate_config, sweep.with_fingerprints(cfgs), Path(cache_dir) / "eval.jsonl",
                  desc=f"02 {g}", common=common)
    print(g, "-", r.report())
    f = r.frame(errors=True)
    f["avg_acc"] = f[[c for c in ACC if c in f]].mean(axis=1) if any(c in f for c in ACC) else np.nan
    frames[g] = f
'''),
    code('''
def bar_panel(ax, f, x, labels, title, highlight=None):
    dense = frames["dense"]
    for i, name in enumerate(model_names):
        d = f[f["model"] == name]
        xs = np.arange(len(d)) + 0.38 * (i - (len(model_names) - 1) / 2)
        ax.bar(xs, 100 * d["avg_acc"].fillna(0), width=0.36 if len(model_names) > 1 else 0.6, label=Path(name).name,
               color=["#D55E00" if (highlight is not None and v == highlight) else "#888888" for v in d[x]],
               edgecolor="black", alpha=1.0 if i == 0 else 0.6)
        ax.axhline(100 * float(dense[dense["model"] == name]["avg_acc"].iloc[0]), color="black", ls="--", lw=1,
                   label=f"dense {Path(name).name}")
        for xx, (_, row) in zip(xs, d.iterrows()):
            if row.get("status", "ok") != "ok":
                ax.text(xx, 1, "failed", rotation=90, ha="center", va="bottom", fontsize=7, color="red")
    d0 = f[f["model"] == model_names[0]]
    ax.set_xticks(np.arange(len(d0)), [labels(v) for v in d0[x]], rotation=0)
    ax.set_ylabel("mean accuracy of 3 tasks (%)"); ax.set_title(title)
    lo = 100 * np.nanmin([f["avg_acc"].min(), frames["dense"]["avg_acc"].min()])
    ax.set_ylim(max(0, lo - 5), None)

fig, axes = plt.subplots(2, 2, figsize=(11, 7))
bar_panel(axes[0, 0], frames["metric"], "metric", str, f"Importance metric (UTRC, {cut:.0%} cut)", "clip")
bar_panel(axes[0, 1], frames["location"], "layers", lambda l: f"start {l[0]}\\n{tuple(l)}",
          f"Reduction location (UTRC, {cut:.0%} cut)", None)
bar_panel(axes[1, 0], frames["hidden_q"], "hidden_rule", lambda r: "q=" + r[7:-1],
          f"Hidden branch: prune fraction q (residual merge, {branch_cut:.0%} cut)", "hybrid(0.5)")
bar_panel(axes[1, 1], frames["residual_rule"], "residual_rule", str,
          f"Residual branch rule (hidden hybrid q=0.5, {branch_cut:.0%} cut)", "merge")
axes[0, 0].legend(fontsize=7)
plotting.annotate_source(fig, f"orange = the paper's choice; {limit} items per task, leak-free evaluation")
fig.tight_layout(); save(fig, "design_choices"); plt.show()
'''),
    md("""
## Three UTRC modes, with and without protection of the scored continuation

Unprotected = the reduction may drop or merge the very positions whose logits are scored, and (non-causal
modes) earlier positions may see later tokens: a leak that can inflate accuracy. Protected = our
leak-free evaluation. "Survives" = protected score / unprotected score.
"""),
    code('''
f = frames["modes"].copy()
def mode(row):
    if row["method"] == "none":
        return "dense"
    if row["method"] == "utrc_reference":
        return "authors' code (utrc_reference)"
    return "paper text, causal (ours)" if row["causal"] else "paper text, non-causal merges"
f["mode"] = f.apply(mode, axis=1)
dense_prot = frames["dense"].assign(mode="dense", protect=True)
f = pd.concat([f, dense_prot], ignore_index=True)
modes = ["dense", "paper text, causal (ours)", "paper text, non-causal merges", "authors' code (utrc_reference)"]
show = [c for c in ["avg_acc"] + ACC + ["ppl/ppl"] if c in f]
fig, axes = plt.subplots(1, len(show), figsize=(3.0 * len(show), 3.6))
for ax, metric in zip(axes, show):
    d = f[f["model"] == model_names[0]]
    for j, prot in enumerate([False, True]):
        vals = [float(d[(d["mode"] == m) & (d["protect"] == prot)][metric].iloc[0]) if len(d[(d["mode"] == m) & (d["protect"] == prot)]) else np.nan
                for m in modes]
        scale = 1 if metric.endswith("ppl") else 100
        ax.bar(np.arange(len(modes)) + 0.4 * j - 0.2, np.array(vals) * scale, width=0.4,
               color="#0072B2" if prot else "#E69F00", label="protected (leak-free)" if prot else "unprotected")
    ax.set_xticks(np.arange(len(modes)), ["dense", "causal\\n(ours)", "non-causal", "authors'\\ncode"], fontsize=7)
    ax.set_title(plotting.TASK_LABELS.get(metric, metric), fontsize=8)
    ax.set_ylabel("perplexity" if metric.endswith("ppl") else "accuracy (%)")
    if metric.endswith("ppl"):
        ax.set_yscale("log")
axes[0].legend(fontsize=7)
fig.suptitle(f"UTRC modes at {cut:.0%} FLOPs cut, {Path(model_names[0]).name}: scored with and without protecting the continuation")
fig.tight_layout(); save(fig, "modes_protection"); plt.show()
piv = f.pivot_table(index=["model", "mode"], columns="protect", values="avg_acc")
piv.columns = ["unprotected" if not c else "protected" for c in piv.columns]
piv["survives"] = piv["protected"] / piv["unprotected"]
display(piv)
'''),
    code('''
effective = dict(quick=quick, model_names=model_names, cut=cut, branch_cut=branch_cut, metrics=metrics, starts=starts,
                 qs=qs, residual_rules=residual_rules, tasks=tasks, limit=limit, batch_size=batch_size, seed=seed,
                 out_dir=str(out), cache_dir=cache_dir)
data = {g: fr[[c for c in fr.columns if not c.startswith("meta/")]] for g, fr in frames.items()}
data["modes_table"] = f[[c for c in ["model", "mode", "method", "causal", "protect", "avg_acc"] + ACC + ["ppl/ppl"] if c in f]]
data["avg_acc_tasks"] = [c for c in ACC if c in f]
data["survival"] = piv.reset_index()
errors = [{"group": g, "params": {k: v for k, v in row.items() if k in ("model", "method", "cut", "metric", "layers",
           "hidden_rule", "residual_rule", "causal", "protect")}, "error": row.get("error")}
          for g, fr in frames.items() for _, row in fr.iterrows() if row.get("status", "ok") != "ok"]
path = reporting.write_results(out, NOTEBOOK, parameters=effective, data=data, seed=seed, figures=save.names,
                               errors=errors, protected="all groups except the unprotected rows of 'modes'")
print("wrote", path)
'''),
]


# -- 03 efficiency --------------------------------------------------------------------------------
NB03 = [
    md("""
# 03 Efficiency (analog of the paper's Figures 3-6)

* CPU prefill latency and throughput against the FLOPs cut on the tiny models (always measured here);
  last-token logits (what generation needs) and full-sequence logits (what the paper's memory setup
  returns) separately; decoding time per generated token, which prompt reduction does not change.
* Analytic FLOPs cut (`utrc_lib.flops`) beside the token-layer cut.
* Peak memory: not measured on CPU (torch's CPU allocator exposes no peak counter and tracemalloc does
  not see it); GPU peak memory (`torch.cuda.max_memory_allocated`) and GPU timings are read from
  `figures/03_efficiency/gpu_bench.json` when `python -m utrc_lib.bench` has produced it on a GPU.
"""),
    params('''
# Parameters (papermill / `python -m utrc_lib.figures --param key=value` override them)
quick: bool = False
model_names: list = ["tiny-mamba2", "tiny-mamba"]
methods: list = ["utrc", "evit", "tome"]     # reduced methods timed on CPU
cuts: list = [0.1, 0.2, 0.3]
batch: int = 4                               # CPU prefill batch
seq_len: int = 512                           # CPU prompt length (tokens)
new_tokens: int = 16                         # generated tokens for the decode timing
repeats: int = 3                             # timed repeats (median reported) after one warm-up
seed: int = 0
DEFAULT_OUT = "../figures/03_efficiency"
out_dir: str = DEFAULT_OUT
gpu_bench: str = "../figures/03_efficiency/gpu_bench.json"   # written by utrc_lib.bench on a GPU machine
paper_results: str = "../data/paper_results.json"
'''),
    code(SETUP.format(name="03_efficiency")),
    code('''
if quick:
    methods, cuts, batch, seq_len, new_tokens, repeats = methods[:1], cuts[1:2], 1, 64, 2, 1
from utrc_lib.core.flops import flops
rows = []
for name in model_names:
    model, tok = sweep.get_model(name)
    for method, cut in [("none", 0.0)] + [(m, c) for m in methods for c in cuts]:
        cfg = sweep.make_config(method, cut, seed=seed)
        rep = flops(model, seq_len, cfg, batch=batch, logits="last")
        for logits in (["last", "all"] if method in ("none", methods[0]) else ["last"]):
            t = analysis.cpu_prefill_ms(model, batch, seq_len, cfg, logits=logits, repeats=repeats, seed=seed)
            rows.append(dict(model=name, method=method, cut=cut, logits=logits, prefill_ms=t["median_ms"],
                             tokens_per_s=t["tokens_per_s"], times_ms=t["times_ms"],
                             analytic_flops_cut=rep.flops_cut, token_layer_cut=1 - rep.token_layer_fraction))
cpu = pd.DataFrame(rows)
dense_ms = cpu[cpu["method"] == "none"].set_index(["model", "logits"])["prefill_ms"]
cpu["speedup_vs_dense"] = [dense_ms[(r.model, r.logits)] / r.prefill_ms for r in cpu.itertuples()]
display(cpu.drop(columns=["times_ms"]))
'''),
    code('''
# Decoding: time per generated token after the prompt (prompt reduction only shortens the prefill)
from utrc_lib.hosts.handle import apply
dec_rows = []
g = torch.Generator().manual_seed(seed)
for name in model_names:
    model, tok = sweep.get_model(name)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
    for method, cut in [("none", 0.0), (methods[0], max(cuts))]:
        cfg = sweep.make_config(method, cut, seed=seed)
        h = apply(model, cfg) if cfg is not None else None
        try:
            import time
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
                t0 = time.perf_counter(); model(input_ids=ids, use_cache=True, logits_to_keep=1); t_pre = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                t_gen = time.perf_counter() - t0
        finally:
            if h is not None: h.remove()
        dec_rows.append(dict(model=name, method=method, cut=cut, prefill_ms=1e3 * t_pre,
                             decode_ms_per_token=1e3 * max(t_gen - t_pre, 0) / max(new_tokens - 1, 1)))
dec = pd.DataFrame(dec_rows); display(dec)
'''),
    code('''
fig, axes = plt.subplots(1, 3, figsize=(13, 3.7))
for name, ls in zip(model_names, ["-", "--"]):
    for m in methods:
        d = cpu[(cpu["model"] == name) & (cpu["method"].isin([m, "none"])) & (cpu["logits"] == "last")].sort_values("cut")
        st = plotting.style(m)
        axes[0].plot(100 * d["cut"], d["prefill_ms"], ls=ls, color=st["color"], marker=st["marker"], label=f"{st['label']} - {Path(name).name}")
        axes[1].plot(100 * d["cut"], d["tokens_per_s"] / 1e3, ls=ls, color=st["color"], marker=st["marker"])
        axes[2].plot(100 * d["cut"], 100 * d["analytic_flops_cut"], ls=ls, color=st["color"], marker=st["marker"])
axes[0].set_ylabel("prefill latency (ms, median)"); axes[0].set_title(f"CPU prefill, last-token logits\\nbatch {batch} x {seq_len} tokens, fp32, {torch.get_num_threads()} threads")
axes[1].set_ylabel("prefill throughput (k tokens/s)"); axes[1].set_title("CPU prefill throughput")
axes[2].plot([0, 100 * max(cuts)], [0, 100 * max(cuts)], color="black", lw=0.8, ls=":", label="analytic = token-layer")
axes[2].set_ylabel("analytic FLOPs cut (%)"); axes[2].set_title(f"Analytic FLOPs cut (incl. reduction cost), N={seq_len}")
for ax in axes:
    ax.set_xlabel("FLOPs cut (%, token-layer fraction)")
axes[0].legend(fontsize=6.5); axes[2].legend(fontsize=7)
fig.tight_layout(); save(fig, "cpu_prefill"); plt.show()

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
d = cpu[cpu["method"].isin(["none", methods[0]])]
for name, ls in zip(model_names, ["-", "--"]):
    for logits, col in [("last", "#D55E00"), ("all", "#0072B2")]:
        e = d[(d["model"] == name) & (d["logits"] == logits)].sort_values("cut")
        axes[0].plot(100 * e["cut"], e["prefill_ms"], ls=ls, color=col, marker="o", label=f"{logits}-position logits - {Path(name).name}")
axes[0].set_xlabel("FLOPs cut (%)"); axes[0].set_ylabel("prefill latency (ms)")
axes[0].set_title(f"{plotting.style(methods[0])['label']}: last-token vs full-sequence logits (CPU)"); axes[0].legend(fontsize=7)
x = np.arange(len(dec))
axes[1].bar(x - 0.2, dec["prefill_ms"], 0.4, label="prefill (prompt)", color="#0072B2")
axes[1].bar(x + 0.2, dec["decode_ms_per_token"], 0.4, label="decode, per new token", color="#E69F00")
axes[1].set_xticks(x, [f"{r.model}\\n{'dense' if r.method == 'none' else f'{r.method} {r.cut:.0%}'}" for r in dec.itertuples()], fontsize=7)
axes[1].set_ylabel("ms"); axes[1].set_title(f"Prefill vs generation (CPU, batch {batch}, {seq_len}-token prompt)"); axes[1].legend(fontsize=7)
fig.tight_layout(); save(fig, "cpu_logits_and_decode"); plt.show()
'''),
    md("## GPU measurements (from `utrc_lib.bench`, when present) beside the paper's A100 numbers"),
    code('''
gpu = None
if Path(gpu_bench).is_file():
    raw = json.load(open(gpu_bench))
    records = raw["records"] if isinstance(raw, dict) else raw  # a list of records (older files: a dict)
    gpu_all = pd.DataFrame([r for r in records if "error" not in r])
    gpu = gpu_all[gpu_all["kind"] == "prefill"] if "kind" in gpu_all else gpu_all
    print(f"{len(records)} GPU records from {gpu_bench} ({len(gpu)} prefill)")
    if "align" in gpu:
        gpu = gpu.assign(align=gpu["align"].fillna(1).astype(int))  # kept counts rounded to multiples (1 = off)
    keys = [k for k in ["model_shape", "align", "device", "dtype", "batch", "seq_len"] if k in gpu]
    groups = list(gpu.groupby(keys)) if keys else [("all", gpu)]
    fig, axes = plt.subplots(len(groups), 4, figsize=(17, 3.4 * len(groups)), squeeze=False)
    for (key, g), row in zip(groups, axes):
        kv = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        label = ", ".join(f"{k}={v}" for k, v in kv.items() if k in ("model_shape", "align", "batch", "seq_len"))
        for m, e in g[~g["method"].isin(["dense"])].groupby("method"):
            e = e.sort_values("flops_cut"); st = plotting.style(m)
            kw = dict(color=st["color"], marker=st["marker"], label=st["label"] if m in plotting.METHOD_STYLE else m)
            if "speedup_vs_dense" in e: row[0].plot(100 * e["flops_cut"], e["speedup_vs_dense"], **kw)
            for col, ax in (("peak_mem_gb_last_token", row[1]), ("peak_mem_gb_full_logits", row[2])):
                if col in e and e[col].notna().any(): ax.plot(100 * e["flops_cut"], e[col], **kw)
            if "peak_mem_gb_kept_logits" in e and e["peak_mem_gb_kept_logits"].notna().any():
                row[2].plot(100 * e["flops_cut"], e["peak_mem_gb_kept_logits"], **dict(kw, ls="--", label=None))
            if m != "slice" and "reduction_overhead_vs_dense" in e and e["reduction_overhead_vs_dense"].notna().any():
                row[3].plot(100 * e["flops_cut"], 100 * e["reduction_overhead_vs_dense"], **kw)
            if m != "slice" and "overhead_vs_slice_of_dense" in e and e["overhead_vs_slice_of_dense"].notna().any():
                row[3].plot(100 * e["flops_cut"], 100 * e["overhead_vs_slice_of_dense"], **dict(kw, ls=":", label=None))
        row[3].axhline(3.0, color="grey", ls="--", lw=0.8, label="target 3%")
        row[3].set_ylabel("overhead (% of dense prefill)")
        row[3].text(0.02, 0.97, "solid: reduction steps (CUDA events)\\ndotted: end to end, minus free slicing",
                    transform=row[3].transAxes, fontsize=6, va="top")
        dn = g[g["method"] == "dense"]
        for col, ax in (("peak_mem_gb_last_token", row[1]), ("peak_mem_gb_full_logits", row[2])):
            if col in dn and len(dn): ax.axhline(float(dn[col].iloc[0]), color="black", ls="--", label="dense")
        row[0].axhline(1.0, color="black", ls="--", lw=0.8)
        row[0].set_ylabel("prefill speed-up vs dense (x)"); row[1].set_ylabel("peak memory (GB), last-token logits")
        row[2].set_ylabel("peak memory (GB), full-sequence logits")
        row[2].text(0.02, 0.03, "solid: logits at all N positions\\ndashed: logits at kept tokens only (kept_only)",
                    transform=row[2].transAxes, fontsize=6, va="bottom")
        for ax in row:
            ax.set_xlabel("FLOPs cut (%)"); ax.set_title(label, fontsize=7)
        row[0].legend(fontsize=6.5)
    names = ", ".join(sorted(set(gpu["gpu"].dropna()))) if "gpu" in gpu else "GPU"
    fig.suptitle(f"GPU prefill on {names}, fp16 (torch.cuda.max_memory_allocated; CUDA-event timing, median)")
    fig.tight_layout(rect=(0, 0, 1, 0.985)); save(fig, "gpu_prefill"); plt.show()
else:
    print(f"no GPU benchmark at {gpu_bench}: run `python -m utrc_lib.bench` on a GPU machine to add the GPU panels")
paper = json.load(open(paper_results))["efficiency"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
for pm, ls in zip(paper["throughput_speedup"], ["-", "--"]):
    cs = sorted(paper["throughput_speedup"][pm], key=float)
    axes[0].plot([0] + [100 * float(c) for c in cs], [1] + [paper["throughput_speedup"][pm][c] for c in cs], ls=ls, marker="o", color="#D55E00", label=pm)
    axes[1].plot([0] + [100 * float(c) for c in cs], [0] + [paper["peak_memory_reduction_pct"][pm][c] for c in cs], ls=ls, marker="o", color="#D55E00", label=pm)
axes[0].set_ylabel("throughput speed-up (x)"); axes[1].set_ylabel("peak-memory reduction (%)")
for ax in axes:
    ax.set_xlabel("FLOPs cut (%)"); ax.legend(fontsize=7)
axes[0].set_title("THEIRS (paper, A100): batch 16, 2048 + 100 tokens", fontsize=8)
axes[1].set_title("THEIRS (paper, A100): NVML memory, batch 96 x 2048, full logits", fontsize=8)
fig.tight_layout(); save(fig, "paper_efficiency"); plt.show()
'''),
    code('''
effective = dict(quick=quick, model_names=model_names, methods=methods, cuts=cuts, batch=batch, seq_len=seq_len,
                 new_tokens=new_tokens, repeats=repeats, seed=seed, out_dir=str(out), gpu_bench=gpu_bench)
data = {"cpu_prefill": cpu, "cpu_decode": dec, "cpu_memory": "not measured (no peak counter for torch's CPU allocator)",
        "gpu": None if gpu is None else gpu, "paper_efficiency": paper}
path = reporting.write_results(out, NOTEBOOK, parameters=effective, data=data, seed=seed, figures=save.names,
                               device={"cpu": "CPU fp32", "threads": torch.get_num_threads()},
                               timing="utrc_lib.bench.time_ms: 1 warm-up, median of `repeats` (perf_counter on CPU)")
print("wrote", path)
'''),
]


# -- 04 failure of transformer methods -----------------------------------------------------------
NB04 = [
    md("""
# 04 Why transformer token-reduction methods fail on SSMs (analog of the paper's Figure 1)

Left: accuracy against the FLOPs cut for EViT- and PuMer-style reduction (and ToMe) relative to UTRC,
as a fraction of the dense model's accuracy. Right: error growth across layers after a single
reduction: for each method we reduce once (after one layer, same keep ratio) and measure, at every
later layer, the relative L2 error of the residual stream against the dense model at the kept tokens'
original positions. In an SSM a removed token is also removed from every later token's recurrent
state, so the error keeps growing with depth instead of staying local.
"""),
    params('''
# Parameters (papermill / `python -m utrc_lib.figures --param key=value` override them)
quick: bool = False
model_names: list = ["tiny-mamba2", "tiny-mamba"]
methods: list = ["utrc", "evit", "pumer", "tome"]
cuts: list = [0.1, 0.2, 0.3]                 # shares the cached rows of 01_main_results
tasks: list = ["cloze", "choice4", "choice2", "ppl"]
limit: int = 20                              # same as 01_main_results: its cached rows are reused
batch_size: int = 16
error_layer: int = 2                         # the single reduction happens after this layer
error_keep_ratio: float = 0.6                # tokens kept at that reduction
error_texts: int = 8                         # passages (ppl task contexts, 192 tokens) for the error curves
seed: int = 0
DEFAULT_OUT = "../figures/04_failure_of_transformer_methods"
out_dir: str = DEFAULT_OUT
cache_dir: str = "../.cache/sweeps"
'''),
    code(SETUP.format(name="04_failure_of_transformer_methods")),
    code('''
if quick:
    methods, cuts, limit, error_texts = methods[:2], cuts[1:2], min(limit or 6, 6), 2
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
ACC = ["cloze/acc", "choice4/acc_norm", "choice2/acc"]
configs = sweep.with_fingerprints(sweep.grid(model=model_names, method=["none"], cut=[0.0])
                                  + sweep.grid(model=model_names, method=methods, cut=cuts))
res = sweep.run(sweep.evaluate_config, configs, Path(cache_dir) / "eval.jsonl", desc="04 accuracy",
                common=dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size))
print(res.report())
df = res.frame()
df["avg_acc"] = df[ACC].mean(axis=1)
dense = df[df["method"] == "none"].set_index("model")["avg_acc"]
df["relative_acc"] = df["avg_acc"] / df["model"].map(dense)
'''),
    code('''
from utrc_lib.core.config import ReductionConfig
from utrc_lib.eval.suite import load_task
errs = []
for name in model_names:
    model, tok = sweep.get_model(name)
    texts = [it["context"] for it in load_task("ppl", error_texts)]
    enc = [tok(t)["input_ids"] for t in texts]
    n = min(len(e) for e in enc)
    ids = torch.tensor([e[:n] for e in enc])
    dense_run = analysis.run(model, ids)
    for m in methods + ["random"]:
        cfg = ReductionConfig(method=m, layers=(error_layer,), keep_ratio=error_keep_ratio, seed=seed,
                              causal=True)
        e = analysis.layer_errors(model, ids, cfg, dense=dense_run)
        errs.append(dict(model=name, method=m, **e))
err = pd.DataFrame(errs)
display(err[["model", "method", "kl_last"]])
'''),
    code('''
fig, axes = plt.subplots(1, 1 + len(model_names), figsize=(4.2 * (1 + len(model_names)), 3.8))
for name, ls in zip(model_names, ["-", "--"]):
    for m in methods:
        d = df[(df["model"] == name) & (df["method"].isin([m, "none"]))].sort_values("cut")
        st = plotting.style(m)
        axes[0].plot(100 * d["cut"], 100 * d["relative_acc"], ls=ls, color=st["color"], marker=st["marker"],
                     label=f"{st['label']} - {Path(name).name}")
axes[0].axhline(100, color="black", lw=0.8, ls=":")
axes[0].set_xlabel("FLOPs cut (%)"); axes[0].set_ylabel("mean accuracy, % of dense")
axes[0].set_title("Accuracy kept vs FLOPs cut (leak-free)"); axes[0].legend(fontsize=6.5)
for ax, name in zip(axes[1:], model_names):
    for m in methods + ["random"]:
        r = err[(err["model"] == name) & (err["method"] == m)].iloc[0]
        st = plotting.style(m)
        ax.plot(r["layer"], r["rel_error"], color=st["color"], marker=st["marker"], label=st["label"], ms=4)
    ax.axvline(error_layer, color="black", lw=0.8, ls=":")
    ax.set_ylim(bottom=0); ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("relative L2 error of the residual stream")
    ax.set_title(f"{Path(name).name}: one reduction after layer {error_layer}\\n(keep {error_keep_ratio:.0%} of tokens)")
    ax.legend(fontsize=7)
fig.tight_layout(); save(fig, "failure_of_transformer_methods"); plt.show()
'''),
    code('''
effective = dict(quick=quick, model_names=model_names, methods=methods, cuts=cuts, tasks=tasks, limit=limit,
                 batch_size=batch_size, error_layer=error_layer, error_keep_ratio=error_keep_ratio,
                 error_texts=error_texts, seed=seed, out_dir=str(out), cache_dir=cache_dir)
keep = [c for c in df.columns if not c.startswith("meta/") or c == "meta/protect"]
path = reporting.write_results(out, NOTEBOOK, parameters=effective, seed=seed, figures=save.names,
                               data={"accuracy": df[keep], "layer_errors": err},
                               errors=[{"params": e["params"], "error": e["error"]} for e in res.errors],
                               protected=bool(df["protect"].all()),
                               error_definition="||h_reduced - h_dense[original positions]|| / ||h_dense[...]|| over kept tokens, per layer")
print("wrote", path)
'''),
]

NOTEBOOKS = {
    "00_walkthrough": NB00,
    "01_main_results": NB01,
    "02_design_choices": NB02,
    "03_efficiency": NB03,
    "04_failure_of_transformer_methods": NB04,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        nbformat.write(notebook(cells), path)
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()

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
# # 00 Walkthrough: what UTRC does to one paragraph
#
# A tiny Mamba language model (12 layers, d_model 256, trained on our offline English corpus) reads one
# real paragraph. We look at
#
# 1. the importance score of every token after every layer (paper §3: S = mean_d max(0, y_d), y the SSM output);
# 2. which tokens UTRC removes at each reduction layer, and whether it prunes or merges them;
# 3. how the sequence shrinks through the layers;
# 4. how the model's next-token prediction changes (KL divergence from the dense model);
#
# and contrast UTRC with EViT (keep the top-k by importance, fuse the rest) and ToMe (bipartite
# merging on alternate tokens) on the same text at the same token-layer cut (the paper's FLOPs
# definition: 1 - mean over layers of the fraction of tokens a layer processes).

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False                      # tiny sizes for tests (same steps, shorter text)
model_names: list = ["tiny-mamba2"]      # the first one is used: embedded name or checkpoint path
methods: list = ["utrc", "evit", "tome"] # methods contrasted on the paragraph
cut: float = 0.3                         # token-layer cut (paper's FLOPs definition) of every method
max_tokens: int = 120                    # tokens of the paragraph shown
text_item: int = 3                       # which item of the ppl task supplies the paragraph
seed: int = 0                            # seed (random metric / random method)
out_dir: str = ""                        # empty: scratch .cache/notebooks/<name> (quick: a temp folder); `make figures` passes figures/<name>

# %%
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import HTML, Markdown, display

from utrc_study.experiments import analysis, sweep
from utrc_study.report import plotting, prose
from utrc_study.report import provenance as reporting
from utrc_study.report.notebooks import setup

ctx = setup("00_walkthrough", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:
    max_tokens = min(max_tokens, 48)
model, tokenizer = sweep.get_model(model_names[0])
from utrc_study.eval.suite import load_task
text = load_task("ppl", text_item + 1)[text_item]["context"]
ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
L = len(model.backbone.layers)
print(f"{type(model).__name__}: {L} layers; paragraph of {ids.shape[1]} tokens")
print(tokenizer.decode(ids[0]))

# %% [markdown]
# ## 1. Token importance after every layer
#
# Clip metric of the paper (mean over channels of max(0, y)), read from the dense model. Bright tokens
# are the ones UTRC ranks as important (set B), dark ones the candidates for removal (set A).

# %%
imp = analysis.token_importance(model, ids, metric="clip")           # (L, N)
imp_rank = analysis.importance_rank(imp)                             # per-layer rank in [0, 1]
fig, ax = plt.subplots(figsize=(10, 3.2))
im = ax.imshow(imp_rank.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
ax.set_xlabel("token position"); ax.set_ylabel("layer (0-based)")
ax.set_title(f"Token importance rank per layer (clip metric; 1 = most important) - {model_names[0]}")
fig.colorbar(im, ax=ax, label="importance rank (0 = lowest)")
save(fig, "importance_heatmap"); plt.show()
top = imp[2].topk(8).indices.tolist()
print("most important tokens after layer 2:", [tokens[i] for i in sorted(top)])

# %% [markdown]
# ## 2. Which tokens each method removes, and how
#
# Colour = the reduction layer after which a token leaves the sequence (white = kept to the last
# layer); hatching = what happened to it: `///` hybrid (pruned in the hidden branch, merged in the
# residual branch: UTRC's hybrid rule prunes the least important half of its matched edges in the
# hidden branch and merges the rest; the residual branch always merges), `xxx` pruned in both
# branches, no hatching = merged in both. The panel titles count the tokens of each fate.

# %%
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
                               title=f"{plotting.style(m)['label']} at {cut:.0%} token-layer cut: "
                                     f"{reporting.fate_counts_text(counts)}")
fig.tight_layout()
save(fig, "token_fates"); plt.show()
for m in methods:
    display(HTML(reporting.tokens_html(traces[m]["tokens"], traces[m]["fates"], traces[m]["anchors"],
                                       title=plotting.style(m)["label"])))

# %% [markdown]
# ## 3. How the sequence shrinks, and 4. how the prediction changes

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
ax1.step(range(L), [ids.shape[1]] * L, where="post", color="black", ls="--", label="dense")
same_lengths = all(traces[m]["tokens_per_layer"] == traces[methods[0]]["tokens_per_layer"] for m in methods)
for m, ls, lw in zip(methods, ["-", "--", ":", "-."] * len(methods), [4.0, 2.4, 1.4, 1.0] * len(methods)):
    st = plotting.style(m)   # wide to thin, solid to dotted: curves that coincide stay visible
    ax1.step(range(L), traces[m]["tokens_per_layer"], where="post", color=st["color"], ls=ls, lw=lw,
             marker=st["marker"], ms=4, markevery=2, label=st["label"])
ax1.set_xlabel("layer (0-based; a reduction after layer l shortens layer l+1 on)")
ax1.set_ylabel("tokens in the residual stream")
ax1.set_title("Sequence length through the model" + ("\n(identical for every method: the cut fixes the keep ratio)"
                                                     if same_lengths else ""))
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

# %% [markdown]
# ### Next-token KL at every position
#
# The reduced model returns full-length logits aligned by original position, but only the positions
# that still own an output row after the last reduction have a prediction of their own. A removed
# position reads the row of the nearest earlier surviving token (the first row, if nothing earlier
# survives; a merged token takes the latest position of its members), i.e. a prediction made for
# another position: its KL of several nats says nothing about the reduction's quality. The plot
# therefore shows the KL at the positions with their own row only, and marks the others with grey
# ticks. Positions before the first removed token see exactly the dense prefix, so their KL is 0; a
# method that removes the very first token leaves no position outside the reduction (the table prints
# the first removed position of each method; the paragraph after it names them).

# %%
N = ids.shape[1]
fig, ax = plt.subplots(figsize=(10, 3))
kl_rows = []
for m in methods:
    red = analysis.run(model, ids, sweep.make_config(m, cut, seed=seed))   # the trace's forward, with its history
    own = analysis.positions_per_layer(red["history"], L, 1, N)[-1][0]
    own = sorted(int(p) for p in own if p >= 0)                             # positions with an output row
    kl_pos = analysis.kl_per_position(traces[m]["logits_dense"], traces[m]["logits_reduced"]).numpy()
    shown = np.full(N, np.nan)
    shown[own] = kl_pos[own]
    st = plotting.style(m)
    ax.plot(shown, color=st["color"], label=st["label"], lw=1, marker=".", ms=3)
    first_removed = next((i for i, f in enumerate(traces[m]["fates"]) if f["layer"] is not None), N)
    before = [p for p in own if p < first_removed]
    after = [p for p in own if p >= first_removed]
    kl_rows.append({"method": m, "positions with own row": len(own), "first removed token": first_removed,
                    "max KL before it": float(kl_pos[before].max()) if before else float("nan"),
                    "median KL after it (own rows)": float(np.median(kl_pos[after])) if after else float("nan"),
                    "KL at last position": float(kl_pos[-1]),
                    "last token": reporting.FATE_LABELS[traces[m]["fates"][-1]["fate"]]
                    + (f" after layer {traces[m]['fates'][-1]['layer']} into #{traces[m]['fates'][-1]['into']}"
                       if traces[m]["fates"][-1]["into"] is not None else "")})
removed_any = sorted({i for m in methods for i, f in enumerate(traces[m]["fates"]) if f["layer"] is not None})
ax.plot(removed_any, [1.2e-3] * len(removed_any), "|", color="#999999", ms=6,
        label="removed by some method (no own row; not shown)")
ax.set_xlabel("token position"); ax.set_ylabel("KL(dense || reduced), nats"); ax.set_yscale("symlog", linthresh=1e-3)
ax.set_ylim(0, None)
ax.set_title(f"Next-token KL at the positions that keep their own output row, {cut:.0%} token-layer cut")
ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
save(fig, "kl_per_position"); plt.show()
kl_table = pd.DataFrame(kl_rows)
display(kl_table)

# %% [markdown]
# What one position's KL says, rendered from this run's numbers (`utrc_study.report.prose.walkthrough_kl`),
# and the numbers per method:

# %%
kl_text = prose.walkthrough_kl(kl_rows)
display(Markdown(kl_text))
for r in kl_rows:
    print(f"{plotting.style(r['method'])['label']}: last-position KL {r['KL at last position']:.2f} nats "
          f"(last token: {r['last token']}); median KL over own rows after the first removal "
          f"{r['median KL after it (own rows)']:.2f} nats; first removed token: position {r['first removed token']}"
          + (f" (max KL before it {r['max KL before it']:.1e} nats)" if r["first removed token"] > 0 else ""))

# %%
data = {"model": model_names[0], "tokens": tokens, "importance_clip": imp.tolist(),
        "methods": {m: {"fates": traces[m]["fates"], "tokens_per_layer": traces[m]["tokens_per_layer"],
                        "anchors": traces[m]["anchors"], "kl_last": traces[m]["kl_last"],
                        "top_dense": traces[m]["top_dense"], "top_reduced": traces[m]["top_reduced"],
                        "fate_counts": reporting.token_fate_counts(traces[m]["fates"])} for m in methods}}
data["text"] = {"last_position_kl": kl_text}
ctx.write_results(data=data, protected=False, note="walkthrough: no tokens are protected (nothing is scored)")

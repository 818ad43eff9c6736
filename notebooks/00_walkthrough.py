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
# merging on alternate tokens) on the same text at the same FLOPs cut.

# %% tags=["parameters"]
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

# %%
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import HTML, display

from utrc_lib.experiments import analysis, sweep
from utrc_lib.report import plotting
from utrc_lib.report import provenance as reporting
from utrc_lib.report.notebooks import setup

ctx = setup("00_walkthrough", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
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
# layer); hatching = pruned in the hidden branch (UTRC's hybrid rule prunes the least important half of
# its matched edges there and merges the rest; the residual branch always merges).

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
                               title=f"{plotting.style(m)['label']} at {cut:.0%} FLOPs cut: {counts}")
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

# %%
# Per-position KL over the whole paragraph (positions before the first reduction are unaffected)
fig, ax = plt.subplots(figsize=(10, 3))
for m in methods:
    kl_pos = analysis.kl_per_position(traces[m]["logits_dense"], traces[m]["logits_reduced"])
    st = plotting.style(m)
    ax.plot(kl_pos.numpy(), color=st["color"], label=st["label"], lw=1)
ax.set_xlabel("token position"); ax.set_ylabel("KL(dense || reduced), nats"); ax.set_yscale("symlog", linthresh=1e-3)
ax.set_title(f"Next-token KL at every position, {cut:.0%} FLOPs cut"); ax.legend()
save(fig, "kl_per_position"); plt.show()

# %%
data = {"model": model_names[0], "tokens": tokens, "importance_clip": imp.tolist(),
        "methods": {m: {"fates": traces[m]["fates"], "tokens_per_layer": traces[m]["tokens_per_layer"],
                        "anchors": traces[m]["anchors"], "kl_last": traces[m]["kl_last"],
                        "top_dense": traces[m]["top_dense"], "top_reduced": traces[m]["top_reduced"],
                        "fate_counts": reporting.token_fate_counts(traces[m]["fates"])} for m in methods}}
ctx.write_results(data=data, protected=False, note="walkthrough: no tokens are protected (nothing is scored)")

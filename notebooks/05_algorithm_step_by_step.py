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
# # 05 The algorithm step by step
#
# UTRC (Zhan et al., EMNLP 2024, §3; docs/method.md §1) reduces the tokens that flow between two layers
# of a Mamba model. This notebook runs each of its steps on a toy sequence small enough to print
# (14 words, width 8, fixed seed), then on the real embedded model `tiny-mamba2`:
#
# 1. the importance score S of every token; 2. the split into A (less important half) and B;
# 3. the cosine matching A -> B and the r kept edges; 4. prune vs merge on the two branches;
# 5. the causal rule; 6. what the authors' released code does instead (`utrc_reference`);
# 7. the schedule: where, how much, and the FLOPs it saves. The last cell is an explorer with controls.
#
# Every number comes from the library (`utrc_study.report.teaching` calls the real reduction functions;
# tests/test_teaching.py checks the drawings against the reducer's plans). Each step ends with an
# exercise; click **Answer** to unfold it.

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False                 # tests: shorter real-model text (same steps)
model_name: str = "tiny-mamba2"     # embedded model (or a checkpoint path) for the real-model steps
toy_seed: int = 0                   # seed of the toy features
toy_keep: int = 10                  # tokens the toy keeps of its 14; the rest are the r kept edges
q: float = 0.5                      # hybrid rule: fraction of the kept edges pruned in the hidden branch
cut: float = 0.3                    # token-layer cut of the real-model steps and of the explorer's default
real_tokens: int = 24               # tokens of the paragraph in the real-model steps
explorer_tokens: int = 64           # tokens of the paragraph in the explorer
text_item: int = 3                  # ppl-task item that supplies the paragraph
seed: int = 0                       # torch seed
out_dir: str = ""                   # empty: scratch .cache/notebooks/<name>; `make figures` passes figures/<name>

# %%
import matplotlib.pyplot as plt
from IPython.display import display

from utrc_study.eval.suite import load_task
from utrc_study.experiments import sweep
from utrc_study.report import teaching
from utrc_study.report.notebooks import setup

ctx = setup("05_algorithm_step_by_step", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save
if quick:
    real_tokens, explorer_tokens = min(real_tokens, 16), min(explorer_tokens, 32)
toy = teaching.toy_sequence(seed=toy_seed)
print(len(toy.tokens), "toy tokens:", " ".join(toy.tokens), f"| y: {tuple(toy.y.shape)}, width D = {toy.hidden.shape[1]}")

# %% [markdown]
# ## 1. Importance: S = (1/D') Σ_d max(0, y_d)
#
# y is the SSM output of the layer (the input of the mixer's `out_proj`, the paper's "hidden
# states"). The paper's metric `clip` averages its positive part; Table 3 ablates the unclipped mean
# (`sum`), the l1 and the l2 norm. The bars are scaled per metric (the legend gives the scale).

# %%
scores = teaching.importance_scores(toy.y)           # {metric: (N,)} via core.methods.importance
fig, ax = plt.subplots(figsize=(10, 2.8))
teaching.draw_scores(ax, toy.tokens, scores)
ax.set_title("Step 1: importance of each toy token under the paper's metric and its alternatives")
save(fig, "step1_importance"); plt.show()

# %% [markdown]
# **Exercise 1.** Which metric can rank a token *last* although its features are large? Find such a
# token in the bars.
#
# <details><summary>Answer</summary>
#
# `sum` (the unclipped mean): a token whose channels are large but mostly negative gets a negative
# mean, while `l1` / `l2` (sizes) rank it high. `clip` ignores the negative part: such a token scores
# near 0 (look for the tokens with orange bars below zero and tall green / red bars).
# </details>

# %% [markdown]
# ## 2. The split: A = the less important half, B = the rest
#
# Sort the tokens by S; the lower floor(N/2) form A (the candidates for removal), the others B
# (`core.methods.importance_halves`). Under each token: its score and its rank (#0 = least important).

# %%
steps = teaching.utrc_steps(toy, toy_keep, q=q)       # the reducer's own functions, see the module doc
fig, ax = plt.subplots(figsize=(10, 1.9))
teaching.draw_split(ax, steps)
save(fig, "step2_split"); plt.show()
print("A:", [toy.tokens[i] + f"({i})" for i in steps.a_idx])
print("B:", [toy.tokens[i] + f"({i})" for i in steps.b_idx])

# %% [markdown]
# **Exercise 2.** With N = 15 tokens, how many are in A? Can a token of B ever be removed?
#
# <details><summary>Answer</summary>
#
# floor(15/2) = 7 tokens in A, 8 in B. A token of B is never a source in this round: it can only
# receive merges. (The library repeats a round on the reduced tokens when one round cannot remove r
# tokens; then a former B token can be in the next round's A.)
# </details>

# %% [markdown]
# ## 3. Matching: f_i = argmax_{b ∈ B} cos(a_i, b), g_i = that cosine; keep the r largest g_i
#
# Left: the cosine of every a_i with every b; the box in each row is a_i's best match f_i, the thick
# green boxes are the r kept edges (r = N - kept = 14 - 10 = 4 here). Below: the same edges as arcs
# over the token strip (thick = kept).

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.2))
teaching.draw_similarity(ax, steps)
ax.set_title(f"Step 3: cos(A x B); r = {steps.r} kept edges (green)")
save(fig, "step3_similarity"); plt.show()
fig, ax = plt.subplots(figsize=(10, 3.2))
teaching.draw_arcs(ax, steps)
save(fig, "step3_arcs"); plt.show()
display(teaching.edge_table(steps))

# %% [markdown]
# **Exercise 3.** Two a_i may share the same f_i. What happens to f_i then?
#
# <details><summary>Answer</summary>
#
# Both are merged into it with size weights: f_i <- (s_f f_i + s_1 a_1 + s_2 a_2) / (s_f + s_1 + s_2),
# and its size becomes s_f + s_1 + s_2 (sizes start at 1). Look for two arcs ending on one token.
# </details>

# %% [markdown]
# ## 4. Prune vs merge: the hybrid rule on the hidden branch, merge-only on the residual
#
# A kept edge a_i -> f_i is **pruned** (drop a_i, f_i unchanged) or **merged** (f_i <- size-weighted mean
# of f_i and a_i, drop a_i). UTRC's hidden branch (the mixer output) prunes a fraction q of the kept
# edges (the paper leaves open which; we prune the least important sources) and merges the rest; the
# residual branch merges all. Both branches drop the same tokens, so they stay aligned. A merged slot
# takes the *latest* original position of its members (`@p` below; step 5 says why).

# %%
fig, axes = plt.subplots(2, 1, figsize=(10, 2.6))
teaching.draw_branches(axes, steps)
save(fig, "step4_branches"); plt.show()
table, merged = teaching.merge_example(steps, toy)
print(f"slot {merged['slot']} after the reduction: size {merged['size']:.0f}, original position {merged['position']}")
display(table)

# %% [markdown]
# **Exercise 4.** With q = 0.25 and r = 4 kept edges, how many tokens does the hidden branch prune?
# Check with `teaching.utrc_steps(toy, toy_keep, q=0.25).edges` (the third entry says merged in hidden).
#
# <details><summary>Answer</summary>
#
# floor(q · r) = floor(0.25 · 4) = 1 edge is pruned in the hidden branch (the one whose source is least
# important); 3 are merged. The residual branch still merges all 4.
# </details>

# %% [markdown]
# ### Steps 1-4 on the real model
#
# The same steps at the first anchor of `tiny-mamba2` (after layer 2) on a real paragraph: the split
# and matching are computed from the SSM output y of that layer, the arcs are the edges of the plan the
# patched model applied in its forward (they coincide: tests/test_teaching.py checks it).

# %%
model, tokenizer = sweep.get_model(model_name)
texts = [it["context"] for it in load_task("ppl", max(text_item + 1, 8))]
real, info = teaching.real_anchor_steps(model, tokenizer, texts[text_item], cut=cut, max_tokens=real_tokens, q=q)
print(f"anchor: after layer {info['anchor']}; {info['tokens_before']} -> {info['tokens_after']} tokens")
fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 4.6), height_ratios=[1, 2])
teaching.draw_split(ax1, real)
teaching.draw_arcs(ax2, real)
for t in ax1.texts + ax2.texts:
    t.set_fontsize(6)
save(fig, "steps1to4_real_model"); plt.show()
display(teaching.edge_table(real))

# %% [markdown]
# ## 5. The causal rule: content may only move forward
#
# In a causal LM the prediction at position t may depend on tokens 0..t only. Merging a *later* token
# into an *earlier* slot breaks this if the slot keeps the earlier position: every position from there
# on then sees the future. The fix (docs/method.md §3.1): the merged slot takes the **latest** position
# of its members, so content only moves forward.
#
# Two tokens on the real model, one merge after layer 0: the later token (x1) is merged into the first.
# We run it for two different x1. The **dense** prediction at position 0 is the same for both (it only
# sees `The`). With the **non-causal** placement the merged row claims position 0, and its prediction
# changes with x1: the future leaked. With the **causal** placement the same row claims position 1,
# where seeing both tokens is allowed; position 0 has no prediction of its own (the scorer never reads
# it: it protects the positions it scores).

# %%
example = teaching.two_token_example(model, tokenizer, "The", [" cat", " house"])
display(teaching.causal_table(example, tokenizer))
leak = teaching.leak_summary(example)
print(f"max |logit change| at position 0 when only x1 changes: dense {leak['dense position 0']:.2e}, "
      f"non-causal row at position 0 {leak['non-causal row at position 0']:.3f}")
print("positions that own a row: non-causal", leak["non-causal positions"], "| causal", leak["causal positions"])

# %% [markdown]
# **Exercise 5.** In the table the non-causal and causal rows have the same logits. Why, and why is
# only one of them a leak?
#
# <details><summary>Answer</summary>
#
# Both runs compute the same thing (one merged token through layers 1-11); they differ only in the
# position the row is *attributed* to. Position 0 may only use token 0, so a row that mixes in x1
# is a leak there; at position 1 using both tokens is the definition of a causal prediction. With
# more tokens the placement also changes the order of the slots, and then the numbers differ as well.
# </details>

# %% [markdown]
# ## 6. What the released code does: `utrc_reference`
#
# The authors' code (docs/method.md §2) matches rows of the clipped, L2-normalised mixer output **after
# sorting each channel along the tokens**, so its "a" and "b" rows are rank levels, not tokens (left).
# It then applies the chosen row indices to even (sources) and odd (destinations) positions: with
# non-negative values the sources are positions 0, 2, ..., 2r-2 and every destination is position 1, a
# non-causal fold (right: UTRC as the paper states it above, the released behaviour below, same toy).

# %%
ref = teaching.reference_steps(toy, toy_keep, q=q)
fig = plt.figure(figsize=(12, 3.6))
gs = fig.add_gridspec(2, 2, width_ratios=[1, 2.4])
teaching.draw_reference_sort(fig.add_subplot(gs[:, 0]), toy, ref)
teaching.draw_fates_strip(fig.add_subplot(gs[0, 1]), toy.tokens, teaching.toy_fates(steps.result, len(toy.tokens)),
                          "UTRC (paper text, causal): sources -> their best match")
teaching.draw_fates_strip(fig.add_subplot(gs[1, 1]), toy.tokens, teaching.toy_fates(ref["result"], len(toy.tokens)),
                          f"utrc_reference (authors' code): sources {ref['src']} -> {sorted(set(ref['dst']))}")
save(fig, "step6_reference"); plt.show()

# %% [markdown]
# **Exercise 6.** Why does the fold into position 1 hardly depend on the text?
#
# <details><summary>Answer</summary>
#
# After the per-channel sort, row k holds the k-th largest value of every channel, so the rows are
# ordered by size and the lower half is often all zero (clipped values): the best a-rows are the first
# ones and `node_idx` is 0 for all of them. Row index i is then read as "even token 2i" and
# destination 0 as "odd token 1", whatever the tokens are.
# </details>

# %% [markdown]
# ## 7. The schedule: anchors, keep ratio, FLOPs
#
# Reduction runs after the anchors (12, 17, ..., 42 for 64 layers; a depth-scaled rule otherwise:
# 2, 4, 6, 8 for this 12-layer model), with one keep ratio rho at each. The paper's FLOPs cut is the
# token-layer cut 1 - (1/L) Σ_l n_l / N; `keep_ratio_for_flops` solves it for rho. The analytic FLOPs
# cut (`utrc_lib.flops`: projections, conv, scan, norms, LM head, plus the reduction's own cost) is
# smaller, mostly because the LM head on every position is not reduced.

# %%
L = len(model.backbone.layers)
N_sched = 120
sched = teaching.schedule_table(L, N_sched, [0.1, 0.2, 0.3], model)
display(sched.drop(columns=["tokens per layer"]))
fig, ax = plt.subplots(figsize=(8, 3))
teaching.draw_schedule(ax, sched, L, N_sched)
ax.set_title(f"Step 7: tokens per layer of {model_name} ({L} layers) on {N_sched} tokens")
save(fig, "step7_schedule"); plt.show()

# %% [markdown]
# **Exercise 7.** Why is the keep ratio for a 30% cut (column `keep ratio rho` of the table above) far
# above 0.7?
#
# <details><summary>Answer</summary>
#
# The layers before the first anchor always see all N tokens, and each anchor compounds: after the
# k-th anchor a layer sees rho^k N tokens. To cut 30% of the token-layers with 4 anchors, the later
# layers must each shed a share, so rho per anchor stays well above 0.7.
# </details>

# %% [markdown]
# ## Explorer: the real model under your settings
#
# The figure below is the default setting (what `make figures` saves). In JupyterLab, the controls
# under it re-run the patched model and re-draw the token fates, the sequence length through the layers
# and the KL of the next-token prediction (at the positions that keep their own output row).

# %%
defaults = dict(teaching.EXPLORER_DEFAULTS, cut=cut, q=q, paragraph=text_item)
data = teaching.explorer_data(model, tokenizer, texts[text_item], method=defaults["method"], metric=defaults["metric"],
                              cut=cut, q=q, max_tokens=explorer_tokens)
fig = plt.figure(figsize=(11, 5.5))
teaching.draw_explorer(fig, data)
save(fig, "explorer_default"); plt.show()
display(teaching.explorer(model, tokenizer, texts, max_tokens=explorer_tokens, defaults=defaults))

# %%
ctx.write_results(data={
    "toy_tokens": toy.tokens,
    "importance": {m: [round(float(v), 6) for v in s] for m, s in scores.items()},
    "side_a": steps.a_idx, "side_b": steps.b_idx, "best_match": steps.f,
    "kept_edges": [[s, d, mh, mr] for s, d, mh, mr in steps.edges],
    "merge_example": {k: merged[k] for k in ("slot", "position", "size", "base")},
    "real_model": {"anchor": info["anchor"], "tokens_before": info["tokens_before"],
                   "tokens_after": info["tokens_after"], "kept_edges": [[s, d, mh, mr] for s, d, mh, mr in real.edges]},
    "causal": leak,
    "reference": {"sources": ref["src"], "destinations": ref["dst"]},
    "schedule": sched.to_dict(orient="records"),
    "explorer_default": {"kl_last": data["trace"]["kl_last"], "tokens_per_layer": data["trace"]["tokens_per_layer"]},
}, protected=False, note="teaching notebook: nothing is scored")

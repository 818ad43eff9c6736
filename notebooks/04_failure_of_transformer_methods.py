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
# # 04 Why transformer token-reduction methods fail on SSMs (analog of the paper's Figure 1)
#
# Left: accuracy against the FLOPs cut for EViT- and PuMer-style reduction (and ToMe) relative to UTRC,
# as a fraction of the dense model's accuracy. Right: error growth across layers after a single
# reduction: for each method we reduce once (after one layer, same keep ratio) and measure, at every
# later layer, the relative L2 error of the residual stream against the dense model at the kept tokens'
# original positions. In an SSM a removed token is also removed from every later token's recurrent
# state, so the error keeps growing with depth instead of staying local.

# %% tags=["parameters"]
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

# %%
from pathlib import Path
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import display

from utrc_lib.experiments import analysis, sweep
from utrc_lib.report import plotting
from utrc_lib.report.notebooks import setup

ctx = setup("04_failure_of_transformer_methods", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:
    methods, cuts, limit, error_texts = methods[:2], cuts[1:2], min(limit or 6, 6), 2
    if cache_dir == "../.cache/sweeps":
        cache_dir = str(out / "cache")
configs = analysis.method_grid(model_names, methods, cuts)   # dense + every method at every cut (01's rows)
res = sweep.run(sweep.evaluate_config, configs, Path(cache_dir) / "eval.jsonl", desc="04 accuracy",
                common=dict(tasks=tasks, limit=limit, seed=seed, batch_size=batch_size))
print(res.report())
df = analysis.with_avg_acc(res.frame())
dense = df[df["method"] == "none"].set_index("model")["avg_acc"]
df["relative_acc"] = df["avg_acc"] / df["model"].map(dense)

# %%
from utrc_lib.core.config import ReductionConfig
errs = []
for name in model_names:
    model, tok = sweep.get_model(name)
    ids = analysis.passage_batch(tok, error_texts)   # (error_texts, n) ppl-task contexts cut to the shortest
    dense_run = analysis.run(model, ids)
    for m in methods + ["random"]:
        cfg = ReductionConfig(method=m, layers=(error_layer,), keep_ratio=error_keep_ratio, seed=seed,
                              causal=True)
        e = analysis.layer_errors(model, ids, cfg, dense=dense_run)
        errs.append(dict(model=name, method=m, **e))
err = pd.DataFrame(errs)
display(err[["model", "method", "kl_last"]])

# %%
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
    ax.set_title(f"{Path(name).name}: one reduction after layer {error_layer}\n(keep {error_keep_ratio:.0%} of tokens)")
    ax.legend(fontsize=7)
fig.tight_layout(); save(fig, "failure_of_transformer_methods"); plt.show()

# %%
keep = [c for c in df.columns if not c.startswith("meta/") or c == "meta/protect"]
ctx.write_results(data={"accuracy": df[keep], "layer_errors": err}, errors=analysis.sweep_errors(res),
                  protected=bool(df["protect"].all()),
                  error_definition="||h_reduced - h_dense[original positions]|| / ||h_dense[...]|| over kept tokens, per layer")

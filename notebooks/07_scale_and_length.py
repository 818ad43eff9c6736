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
# # 07 Scale and length: does UTRC's margin appear or grow with model size and input length?
#
# The paper's claim is about 1.3-2.8B models. Here: the four embedded models (tiny 12 layers, small 24
# layers; Mamba-2 and Mamba-1) on benchmark suite v2 (`data/benchmarks_v2/`): the calibrated short tasks
# (~60-150 tokens, the 128-token point of the length axis) and the long tasks at 512 / 1024 / 2048 tokens
# (long-range cloze, pass key retrieval by 4-way choice, held-out perplexity). Rows come from
# `scripts/scale_length_eval.py` (one cached sweep row per model, method, cut and task, with item arrays;
# the GPU run is `scripts/gpu_scale_length.sh`). By default this notebook renders the committed,
# slimmed cache `figures/07_scale_and_length/cache.jsonl` (its rows say where and at which sizes they
# were computed; `results.json` lists them); without it, it runs a small CPU sweep first.
#
# Outputs: `dense_accuracy.md` (every v2 task x model, 95% CI, chance), `long_context_table.md` (every
# reduced row: value with CI, paired change vs dense, token-layer cut beside the analytic FLOPs cut at the
# task's length; UTRC minus each baseline per task with p and Holm-adjusted p),
# `utrc_margin_scale_length.png/.pdf` (UTRC minus each baseline, paired 95% CI, against input length, one
# column per model and one row per task family, at the 30% cut; `_20` / `_10` at the 20% / 10% cuts) and
# `results.json`. Every task is reported on its own: pass key retrieval and long-range cloze are never
# averaged. The baselines are `methods` without UTRC, including UTRC as the authors' released code does it
# (`utrc_reference`); a method the cache has no rows for is named below, not drawn. Every number in the
# text is rendered from the tables (`utrc_study.report.scale_length`).

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False                          # tiny sizes for tests
cache: str = "../figures/07_scale_and_length/cache.jsonl"   # the slimmed cache of the GPU run (committed)
cpu_models: list = ["tiny-mamba2"]           # the CPU fallback sweep when `cache` is missing
cpu_tasks: list = ["cloze_v2", "passkey_512", "longppl_1024"]
cpu_limit: int = 8                           # items per task of the CPU fallback
methods: list = ["utrc", "utrc_reference", "evit", "pumer", "tome"]   # UTRC and the baselines it is compared with
figure_cuts: list = [0.3, 0.2, 0.1]          # one margin figure per cut (0.3: utrc_margin_scale_length.png)
seed: int = 0
resamples: int = 10000                       # bootstrap resamples of every interval (seeded by seed)
out_dir: str = ""                            # empty: scratch .cache/notebooks/<name>; `make figures` passes figures/<name>

# %%
import os
import subprocess
import sys
from pathlib import Path

from IPython.display import Markdown, display

from utrc_study.report import scale_length as sl
from utrc_study.report.notebooks import setup

ctx = setup("07_scale_and_length", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save
REPO = Path("..").resolve()

# %%
if quick:
    cpu_tasks, cpu_limit, resamples = cpu_tasks[:2], min(cpu_limit, 2), min(resamples, 200)
    cache = str(out / "cache.jsonl")   # always the small CPU sweep, into the scratch folder
source = Path(cache)
if not source.is_file():   # no committed GPU cache: a small CPU sweep (resumable) into the output folder
    source = out / "cpu_cache.jsonl"
    cmd = [sys.executable, str(REPO / "scripts/scale_length_eval.py"), "--cache", str(source), "--models", *cpu_models,
           "--tasks", *cpu_tasks, "--limit", str(cpu_limit), "--cuts", "0.3", "--device", "cpu", "--methods", *methods]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(run.stdout[-2000:])
    if run.returncode:
        raise RuntimeError(run.stderr[-4000:])
rows = sl.load_rows(source)
print(f"{len(rows)} rows from {source}")
stale = sl.stale_rows(rows)   # measured on other weights / another task file than the ones here now
if stale:
    print(f"WARNING: {len(stale)} row(s) are stale (recompute them with scripts/scale_length_eval.py):")
    for st in stale[:10]:
        print("   ", st)
missing = sl.missing_methods(rows, methods)   # e.g. a cache computed before a method joined the comparison
baselines = [m for m in methods if m != "utrc" and m not in missing]
display(Markdown(f"**No rows in this cache for {', '.join(missing)}**: the tables and figures below show the other "
                 f"methods. Compute them with `scripts/scale_length_eval.py --methods {' '.join(missing)}` (GPU: "
                 f"`scripts/gpu_scale_length.sh`)." if missing else f"Methods: {', '.join(methods)}."))

# %% [markdown]
# ## Dense accuracy of every v2 task, every model (95% CI, chance level)

# %%
dense = sl.dense_table(rows, resamples=resamples, seed=seed)
long = sl.long_context_table(rows, resamples=resamples, seed=seed)
margin = sl.margin_table(rows, baselines=baselines, resamples=resamples, seed=seed)   # Holm: every comparison at a cut
md = sl.markdown(dense, long, margin, resamples=resamples)
for name, text in md.items():
    (out / name).write_text(text)
display(Markdown(md["dense_accuracy.md"]))

# %% [markdown]
# ## Reduced models: paired change vs dense; token-layer cut beside the analytic FLOPs cut
#
# The token-layer cut is the paper's FLOPs definition (the x-axis of every figure); the analytic cut
# counts every FLOP of `utrc_lib.core.flops` at the task's length. How far apart the two are, per length
# and method, is rendered below from the table.

# %%
agreement = sl.cut_agreement(long)
display(Markdown(agreement))
display(Markdown(md["long_context_table.md"]))

# %% [markdown]
# ## UTRC's margin over each baseline as a function of input length, per model scale
#
# Each task on its own; bars are unadjusted 95% intervals, filled markers the comparisons that survive
# the Holm correction over every comparison of that cut's figure. The summary is rendered from the table.

# %%
summary = sl.margin_summary(margin)
display(Markdown(summary))
cuts_here = sorted({float(c) for c in margin["cut"]}, reverse=True) if len(margin) else []
for c in figure_cuts:
    if not any(abs(c - x) < 1e-9 for x in cuts_here):
        continue
    fig = sl.plot_margins(margin, cuts=[c])
    save(fig, "utrc_margin_scale_length" + ("" if abs(c - 0.3) < 1e-9 else f"_{round(c * 100)}"))

# %%
devices = sorted({str(r["result"].get("meta/device")) for r in rows})
items = {f"{r['params']['model']}/{r['params']['method']}/{r['params']['cut']}/{r['params']['tasks'][0]}":
         int(r["result"].get(f"{r['params']['tasks'][0]}/n", 0)) for r in rows}
ctx.write_results(data={"source": os.path.relpath(source, REPO) if source.resolve().is_relative_to(REPO) else source.name,
                        "rows": len(rows), "stale_rows": stale, "devices": devices, "items_per_row": items,
                        "row_seeds": sorted({r["params"].get("seed") for r in rows}), "missing_methods": missing,
                        "dense": dense, "long_context": long, "margins": margin,
                        "text": {"cut_agreement": agreement, "margin_summary": summary},
                        "intervals": {"level": 0.95, "resamples": resamples, "seed": seed, "method":
                                      "percentile bootstrap over items, paired; every task on its own; McNemar "
                                      "exact vs dense per task; Holm over every UTRC-vs-baseline comparison at one "
                                      "cut (models x tasks x baselines); bootstrap p below 1/resamples: < 1/resamples"}},
                  computed_on=sl.computed_on(rows, source))
print("devices:", devices)

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
# # 03 Efficiency (analog of the paper's Figures 3-6)
#
# * CPU prefill latency and throughput against the token-layer cut (the paper's FLOPs definition, the
#   x-axis of every panel) on the tiny models (always measured here);
#   last-token logits (what generation needs) and full-sequence logits (what the paper's memory setup
#   returns) separately; decoding time per generated token, which prompt reduction does not change.
# * Analytic FLOPs cut (`utrc_lib.flops`) beside the token-layer cut.
# * Peak memory: not measured on CPU (torch's CPU allocator exposes no peak counter and tracemalloc does
#   not see it); GPU peak memory (`torch.cuda.max_memory_allocated`) and GPU timings are read from
#   `figures/03_efficiency/gpu_bench.json` when `python -m utrc_study.bench` has produced it on a GPU.
#
# The CPU timings are measurements of this machine at this moment: they change from run to run (and
# with them this notebook's results.json and figures), unlike the other notebooks' numbers.

# %% tags=["parameters"]
# Parameters (papermill / `python -m utrc_study.figures --param key=value` override them)
quick: bool = False
model_names: list = ["tiny-mamba2", "tiny-mamba"]
methods: list = ["utrc", "evit", "tome"]     # reduced methods timed on CPU
cuts: list = [0.1, 0.2, 0.3]                 # token-layer cuts (paper's FLOPs definition)
batch: int = 4                               # CPU prefill batch
seq_len: int = 512                           # CPU prompt length (tokens)
new_tokens: int = 16                         # generated tokens for the decode timing
repeats: int = 3                             # timed repeats (median reported) after one warm-up
seed: int = 0
out_dir: str = ""                        # empty: scratch .cache/notebooks/<name> (quick: a temp folder); `make figures` passes figures/<name>
gpu_bench: str = "../figures/03_efficiency/gpu_bench.json"   # written by utrc_study.bench on a GPU machine
gpu_generate: str = "../figures/03_efficiency/gpu_generate.json"   # written by scripts/gpu_generate.sh
paper_results: str = "../data/paper_results.json"

# %%
import json
from pathlib import Path
import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt
from IPython.display import display

from utrc_study.experiments import analysis, sweep
from utrc_study.report import plotting
from utrc_study.report.notebooks import setup
from utrc_study.report.provenance import records_machine

ctx = setup("03_efficiency", globals())  # threads, seed, output folder, figure saver, style
out, save = ctx.out, ctx.save

# %%
if quick:
    methods, cuts, batch, seq_len, new_tokens, repeats = methods[:1], cuts[1:2], 1, 64, 2, 1
cpu = analysis.cpu_prefill_table(model_names, methods, cuts, batch=batch, seq_len=seq_len, repeats=repeats,
                                 seed=seed)   # median prefill ms, tokens/s, analytic FLOPs cut, speed-up
display(cpu.drop(columns=["times_ms"]))

# %%
# Decoding: time per generated token after the prompt (prompt reduction only shortens the prefill)
dec_rows = []
g = torch.Generator().manual_seed(seed)
for name in model_names:
    model, tok = sweep.get_model(name)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
    for method, cut in [("none", 0.0), (methods[0], max(cuts))]:
        t = analysis.cpu_decode_ms(model, ids, sweep.make_config(method, cut, seed=seed), new_tokens=new_tokens)
        dec_rows.append(dict(model=name, method=method, cut=cut, **t))
dec = pd.DataFrame(dec_rows); display(dec)

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.7))
for name, ls in zip(model_names, ["-", "--"]):
    for m in methods:
        d = cpu[(cpu["model"] == name) & (cpu["method"].isin([m, "none"])) & (cpu["logits"] == "last")].sort_values("cut")
        st = plotting.style(m)
        axes[0].plot(100 * d["cut"], d["prefill_ms"], ls=ls, color=st["color"], marker=st["marker"], label=f"{st['label']} - {Path(name).name}")
        axes[1].plot(100 * d["cut"], d["tokens_per_s"] / 1e3, ls=ls, color=st["color"], marker=st["marker"])
        axes[2].plot(100 * d["cut"], 100 * d["analytic_flops_cut"], ls=ls, color=st["color"], marker=st["marker"])
axes[0].set_ylabel("prefill latency (ms, median)"); axes[0].set_title(f"CPU prefill, last-token logits\nbatch {batch} x {seq_len} tokens, fp32, {torch.get_num_threads()} threads")
axes[1].set_ylabel("prefill throughput (k tokens/s)"); axes[1].set_title("CPU prefill throughput")
axes[2].plot([0, 100 * max(cuts)], [0, 100 * max(cuts)], color="black", lw=0.8, ls=":", label="analytic = token-layer")
axes[2].set_ylabel(plotting.ANALYTIC_CUT_LABEL); axes[2].set_title(f"Analytic FLOPs cut (incl. reduction cost), N={seq_len}")
for ax in axes:
    ax.set_xlabel(plotting.TOKEN_LAYER_CUT_LABEL)
axes[0].legend(fontsize=6.5); axes[2].legend(fontsize=7)
fig.tight_layout(); save(fig, "cpu_prefill"); plt.show()

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
d = cpu[cpu["method"].isin(["none", methods[0]])]
for name, ls in zip(model_names, ["-", "--"]):
    for logits, col in [("last", "#D55E00"), ("all", "#0072B2")]:
        e = d[(d["model"] == name) & (d["logits"] == logits)].sort_values("cut")
        axes[0].plot(100 * e["cut"], e["prefill_ms"], ls=ls, color=col, marker="o", label=f"{logits}-position logits - {Path(name).name}")
axes[0].set_xlabel(plotting.TOKEN_LAYER_CUT_LABEL); axes[0].set_ylabel("prefill latency (ms)")
axes[0].set_title(f"{plotting.style(methods[0])['label']}: last-token vs full-sequence logits (CPU)"); axes[0].legend(fontsize=7)
x = np.arange(len(dec))
axes[1].bar(x - 0.2, dec["prefill_ms"], 0.4, label="prefill (prompt)", color="#0072B2")
axes[1].bar(x + 0.2, dec["decode_ms_per_token"], 0.4, label="decode, per new token", color="#E69F00")
axes[1].set_xticks(x, [f"{r.model}\n{'dense' if r.method == 'none' else f'{r.method} {r.cut:.0%}'}" for r in dec.itertuples()], fontsize=7)
axes[1].set_ylabel("ms"); axes[1].set_title(f"Prefill vs generation (CPU, batch {batch}, {seq_len}-token prompt)"); axes[1].legend(fontsize=7)
fig.tight_layout(); save(fig, "cpu_logits_and_decode"); plt.show()

# %% [markdown]
# ## GPU measurements (from `utrc_study.bench`, when present) beside the paper's A100 numbers

# %%
records, gpu = analysis.load_gpu_bench(gpu_bench)   # (None, None) without a benchmark file
if gpu is not None:
    print(f"{len(records)} GPU records from {gpu_bench} ({len(gpu)} prefill)")
    fig = plotting.gpu_prefill_figure(gpu)
    save(fig, "gpu_prefill"); plt.show()
else:
    print(f"no GPU benchmark at {gpu_bench}: run `python -m utrc_study.bench` on a GPU machine to add the GPU panels")
paper = json.load(open(paper_results))["efficiency"]
fig = plotting.paper_efficiency_figure(paper)
save(fig, "paper_efficiency"); plt.show()

# %% [markdown]
# ## Generation as users run it (GPU, `scripts/gpu_generate.sh`, when present)
#
# mamba-ssm with CUDA-graph decoding after the (reduced) prefill, end to end (prefill + decoding) at
# 100, 500 and 2000 new tokens, batch 16 x 2048-token prompts, random fp16 weights of the paper's
# shapes. The reduction only shortens the prefill (decoding keeps a fixed-size state), so its
# end-to-end gain is bounded by Amdahl's law from the dense prefill share p:
# 1 / ((1 - p) + p (1 - cut)). The paper's throughput speed-ups (batch 16, 2048 + 100 tokens) are
# shown at 100 tokens. Decode ms/token is compared with the bound of moving the weights and the
# state once per step at the measured copy bandwidth.

# %%
from utrc_study.experiments.bench import generation_table

gen_records = json.load(open(gpu_generate)) if Path(gpu_generate).is_file() else None
gen_table = ask_table = None
if gen_records:
    paper_tp = json.load(open(paper_results))["efficiency"]["throughput_speedup"]
    paper_name = {"mamba2-2.7b": "Mamba-2-2.7B", "mamba-2.8b": "Mamba-2.8B"}
    gen_table = pd.DataFrame(generation_table(gen_records))
    gen_table["paper_speedup"] = [
        paper_tp.get(paper_name.get(r.model_shape, ""), {}).get(f"{r.flops_cut:.1f}")
        if (r.method == "utrc" and r.new_tokens == 100) else None for r in gen_table.itertuples()]
    display(gen_table.round(3))
    ask_table = pd.DataFrame([{k: r.get(k) for k in ("model_shape", "method", "flops_cut", "questions",
                                                       "question_tokens", "context_tokens", "answer_tokens",
                                                       "once_prefill_ms", "once_ms", "separate_ms",
                                                       "speedup_once_vs_separate", "answers_agree")}
                              for r in gen_records if r.get("kind") == "ask_many" and "error" not in r])
    display(ask_table.round(3))
    fig = plotting.gpu_generation_figure(gen_table, sorted({r.get("gpu") for r in gen_records if r.get("gpu")}))
    if fig is not None:
        save(fig, "gpu_generation"); plt.show()
else:
    print(f"no generation benchmark at {gpu_generate}: run `bash scripts/gpu_generate.sh` on a GPU machine")

# %%
data = {"cpu_prefill": cpu, "cpu_decode": dec, "cpu_memory": "not measured (no peak counter for torch's CPU allocator)",
        "gpu": None if gpu is None else gpu, "paper_efficiency": paper,
        "gpu_generation": gen_table, "gpu_ask_many": ask_table}
computed_on = [{"source": "this run: the CPU timings", "machine": "the rendering machine (rendered_on)"}] + [
    records_machine(Path(f).name, r) for f, r in ((gpu_bench, records), (gpu_generate, gen_records)) if r]   # GPU files
ctx.write_results(data=data, computed_on=computed_on, device={"cpu": "CPU fp32", "threads": torch.get_num_threads()},
                  timing="utrc_study.experiments.timing.time_ms: 1 warm-up, median of `repeats` (perf_counter on CPU)")

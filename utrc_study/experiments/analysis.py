"""Analyses behind the notebooks: token importance, reduction traces, error growth, output change, CPU timing,
and the small table helpers of the notebooks' sweeps (mean accuracy, grids, mode labels, failed rows).

Glossary: B batch, N input tokens, N' tokens after reductions, D d_model, L layers, V vocabulary.

All functions take a transformers Mamba / Mamba-2 causal LM and token ids (B, N) (no padding) and run
the model through `utrc_lib.apply`; the dense reference goes through the same patched layer loop with
method "none", so dense and reduced per-layer states follow one convention.
"""
from __future__ import annotations


from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from utrc_lib.core.config import ReductionConfig

Tensor = torch.Tensor
DENSE = ReductionConfig(method="none")


@torch.no_grad()
def run(model, input_ids: Tensor, config: Optional[ReductionConfig] = None, *, record: bool = False,
        fast: bool = False) -> dict:
    """One prefill through the patched layer loop (`fast`: under `hosts.speed.fast_inference`, the same
    numbers up to float rounding, several times faster on a CPU, most of all for Mamba-1).

    Returns {"logits": (B, N, V) by original position (NaN rows at removed positions), "last": (B, V)
    the final output row (the last kept token's: the next-token prediction generation continues
    from), "states": [L x (B, N_l', D)] residual stream after each layer, "history": per-anchor
    history (plans when record=True)}.
    """
    from utrc_lib.hosts.handle import apply
    from utrc_lib.scoring import _speed

    cfg = DENSE if config is None else config
    with apply(model, cfg) as handle, handle.options(record=record), _speed(model, fast):
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        reducer = handle.last_reducer
    L = len(model.backbone.layers)
    # "last": the final output row, the next-token prediction generation continues from: the last
    # position's own row, or, where the method removed the last token (its row is NaN in "logits"),
    # the row of the last kept position
    logits = out.logits.float()
    last = logits[:, -1]
    if reducer is not None and reducer.reduced:
        p_last = reducer.state.positions[:, -1].clamp_min(0)
        last = logits[torch.arange(logits.shape[0]), p_last]
    return {"logits": logits, "last": last, "states": list(out.hidden_states[:L]),
            "history": list(reducer.history) if reducer is not None else []}


def positions_per_layer(history: Sequence[dict], num_layers: int, batch: int, num_tokens: int) -> list[Tensor]:
    """(B, N_l') original positions of the tokens in the residual stream after each layer."""
    cur = torch.arange(num_tokens).expand(batch, num_tokens)
    by_layer = {h["layer"]: h["positions"] for h in history}
    out = []
    for layer in range(num_layers):
        if layer in by_layer:
            cur = by_layer[layer]
        out.append(cur)
    return out


@torch.no_grad()
def layer_errors(model, input_ids: Tensor, config: ReductionConfig, dense: Optional[dict] = None) -> dict:
    """Relative L2 error of the reduced residual stream against the dense one, per layer.

    At layer l, each reduced token is compared with the dense token at its original position:
    err_l = ||h_red - h_dense[pos]|| / ||h_dense[pos]|| over all kept (valid) tokens of the batch.
    Also returns the tokens per layer and the KL(dense || reduced) of the next-token distribution at
    the last position (mean over the batch). Per passage: `layer_error_items`.
    """
    it = layer_error_items(model, input_ids, config, dense=dense, batch=None)
    d2, r2 = it["d2"].sum(0), it["r2"].sum(0)
    errs = [float(d.sqrt() / r.sqrt().clamp_min(1e-12)) for d, r in zip(d2, r2)]
    return {"layer": list(range(len(errs))), "rel_error": errs, "tokens": it["tokens"], "anchors": it["anchors"],
            "kl_last": float(it["kl_last"].mean())}


@torch.no_grad()
def dense_runs(model, input_ids: Tensor, batch: Optional[int] = 50, fast: bool = False) -> list:
    """The dense runs `layer_error_items` compares with, one per chunk of `batch` passages (residual
    states and last row only), to share between the methods compared on the same passages."""
    step = input_ids.shape[0] if not batch else batch
    out = []
    for s in range(0, input_ids.shape[0], step):
        r = run(model, input_ids[s:s + step], fast=fast)
        out.append({"states": r["states"], "last": r["last"]})
    return out


@torch.no_grad()
def layer_error_items(model, input_ids: Tensor, config: ReductionConfig, dense=None,
                      batch: Optional[int] = 50, fast: bool = False) -> dict:
    """Per passage (row of input_ids) and layer, what `layer_errors` pools: d2 (B, L) the squared norm of
    h_reduced - h_dense[original positions] over the kept tokens, r2 (B, L) the squared norm of
    h_dense[those positions]; kl_last (B,) KL(dense || reduced) of the next-token distribution at the
    last position; tokens (L,) kept tokens per layer (mean over passages); anchors. The pooled relative
    error of a set of passages is sqrt(sum d2 / sum r2) (so passages can be resampled). `batch`: passages
    per forward (None: all at once). `dense`: the dense run of all passages (batch None), or
    `dense_runs(model, input_ids, batch, fast)` (the same chunks); computed here when None. `fast`: see `run`."""
    B, N = input_ids.shape
    step = B if not batch else batch
    if isinstance(dense, dict):   # the dense run of all passages: one chunk
        dense = [dense] if step >= B else None
    if dense is not None and len(dense) != -(-B // step):
        raise ValueError(f"dense holds {len(dense)} chunk runs; {-(-B // step)} chunks of {step} passages expected")
    d2s, r2s, kls, toks, anchors = [], [], [], [], []
    for k, s in enumerate(range(0, B, step)):
        ids = input_ids[s:s + step]
        dn = dense[k] if dense is not None else run(model, ids, fast=fast)
        red = run(model, ids, config, fast=fast)
        L = len(red["states"])
        d2, r2, nt = [], [], []
        for hd, hr, pos in zip(dn["states"], red["states"], positions_per_layer(red["history"], L, ids.shape[0], N)):
            ok = (pos >= 0)[..., None]
            ref = hd.gather(1, pos.clamp_min(0)[..., None].expand(-1, -1, hd.shape[-1])).float()
            d2.append((((hr.float() - ref) * ok) ** 2).sum((1, 2)))
            r2.append(((ref * ok) ** 2).sum((1, 2)))
            nt.append(ok[..., 0].sum(1).float())
        d2s.append(torch.stack(d2, 1))
        r2s.append(torch.stack(r2, 1))
        toks.append(torch.stack(nt, 1))
        lp = F.log_softmax(dn["last"].float(), -1)
        lq = F.log_softmax(red["last"].float(), -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
        anchors = [h["layer"] for h in red["history"]]
    return {"d2": torch.cat(d2s).double(), "r2": torch.cat(r2s).double(), "kl_last": torch.cat(kls).double(),
            "tokens": [float(v) for v in torch.cat(toks).mean(0)], "anchors": anchors}


def error_statistics(items: dict, error_layer: int, *, reference: str = "utrc", resamples: int = 10_000,
                     seed: int = 0) -> dict:
    """95% bootstrap intervals over passages of `layer_error_items` results, items = {method: items} of
    one model: per method the pooled relative error of every layer ("rel_error", "rel_low", "rel_high"),
    the last layer's ("final"), whether it grows from layer error_layer + 1 to the last ("grows": the
    paired interval of the difference lies above 0) and the last-position KL ("kl_last"); and the
    reference's final error minus each other method's, paired over passages ("<reference>_minus")."""
    import numpy as np

    from . import stats

    def ratio(d, r):
        return np.sqrt(d.sum(-1) / np.maximum(r.sum(-1), 1e-300))

    kw = dict(resamples=resamples, seed=seed)
    out: dict = {"methods": {}, f"{reference}_minus": {}}
    for m, it in items.items():
        d2, r2 = it["d2"].numpy(), it["r2"].numpy()
        last, first = d2.shape[1] - 1, min(error_layer + 1, d2.shape[1] - 1)
        per_layer = [stats.bootstrap([d2[:, l], r2[:, l]], ratio, **kw) for l in range(d2.shape[1])]
        growth = stats.bootstrap([d2[:, last], r2[:, last], d2[:, first], r2[:, first]],
                                 lambda a, b, c, d: ratio(a, b) - ratio(c, d), **kw)
        kl = stats.bootstrap_mean(it["kl_last"].numpy(), **kw)
        out["methods"][m] = {"rel_error": [c.estimate for c in per_layer], "rel_low": [c.low for c in per_layer],
                             "rel_high": [c.high for c in per_layer], "final": per_layer[-1].to_dict(),
                             "growth": growth.to_dict(), "grows": growth.low > 0, "kl_last": kl.to_dict()}
    if reference in items:
        ru = items[reference]
        for m, it in items.items():
            if m == reference:
                continue
            L = it["d2"].shape[1] - 1
            arrays = [ru["d2"][:, L].numpy(), ru["r2"][:, L].numpy(), it["d2"][:, L].numpy(), it["r2"][:, L].numpy()]
            ci = stats.bootstrap(arrays, lambda a, b, c, d: ratio(a, b) - ratio(c, d), p_value=True, **kw)
            out[f"{reference}_minus"][m] = ci.to_dict()
    return out


def next_token_kl(dense_logits: Tensor, reduced_logits: Tensor) -> float:
    """Mean over the batch of KL(p_dense || p_reduced) (nats) of (B, V) logits."""
    lp = F.log_softmax(dense_logits.float(), -1)
    lq = F.log_softmax(reduced_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@torch.no_grad()
def token_importance(model, input_ids: Tensor, metric: str = "clip") -> Tensor:
    """(L, N) importance of every token after every layer (dense run, sample 0), from the SSM output y.

    Reads the input of each mixer's out_proj (the SSM output y, the paper's "hidden states") with
    forward hooks and applies `utrc_lib.core.methods.importance(metric, y)`.
    """
    from utrc_lib.core.methods import importance

    feats = {}
    hooks = [layer.mixer.out_proj.register_forward_pre_hook(
        lambda mod, args, i=i: feats.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.backbone.layers)]
    try:
        model(input_ids=input_ids[:1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([importance(metric, feats[i])[0] for i in range(len(feats))])


@torch.no_grad()
def trace(model, tokenizer, text: str, config: ReductionConfig, *, max_tokens: int = 160) -> dict:
    """Which tokens of `text` a method removes, where and how, and how the next-token prediction changes.

    Returns {"tokens": [str], "ids", "fates": [token_fates], "tokens_per_layer",
    "anchors", "kl_last", "top_dense"/"top_reduced": [(token, prob)] x 5, "logits_dense"/"logits_reduced"}.
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    N = ids.shape[1]
    dense = run(model, ids)
    red = run(model, ids, config, record=True)
    L = len(red["states"])
    tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
    protect = None
    if config.protect_last:
        protect = N - config.protect_last
    elif config.protect_from is not None:
        protect = config.protect_from

    def top(logits, k=5):
        p = logits.softmax(-1)
        v, i = p.topk(k)
        return [(tokenizer.decode([int(j)]), float(x)) for x, j in zip(v, i)]

    return {"tokens": tokens, "ids": ids[0].tolist(), "fates": token_fates(red["history"], N, protect),
            "tokens_per_layer": [int(s.shape[1]) for s in red["states"]], "num_layers": L,
            "anchors": [h["layer"] for h in red["history"]],
            "kl_last": next_token_kl(dense["last"], red["last"]),
            "top_dense": top(dense["last"][0]), "top_reduced": top(red["last"][0]),
            "logits_dense": dense["logits"][0], "logits_reduced": red["logits"][0]}


# -- CPU timing -----------------------------------------------------------------------------------
@torch.no_grad()
def cpu_prefill_ms(model, batch: int, seq_len: int, config: Optional[ReductionConfig] = None, *,
                   logits: str = "last", repeats: int = 5, warmup: int = 1, vocab: Optional[int] = None,
                   seed: int = 0) -> dict:
    """Median wall time (ms) of one prefill forward on CPU (random token ids), dense or reduced.

    logits="last" asks the model for the last position only (logits_to_keep=1); "all" for all
    positions. Returns {"median_ms", "min_ms", "times_ms", "tokens_per_s"}.
    Timed with utrc_study.experiments.timing.time_ms (warm-up, then `repeats` calls; median reported).
    """
    from utrc_lib.hosts.handle import apply
    from .timing import median, time_ms

    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    keep = 1 if logits == "last" else 0
    handle = apply(model, config) if config is not None else None
    try:
        def step():
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits

        times = time_ms(step, "cpu", repeats=repeats, warmup=warmup)
    finally:
        if handle is not None:
            handle.remove()
    med = median(times)
    return {"median_ms": med, "min_ms": min(times), "times_ms": times,
            "tokens_per_s": batch * seq_len / (med / 1e3)}


@torch.no_grad()
def cpu_decode_ms(model, input_ids: Tensor, config: Optional[ReductionConfig] = None, *,
                  new_tokens: int = 16) -> dict:
    """Prefill time and time per generated token on CPU, dense (config None) or with a reduced prompt.

    input_ids: (B, N) prompt. One untimed warm-up generation (2 tokens), then one timed prefill
    (`logits_to_keep=1`, with cache) and one timed greedy generation of `new_tokens` tokens, each with
    `utrc_study.experiments.timing.time_ms` (perf_counter on CPU). Decoding time per token =
    (generation - prefill) / (new_tokens - 1), floored at 0: prompt reduction shortens only the prefill.
    Returns {"prefill_ms", "decode_ms_per_token"}.
    """
    from utrc_lib.hosts.handle import apply
    from .timing import time_ms

    def generate(n):
        return model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    handle = apply(model, config) if config is not None else None
    try:
        with torch.inference_mode():
            model.generate(input_ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            (pre,) = time_ms(lambda: model(input_ids=input_ids, use_cache=True, logits_to_keep=1), "cpu",
                             repeats=1, warmup=0)
            (gen,) = time_ms(lambda: generate(new_tokens), "cpu", repeats=1, warmup=0)
    finally:
        if handle is not None:
            handle.remove()
    return {"prefill_ms": pre, "decode_ms_per_token": max(gen - pre, 0) / max(new_tokens - 1, 1)}


def cpu_prefill_table(model_names: Sequence[str], methods: Sequence[str], cuts: Sequence[float], *, batch: int,
                      seq_len: int, repeats: int, seed: int = 0):
    """CPU prefill latency of dense and of every (method, cut), beside the analytic FLOPs cut (a DataFrame).

    One row per (model, method, cut, logits): logits "last" for every method, also "all" for dense and
    methods[0]. Columns: model, method, cut, logits, prefill_ms (median of `repeats` after a warm-up,
    `cpu_prefill_ms`), tokens_per_s, times_ms, analytic_flops_cut / token_layer_cut (`utrc_lib.flops`,
    last-token logits), speedup_vs_dense (dense time / this time, same model and logits).
    """
    import pandas as pd

    from utrc_lib.core.flops import flops
    from . import sweep

    rows = []
    for name in model_names:
        model, _ = sweep.get_model(name)
        for method, cut in [("none", 0.0)] + [(m, c) for m in methods for c in cuts]:
            cfg = sweep.make_config(method, cut, seed=seed)
            rep = flops(model, seq_len, cfg, batch=batch, logits="last")
            for logits in (["last", "all"] if method in ("none", methods[0]) else ["last"]):
                t = cpu_prefill_ms(model, batch, seq_len, cfg, logits=logits, repeats=repeats, seed=seed)
                rows.append(dict(model=name, method=method, cut=cut, logits=logits, prefill_ms=t["median_ms"],
                                 tokens_per_s=t["tokens_per_s"], times_ms=t["times_ms"],
                                 analytic_flops_cut=rep.flops_cut, token_layer_cut=1 - rep.token_layer_fraction))
    cpu = pd.DataFrame(rows)
    dense_ms = cpu[cpu["method"] == "none"].set_index(["model", "logits"])["prefill_ms"]
    cpu["speedup_vs_dense"] = [dense_ms[(r.model, r.logits)] / r.prefill_ms for r in cpu.itertuples()]
    return cpu


def load_gpu_bench(path) -> tuple:
    """Records of a `utrc_study.experiments.bench` JSON file and its prefill rows.

    Returns (records: list of dicts, prefill: DataFrame of the error-free records of kind "prefill",
    with `align` filled with 1 where missing), or (None, None) when the file does not exist.
    """
    import json
    from pathlib import Path

    import pandas as pd

    if not Path(path).is_file():
        return None, None
    raw = json.loads(Path(path).read_text())
    records = raw["records"] if isinstance(raw, dict) else raw  # a list of records (older files: a dict)
    every = pd.DataFrame([r for r in records if "error" not in r])
    gpu = every[every["kind"] == "prefill"] if "kind" in every else every
    if "align" in gpu:
        gpu = gpu.assign(align=gpu["align"].fillna(1).astype(int))  # kept counts rounded to multiples (1 = off)
    return records, gpu


# -- helpers of the notebooks' sweeps -------------------------------------------------------------
ACC_METRICS = ["cloze/acc", "choice4/acc_norm", "choice2/acc"]  # averaged into avg_acc (paper: mean of accuracies)


def acc_metrics(tasks: Sequence[str]) -> list[str]:
    """The accuracy columns averaged into avg_acc for a sweep over `tasks`: ACC_METRICS (the built-in
    three, as always) when any built-in task or no lm-eval task is among them, then, per lm-eval task
    (a name not of the built-in suite: lambada_openai, hellaswag, utrc_choice2, ...), "<task>/acc" or
    "<task>/acc_norm" as `paired.accuracy_key` picks (the paper's: acc_norm for hellaswag and
    arc_challenge; not for the local YAMLs of ppl tasks). Built-in tasks only: exactly ACC_METRICS."""
    from ..eval.lm_eval_rows import split_tasks
    from .paired import accuracy_key, has_accuracy

    builtin, external = split_tasks(list(tasks))
    out = list(ACC_METRICS) if builtin or not external else []
    for t in filter(has_accuracy, external):
        out.append(f"{t}/{'acc_norm' if accuracy_key(t) == 'correct_norm' else 'acc'}")
    return out


def _frame_tasks(df) -> list[str]:
    """Task names of a sweep frame's "<task>/acc" / "<task>/acc_norm" columns, in column order."""
    seen: list = []
    for c in df.columns:
        task, _, metric = str(c).rpartition("/")
        if metric in ("acc", "acc_norm") and task and task != "meta" and task not in seen:
            seen.append(task)
    return seen


def with_avg_acc(df, *, stderr: bool = False, metrics: Optional[Sequence[str]] = None):
    """Add `avg_acc` (mean of the accuracy columns present; NaN if none) to a sweep frame, in place.

    metrics: the accuracy columns (default `acc_metrics` of the frame's tasks: ACC_METRICS for the
    built-in suite, "<task>/acc" or "/acc_norm" for lm-eval tasks).
    stderr=True also adds `avg_acc_stderr` = sqrt(sum of the present `<metric>_stderr`^2) / the number
    of accuracy columns present.
    Returns the frame.
    """
    import numpy as np

    if metrics is None:
        metrics = acc_metrics(_frame_tasks(df))
    present = [c for c in metrics if c in df]
    df["avg_acc"] = df[present].mean(axis=1) if present else np.nan
    if stderr:
        errs = [c + "_stderr" for c in metrics if c + "_stderr" in df]
        df["avg_acc_stderr"] = np.sqrt((df[errs] ** 2).sum(axis=1)) / max(1, len(present))
    return df


def method_grid(model_names: Sequence[str], methods: Sequence[str], cuts: Sequence[float]) -> list[dict]:
    """Sweep configs (with model fingerprints): dense, then every method at every cut, for every model."""
    from . import sweep

    return sweep.with_fingerprints(sweep.grid(model=model_names, method=["none"], cut=[0.0])
                                   + sweep.grid(model=model_names, method=methods, cut=cuts))


def sweep_errors(result) -> list[dict]:
    """[{"params", "error"}] of the failed rows of a `sweep.run` result."""
    return [{"params": e["params"], "error": e["error"]} for e in result.errors]


def failed_rows(frames: dict, keys: Sequence[str]) -> list[dict]:
    """[{"group", "params" (the `keys` of the row), "error"}] of every row whose status is not "ok".

    frames: {group: DataFrame of `sweep.SweepResult.frame(errors=True)`}.
    """
    return [{"group": g, "params": {k: v for k, v in row.items() if k in keys}, "error": row.get("error")}
            for g, fr in frames.items() for _, row in fr.iterrows() if row.get("status", "ok") != "ok"]


def anchor_schedule(start: int, count: int = 4, step: int = 2) -> list[int]:
    """`count` reduction layers every `step` layers from `start` (02_design_choices' location sweep)."""
    return [start + step * i for i in range(count)]


UTRC_MODES = ["dense", "paper text, causal (ours)", "paper text, non-causal merges", "authors' code (utrc_reference)"]


def utrc_mode(row) -> str:
    """Label of a sweep row among UTRC_MODES (method, causal)."""
    if row["method"] == "none":
        return "dense"
    if row["method"] == "utrc_reference":
        return "authors' code (utrc_reference)"
    return "paper text, causal (ours)" if row["causal"] else "paper text, non-causal merges"


def modes_table(modes, dense):
    """Rows of the modes sweep labelled by `utrc_mode`, plus the (protected) dense rows: a new frame."""
    import pandas as pd

    f = modes.copy()
    f["mode"] = f.apply(utrc_mode, axis=1)
    return pd.concat([f, dense.assign(mode="dense", protect=True)], ignore_index=True)


def survival_table(modes):
    """avg_acc protected / unprotected per (model, mode) of a `modes_table`: columns unprotected,
    protected, survives (= protected / unprotected)."""
    piv = modes.pivot_table(index=["model", "mode"], columns="protect", values="avg_acc")
    piv.columns = ["unprotected" if not c else "protected" for c in piv.columns]
    piv["survives"] = piv["protected"] / piv["unprotected"]
    return piv


def importance_rank(importance: Tensor) -> Tensor:
    """(L, N) importance -> (L, N) per-layer rank scaled to [0, 1] (1 = most important)."""
    return importance.argsort(1).argsort(1).float() / (importance.shape[1] - 1)


def kl_per_position(dense_logits: Tensor, reduced_logits: Tensor) -> Tensor:
    """(N, V) dense and reduced logits -> (N,) KL(p_dense || p_reduced) in nats at every position."""
    lp, lq = dense_logits.log_softmax(-1), reduced_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def passage_batch(tokenizer, count: int) -> Tensor:
    """(count, n) token ids of the first `count` ppl-task contexts, each cut to the shortest one's n."""
    from ..eval.suite import load_task

    enc = [tokenizer(it["context"])["input_ids"] for it in load_task("ppl", count)]
    n = min(len(e) for e in enc)
    return torch.tensor([e[:n] for e in enc])


def token_fates(history: Sequence[dict], num_tokens: int, protect_from: Optional[int] = None) -> list[dict]:
    """Fate of each original token of a single-sample prefill, from its recorded reduction history.

    Args:
        history: `handle.last_reducer.history` of a batch-1 prefill run with plan recording on
            (`handle.options(record=True)`, as `utrc_study.experiments.analysis.run(..., record=True)` does); entries need "plan".
        num_tokens: input length N.
        protect_from: original index from which tokens were protected (shown as "protected").
    Returns:
        one dict per original token: {"fate": kept | merged | hybrid | pruned | protected,
        "layer": reduction layer that removed it (None if kept), "into": original index of the kept
        token it was merged into (None if pruned / kept)}.
    A slot carries the identity of its base (kept) token, whatever position a causal merge gives it.
    """
    fates = [{"fate": "kept", "layer": None, "into": None} for _ in range(num_tokens)]
    if protect_from is not None:
        for i in range(protect_from, num_tokens):
            fates[i]["fate"] = "protected"
    identity = list(range(num_tokens))  # original token carried by each current slot
    for entry in history:
        if "plan" not in entry:
            raise ValueError("history has no plans: run the forward inside handle.options(record=True)")
        plan = entry["plan"]
        if plan.base.shape[0] != 1:
            raise ValueError("token_fates reads batch-1 traces")
        base = plan.base[0].tolist()
        n_src = int(entry["tokens_before"]) - int(entry["tokens_after"])
        src = plan.src[0].tolist()[:n_src]  # sources first, by position
        slot = plan.src_slot[0].tolist()
        w_h = plan.src_weight.get("hidden")
        w_r = plan.src_weight.get("residual")
        for j, s in enumerate(src):
            mh = w_h is not None and float(w_h[0, j]) > 0
            mr = w_r is not None and float(w_r[0, j]) > 0
            fate = "merged" if (mh and mr) else "hybrid" if (mr or mh) else "pruned"
            into = identity[base[slot[j]]] if (mh or mr) else None
            fates[identity[s]].update(fate=fate, layer=int(entry["layer"]), into=into)
        identity = [identity[b] for b in base]
    return fates

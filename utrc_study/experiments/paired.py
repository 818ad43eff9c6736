"""Paired tables of a sweep with item arrays: intervals on every number, significance between methods.

The notebooks' figures read these tables (`utrc_study.experiments.stats` does the statistics). Input: a
`sweep.SweepResult` computed with items=True (every ok row holds row["items"][task]). Every row of a
sweep runs the same items in the same order, so two rows' arrays are paired item by item.

    acc = accuracy_table(result)          # per (model, method, cut, task): accuracy, 95% CI, delta vs dense + CI
    fid = fidelity_table(result)          # KL(dense || method) per token, top-1 agreement, delta ll/token: CIs
    ppl = perplexity_table(result)        # ppl task and cloze: ppl with CI, delta vs dense with CI
    cmp = comparison_table(result)        # UTRC vs each baseline per (model, cut, metric): delta, CI, p, Holm, verdict
    pw  = power_table(result)             # smallest paired accuracy difference n items resolve (measured discordance)

Accuracy metrics per task (the paper's): cloze acc, choice4 acc_norm, choice2 acc; "avg_acc" is their
mean, with a stratified bootstrap (each task's items resampled on their own, the same draws for the
two methods of a paired delta). Intervals: percentile bootstrap, `resamples` draws, `seed`, level 95%.
Significance of accuracy differences: exact McNemar per task; for avg_acc the stratified paired
bootstrap p-value; KL / ll per token: paired bootstrap; Holm-Bonferroni over a family of comparisons
(default: the baselines compared at one (model, cut, metric); `holm_over=()`: the whole table, e.g.
everything one figure shows).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from . import stats

TASK_ACC = {"cloze": "correct", "choice4": "correct_norm", "choice2": "correct"}
# lm-eval tasks (rows of `utrc_study.eval.lm_eval_rows`): the paper's metric of each of its six tasks
# (acc_norm for HellaSwag and ARC-c, as the Mamba and UTRC papers report), the local YAMLs as their
# built-in twins; any other lm-eval task: "correct" (lm-eval's acc)
LM_EVAL_ACC = {"lambada_openai": "correct", "hellaswag": "correct_norm", "piqa": "correct", "arc_easy": "correct",
               "arc_challenge": "correct_norm", "winogrande": "correct",
               "utrc_cloze": "correct", "utrc_choice4": "correct_norm", "utrc_choice2": "correct"}
AVG = "avg_acc"
BASELINES = ("evit", "pumer", "tome", "prune_only", "merge_only", "random")
DENSE_METHODS = ("none", "dense")

__all__ = ["TASK_ACC", "LM_EVAL_ACC", "accuracy_key", "accuracy_tasks", "has_accuracy", "kl_task", "comparison_metrics", "COMPARISON_METRICS",
           "FIDELITY_TASKS", "AVG", "BASELINES", "row_label", "items_by_row", "stratified_bootstrap",
           "accuracy_table", "fidelity_table", "perplexity_table", "comparison_table", "power_table",
           "verdicts", "holm_family"]


def row_label(params: dict, extra: Sequence[str] = (), by: str = "method") -> tuple:
    """(model, setting, cut, *extra params) of a sweep row: the key of the tables. The setting is the
    method ("none" for dense rows), or with `by` the value of that parameter (e.g. "metric" to
    compare the rows of a metric sweep with each other)."""
    method = params.get("method")
    dense = method in DENSE_METHODS
    cut = 0.0 if dense else float(params.get("cut", 0.0))
    setting = "none" if dense else (method if by == "method" else str(params.get(by)))
    return (params.get("model"), setting, cut) + tuple(_hashable(params.get(k)) for k in extra)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def items_by_row(result, extra: Sequence[str] = (), by: str = "method") -> dict:
    """{row_label: row["items"]} of the ok rows (the first row of a label wins; a row without items
    raises: the sweep must run with items=True)."""
    out = {}
    for r in result.rows:
        if r.get("status") != "ok":
            continue
        if "items" not in r:
            raise ValueError(f"row {r['params']} has no item arrays: run the sweep with items=True")
        out.setdefault(row_label(r["params"], extra, by), r["items"])
    return out


def _dense_of(rows: dict, label: tuple) -> Optional[dict]:
    """Items of the dense row of `label`'s model (same extra parameters when a dense row has them)."""
    model = label[0]
    for k, v in rows.items():
        if k[0] == model and k[1] == "none" and k[3:] == label[3:]:
            return v
    for k, v in rows.items():
        if k[0] == model and k[1] == "none":
            return v
    return None


def _ratio(x, n):
    """sum x / sum n over items (token-weighted KL, top-1 share): a bootstrap statistic."""
    return x.sum(-1) / n.sum(-1)


def _builtin(task: str) -> bool:
    from ..eval.lm_eval_rows import is_builtin

    return is_builtin(task)


def accuracy_key(task: str) -> str:
    """The item array whose mean is `task`'s accuracy: TASK_ACC for the built-in three, LM_EVAL_ACC
    for the paper's lm-eval tasks and the local YAMLs (utrc_v2_choice4: as choice4), else "correct"."""
    if task in TASK_ACC:
        return TASK_ACC[task]
    if task in LM_EVAL_ACC:
        return LM_EVAL_ACC[task]
    from ..eval.lm_eval_rows import local_source
    from ..eval.suite import task_kind

    source = local_source(task)
    if source is not None:
        return TASK_ACC.get(task_kind(source), "correct")
    return "correct"


def accuracy_tasks(tasks) -> list:
    """The tasks whose accuracy a table shows and avg_acc averages, in order: the built-in three
    (TASK_ACC order) present, then the lm-eval tasks (names not of the built-in suite) in their own
    order. `tasks`: a row's items ({task: arrays}; only tasks that have their accuracy array) or a
    list of task names. Built-in v2 tasks are not among them (as before)."""
    names = list(tasks)
    has = (lambda t: accuracy_key(t) in tasks[t]) if isinstance(tasks, dict) else has_accuracy
    return ([t for t in TASK_ACC if t in names and has(t)]
            + [t for t in names if t not in TASK_ACC and not _builtin(t) and has(t)])


def has_accuracy(task: str) -> bool:
    """False for the tasks known to have no accuracy: the built-in ppl tasks and the local YAMLs that
    read them (utrc_ppl, utrc_v2_longppl_*); True for every other name (an lm-eval task without
    "acc", e.g. wikitext, simply has no accuracy array: the tables skip it)."""
    from ..eval.lm_eval_rows import local_source
    from ..eval.suite import task_kind

    try:
        return task_kind(local_source(task) or task) != "ppl"
    except ValueError:   # an lm-eval task
        return True


def kl_task(tasks: Sequence[str]) -> str:
    """The task whose KL per token the notebooks' margin panels show: "ppl" when it is among `tasks`,
    else a local YAML of a ppl task (utrc_ppl), else lambada_openai (KL at its target word), else the
    first lm-eval task ("ppl" when there is none)."""
    names = list(tasks)
    if "ppl" in names:
        return "ppl"
    external = [t for t in names if not _builtin(t)]
    for t in external:
        if not has_accuracy(t):
            return t
    if "lambada_openai" in external:
        return "lambada_openai"
    return external[0] if external else "ppl"


def _acc(items: dict, task: str) -> np.ndarray:
    return stats.item_array(items[task], accuracy_key(task))


def _frame(recs: list, columns: Sequence[str]):
    """DataFrame of `recs`; with none, an empty frame that still has the table's columns (so that a
    notebook's selections on it work when a sweep has no such task, e.g. no ppl task)."""
    import pandas as pd

    return pd.DataFrame.from_records(recs) if recs else pd.DataFrame(columns=list(columns))


def stratified_bootstrap(groups_a: Sequence, groups_b: Optional[Sequence] = None, *,
                         resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED,
                         level: float = stats.DEFAULT_LEVEL) -> stats.Interval:
    """Mean over groups of each group's mean (avg_acc over tasks), or with `groups_b` the paired delta
    (a minus b, group i of a paired with group i of b). Each group's items are resampled on their
    own (the same draws for a and b); percentile interval; p_value as in `stats.paired_bootstrap`
    (two-sided bootstrap p of "delta = 0") when paired."""
    ga = [np.asarray(g, dtype=float) for g in groups_a]
    gb = None if groups_b is None else [np.asarray(g, dtype=float) for g in groups_b]
    if gb is not None and [len(g) for g in ga] != [len(g) for g in gb]:
        raise ValueError("paired groups must have the same sizes")
    if not ga or any(len(g) == 0 for g in ga):
        raise ValueError("every group needs at least one item")
    rng = np.random.default_rng(seed)
    est_a = np.mean([g.mean() for g in ga])
    est = est_a - (np.mean([g.mean() for g in gb]) if gb is not None else 0.0)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    draws = np.zeros(resamples)
    for i, g in enumerate(ga):
        for start in range(0, resamples, 1000):   # 1000 draws at a time (memory: 1000 x n indices)
            k = min(1000, resamples - start)
            idx = rng.integers(0, len(g), size=(k, len(g)))
            d = g[idx].mean(axis=1)
            if gb is not None:
                d = d - gb[i][idx].mean(axis=1)
            draws[start:start + k] += d / len(ga)
    lo, hi = stats._percentiles(draws, level)
    p = stats._boot_p(draws) if gb is not None else None
    return stats.Interval(float(est), float(lo), float(hi), level, int(sum(len(g) for g in ga)), resamples, seed, p)


def accuracy_table(result, tasks: Optional[Sequence[str]] = None, extra: Sequence[str] = (), *,
                   resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED):
    """DataFrame, one row per (model, method, cut, [extra], metric in tasks + avg_acc): n, acc, acc_low,
    acc_high, and against the model's dense row delta, delta_low, delta_high, p_vs_dense (McNemar
    exact per task, stratified bootstrap for avg_acc). tasks: default `accuracy_tasks` of each row
    (the built-in three, then lm-eval tasks)."""
    rows = items_by_row(result, extra)
    recs = []
    for label, items in rows.items():
        present = [t for t in (accuracy_tasks(items) if tasks is None else tasks)
                   if t in items and "correct" in items[t] and accuracy_key(t) in items[t]]
        if not present:
            continue
        dense = _dense_of(rows, label)
        for t in present + [AVG]:
            groups = [_acc(items, x) for x in present] if t == AVG else [_acc(items, t)]
            ci = stratified_bootstrap(groups, resamples=resamples, seed=seed)
            rec = dict(zip(("model", "method", "cut") + tuple(extra), label), metric=t, n=ci.n,
                       acc=ci.estimate, acc_low=ci.low, acc_high=ci.high)
            if dense is not None and label[1] != "none":
                dgroups = [_acc(dense, x) for x in present] if t == AVG else [_acc(dense, t)]
                d = stratified_bootstrap(groups, dgroups, resamples=resamples, seed=seed)
                p = d.p_value if t == AVG else stats.mcnemar_exact(groups[0], dgroups[0]).p_value
                rec.update(delta=d.estimate, delta_low=d.low, delta_high=d.high, p_vs_dense=p)
            recs.append(rec)
    return _frame(recs, ("model", "method", "cut") + tuple(extra) + ("metric", "n", "acc", "acc_low", "acc_high",
                                                                   "delta", "delta_low", "delta_high", "p_vs_dense"))


FIDELITY_TASKS = ("cloze", "choice4", "choice2", "ppl")


def fidelity_table(result, tasks: Optional[Sequence[str]] = None, extra: Sequence[str] = (), *,
                   resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED):
    """DataFrame per (model, method, cut, [extra], task, measure): estimate with 95% CI for measure in
    kl_per_token (KL(dense || method) at the scored positions, token-weighted: sum kl / sum tokens,
    bootstrapped as a ratio over items), top1 (share of scored positions whose argmax is dense's) and
    delta_ll_per_token (gold log-likelihood per token minus dense's, paired). Reduced rows only.
    tasks: default FIDELITY_TASKS, then the row's lm-eval tasks; a task without KL arrays is skipped."""
    rows = items_by_row(result, extra)
    recs = []
    for label, items in rows.items():
        if label[1] == "none":
            continue
        dense = _dense_of(rows, label)
        chosen = tasks if tasks is not None else \
            [t for t in FIDELITY_TASKS if t in items] + [t for t in items if t not in FIDELITY_TASKS and not _builtin(t)]
        for t in chosen:
            it = items.get(t)
            if not it or not it.get("kl") or any(v is None for v in it["kl"]):
                continue
            kl, tok = np.asarray(it["kl"], float), np.asarray(it["tokens"], float)
            top1 = np.asarray(it["top1"], float) * tok
            base = dict(zip(("model", "method", "cut") + tuple(extra), label), task=t)
            for measure, arrays in (("kl_per_token", (kl, tok)), ("top1", (top1, tok))):
                ci = stats.bootstrap(list(arrays), _ratio, resamples=resamples, seed=seed)
                recs.append({**base, "measure": measure, "estimate": ci.estimate, "low": ci.low, "high": ci.high,
                             "n": ci.n})
            if dense is not None and t in dense:
                a = np.asarray(it["ll_per_token"], float)
                b = np.asarray(dense[t]["ll_per_token"], float)
                ci = stats.paired_bootstrap(a, b, resamples=resamples, seed=seed)
                recs.append({**base, "measure": "delta_ll_per_token", "estimate": ci.estimate, "low": ci.low,
                             "high": ci.high, "n": ci.n, "p_vs_dense": ci.p_value})
    return _frame(recs, ("model", "method", "cut") + tuple(extra) + ("task", "measure", "estimate", "low", "high", "n",
                                                                   "p_vs_dense"))


def perplexity_table(result, tasks: Sequence[str] = ("ppl", "cloze"), extra: Sequence[str] = (), *,
                     resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED):
    """DataFrame per (model, method, cut, [extra], task): ppl with 95% CI (bootstrap over items of
    exp(-sum ll / sum tokens); cloze: per-item mean, tokens = 1 per item, as the cloze ppl is defined),
    and for reduced rows ppl minus dense ppl with its paired CI and bootstrap p."""
    rows = items_by_row(result, extra)
    recs = []
    for label, items in rows.items():
        dense = _dense_of(rows, label)
        for t in tasks:
            it = items.get(t)
            if not it:
                continue
            ll = np.asarray(it["ll"], float)
            tok = np.asarray(it["gold_tokens"], float) if t == "ppl" else np.ones_like(ll)
            ci = stats.bootstrap_ppl(ll, tok, resamples=resamples, seed=seed)
            rec = dict(zip(("model", "method", "cut") + tuple(extra), label), task=t, ppl=ci.estimate,
                       ppl_low=ci.low, ppl_high=ci.high, n=ci.n)
            if dense is not None and label[1] != "none" and t in dense:
                dll = np.asarray(dense[t]["ll"], float)
                d = stats.paired_bootstrap_ppl(ll, dll, tok, resamples=resamples, seed=seed)
                rec.update(delta=d.estimate, delta_low=d.low, delta_high=d.high, p_vs_dense=d.p_value)
            recs.append(rec)
    return _frame(recs, ("model", "method", "cut") + tuple(extra) + ("task", "ppl", "ppl_low", "ppl_high", "n", "delta",
                                                                   "delta_low", "delta_high", "p_vs_dense"))


def _metric_arrays(items: dict, metric: str, tasks: Optional[Sequence[str]] = None):
    """Per-item array(s) of `metric` for the comparisons: a task's accuracy (any task name: built-in
    or lm-eval), avg_acc (list of task arrays; tasks default `accuracy_tasks(items)`), "kl:<task>" (kl
    per token per item) or "ll:<task>" (gold ll per token per item). KeyError for a task not in items."""
    if metric == AVG:
        return [_acc(items, t) for t in (accuracy_tasks(items) if tasks is None else tasks) if t in items]
    if ":" not in metric:
        return _acc(items, metric)
    kind, _, task = metric.partition(":")
    it = items[task]
    if kind == "kl":
        return None if any(v is None for v in it["kl"]) else np.asarray(it["kl_per_token"], float)
    if kind == "ll":
        return np.asarray(it["ll_per_token"], float)
    raise ValueError(f"unknown comparison metric {metric!r}")


COMPARISON_METRICS = (AVG, "cloze", "choice4", "choice2", "kl:ppl", "ll:ppl")


def comparison_metrics(items: dict) -> list:
    """The default metrics of `comparison_table` for a reference row's items: COMPARISON_METRICS (those
    the row has), then each lm-eval task's accuracy and, where it has KL arrays, "kl:<task>" and
    "ll:<task>". For built-in rows exactly COMPARISON_METRICS."""
    out = list(COMPARISON_METRICS)
    for t in accuracy_tasks(items):
        if t not in out:
            out.append(t)
    for t in items:
        it = items[t]
        if not _builtin(t) and it.get("kl") and all(v is not None for v in it["kl"]):
            out += [f"kl:{t}", f"ll:{t}"]
    return out


def comparison_table(result, reference: str = "utrc", baselines: Iterable[str] = BASELINES,
                     metrics: Optional[Sequence[str]] = None,
                     extra: Sequence[str] = (), *, by: str = "method", alpha: float = 0.05,
                     holm_over: Optional[Sequence[str]] = None,
                     resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED):
    """DataFrame per (model, cut, [extra], metric, baseline): delta = reference minus baseline (for kl:
    lower is better, so a negative delta favours the reference), its 95% CI (unadjusted), p (`test`:
    mcnemar_exact per task accuracy, else the paired / stratified bootstrap with `resamples` draws),
    Holm-adjusted p_holm over one family of comparisons, and verdict "beats" / "beaten" / "unresolved"
    (p_holm < alpha in the favourable / unfavourable direction).

    The family: the rows that share the values of the columns `holm_over` (default ("model", "cut",
    *extra, "metric"): the baselines of one cell); holm_over=() makes every row of the table one family
    (what a figure that shows the whole table needs). Each row records family_size and holm_over. A
    bootstrap p of 0 enters the correction as 1 / resamples (`stats.p_floor`). `by`: the parameter whose
    values `reference` and `baselines` are (default the method; e.g. "metric" within a metric sweep).
    metrics: default `comparison_metrics` of the reference row (COMPARISON_METRICS for the built-in
    suite; lm-eval tasks add their accuracy, kl:<task> and ll:<task>)."""

    rows = items_by_row(result, extra, by)
    baselines = list(baselines)
    keys = ("model", "cut") + tuple(extra)
    holm_over = tuple(keys + ("metric",) if holm_over is None else holm_over)
    recs = []
    groups = sorted({(k[0], k[2]) + k[3:] for k in rows if k[1] == reference}, key=str)
    for g in groups:
        ref_label = (g[0], reference, g[1]) + g[2:]
        ref_items = rows[ref_label]
        for metric in (comparison_metrics(ref_items) if metrics is None else metrics):
            try:
                ref_arr = _metric_arrays(ref_items, metric)
            except KeyError:
                continue
            if metric == AVG and not ref_arr:
                continue
            if ref_arr is None:
                continue
            lower_better = metric.startswith("kl")
            for b in baselines:
                lab = (g[0], b, g[1]) + g[2:]
                if lab not in rows:
                    continue
                arr = _metric_arrays(rows[lab], metric)
                if arr is None:
                    continue
                if metric == AVG:
                    ci = stratified_bootstrap(ref_arr, arr, resamples=resamples, seed=seed)
                    p, test = ci.p_value, "stratified_bootstrap"
                elif ":" not in metric:
                    ci = stats.paired_bootstrap(ref_arr, arr, resamples=resamples, seed=seed)
                    p, test = stats.mcnemar_exact(ref_arr, arr).p_value, "mcnemar_exact"
                else:
                    ci = stats.paired_bootstrap(ref_arr, arr, resamples=resamples, seed=seed)
                    p, test = ci.p_value, "paired_bootstrap"
                favourable = ci.estimate < 0 if lower_better else ci.estimate > 0
                recs.append(dict(zip(keys, g), metric=metric, reference=reference, baseline=b, delta=ci.estimate,
                                 low=ci.low, high=ci.high, p=p, test=test,
                                 resamples=None if test == "mcnemar_exact" else resamples,
                                 favourable=bool(favourable), n=ci.n))
    families: dict = {}
    for i, r in enumerate(recs):
        families.setdefault(tuple(r[k] for k in holm_over), []).append(i)
    for members in families.values():
        adjusted = stats.holm({i: stats.p_floor(recs[i]["p"], recs[i]["resamples"]) for i in members})
        for i in members:
            r = recs[i]
            verdict = "unresolved"
            if adjusted[i] < alpha and r["delta"] != 0:
                verdict = "beats" if r["favourable"] else "beaten"
            r.update(p_holm=adjusted[i], verdict=verdict, family_size=len(members), holm_over=",".join(holm_over))
    for r in recs:
        del r["favourable"]
    return _frame(recs, keys + ("metric", "reference", "baseline", "delta", "low", "high", "p", "test", "resamples",
                                "n", "p_holm", "verdict", "family_size", "holm_over"))


def holm_family(cmp) -> str:
    """Which comparisons one Holm family of a comparison_table holds, in words: "all 84 comparisons of
    the table" (holm_over empty) or "the 6 comparisons that share model, cut, metric" (its largest)."""
    if cmp is None or not len(cmp):
        return "no comparisons"
    over = [c for c in str(cmp["holm_over"].iloc[0]).split(",") if c]
    size = int(cmp["family_size"].max())
    if not over:
        return f"all {size} comparisons of the table"
    return f"the {size} comparisons that share {', '.join(over)}"


def verdicts(cmp, metric: str = AVG) -> dict:
    """{(model, cut): {"beats": [...], "beaten": [...], "unresolved": [...]}} from a comparison_table."""
    out: dict = {}
    for _, r in cmp[cmp["metric"] == metric].iterrows():
        d = out.setdefault((r["model"], r["cut"]), {"beats": [], "beaten": [], "unresolved": []})
        d[r["verdict"]].append(r["baseline"])
    return out


def power_table(result, reference: str = "utrc", tasks: Optional[Sequence[str]] = None, extra: Sequence[str] = (),
                *, level: float = stats.DEFAULT_LEVEL, power: float = 0.8):
    """DataFrame per (model, cut, task): n items, the measured discordance of the reference against
    each other method at that cut (median over them) and the smallest paired accuracy difference
    that resolves at `level` (50% power, `stats.MDE.resolvable`) and the one detected with `power`.
    tasks: default `accuracy_tasks` of each reference row."""
    rows = items_by_row(result, extra)
    recs = []
    for label, items in rows.items():
        if label[1] != reference:
            continue
        others = [v for k, v in rows.items() if k[0] == label[0] and k[2] == label[2] and k[3:] == label[3:]
                  and k[1] not in (reference, "none")]
        for t in (accuracy_tasks(items) if tasks is None else tasks):
            if t not in items:
                continue
            a = _acc(items, t)
            disc = [stats.mcnemar_exact(a, _acc(o, t)).discordance for o in others if t in o]
            if not disc:
                continue
            pd_med = float(np.median(disc))
            mde = stats.minimum_detectable_effect(len(a), pd_med, level=level, power=power)
            recs.append(dict(zip(("model", "method", "cut") + tuple(extra), label), task=t, n=len(a),
                             discordance=pd_med, resolvable=mde.resolvable, at_power=mde.at_power, power=power,
                             exact=mde.exact))
    return _frame(recs, ("model", "method", "cut") + tuple(extra) + ("task", "n", "discordance", "resolvable",
                                                                   "at_power", "power", "exact"))


FRAME_METRICS = ("avg_acc", "cloze/acc", "choice4/acc_norm", "choice2/acc", "ppl/ppl", "kl/ppl")


def interval_columns(result, *, errors: bool = True, resamples: int = stats.DEFAULT_RESAMPLES,
                     seed: int = stats.DEFAULT_SEED, kl_task: str = "ppl"):
    """DataFrame aligned row by row with `result.frame(errors=errors)`: for each metric of FRAME_METRICS
    present, `<metric>_low` / `<metric>_high` (95% bootstrap interval of that row's own value; avg_acc
    stratified by task; ppl/ppl over windows; kl/ppl = KL per token on the ppl task, with `kl/ppl`
    itself as its point estimate). NaN for error rows and missing tasks. Rows with lm-eval tasks add
    their accuracies' intervals ("<task>/acc_low", ...); `kl_task` (default "ppl"; `kl_task(tasks)` for
    lm-eval sweeps) adds "kl/<kl_task>" with its interval when it is not the ppl task."""
    import pandas as pd

    recs = []
    for r in result.rows:
        if r.get("status") != "ok" and not errors:
            continue
        rec: dict = {}
        items = r.get("items") if r.get("status") == "ok" else None
        if items:
            present = accuracy_tasks(items)
            if present:
                ci = stratified_bootstrap([_acc(items, t) for t in present], resamples=resamples, seed=seed)
                rec.update({"avg_acc_low": ci.low, "avg_acc_high": ci.high})
            for t in present:
                key = f"{t}/{'acc_norm' if accuracy_key(t) == 'correct_norm' else 'acc'}"
                ci = stratified_bootstrap([_acc(items, t)], resamples=resamples, seed=seed)
                rec.update({f"{key}_low": ci.low, f"{key}_high": ci.high})
            if "ppl" in items:
                it = items["ppl"]
                ci = stats.bootstrap_ppl(it["ll"], it["gold_tokens"], resamples=resamples, seed=seed)
                rec.update({"ppl/ppl_low": ci.low, "ppl/ppl_high": ci.high})
                if not any(v is None for v in it["kl"]):
                    ci = stats.bootstrap([np.asarray(it["kl"], float), np.asarray(it["tokens"], float)], _ratio,
                                         resamples=resamples, seed=seed)
                    rec.update({"kl/ppl": ci.estimate, "kl/ppl_low": ci.low, "kl/ppl_high": ci.high})
            it = items.get(kl_task) if kl_task != "ppl" else None
            if it and it.get("kl") and not any(v is None for v in it["kl"]):
                ci = stats.bootstrap([np.asarray(it["kl"], float), np.asarray(it["tokens"], float)], _ratio,
                                     resamples=resamples, seed=seed)
                rec.update({f"kl/{kl_task}": ci.estimate, f"kl/{kl_task}_low": ci.low, f"kl/{kl_task}_high": ci.high})
        recs.append(rec)
    columns = [f"{m}{s}" for m in FRAME_METRICS for s in ("_low", "_high")] + ["kl/ppl"]
    if kl_task != "ppl":
        columns += [f"kl/{kl_task}", f"kl/{kl_task}_low", f"kl/{kl_task}_high"]
    columns += [k for k in dict.fromkeys(k for r in recs for k in r) if k not in columns]   # lm-eval tasks' own
    return pd.DataFrame.from_records(recs, columns=columns)

"""Built-in evaluator (no lm-eval): the offline task suite scored with token reduction, per item.

Every request is scored by the library's primitive, `utrc_lib.scoring.score_tokens` (lm-eval 0.4's
conventions, the reduction protecting each request's own scored tail, left padding, dense fallback for
requests too short to reduce: its module doc). What this module adds is the task level:
    * acc_norm divides the log-likelihood by the ending's character length (lm-eval:
      `len(choice)`, the choice without the leading delimiter);
    * cloze ppl = exp(-mean over items of the target's log-likelihood) (lm-eval's lambada
      "perplexity"); ppl task: token perplexity exp(-sum loglik / sum tokens) of the 64 scored tokens
      of each 256-token window given its first 192;
    * per task "dense_fallback": how many requests were scored dense (too short to reduce).

Item level (opt-in, the aggregates are the same numbers with it): `evaluate(items=True)` also
returns per-item arrays (correct, gold log-likelihood, KL(dense || reduced) and top-1 agreement with
the dense model at the scored positions; `_item_outcomes`). The dense reference is the scorer's own
dense pass (unpatched model, same sorted batches and padding), cached in memory per (model,
tokenizer, task, limit, batch_size, max_length): stored as float32 log-softmax at the scored positions
when that fits REFERENCE_BUDGET_BYTES (1 GiB; environment UTRC_REFERENCE_BUDGET_BYTES), else recomputed as a dense forward of each batch
beside the reduced one (exact either way; `DenseReference`). `utrc_study.experiments.stats` turns the
arrays into paired intervals and tests.

API:
    evaluate(model, tokenizer, tasks=("cloze", "choice4", "choice2", "ppl"), config=None, *,
             limit=None, batch_size=16, progress=True, max_length=1024, protect=True,
             items=False, protocol=None) -> dict
    clear_reference_cache()
    task_result(...)  (one task's metrics from its TokenScores; the fast path uses it too)
    re-exported from utrc_lib.scoring for the harness: score_tokens, dense_reference, encode_pair,
    pad_id, run_metadata, TokenScores, DenseReference
"""
from __future__ import annotations

import collections
import math
import time
import weakref
from typing import Optional, Sequence

from utrc_lib.core.config import ReductionConfig
from utrc_lib.scoring import (DenseReference, TokenScores, _env_bytes, dense_reference, encode_pair, pad_id,
                              request_signature,
                              run_metadata, score_tokens)
from .suite import available_tasks, load_task, task_kind

DEFAULT_TASKS = ("cloze", "choice4", "choice2", "ppl")




# -- tasks ---------------------------------------------------------------------------------------------
_TOKEN_CACHE: dict = {}  # (id(tokenizer), task, limit, task files) -> (tokenizer, token requests, extra)


def _task_requests(tokenizer, task: str, limit: Optional[int]):
    """Token requests of a task, cached per (tokenizer, task, limit, the task files' paths and
    content hashes: `suite.task_signature`) for repeated calls (sweeps)."""
    from .suite import task_signature

    key = (id(tokenizer), task, limit, task_signature(task))
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1], hit[2]
    items = load_task(task, limit)
    kind = task_kind(task)
    if kind == "cloze":
        reqs = [(it["context"], it["target"]) for it in items]
    elif kind == "choice4":
        reqs = [(it["context"], " " + e) for it in items for e in it["endings"]]
    elif kind == "choice2":
        reqs = [(it["context"], " " + o) for it in items for o in it["options"]]
    elif kind == "ppl":
        reqs = [(it["context"], it["continuation"]) for it in items]
    else:  # pragma: no cover - load_task rejects unknown names
        raise ValueError(task)
    toks = [encode_pair(tokenizer, c, x) for c, x in reqs]
    extra = {"items": items, "texts": reqs}
    _TOKEN_CACHE[key] = (tokenizer, toks, extra)
    return toks, extra


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def _score_task(task: str, items: list[dict], texts, res, toks) -> dict:
    out: dict = {"n": len(items)}
    kind = task_kind(task)
    if kind == "cloze":
        accs = [float(g) for _, g in res]
        lls = [ll for ll, _ in res]
        out.update(acc=sum(accs) / len(accs), acc_stderr=_stderr(accs), ppl=math.exp(-sum(lls) / len(lls)))
    elif kind in ("choice4", "choice2"):
        key = "endings" if kind == "choice4" else "options"
        accs, norms, j = [], [], 0
        for it in items:
            n = len(it[key])
            lls = [res[j + c][0] for c in range(n)]
            j += n
            pred = max(range(n), key=lambda c: lls[c])
            accs.append(float(pred == it["label"]))
            if kind == "choice4":
                normed = [lls[c] / len(it[key][c]) for c in range(n)]
                norms.append(float(max(range(n), key=lambda c: normed[c]) == it["label"]))
        out.update(acc=sum(accs) / len(accs), acc_stderr=_stderr(accs))
        if items and all("depth" in it for it in items):  # v2 passkey: accuracy per needle depth
            by = collections.defaultdict(list)
            for it, a in zip(items, accs):
                by[it["depth"]].append(a)
            out["acc_by_depth"] = {str(d): sum(v) / len(v) for d, v in sorted(by.items())}
        if kind == "choice4":
            out.update(acc_norm=sum(norms) / len(norms), acc_norm_stderr=_stderr(norms))
    elif kind == "ppl":
        lls = [ll for ll, _ in res]
        ntok = sum(len(t[1]) for t in toks)
        nbytes = sum(len(x.encode("utf-8")) for _, x in texts)
        out.update(ppl=math.exp(-sum(lls) / ntok), nll=-sum(lls) / ntok,
                   bits_per_byte=-sum(lls) / (math.log(2) * nbytes), tokens=ntok)
    return out


def _item_outcomes(task: str, items: list[dict], toks, details: list) -> dict:
    """Per-item arrays of one task from its requests' RequestDetails (item order = task order).

    Every task: "id"; "tokens" (scored positions of all the item's requests); "kl" (sum of
    KL(dense || scored model) over them, nats) and "kl_per_token" (kl / tokens); "top1" (fraction of
    them whose argmax equals the dense model's); "ll" (gold log-likelihood: the target, the gold
    ending / option, the window's continuation), "gold_tokens" and "ll_per_token" (ll / gold_tokens).
    "correct" (0/1): cloze greedy match, choice acc; choice4 also "correct_norm" (acc_norm). The
    ppl task has no "correct". kl / top1 are None where there was no reference.
    """
    kind = task_kind(task)
    groups = []   # (request indices of the item, gold request index)
    if kind in ("choice4", "choice2"):
        key = "endings" if kind == "choice4" else "options"
        j = 0
        for it in items:
            n = len(it[key])
            groups.append((list(range(j, j + n)), j + it["label"]))
            j += n
    else:
        groups = [([i], i) for i in range(len(items))]
    out: dict = {"id": [it.get("id") for it in items], "tokens": [], "kl": [], "kl_per_token": [], "top1": [],
                 "ll": [], "gold_tokens": [], "ll_per_token": []}
    for members, gold in groups:
        ds = [details[j] for j in members]
        ntok = sum(d.tokens for d in ds)
        have = all(d.kl is not None for d in ds)
        kl = sum(d.kl for d in ds) if have else None
        out["tokens"].append(ntok)
        out["kl"].append(kl)
        out["kl_per_token"].append(None if kl is None else kl / ntok)
        out["top1"].append(sum(d.top1 for d in ds) / ntok if have else None)
        g = details[gold]
        out["ll"].append(g.ll)
        out["gold_tokens"].append(g.tokens)
        out["ll_per_token"].append(g.ll / g.tokens)
    if kind == "cloze":
        out["correct"] = [int(details[i].greedy) for i in range(len(items))]
    elif kind in ("choice4", "choice2"):
        key = "endings" if kind == "choice4" else "options"
        out["correct"], norm = [], []
        for it, (members, _) in zip(items, groups):
            lls = [details[j].ll for j in members]
            n = len(members)
            out["correct"].append(int(max(range(n), key=lambda c: lls[c]) == it["label"]))
            if kind == "choice4":
                normed = [lls[c] / len(it[key][c]) for c in range(n)]
                norm.append(int(max(range(n), key=lambda c: normed[c]) == it["label"]))
        if kind == "choice4":
            out["correct_norm"] = norm
    return out


def _fidelity_summary(outcomes: dict) -> dict:
    """Task-level fidelity from the item arrays: kl_per_token (sum KL / sum scored tokens) and
    top1_agreement (agreeing positions / positions); empty without a reference."""
    if any(v is None for v in outcomes["kl"]):
        return {}
    ntok = sum(outcomes["tokens"])
    agree = sum(t * n for t, n in zip(outcomes["top1"], outcomes["tokens"]))
    return {"kl_per_token": sum(outcomes["kl"]) / ntok, "top1_agreement": agree / ntok}


# dense references of evaluate(items=True): (id(model), id(tokenizer), task, limit, batch_size, max_length)
# -> (weakref to the model, DenseReference); least recently used dropped beyond REFERENCE_CACHE_BYTES
_REFERENCES: "collections.OrderedDict" = collections.OrderedDict()
REFERENCE_CACHE_BYTES = _env_bytes("UTRC_REFERENCE_CACHE_BYTES", 4 << 30)


def clear_reference_cache() -> None:
    """Forget the cached dense references (call after changing a model's weights in place)."""
    _REFERENCES.clear()


def _cached_reference(model, tokenizer, task, limit, batch_size, max_length, toks):
    key = (id(model), id(tokenizer), task, limit, batch_size, max_length)
    hit = _REFERENCES.get(key)
    if hit is not None and hit[0]() is model and \
            hit[1].signature == request_signature(toks, batch_size, max_length, pad_id(tokenizer)):
        _REFERENCES.move_to_end(key)
        return key, hit[1]
    return key, None


def _store_reference(key, model, ref: DenseReference) -> None:
    _REFERENCES[key] = (weakref.ref(model), ref)
    _REFERENCES.move_to_end(key)
    while len(_REFERENCES) > 1 and sum(r.nbytes for _, r in _REFERENCES.values()) > REFERENCE_CACHE_BYTES:
        _REFERENCES.popitem(last=False)




def task_result(results: dict, task: str, extra: dict, toks, scores: "TokenScores", *, items: bool, reduced: bool,
                t0: float) -> None:
    """Fill results[task] (and results["items"][task] with `items`) from one task's TokenScores: the task
    metrics, fidelity to dense, the dense-fallback count and the achieved cut (reduced runs), the seconds
    since `t0`. Shared by `evaluate` and the fast path (`utrc_study.eval.fast.evaluate_fast`)."""
    results[task] = _score_task(task, extra["items"], extra["texts"], scores.results, toks)
    if items:
        outcomes = _item_outcomes(task, extra["items"], toks, scores.details)
        results.setdefault("items", {})[task] = outcomes
        results[task].update(_fidelity_summary(outcomes))
    if reduced:
        results[task]["dense_fallback"] = scores.dense_fallback
        cuts = scores.achieved_cut
        results[task]["achieved_token_layer_cut"] = sum(cuts) / len(cuts) if cuts else 0.0
        results[task]["achieved_token_layer_cut_min"] = min(cuts) if cuts else 0.0
    results[task]["seconds"] = time.perf_counter() - t0


def evaluate(model, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, config: Optional[ReductionConfig] = None, *,
             limit: Optional[int] = None, batch_size: int = 16, progress: bool = True,
             max_length: int = 1024, protect: bool = True, items: bool = False,
             protocol: Optional[str] = None) -> dict:
    """Score `model` (patched with `config`, or dense when None) on the offline suite.

    protocol: None (as `protect` says), "leak_free" (protected, the default behaviour) or "authors" (the
    released code's protocol: `utrc_study.eval.protocol`); "meta" records the protocol and the method run.

    Returns {task: {metric: value, ..., "n": items, "seconds": s}, "meta": run_metadata(...)}.
    Metrics: cloze acc/ppl, choice4 acc/acc_norm, choice2 acc, ppl ppl/nll/bits_per_byte/tokens
    (+ *_stderr for accuracies); with a config also "dense_fallback", the task's requests scored
    dense because their context was too short to reduce, and "achieved_token_layer_cut" (mean over
    the task's requests, "_min" the smallest) beside the nominal cut in "meta". `protect=False` applies `config` unchanged
    (scored positions may be reduced). Task data and tokenised requests are cached, so repeated
    calls (sweeps) only run the model.

    items=True (opt-in; the aggregate numbers are the same either way) adds "items": {task: per-item
    arrays} (`_item_outcomes`: correct, ll, ll_per_token, kl, kl_per_token, top1, tokens, ...) and per
    task "kl_per_token" / "top1_agreement", fidelity to the dense model at the scored positions. The
    dense reference is computed by this scorer (unpatched model, same batches) once per (model,
    tokenizer, task, limit, batch_size, max_length) and kept in memory (`DenseReference`: stored
    log-softmax when it fits REFERENCE_BUDGET_BYTES, else a dense forward of each batch beside the
    reduced one); a dense call with items=True builds it from its own pass.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in available_tasks("all")]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(available_tasks('all'))}")
    if config is not None and not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a utrc_lib.ReductionConfig or None, got {type(config).__name__}")
    from utrc_lib.hosts.handle import ensure_unpatched

    ensure_unpatched(model, "utrc_study.eval.scorer.evaluate")
    from .protocol import resolve_scoring

    asked = config
    config, protect, protocol = resolve_scoring(config, protocol, protect)
    was_training = model.training
    model.eval()
    results: dict = {}
    # every task is loaded (items validated on load) and length-checked before any scoring starts
    prepared = {}
    for task in tasks:
        toks, extra = _task_requests(tokenizer, task, limit)
        longest = max((len(c) + len(x) - 1 for c, x in toks), default=0)
        if longest > max_length:  # the context would be cut on the left (e.g. v2 long tasks, passkey)
            from .suite import task_path

            raise ValueError(f"task {task!r} ({task_path(task)}): a request has {longest} input tokens > "
                             f"max_length={max_length}; pass max_length >= {longest}")
        prepared[task] = (toks, extra)
    try:
        for task in tasks:
            t0 = time.perf_counter()
            toks, extra = prepared[task]
            kw = {}
            if items:
                ref_key, ref = _cached_reference(model, tokenizer, task, limit, batch_size, max_length, toks)
                if config is None:
                    kw = dict(details=True, keep_reference=ref is None)
                else:
                    if ref is None:
                        ref = dense_reference(model, toks, batch_size, max_length=max_length,
                                              pad_token_id=pad_id(tokenizer))
                        _store_reference(ref_key, model, ref)
                    kw = dict(reference=ref)
            scores = score_tokens(model, toks, config, batch_size, max_length=max_length,
                                  pad_token_id=pad_id(tokenizer), progress=progress, protect=protect, desc=task,
                                  **kw)
            if items and scores.reference is not None:
                _store_reference(ref_key, model, scores.reference)
            task_result(results, task, extra, toks, scores, items=items, reduced=config is not None, t0=t0)
    finally:
        model.train(was_training)
    results["meta"] = run_metadata(model, config, max_length=max_length, batch_size=batch_size, limit=limit,
                                   protect=protect)
    results["meta"].update(protocol=protocol, method_asked="dense" if asked is None else asked.method)
    return results

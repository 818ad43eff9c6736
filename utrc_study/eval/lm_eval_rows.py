"""lm-eval tasks as sweep rows: the same per-item arrays as the built-in evaluator, from lm-eval's
per-sample log.

A task name that is not one of the built-in suite's (`suite.available_tasks("all")`: cloze, choice4,
..., cloze_v2, ...) is an lm-eval task: the paper's six (lambada_openai, hellaswag, piqa, arc_easy,
arc_challenge, winogrande; they need the Hugging Face hub, or its local cache), any other task lm-eval
knows, or one of the local YAMLs in `TASKS_DIR` (utrc_cloze, utrc_choice2, ..., utrc_v2_*, which read the
local JSONL). `evaluate` runs such tasks through `lm_eval.simple_evaluate` with the adapter
(`utrc_lib.integrations.lm_eval.UTRCLM` around the already loaded model, the same reduction config and
scorer) and `log_samples=True`, one task at a time, and returns what `utrc_study.eval.scorer.evaluate`
returns: {task: aggregates, "meta": ..., "items": {task: per-item arrays}}, so that the sweep rows, the
paired statistics (`utrc_study.experiments.paired` / `stats`) and the notebooks' figures treat them
alike.

Per-item arrays of an lm-eval task (`items_from_samples`; item order = lm-eval's document order, the
first `limit` documents, as the built-in tasks take the first `limit` items):

    id            the document's own "id" field when it has one, else its lm-eval doc_id
    doc_id        lm-eval's document index
    correct       0/1: lm-eval's per-sample "acc" (loglikelihood tasks: the continuation is the greedy
                  decode, as the built-in cloze; multiple choice: argmax of the options' log-likelihoods
                  is the gold option); absent for tasks without "acc" (perplexity tasks), as for ppl
    correct_norm  0/1: lm-eval's "acc_norm" (length-normalised choice), where the task has it
    ll            gold log-likelihood (nats): the target, the gold option (lm-eval's gold index), or the
                  whole text of a rolling task (sum over its windows)
    gold_tokens   scored tokens of that gold request; ll_per_token = ll / gold_tokens
    tokens        scored tokens of all the item's requests (every option)
    kl, kl_per_token, top1
                  KL(dense || scored model) summed over the item's scored positions, per token, and the
                  share of them whose argmax is the dense model's: the adapter's item-level details
                  (`UTRCLM(details=True)`: a dense forward of each batch beside the reduced one, the
                  same measure as the built-in evaluator's; dense rows: 0 and 1). They cost a reduced
                  row a second (dense) forward of every batch, as the built-in evaluator's do when
                  its dense reference does not fit in memory.

Aggregates per task: lm-eval's own metrics for the "none" filter ("acc", "acc_norm", "perplexity",
...; their lm-eval bootstrap stderr is not computed: `<metric>_stderr` of acc / acc_norm is the
item-level standard error, as the built-in evaluator's), "n", "seconds", "kl_per_token" /
"top1_agreement" (token-weighted, as the built-in), and for reduced rows "dense_fallback" and
"achieved_token_layer_cut" (mean over the task's requests).

`check_tasks` fails before anything is loaded when a name is neither built-in nor known to lm-eval
(with the local YAMLs on its include path): the message names the task, the built-in tasks and the
closest lm-eval names.
"""
from __future__ import annotations

import difflib
import functools
import time
from typing import Optional, Sequence

from . import TASKS_DIR
from .scorer import _stderr   # the built-in evaluator's standard error of a mean

__all__ = ["is_builtin", "split_tasks", "check_tasks", "local_source", "task_manager", "evaluate",
           "items_from_samples", "gold_index"]


def is_builtin(task: str) -> bool:
    """True for a task of the built-in suite (v1 or v2), which `scorer.evaluate` scores itself."""
    from .suite import available_tasks

    return task in available_tasks("all")


def split_tasks(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(built-in tasks, lm-eval tasks) of `tasks`, each in the given order."""
    tasks = [str(t) for t in tasks]
    return [t for t in tasks if is_builtin(t)], [t for t in tasks if not is_builtin(t)]


def local_source(task: str) -> Optional[str]:
    """The built-in task whose JSONL a local lm-eval YAML reads (utrc_cloze -> cloze, utrc_v2_cloze ->
    cloze_v2, utrc_v2_passkey_512 -> passkey_512), or None for other lm-eval tasks."""
    from .suite import TASKS, TASKS_V2

    if task.startswith("utrc_v2_"):
        rest = task[len("utrc_v2_"):]
        name = f"{rest}_v2" if rest in TASKS else rest
        return name if name in TASKS_V2 else None
    if task.startswith("utrc_"):
        rest = task[len("utrc_"):]
        return rest if rest in TASKS else None
    return None


@functools.lru_cache(maxsize=2)
def task_manager(include_defaults: bool = True):
    """lm-eval's TaskManager with the local YAMLs (`TASKS_DIR`) on its include path; with
    include_defaults=False only those (fast: lm-eval's own catalogue takes ~10-20 s to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _lm_eval_missing() -> Optional[str]:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "lm-eval is not installed (pip install -e '.[eval]')"
    return None


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The lm-eval tasks of `tasks` (built-in tasks are left out); ValueError naming every task that
    is neither built-in nor known to lm-eval (local YAMLs included), with the closest names."""
    from .suite import available_tasks

    _, names = split_tasks(tasks)
    if not names:
        return []
    builtin = ", ".join(available_tasks("all"))
    missing = _lm_eval_missing()
    if missing:
        raise ValueError(f"task(s) {names} are not built-in tasks ({builtin}), and lm-eval tasks cannot run: {missing}")
    local = set(task_manager(False).all_tasks)
    rest = [n for n in names if n not in local]
    if rest:
        known = task_manager(True).all_tasks
        unknown = [n for n in rest if n not in set(known)]
        if unknown:
            import lm_eval

            hints = []
            for n in unknown:
                close = difflib.get_close_matches(n, list(known) + list(available_tasks("all")), n=3, cutoff=0.6)
                hints.append(f"{n!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
            raise ValueError(f"unknown task(s) {'; '.join(hints)}: neither a task of the built-in suite ({builtin}) "
                             f"nor a task lm-eval {getattr(lm_eval, '__version__', '')} knows (its catalogue and "
                             f"the local YAMLs of {TASKS_DIR}); `lm-eval ls tasks` lists lm-eval's")
    return names


# -- per-sample records -> per-item arrays ----------------------------------------------------------
def gold_index(task, doc, n_choices: int) -> Optional[int]:
    """The gold option of a multiple-choice document, as lm-eval's `ConfigurableTask.process_results`
    finds it (doc_to_text for multiple-input tasks such as winogrande, else doc_to_target; an option
    string is looked up among the choices; of several gold options the first); None if out of range."""
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    if isinstance(gold, (list, tuple)):
        gold = next((g for g in gold if isinstance(g, int) and 0 <= g < n_choices), None)
    elif isinstance(gold, str):
        choices = list(task.doc_to_choice(doc))
        gold = choices.index(gold) if gold in choices else None
    if gold is None:
        return None
    gold = int(gold)
    return gold if 0 <= gold < n_choices else None


def _ll(resp) -> float:
    """Log-likelihood of one filtered response: (ll, is_greedy) or a rolling task's float."""
    return float(resp[0]) if isinstance(resp, (list, tuple)) else float(resp)


def _request_type(task) -> str:
    out = task.get_config("output_type") if hasattr(task, "get_config") else getattr(task, "OUTPUT_TYPE", "")
    return "loglikelihood_rolling" if out == "loglikelihood_rolling" else "loglikelihood"


def _first_filter(samples: list) -> list:
    """One record per document (the first filter's; log-likelihood tasks have only "none"), by doc_id."""
    if not samples:
        return []
    first = samples[0].get("filter", "none")
    chosen = [s for s in samples if s.get("filter", "none") == first]
    return sorted(chosen, key=lambda s: s["doc_id"])


def items_from_samples(task, samples: list, details: Optional[dict] = None) -> dict:
    """Per-item arrays (module doc) of one lm-eval task from its per-sample records (`log_samples`):
    `task` is the lm-eval Task object, `details` the adapter's `request_details` ((request type, args)
    -> RequestDetail; None: no token counts and no fidelity)."""
    kind = task.get_config("output_type") if hasattr(task, "get_config") else None
    rtype = _request_type(task)
    recs = _first_filter(samples)
    out: dict = {"id": [], "doc_id": [], "ll": [], "gold_tokens": [], "ll_per_token": [], "tokens": [], "kl": [],
                 "kl_per_token": [], "top1": []}
    has_acc = bool(recs) and all("acc" in r for r in recs)
    has_norm = bool(recs) and all("acc_norm" in r for r in recs)
    if has_acc:
        out["correct"] = []
    if has_norm:
        out["correct_norm"] = []
    for r in recs:
        doc = r.get("doc") or {}
        own = doc.get("id") if isinstance(doc, dict) else None
        out["id"].append(own if isinstance(own, (str, int)) and not isinstance(own, bool) else r["doc_id"])
        out["doc_id"].append(int(r["doc_id"]))
        resps = r["filtered_resps"]
        gold = 0
        if kind == "multiple_choice":
            gold = gold_index(task, doc, len(resps))
            if gold is None:
                raise ValueError(f"lm-eval task {task.task_name!r}, doc {r['doc_id']}: no gold option among "
                                 f"{len(resps)} choices")
        out["ll"].append(_ll(resps[gold]))
        ds = [details.get((rtype, tuple(a))) for a in r["arguments"]] if details is not None else [None]
        if details is not None and all(d is not None for d in ds):
            ntok = sum(d.tokens for d in ds)
            g = ds[gold]
            have = all(d.kl is not None for d in ds)
            kl = sum(d.kl for d in ds) if have else None
            out["gold_tokens"].append(g.tokens)
            out["ll_per_token"].append(out["ll"][-1] / g.tokens if g.tokens else None)
            out["tokens"].append(ntok)
            out["kl"].append(kl)
            out["kl_per_token"].append(None if kl is None or not ntok else kl / ntok)
            out["top1"].append(sum(d.top1 for d in ds) / ntok if have and ntok else None)
        else:
            for k in ("gold_tokens", "ll_per_token", "tokens", "kl", "kl_per_token", "top1"):
                out[k].append(None)
        if has_acc:
            out["correct"].append(int(round(float(r["acc"]))))
        if has_norm:
            out["correct_norm"].append(int(round(float(r["acc_norm"]))))
    return out


def _aggregates(task_results: dict, items: dict) -> dict:
    """lm-eval's metrics of the "none" filter (numbers only), n, the item-level stderr of acc /
    acc_norm, and fidelity (token-weighted KL per token, top-1 agreement) from the items."""
    out: dict = {}
    for k, v in (task_results or {}).items():
        metric, _, flt = k.partition(",")
        if flt not in ("none", "") or metric in ("alias", "sample_len") or "_stderr" in metric:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[metric] = float(v)
    out["n"] = len(items["ll"])
    for key, metric in (("correct", "acc"), ("correct_norm", "acc_norm")):
        if key in items:
            out.setdefault(metric, sum(items[key]) / len(items[key]) if items[key] else float("nan"))
            out[f"{metric}_stderr"] = _stderr([float(x) for x in items[key]])
    if items["kl"] and all(v is not None for v in items["kl"]):
        ntok = sum(items["tokens"])
        if ntok:
            out["kl_per_token"] = sum(items["kl"]) / ntok
            out["top1_agreement"] = sum(t * n for t, n in zip(items["top1"], items["tokens"])) / ntok
    return out


# -- evaluation ---------------------------------------------------------------------------------------
def evaluate(model, tokenizer, tasks: Sequence[str], config=None, *, limit: Optional[int] = None,
             batch_size: int = 16, max_length: int = 1024, protect: bool = True, items: bool = False,
             protocol: Optional[str] = None, num_fewshot: Optional[int] = None,
             seed: int = 0, progress: bool = False) -> dict:
    """Score `model` (reduced by `config`, dense when None) on lm-eval `tasks`: the result layout of
    `utrc_study.eval.scorer.evaluate` (module doc). One `lm_eval.simple_evaluate` call per task with
    the adapter around `model`, `log_samples=True`, `limit` documents, lm-eval's default few-shot count
    unless `num_fewshot`; `protocol` / `protect` as in the built-in evaluator. items=True adds the
    per-item arrays (with KL / top-1 to the dense model: twice the forwards of a reduced row)."""
    import lm_eval

    from utrc_lib.hosts.handle import ensure_unpatched
    from utrc_lib.integrations.lm_eval import UTRCLM
    from utrc_lib.scoring import run_metadata

    names = check_tasks(tasks)
    ensure_unpatched(model, "utrc_study.eval.lm_eval_rows.evaluate")
    from .protocol import resolve_scoring

    asked = config
    config, protect, protocol = resolve_scoring(config, protocol, protect)
    local = set(task_manager(False).all_tasks)
    tm = task_manager(not all(n in local for n in names))   # lm-eval's catalogue only when needed
    lm = UTRCLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                protect=protect, progress=progress, details=bool(items))
    lm.config = config   # the row's config object itself (already built, or resolved by the protocol)
    results: dict = {}
    was_training = model.training
    model.eval()
    try:
        for name in names:
            t0 = time.perf_counter()
            loaded = tm.load([name])["tasks"]
            lm.request_details.clear()
            fallback0, cuts0 = lm.dense_fallback, len(lm.achieved_cuts)
            res = lm_eval.simple_evaluate(model=lm, tasks=list(loaded.values()), limit=limit, num_fewshot=num_fewshot,
                                          task_manager=tm, log_samples=True, bootstrap_iters=0, verbosity="ERROR",
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
            cuts = lm.achieved_cuts[cuts0:]
            for leaf, task in loaded.items():
                samples = (res.get("samples") or {}).get(leaf, [])
                arrays = items_from_samples(task, samples, lm.request_details if items else None)
                results[leaf] = _aggregates(res["results"].get(leaf, {}), arrays)
                if items:
                    results.setdefault("items", {})[leaf] = arrays
                if config is not None:
                    results[leaf]["dense_fallback"] = lm.dense_fallback - fallback0
                    results[leaf]["achieved_token_layer_cut"] = sum(cuts) / len(cuts) if cuts else 0.0
                    results[leaf]["achieved_token_layer_cut_min"] = min(cuts) if cuts else 0.0
                results[leaf]["seconds"] = time.perf_counter() - t0
                results[leaf]["task_version"] = _task_version(res, leaf)
    finally:
        model.train(was_training)
        lm.request_details.clear()
    results["meta"] = run_metadata(model, config, max_length=max_length, batch_size=batch_size, limit=limit,
                                   protect=protect)
    results["meta"].update(protocol=protocol, method_asked="dense" if asked is None else asked.method,
                           evaluator="lm-eval " + str(getattr(lm_eval, "__version__", "")),
                           num_fewshot=num_fewshot)
    return results


def _task_version(res: dict, task: str):
    v = (res.get("versions") or {}).get(task)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

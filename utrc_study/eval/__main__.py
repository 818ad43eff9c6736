"""python -m utrc_study.eval: lm-eval's simple_evaluate with `--model utrc` registered.

    python -m utrc_study.eval --model-name tiny-mamba2 --method utrc --flops-reduction 0.2 \
        --tasks utrc_cloze,utrc_choice4,utrc_choice2,utrc_ppl [--limit N] [--batch-size 16] [--output results.json]

Default tasks: the paper's six (lambada_openai, hellaswag, piqa, arc_easy, arc_challenge,
winogrande; they need the Hugging Face hub) unless HF_HUB_OFFLINE is set, then the local suite
(utrc_cloze, utrc_choice4, utrc_choice2, utrc_ppl). The output is lm-eval's results JSON plus "utrc": the
reduction metadata (method, keep ratio, layers, token-layer FLOPs cut, analytic FLOPs, versions).

Arguments are checked before anything is loaded: the reduction flags go through
`utrc_lib.core.config.config_from_args` (a reduction flag without --method is an error, not a
silent dense run), and --output must be writable. Both fail as usage errors (exit code 2). The
results are printed even when writing --output fails afterwards (then the JSON goes to stdout and
the exit code is 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from utrc_lib.environment import hf_offline
from . import LOCAL_TASKS, PAPER_TASKS, TASKS_DIR

# CLI flag -> config_from_args field, for the reduction flags
REDUCTION_FLAGS = {"--flops-reduction": "flops_reduction", "--keep-ratio": "keep_ratio", "--metric": "metric",
                   "--layers": "layers", "--q": "q", "--hidden-rule": "hidden_rule",
                   "--residual-rule": "residual_rule", "--metric-source": "metric_source", "--seed": "seed"}
DENSE_METHODS = (None, "", "none", "dense")
V2_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("utrc_v2_*.yaml")))


def default_tasks() -> list[str]:
    return list(LOCAL_TASKS if hf_offline() else PAPER_TASKS)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m utrc_study.eval", description=__doc__.splitlines()[0])
    from utrc_lib.hosts.models import EMBEDDED

    ap.add_argument("--model-name", default="tiny-mamba2",
                    help=" | ".join(EMBEDDED) + " | checkpoint directory | hub id (default: tiny-mamba2)")
    ap.add_argument("--method", default=None,
                    help="reduction method, e.g. utrc, utrc_reference, evit, pumer, tome (default: none = dense)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--flops-reduction", type=float, default=None,
                   help="token-layer FLOPs cut in [0, 1), solved to a keep ratio for the model depth; needs --method")
    g.add_argument("--keep-ratio", type=float, default=None,
                   help="per-anchor keep ratio in (0, 1], instead of --flops-reduction; needs --method")
    ap.add_argument("--metric", default=None, help="importance metric, e.g. clip (default: clip, the paper's)")
    ap.add_argument("--layers", default=None,
                    help="0-based layers to reduce after, e.g. 2,4,6 (default: the paper's schedule for the depth)")
    ap.add_argument("--q", type=float, default=None,
                    help="fraction of matched edges pruned by the hybrid rule, in [0, 1] (default: 0.5)")
    ap.add_argument("--hidden-rule", default=None,
                    help="hidden-branch rule: prune | merge | hybrid | hybrid(q) (default: the method's)")
    ap.add_argument("--residual-rule", default=None,
                    help="residual-branch rule: prune | merge | hybrid | hybrid(q) (default: the method's)")
    ap.add_argument("--non-causal", action="store_true",
                    help="causal=False: allow non-causal merges (default: the method's own; only "
                         "utrc_reference is non-causal by default)")
    ap.add_argument("--metric-source", default=None,
                    help="what the metric reads: ssm (SSM output, paper) | mixer (default: ssm)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random metric / method (default: 0)")
    ap.add_argument("--no-protect", action="store_true",
                    help="do not protect the scored continuation (measures the unprotected reduction)")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated lm-eval task names; local suite v1: " + ", ".join(LOCAL_TASKS)
                         + "; local suite v2 (--max-length 4096 for the 2048-token tasks): " + ", ".join(V2_TASKS)
                         + " (default: " + ", ".join(LOCAL_TASKS)
                         + " when HF_HUB_OFFLINE is set, else the paper's six: " + ", ".join(PAPER_TASKS) + ")")
    ap.add_argument("--limit", type=float, default=None,
                    help="documents per task: a count (>= 1) or a fraction (< 1) of each task (default: all)")
    ap.add_argument("--num-fewshot", type=int, default=None,
                    help="few-shot examples per prompt (default: each task's own, 0 for the utrc_* tasks)")
    ap.add_argument("--batch-size", type=int, default=16, help="requests per forward (default: 16)")
    ap.add_argument("--max-length", type=int, default=1024,
                    help="longest model input in tokens; longer contexts keep their end (default: 1024)")
    ap.add_argument("--device", default="auto",
                    help="torch device: auto (CUDA when torch sees a GPU, else cpu), cpu, cuda, cuda:1 "
                         "(default: auto; one GPU per rank under accelerate)")
    ap.add_argument("--dtype", default=None,
                    help="model dtype: float32 | bfloat16 | float16 | auto = the checkpoint's (default: float32)")
    ap.add_argument("--bootstrap-iters", type=int, default=1000,
                    help="bootstrap iterations for lm-eval's stderr estimates; 0 skips them (default: 1000)")
    ap.add_argument("--output", default=None,
                    help="write the results JSON to this file, creating its folder (default: print only)")
    ap.add_argument("--no-progress", action="store_true", help="hide the scoring progress bars")
    return ap


def model_args_from(ns: argparse.Namespace) -> dict:
    """UTRCLM keyword arguments from the parsed flags. The reduction flags are validated through
    `config_from_args` here (ValueError naming the flag), so a bad combination fails before any
    model is loaded."""
    from utrc_lib.core.config import config_from_args

    args = {"pretrained": ns.model_name, "batch_size": ns.batch_size, "max_length": ns.max_length,
            "device": ns.device}
    if ns.dtype:
        args["dtype"] = ns.dtype
    reduction = {field: getattr(ns, field) for field in REDUCTION_FLAGS.values() if getattr(ns, field) is not None}
    if ns.non_causal:
        reduction["causal"] = False
    if ns.method in DENSE_METHODS:
        if reduction:
            flags = [f for f, field in REDUCTION_FLAGS.items() if field in reduction]
            flags += ["--non-causal"] if ns.non_causal else []
            raise ValueError(f"{', '.join(flags)} given without --method: the run would be dense; "
                             f"pass a method (e.g. --method utrc) or drop {'it' if len(flags) == 1 else 'them'}")
    else:
        try:
            config = config_from_args(ns.method, **reduction)
        except ValueError as e:
            raise ValueError(f"invalid reduction flags: {e}") from None
        args["method"] = ns.method
        args.update(reduction)
        if config is not None and "layers" in reduction:
            args["layers"] = list(config.layers)  # parsed and sorted; no commas in the model_args string
    if ns.no_protect:
        args["protect"] = False
    if ns.no_progress:
        args["progress"] = False
    return args


def output_problem(path: str) -> Optional[str]:
    """Why `path` cannot be written (or None): it is a folder, its nearest existing parent is a
    file, or that parent (or an existing file) is not writable."""
    target = Path(path)
    if target.is_dir():
        return f"--output {path}: is a directory"
    if target.exists():
        return None if os.access(target, os.W_OK) else f"--output {path}: file is not writable"
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"--output {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--output {path}: cannot create files under {parent} (not writable)"
    return None


def run_problem(ns: argparse.Namespace) -> Optional[str]:
    """What makes the run fail, found before anything is loaded (one line, or None): --limit and
    --batch-size out of range, a CUDA device torch cannot see, a cut the model's schedule cannot reach
    (depth read from its config.json), a model name that is neither local nor embedded while offline."""
    if ns.limit is not None and not ns.limit > 0:
        return f"--limit {ns.limit:g}: give a count >= 1 or a fraction in (0, 1) (or leave it out for all documents)"
    if ns.limit is not None and ns.limit >= 1 and ns.limit != int(ns.limit):
        return f"--limit {ns.limit:g}: a count must be a whole number (a fraction must be < 1)"
    if ns.batch_size < 1:
        return f"--batch-size {ns.batch_size}: must be >= 1"
    if ns.max_length < 2:
        return f"--max-length {ns.max_length}: must be >= 2"
    if str(ns.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return (f"--device {ns.device}: torch sees no CUDA device (torch {torch.__version__}); "
                    f"use --device auto or --device cpu")
    from utrc_lib.hosts.models import EMBEDDED, hub_problem, model_depth

    name = ns.model_name
    is_local = name in EMBEDDED or Path(name).expanduser().exists()
    if not is_local and not name.startswith((".", "/", "~")):
        problem = hub_problem(name)
        if problem:
            return f"--model-name {name}: {problem}"
    if ns.method not in DENSE_METHODS and is_local:
        depth = model_depth(name)
        if depth is not None:
            from utrc_lib.core.config import config_from_args

            cfg = config_from_args(ns.method, **{f: getattr(ns, f) for f in REDUCTION_FLAGS.values()
                                                 if getattr(ns, f) is not None})
            try:
                if cfg is not None:
                    cfg.resolve(depth)
            except ValueError as e:
                return f"{name} ({depth} layers): {e}"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the flags; usage errors (exit code 2) for a reduction flag without
    --method, an invalid reduction and an unwritable --output."""
    ap = build_parser()
    ns = ap.parse_args(argv)
    try:
        model_args_from(ns)
    except ValueError as e:
        ap.error(str(e))
    problem = run_problem(ns)
    if problem:
        ap.error(problem)
    if ns.output:
        problem = output_problem(ns.output)
        if problem:
            ap.error(problem)
    return ns


def _tasks(ns: argparse.Namespace) -> list[str]:
    return [t.strip() for t in ns.tasks.split(",") if t.strip()] if ns.tasks else default_tasks()


def partial_path(ns: argparse.Namespace) -> Optional[Path]:
    """Where finished tasks are kept while a run is under way (`--output` + ".partial.json"), None
    without --output."""
    return Path(ns.output + ".partial.json") if ns.output else None


def _run_signature(ns: argparse.Namespace, margs: dict) -> dict:
    """What a kept task's result depends on besides its name: a resumed run reuses it only when the
    signature is the same."""
    from utrc_lib.environment import code_version

    return {"model_args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in margs.items() if k != "progress"},
            "limit": ns.limit, "num_fewshot": ns.num_fewshot, "bootstrap_iters": ns.bootstrap_iters,
            "code_version": code_version()}


def _load_partial(path: Optional[Path], signature: dict) -> dict:
    """{task: lm-eval results of that task} kept by an earlier run of the same command, else {}."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("tasks", {}) if data.get("signature") == signature else {}


def _save_partial(path: Optional[Path], signature: dict, done: dict) -> None:
    if path is None:
        return
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"signature": signature, "tasks": done}, default=handle_non_serializable,
                              ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _merge(parts: list) -> dict:
    """lm-eval results of several single-task runs -> one results dict (dict-valued entries merged)."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


class Interrupted(Exception):
    """Ctrl-C during `evaluate`: the finished tasks (`done`) are kept in `path` (None without --output)."""

    def __init__(self, done: dict, total: list, path: Optional[Path]):
        super().__init__("interrupted")
        self.done, self.total, self.path = done, total, path


def evaluate(ns: argparse.Namespace, lm=None) -> dict:
    """Run lm-eval for parsed flags `ns`, one task at a time; returns its results dict with "utrc"
    metadata added ({} on ranks other than 0 under accelerate launch).

    Each finished task is kept in `--output`.partial.json (with a signature of the run); the same
    command run again reuses the kept tasks and computes only the rest. Ctrl-C raises `Interrupted`
    after the finished tasks are on disk."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from utrc_lib.integrations.lm_eval import UTRCLM

    tasks = _tasks(ns)
    only_local = all(t in LOCAL_TASKS or t in V2_TASKS or t == "utrc" for t in tasks)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=not only_local)
    margs = model_args_from(ns)
    limit = ns.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    signature = _run_signature(ns, margs)
    path = partial_path(ns)
    done = {t: r for t, r in _load_partial(path, signature).items() if t in tasks}
    if done:
        print(f"resuming: {len(done)} of {len(tasks)} task(s) kept in {path} ({', '.join(done)})", file=sys.stderr)
    try:
        for task in tasks:
            if task in done:
                continue
            if lm is None:
                lm = UTRCLM(**margs)
            res = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=ns.num_fewshot, limit=limit,
                                          batch_size=ns.batch_size, task_manager=tm, log_samples=False,
                                          bootstrap_iters=ns.bootstrap_iters, verbosity="ERROR")
            if res is None:  # non-zero rank
                continue
            res.pop("samples", None)
            res["utrc"] = lm.reduction_metadata
            done[task] = json.loads(json.dumps(res, default=_jsonable))
            _save_partial(path, signature, done)
    except KeyboardInterrupt:
        raise Interrupted(done, tasks, path) from None
    if not done:  # non-zero rank
        return {}
    results = _merge([done[t] for t in tasks])
    results.setdefault("config", {})
    results["config"]["model"] = "utrc"
    results["config"]["model_args"] = ",".join(
        f"{k}={';'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in margs.items())
    results["utrc"] = lm.reduction_metadata if lm is not None else results.get("utrc", {})
    results["utrc"]["tasks"] = tasks
    results["utrc"]["limit"] = limit
    return results


def _jsonable(obj):
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(obj)


def run(argv=None, lm=None) -> dict:
    """Parse `argv` and run the evaluation; returns lm-eval's results dict with "utrc" metadata added."""
    return evaluate(parse_args(argv), lm)


def _print_results(results: dict) -> None:
    try:
        from lm_eval.utils import make_table

        print(make_table(results))
    except Exception as e:  # the table is a convenience; the summary line and JSON carry the numbers
        print(f"(no results table: {e!r})", file=sys.stderr)
    meta = results.get("utrc", {})
    print(f"utrc: method={meta.get('method')} keep_ratio={meta.get('keep_ratio')} layers={meta.get('layers')} "
          f"token-layer FLOPs cut={meta.get('flops_reduction_token_layer')} "
          f"(achieved {meta.get('achieved_token_layer_cut')})")


def main(argv=None) -> int:
    ns = parse_args(argv)  # exits with code 2 on bad flags or an unwritable --output, before loading anything
    try:
        results = evaluate(ns)
    except Interrupted as e:
        kept = ", ".join(e.done) or "none"
        if e.path is not None and e.done:
            print(f"interrupted: kept {len(e.done)} of {len(e.total)} task(s) ({kept}) in {e.path}; "
                  f"run the same command again to compute only the rest", file=sys.stderr, flush=True)
        else:
            print(f"interrupted: {len(e.done)} of {len(e.total)} task(s) finished ({kept}); "
                  + ("nothing is kept without --output" if e.path is None else "nothing to keep yet"),
                  file=sys.stderr, flush=True)
        return 130
    if not results:  # ranks other than 0 under accelerate launch: rank 0 writes the output
        return 0
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    _print_results(results)
    if not ns.output:
        return 0
    try:
        Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output).write_text(text + "\n", encoding="utf-8")
        if partial_path(ns).is_file():
            partial_path(ns).unlink()
    except OSError as e:  # checked before the run, but the disk can still change under us
        print(f"could not write --output {ns.output}: {e}; the results JSON follows on stdout", file=sys.stderr)
        print(text)
        return 1
    print(f"wrote {ns.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

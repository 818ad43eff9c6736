"""python -m utrc_lib.eval: lm-eval's simple_evaluate with `--model utrc` registered.

    python -m utrc_lib.eval --model-name tiny-mamba2 --method utrc --flops-reduction 0.2 \
        --tasks utrc_cloze,utrc_choice4,utrc_choice2,utrc_ppl [--limit N] [--batch-size 16] [--output results.json]

Default tasks: the paper's six (lambada_openai, hellaswag, piqa, arc_easy, arc_challenge,
winogrande; they need the Hugging Face hub) unless HF_HUB_OFFLINE is set, then the local suite
(utrc_cloze, utrc_choice4, utrc_choice2, utrc_ppl). The output is lm-eval's results JSON plus "utrc": the
reduction metadata (method, keep ratio, layers, token-layer FLOPs cut, analytic FLOPs, versions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import LOCAL_TASKS, PAPER_TASKS, TASKS_DIR


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def default_tasks() -> list[str]:
    return list(LOCAL_TASKS if _offline() else PAPER_TASKS)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m utrc_lib.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model-name", default="tiny-mamba2",
                    help="tiny-mamba2 | tiny-mamba | checkpoint directory | hub id")
    ap.add_argument("--method", default=None, help="reduction method (default: dense)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--flops-reduction", type=float, default=None)
    g.add_argument("--keep-ratio", type=float, default=None)
    ap.add_argument("--metric", default=None)
    ap.add_argument("--layers", default=None, help="reduction layers, e.g. 2,4,6 (default: schedule)")
    ap.add_argument("--q", type=float, default=None)
    ap.add_argument("--hidden-rule", default=None)
    ap.add_argument("--residual-rule", default=None)
    ap.add_argument("--non-causal", action="store_true", help="causal=False (needed by utrc_reference)")
    ap.add_argument("--metric-source", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-protect", action="store_true",
                    help="do not protect the scored continuation (measures the unprotected reduction)")
    ap.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (default: see --help)")
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--bootstrap-iters", type=int, default=1000)
    ap.add_argument("--output", default=None, help="write the results JSON here")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def model_args_from(ns: argparse.Namespace) -> dict:
    args = {"pretrained": ns.model_name, "batch_size": ns.batch_size, "max_length": ns.max_length,
            "device": ns.device}
    if ns.dtype:
        args["dtype"] = ns.dtype
    if ns.method:
        args["method"] = ns.method
        for k in ("flops_reduction", "keep_ratio", "metric", "q", "hidden_rule", "residual_rule",
                  "metric_source", "seed"):
            v = getattr(ns, k)
            if v is not None:
                args[k] = v
        if ns.layers:
            args["layers"] = [int(x) for x in ns.layers.replace(";", ",").split(",") if x.strip()]
        if ns.non_causal:
            args["causal"] = False
    if ns.no_protect:
        args["protect"] = False
    return args


def run(argv=None, lm=None) -> dict:
    """Run the evaluation; returns lm-eval's results dict with "utrc" metadata added."""
    ns = parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_adapter import UTRCLM

    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()] if ns.tasks else default_tasks()
    only_local = all(t in LOCAL_TASKS or t == "utrc" for t in tasks)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=not only_local)
    margs = model_args_from(ns)
    if lm is None:
        lm = UTRCLM(**margs)
    limit = ns.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=ns.num_fewshot, limit=limit,
                                      batch_size=ns.batch_size, task_manager=tm, log_samples=False,
                                      bootstrap_iters=ns.bootstrap_iters, verbosity="ERROR")
    if results is None:  # non-zero rank
        return {}
    results.setdefault("config", {})
    results["config"]["model"] = "utrc"
    results["config"]["model_args"] = ",".join(
        f"{k}={';'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in margs.items())
    results["utrc"] = lm.reduction_metadata
    results["utrc"]["tasks"] = tasks
    results["utrc"]["limit"] = limit
    return results


def main(argv=None) -> int:
    results = run(argv)
    if not results:  # ranks other than 0 under accelerate launch: rank 0 writes the output
        return 0
    ns = parse_args(argv)
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    if ns.output:
        Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output).write_text(text + "\n", encoding="utf-8")
    try:
        from lm_eval.utils import make_table

        print(make_table(results))
    except Exception:
        pass
    meta = results.get("utrc", {})
    print(f"utrc: method={meta.get('method')} keep_ratio={meta.get('keep_ratio')} layers={meta.get('layers')} "
          f"token-layer FLOPs cut={meta.get('flops_reduction_token_layer')}")
    if ns.output:
        print(f"wrote {ns.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU scoring throughput: this checkout against an earlier commit, side by side in one run.

    .venv/bin/python scripts/cpu_eval_speed.py [--baseline 5560746] [--limit 12] [--repeats 3]
        [--out figures/03_efficiency/cpu_eval_speed.json]

For each embedded model (tiny-mamba2, tiny-mamba), dense and UTRC at a 20% cut, and each scoring
path (the built-in evaluator `utrc_study.eval.scorer.evaluate` on all four tasks, and the lm-eval adapter's
`UTRCLM.loglikelihood` on the same requests), it runs the baseline commit's package and this
checkout's package in separate processes, alternating A/B/A/B... so that load on the machine falls
on both alike, and reports requests/s and tokens/s (medians over `--repeats` rounds) and the ratio.
The baseline is the package of `--baseline` extracted with `git archive` into .cache/; both read the
same data (models, tokenizer, benchmarks: UTRC_DATA_DIR is this checkout's data/). Each process warms
up on a few requests first (not timed). Accuracy numbers of both are recorded as a check that the
two compute the same thing (they agree to float rounding; the chunk size changes the summation order).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import io
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = ("cloze", "choice4", "choice2", "ppl")


# -- worker (runs inside one process, one package version) -------------------------------------------
def worker(args) -> dict:
    import torch

    import utrc_lib
    from utrc_study.eval import scorer

    torch.set_num_threads(args.threads)
    model, tok = utrc_lib.load_model(args.model)
    cfg = None if args.method == "dense" else utrc_lib.ReductionConfig(args.method, flops_reduction=args.cut)
    requests, ntok = [], 0
    for task in TASKS:
        toks, _ = scorer._task_requests(tok, task, args.limit)
        requests += toks
        ntok += sum(len(c) + len(x) - 1 for c, x in toks)
    if args.path == "evaluator":
        def run():
            return scorer.evaluate(model, tok, TASKS, cfg, limit=args.limit, batch_size=args.batch_size,
                                     progress=False)
        warm = lambda: scorer.score_tokens(model, requests[:args.batch_size], cfg, args.batch_size,  # noqa: E731
                                           pad_token_id=scorer.pad_id(tok))
    else:
        from lm_eval.api.instance import Instance

        from utrc_lib.integrations.lm_eval import UTRCLM

        kw = {} if cfg is None else {"method": args.method, "flops_reduction": args.cut}
        lm = UTRCLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, **kw)
        texts = []
        for task in TASKS:
            _, extra = scorer._task_requests(tok, task, args.limit)
            texts += extra["texts"]
        inst = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(texts)]

        def run():
            return lm.loglikelihood(inst, disable_tqdm=True)
        warm = lambda: lm.loglikelihood(inst[:args.batch_size], disable_tqdm=True)  # noqa: E731
    warm()
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    if isinstance(out, dict):
        check = {t: out[t].get("acc", out[t].get("ppl")) for t in TASKS}
    else:
        check = {"sum_ll": float(sum(r[0] for r in out))}
    return {"seconds": dt, "requests": len(requests), "tokens": ntok, "check": check,
            "package": str(Path(utrc_lib.__file__).resolve().parent)}


# -- orchestration --------------------------------------------------------------------------------
def extract(ref: str) -> Path:
    sha = subprocess.check_output(["git", "rev-parse", "--short=12", ref], cwd=REPO, text=True).strip()
    dest = REPO / ".cache" / f"baseline-{sha}"
    if not (dest / "utrc_lib" / "__init__.py").is_file():
        data = subprocess.check_output(["git", "archive", "--format=tar", sha, "utrc_lib"], cwd=REPO)
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
    return dest


def run_worker(tree: Path, opts: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), UTRC_DATA_DIR=str(REPO / "data"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--worker"] + \
        [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    # cwd outside the repo, so that `import utrc_lib` resolves through PYTHONPATH only
    proc = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker failed ({tree.name}, {opts}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="5560746", help="git ref of the code to compare with (default: main before the speed work)")
    ap.add_argument("--models", default="tiny-mamba2,tiny-mamba")
    ap.add_argument("--methods", default="dense,utrc")
    ap.add_argument("--paths", default="evaluator,adapter")
    ap.add_argument("--cut", type=float, default=0.2)
    ap.add_argument("--limit", type=int, default=12, help="items per task (x4 tasks; choice tasks have 4 / 2 requests per item)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores this process may use)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / ".cache" / "bench" / "cpu_eval_speed.json"))
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads <= 0:
        args.threads = max(1, len(os.sched_getaffinity(0)))
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.repeats < 1 or args.limit < 1:
        ap.error("--repeats and --limit must be >= 1")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    trees = {"baseline": extract(args.baseline), "current": REPO}
    rows = []
    combos = [(m, meth, path) for m in args.models.split(",") for meth in args.methods.split(",")
              for path in args.paths.split(",")]
    t_start = time.time()
    for k, (model, method, path) in enumerate(combos):
        opts = dict(model=model, method=method, path=path, cut=args.cut, limit=args.limit,
                    batch_size=args.batch_size, threads=args.threads)
        runs = {"baseline": [], "current": []}
        for r in range(args.repeats):
            order = ("baseline", "current") if r % 2 == 0 else ("current", "baseline")
            for which in order:
                runs[which].append(run_worker(trees[which], opts))
        med = {w: statistics.median(x["seconds"] for x in v) for w, v in runs.items()}
        n_req, n_tok = runs["current"][0]["requests"], runs["current"][0]["tokens"]
        row = {"model": model, "method": method, "path": path, "cut": None if method == "dense" else args.cut,
               "requests": n_req, "tokens": n_tok,
               "baseline_req_per_s": n_req / med["baseline"], "current_req_per_s": n_req / med["current"],
               "baseline_tok_per_s": n_tok / med["baseline"], "current_tok_per_s": n_tok / med["current"],
               "speedup": med["baseline"] / med["current"],
               "seconds": {w: [x["seconds"] for x in v] for w, v in runs.items()},
               "check": {w: v[0]["check"] for w, v in runs.items()}}
        rows.append(row)
        el = time.time() - t_start
        print(f"[{k + 1}/{len(combos)}] {model:12s} {method:6s} {path:9s} baseline {row['baseline_req_per_s']:7.1f} req/s  "
              f"current {row['current_req_per_s']:7.1f} req/s  x{row['speedup']:.2f}   "
              f"({el:.0f} s elapsed, ~{el / (k + 1) * (len(combos) - k - 1):.0f} s left)", flush=True)
    import torch

    result = {
        "what": "CPU scoring throughput, this checkout vs --baseline, alternating processes in one run",
        "baseline_ref": args.baseline,
        "baseline_commit": subprocess.check_output(["git", "rev-parse", args.baseline], cwd=REPO, text=True).strip(),
        "current_commit": subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip(),
        "current_dirty": bool(subprocess.check_output(["git", "status", "--porcelain", "utrc_lib"], cwd=REPO, text=True).strip()),
        "parameters": {k: getattr(args, k) for k in ("models", "methods", "paths", "cut", "limit", "batch_size",
                                                     "threads", "repeats")},
        "tasks": list(TASKS),
        "machine": {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
        "min_speedup": min(r["speedup"] for r in rows),
    }
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path} (min speed-up x{result['min_speedup']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Dense scores of models on the first `--limit` items of each v2 task (CPU), with chance levels.

    .venv/bin/python data/benchmarks_v2/dense_sample.py tiny-mamba2 tiny-mamba --limit 40 \
        --out data/benchmarks_v2/dense_sample_tiny.json

Uses `utrc_study.eval.scorer.evaluate` (max_length 4096, so no long context is cut). Passkey files
interleave the depths, so a prefix of 5k items has k items at each depth.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))


def main(argv=None) -> int:
    from utrc_study.eval import suite
    from utrc_study.eval.scorer import evaluate
    from utrc_lib.hosts.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tasks", default=",".join(suite.available_tasks("v2")))
    ap.add_argument("--limit", type=int, default=100, help="items of each short task")
    ap.add_argument("--limit-long", type=int, default=25, help="items of each long task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    manifest = json.loads((suite.data_dir_v2() / "manifest.json").read_text())
    out = {"limit": args.limit, "limit_long": args.limit_long, "tasks": tasks, "manifest_version": manifest["version"],
           "chance": {t: manifest["tasks"][t].get("chance", 0.0) for t in tasks}, "models": {}}
    for m in args.models:
        model, tok = load_model(m)
        res = {}
        for t in tasks:
            t0 = time.perf_counter()
            lim = args.limit if t in ("cloze_v2", "choice4_v2", "choice2_v2") else args.limit_long
            r = evaluate(model, tok, tasks=[t], limit=lim, batch_size=args.batch_size, progress=False,
                         max_length=4096)[t]
            res[t] = r
            keys = ("acc", "acc_norm", "acc_by_depth", "bits_per_byte", "ppl")
            print(m, t, {k: r[k] for k in keys if k in r}, f"{time.perf_counter() - t0:.0f} s", flush=True)
        out["models"][m] = res
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Windowed matching against global matching on the long tasks (issue 28's optional speed option):
paired accuracy and gold log-likelihood per item, the same model, cut and items, one JSON.

    python scripts/window_accuracy.py [--model tiny-mamba2] [--cut 0.3] [--windows 64,256]
        [--tasks lr_cloze_1024,longppl_1024] [--limit 100] [--out figures/03_efficiency/window_accuracy.json]

Rows: UTRC at the cut with global matching (`match_window=None`) and with each window, plus dense for
reference; per-item rows through `utrc_study.experiments.sweep` (resumable: its cache is
`.cache/sweeps/window_accuracy.jsonl`). Comparison: `paired.comparison_table` with global matching as
the reference and every window a "baseline" (delta = global minus windowed: positive means the window
loses), 95% paired bootstrap intervals (McNemar for accuracy), Holm over every comparison in the file.
The JSON holds the parameters, seed, items per task, the rows' accuracies, the comparisons and the
machine; docs/prefill_speed.md renders it (`python -m utrc_study.report.results_page`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mamba2")
    ap.add_argument("--cut", type=float, default=0.3, help="token-layer cut (default 0.3)")
    ap.add_argument("--windows", default="64,256", help="comma-separated match windows (tokens)")
    ap.add_argument("--tasks", default="lr_cloze_1024,longppl_1024")
    ap.add_argument("--limit", type=int, default=100, help="items per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=2200, help="input length limit of the evaluator")
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(REPO / ".cache" / "sweeps" / "window_accuracy.jsonl"))
    ap.add_argument("--out", default=str(REPO / "figures" / "03_efficiency" / "window_accuracy.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from utrc_lib.environment import code_version, git_commit, versions
    from utrc_study.experiments import paired, sweep
    from utrc_study.report import evidence

    windows = [int(w) for w in a.windows.split(",") if w.strip()]
    if not windows or any(w < 1 for w in windows):
        ap.error(f"--windows: positive integers, got {a.windows!r}")
    tasks = [t for t in a.tasks.split(",") if t.strip()]
    common = dict(model=a.model, tasks=tasks, limit=a.limit, seed=a.seed, batch_size=a.batch_size,
                  max_length=a.max_length)
    configs = [dict(common, method="none", cut=0.0)] + [dict(common, method="utrc", cut=a.cut, match_window=w)
                                                         for w in [None] + windows]
    start = time.time()
    res = sweep.run(sweep.evaluate_config, configs, Path(a.cache), items=True, desc="window accuracy")
    bad = [r for r in res.rows if r.get("status") != "ok"]
    if bad:
        print(f"{len(bad)} configuration(s) failed: {bad[0].get('error')}", file=sys.stderr)
        return 1
    from utrc_study.experiments.paired import has_accuracy

    metrics = [t for t in tasks if has_accuracy(t)] + [f"{k}:{t}" for t in tasks for k in ("ll", "kl")]
    cmp = paired.comparison_table(res, reference="None", baselines=[str(w) for w in windows], by="match_window",
                                  metrics=metrics, holm_over=(), resamples=a.resamples, seed=a.seed)
    rows = []
    for r in res.rows:
        p, out = r["params"], r["result"]
        rows.append({"method": p["method"], "match_window": p.get("match_window"),
                     **{k: v for k, v in out.items() if k.split("/")[0] in tasks or k in ("token_layer_cut",
                                                                                           "keep_ratio")}})
    sizes = {t: len(res.rows[0]["items"][t]["id"]) for t in tasks}
    doc = {"what": "UTRC with windowed bipartite matching against global matching, paired over the same items",
           "parameters": {**common, "cut": a.cut, "windows": windows, "resamples": a.resamples,
                          "reference": "global matching (match_window None)"},
           "seed": a.seed, "items_per_task": sizes,
           "delta": "global minus windowed (accuracy, gold log-likelihood per token: positive = the window loses; "
                    "kl: negative = the window loses)",
           "holm": f"over all {len(cmp)} comparisons in this file",
           "rows": rows, "comparisons": json.loads(cmp.to_json(orient="records")),
           "machine": {**evidence.machine_info(), "torch_threads": torch.get_num_threads()},
           "versions": versions(), "code_version": code_version(), "git_commit": git_commit(),
           "seconds": round(time.time() - start, 1), "command": "python scripts/window_accuracy.py " +
           " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {out}: {len(rows)} rows, {len(cmp)} comparisons, {doc['seconds']} s")
    print(cmp[["model", "metric", "baseline", "delta", "low", "high", "p_holm", "verdict"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

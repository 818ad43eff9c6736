#!/usr/bin/env python3
"""Issue 27's evaluation of the depth family on one GPU: dense and every baseline at token-layer cuts
10 / 20 / 30 % under two anchor schedules, every item of the v2 short and 512-2048-token tasks, per-item
rows written as committed evidence (`utrc_study.report.evidence` format) for `08_depth`.

Schedules (per depth L; `utrc_study.experiments.depth.schedule_layers`):
  library   `utrc_lib.default_layers(L)`: the paper's anchors at 48 (10, 15, ..., 35) and 64 layers
            (12, 17, ..., 42), the paper's rule scaled to other depths (about L/5 apart from the start,
            every max(2, round(L/10)), none in the last sixth): 4 anchors at 12 layers, 8 at 24;
  relative  the 64-layer anchors at the same fractions of the stack (round(L x a / 64)), so every depth
            has its anchors at the same relative depths ("deeper model" apart from "more anchors").
A row's `layers` parameter holds the anchors; `depth.schedule_of(L, layers)` names them back.

Engine: `utrc_study.experiments.sweep.evaluate_config(..., engine=...)`: on a GPU "fast_ssm" (the fast
evaluator on mamba-ssm's MambaLMHeadModel in float32, exact-length batches, Triton SSD scan; its per-request
agreement with the transformers fp32 path is what scripts/gpu_eval_speed.py measures), on a CPU "fast"
(transformers float32). The dense reference of each task (KL, top-1) is computed once per model.

Order of work (each configuration one row; a deadline stops between rows): for each model, deepest
first: dense, then library @ 20 %, relative @ 20 %, library @ 10 % and 30 %, relative @ 10 % and 30 %, each
over METHODS. Rows already in the evidence folder (--evidence, carried in with the working tree) are
read back and skipped, so repeated calls fill the grid; every call rewrites the whole folder under $OUT.

DEVICE COMMAND (one H100 / H200, repo root as cwd; 10 minutes per call):
  the tree must travel under 64 MiB: `python scripts/device_tree.py out depth --models depth-mamba2-64` keeps
  only the code, data/benchmarks_v2/ (without docs.jsonl), data/tokenizer_v2/, figures/08_depth/ and the models
  named (data/models/depth-mamba2-64 alone is 59.6 MB: it travels alone), and `python scripts/device_tree.py
  in` puts everything back after the call. Pass `--carry .train/mamba_ssm_py` to `out` and carry what it
  prints (the triton cache, .train/triton_cache.tar.gz, fits only beside a small model). Only the 64-layer
  weights are committed: the 12 / 24 / 48-layer weights are git-ignored (rebuilt from their cards), so for
  those `out depth --models depth-mamba2-12` lists the weights under "carry", one model per call. Then:

  export PYTHONPATH=$PWD/.train/mamba_ssm_py:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \\
    TRITON_CACHE_DIR=/tmp/triton; mkdir -p /tmp/triton; [ -f .train/triton_cache.tar.gz ] && \\
    tar xzf .train/triton_cache.tar.gz -C /tmp/triton; python3 scripts/gpu_depth_eval.py --out $OUT \\
    --models depth-mamba2-64 --deadline 540

  AFTERWARDS: `python scripts/device_tree.py in` first, then copy FILES/08_depth/evidence to figures/08_depth/evidence (the next call carries it in and
  continues), append FILES/gpu_depth_eval.log to figures/08_depth/device_calls.log.

CPU check of the script (no GPU): `python scripts/gpu_depth_eval.py --out /tmp/d --models tiny-mamba2
--limit 2 --methods utrc,tome --cuts 0.2 --tasks cloze_v2,choice2_v2`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utrc_study.experiments.depth import CUTS, METHODS, SCHEDULES, TASKS  # noqa: E402  (after sys.path)
from utrc_study.experiments.depth import plan  # noqa: E402  (after sys.path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="where 08_depth/evidence and the log go")
    ap.add_argument("--models", default="depth-mamba2-64,depth-mamba2-12,depth-mamba2-48,depth-mamba2-24",
                    help="comma-separated model names (default: the depth family, deepest first)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--cuts", default=",".join(map(str, CUTS)), help="token-layer cuts, the first one first")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="library,relative")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated suite tasks")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--engine", default=None, help="sweep engine (default fast_ssm on CUDA, fast on CPU)")
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start after which no row starts")
    ap.add_argument("--evidence", default=str(REPO / "figures/08_depth/evidence"),
                    help="evidence already computed (read back, its configurations skipped)")
    a = ap.parse_args(argv)
    start = time.time()
    out = Path(a.out)
    (out / "08_depth").mkdir(parents=True, exist_ok=True)
    from utrc_study.experiments.timing import progress_log

    say = progress_log(out / "gpu_depth_eval.log", "depth_eval", start)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from utrc_lib.environment import code_version
    from utrc_study.experiments import sweep
    from utrc_study.report import evidence

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    engine = a.engine or ("fast_ssm" if cuda else "fast")
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()])
    models = split(a.models)
    say(f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}; torch {torch.__version__}; engine {engine}; "
        f"code version {code_version()}; models {models}; limit {a.limit}; deadline {a.deadline:.0f}s")
    wanted = plan(models, split(a.methods), [float(c) for c in split(a.cuts)], split(a.schedules),
                  split(a.tasks), a.limit, engine)
    rows, todo = [], list(wanted)
    if evidence.exists(Path(a.evidence)):
        ev = evidence.load(Path(a.evidence))
        rows = list(ev.rows)
        todo = [c for c in wanted if ev.lookup(c) is None]
        say(f"{len(rows)} rows read back from {a.evidence}")
    say(f"{len(todo)} of {len(wanted)} configurations to compute")
    device = f"cuda:0 ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    version = code_version()
    done = 0
    for c in todo:
        if time.time() - start > a.deadline:
            break
        t = time.time()
        res = sweep.compute(sweep.evaluate_config, c, items=True)
        if res["status"] != "ok":
            say(f"ERROR {c['model']} {c['method']} {c['cut']} {c.get('layers')}: {res['error']}")
            if res.get("transient"):
                break
            continue
        res["device"] = device
        rows.append({"key": sweep.row_key(c, version), "params": sweep._canonical(c), "version": version, **res})
        done += 1
        r = res["result"]
        accs = " ".join(f"{k.split('/')[0]} {v:.3f}" for k, v in r.items() if k.endswith("/acc"))
        say(f"{c['model']} {c['method']} {c['cut']:.2f} layers {c.get('layers', [])}: {time.time() - t:.1f}s; "
            f"achieved cut {r.get('achieved_token_layer_cut', 0):.3f}; {accs}")
        evidence.write(rows, out / "08_depth" / "evidence", command=" ".join(sys.argv), notebooks=["08_depth"],
                       extra={"engine": engine})
    left = len(todo) - done
    say(f"{'COMPLETE' if left == 0 else 'INCOMPLETE'}: {done} computed this call, {left} left, "
        f"{len(rows)} rows in {out / '08_depth' / 'evidence'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Old vs new evaluator, side by side on the same items and model (issue 27, "make the GPU evaluator
fast first"): requests/s of each, ratio, per-item agreement; JSON to $OUT/gpu_eval_speed.json.

Paths compared, for each model (tiny-mamba2, depth-mamba2-64) and config (dense, utrc at 20%):
  classic      utrc_lib.scoring.score_tokens, transformers fp32, batch_size 64 (today's GPU path)
  fast_hf      utrc_study.eval.fast.score_tokens_fast, transformers fp32 (token-budget batches)
  fast_ssm32   fast path on mamba-ssm's MambaLMHeadModel, fp32 weights (exact-length batches, Triton SSD)
  fast_ssm_bf16  the same under bf16 autocast (fp32 weights)
Agreement of each fast path with classic, per request: |dll| <= 1e-4 + 1e-5 |ll| (fp32 paths) and
greedy identical; per item (choice tasks: argmax over choices) correctness identical. bf16 is reported
with its own numbers (max |dll|, fraction of items whose correctness flips), not held to fp32 tolerance.
Timing: a warm-up call on a few requests of each path first (Triton compilation, caches), then one
timed call per (path, config) with torch.cuda.synchronize() around it (the unit is a whole scoring
call: requests/s over its wall time, as the notes measure the evaluator).

Device command (repo copied to the GPU machine; run from the repo root; carry the gitignored kernel
folder and Triton cache, e.g. `ln -s /work/main/.train .train` in this checkout first or copy it):
  run(command="OUT=${OUT:-out} timeout 470 bash -c 'export PYTHONPATH=$PWD/.train/mamba_ssm_py:$PWD
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TRITON_CACHE_DIR=/tmp/triton; mkdir -p /tmp/triton;
  [ -f .train/triton_cache.tar.gz ] && tar xzf .train/triton_cache.tar.gz -C /tmp/triton;
  python3 scripts/gpu_eval_speed.py --limit 400 --classic-limit 100 --deadline 440'",
      carry=[".train/mamba_ssm_py", ".train/triton_cache.tar.gz"], timeout_s=500)
(one line; nothing is installed; fast paths on 400 items per task, the classic path on the first 100,
which is also where agreement is checked). It stops starting new measurements after --deadline seconds from
its start and writes the JSON after every measurement, so a partial run still returns numbers. Without
mamba-ssm importable the fast_ssm* paths are skipped and said so in the JSON.

CPU (no GPU): `python scripts/gpu_eval_speed.py --device cpu --models tiny-mamba2 --limit 12 --paths
classic,fast_hf --out figures/eval_speed` measures the same on CPU (labelled "device": "cpu").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

LL_ABS, LL_REL = 1e-4, 1e-5
TASKS = ("cloze_v2", "choice4_v2", "choice2_v2")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def items_correct(task, items, results):
    """Per item correctness from (ll, greedy) results (the scorer's rules, acc only)."""
    from utrc_study.eval.suite import task_kind

    kind = task_kind(task)
    if kind == "cloze":
        return [int(g) for _, g in results]
    if kind == "ppl":
        return []
    key = "endings" if kind == "choice4" else "options"
    out, j = [], 0
    for it in items:
        n = len(it[key])
        lls = [results[j + c][0] for c in range(n)]
        j += n
        out.append(int(max(range(n), key=lambda c: lls[c]) == it["label"]))
    return out


def agreement(task, items, ref, got, fp32: bool) -> dict:
    d = [abs(a[0] - b[0]) for a, b in zip(ref, got)]
    ok = [abs(a[0] - b[0]) <= LL_ABS + LL_REL * abs(a[0]) for a, b in zip(ref, got)]
    greedy = sum(a[1] == b[1] for a, b in zip(ref, got))
    ca, cb = items_correct(task, items, ref), items_correct(task, items, got)
    flips = sum(x != y for x, y in zip(ca, cb))
    return {"requests": len(ref), "max_abs_dll": max(d) if d else 0.0,
            "within_tolerance": sum(ok), "greedy_same": greedy, "items": len(ca), "correct_flips": flips,
            "acc_ref": sum(ca) / len(ca) if ca else None, "acc": sum(cb) / len(cb) if cb else None,
            "pass": (sum(ok) == len(ok) and flips == 0) if fp32 else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-mamba2,depth-mamba2-64")
    ap.add_argument("--methods", default="dense,utrc")
    ap.add_argument("--cut", type=float, default=0.2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--paths", default="classic,fast_hf,fast_ssm32,fast_ssm_bf16")
    ap.add_argument("--classic-batch", type=int, default=64)
    ap.add_argument("--classic-limit", type=int, default=None,
                    help="items per task for the classic path (its requests/s are measured on these; the "
                         "agreement on them too). Default: --limit")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--deadline", type=float, default=440.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args(argv)
    t_start = time.time()
    import transformers

    import utrc_lib
    from utrc_study.eval import fast, scorer
    from utrc_lib.hosts.speed import resolve_device

    device = resolve_device(a.device)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path_json = out_dir / ("gpu_eval_speed.json" if device.startswith("cuda") else "cpu_eval_speed_fast.json")
    rec = {"device": device, "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
           "cpu_threads": torch.get_num_threads(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "utrc_lib": utrc_lib.__version__},
           "tolerance": {"ll_abs": LL_ABS, "ll_rel": LL_REL, "note": "fp32 fast paths must agree within it per request, "
                         "and per item correctness identical; bf16 reported only"},
           "tasks": a.tasks.split(","), "limit": a.limit, "cut": a.cut, "runs": [], "skipped": []}
    try:
        import mamba_ssm  # noqa: F401
        rec["versions"]["mamba_ssm"] = getattr(mamba_ssm, "__version__", "?")
        have_ssm = device.startswith("cuda")
    except Exception as e:
        have_ssm = False
        rec["skipped"].append(f"mamba-ssm not importable: {e!r}")
    try:
        import triton
        rec["versions"]["triton"] = triton.__version__
    except Exception:
        pass

    def save():
        rec["wall_s"] = time.time() - t_start
        path_json.write_text(json.dumps(rec, indent=1))

    def left():
        return a.deadline - (time.time() - t_start)

    paths = a.paths.split(",")
    for name in a.models.split(","):
        if left() < 30:
            rec["skipped"].append(f"{name}: deadline")
            break
        hf, tok = utrc_lib.load_model(name, device=device)
        pad = scorer.pad_id(tok)
        ssm = {}
        if have_ssm and any(p.startswith("fast_ssm") for p in paths):
            try:
                ssm["m"] = fast.mamba_ssm_model(hf, dtype=torch.float32, device=device)
            except Exception as e:
                rec["skipped"].append(f"{name}: mamba-ssm model: {e!r}")
        task_reqs = {}
        for t in a.tasks.split(","):
            toks, extra = scorer._task_requests(tok, t, a.limit)
            task_reqs[t] = (toks, extra["items"])
        climit = a.classic_limit if a.classic_limit is not None else a.limit

        def call(path, toks, cfg):
            if path == "classic":
                return scorer.score_tokens(hf, toks, cfg, a.classic_batch, pad_token_id=pad)
            if path == "fast_hf":
                return fast.score_tokens_fast(hf, toks, cfg, pad_token_id=pad)
            if path == "fast_ssm32":
                return fast.score_tokens_fast(ssm["m"], toks, cfg, pad_token_id=pad)
            if path == "fast_ssm_bf16":
                return fast.score_tokens_fast(ssm["m"], toks, cfg, pad_token_id=pad, autocast=torch.bfloat16)
            raise ValueError(path)

        for method in a.methods.split(","):
            cfg = None if method == "dense" else utrc_lib.ReductionConfig(method, flops_reduction=a.cut)
            classic_res = {}
            for path in paths:
                if path.startswith("fast_ssm") and "m" not in ssm:
                    continue
                if left() < 20:
                    rec["skipped"].append(f"{name}/{method}/{path}: deadline")
                    continue
                # warm-up on a few requests of every task (compilation, allocator)
                t0 = time.time()
                for t, (toks, _) in task_reqs.items():
                    call(path, toks[:8], cfg)
                sync()
                warm = time.time() - t0
                row = {"model": name, "method": method, "path": path, "warmup_s": warm, "tasks": {}}
                n_req = 0
                secs = 0.0
                for t, (toks, items) in task_reqs.items():
                    if left() < 10:
                        row["partial"] = True
                        break
                    if path == "classic" and climit is not None and climit != a.limit:
                        n_items = climit
                    else:
                        n_items = len(items)
                    per = len(toks) // max(len(items), 1)
                    sub = toks[: n_items * per]
                    sync()
                    t0 = time.perf_counter()
                    res = call(path, sub, cfg)
                    sync()
                    dt = time.perf_counter() - t0
                    n_req += len(sub)
                    secs += dt
                    entry = {"requests": len(sub), "seconds": dt, "requests_per_s": len(sub) / dt,
                             "dense_fallback": res.dense_fallback}
                    if path == "classic":
                        classic_res[t] = res.results
                    elif t in classic_res:
                        k = len(classic_res[t])
                        entry["agreement"] = agreement(t, items[: k // max(per, 1)], classic_res[t], res.results[:k],
                                                       fp32=path != "fast_ssm_bf16")
                    row["tasks"][t] = entry
                row["requests"] = n_req
                row["seconds"] = secs
                row["requests_per_s"] = n_req / secs if secs else None
                if torch.cuda.is_available():
                    row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                    torch.cuda.reset_peak_memory_stats()
                base = next((r for r in rec["runs"] if r["model"] == name and r["method"] == method
                             and r["path"] == "classic"), None)
                if base and path != "classic" and base.get("requests_per_s") and row["requests_per_s"]:
                    row["speedup_vs_classic"] = row["requests_per_s"] / base["requests_per_s"]
                rec["runs"].append(row)
                save()
                print(f"{name:16s} {method:6s} {path:14s} {row['requests_per_s'] or 0:9.1f} req/s "
                      f"x{row.get('speedup_vs_classic', 1.0):6.2f} warm-up {warm:5.1f}s", flush=True)
        del hf, ssm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    save()
    print(f"wrote {path_json}")
    print("agreement (fast vs classic): " + "; ".join(
        f"{r['model']}/{r['method']}/{r['path']}: " + ",".join(
            f"{t}:{e['agreement']['within_tolerance']}/{e['agreement']['requests']} flips {e['agreement']['correct_flips']} "
            f"max|dll| {e['agreement']['max_abs_dll']:.1e}" for t, e in r["tasks"].items() if "agreement" in e)
        for r in rec["runs"] if r["path"] != "classic"))


if __name__ == "__main__":
    main()

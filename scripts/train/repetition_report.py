#!/usr/bin/env python3
"""Report of the data-repetition probe (scripts/train/repetition_probe.sh): how much does training on
repeated data cost the small Mamba-2, at the same number of steps?

Reads  RUNS/*/training_log.json (one run per fraction of the training documents, from the device call)
Writes OUT/runs/<run>/training_log.json   the logs, copied (the figure's data stays beside it)
       OUT/repetition.json                per run: fraction, unique tokens, epochs, final validation and
                                          test loss / bits per byte overall and per source; per pair
                                          (each run against the full-data run of the same seed): the
                                          per-source test bits-per-byte difference, its mean with a
                                          t interval over sources, the overall difference; and where
                                          the shipped small models stand (epochs from their logs); small vs
                                          tiny on the same test text, v1 and new sources apart
       OUT/repetition.png                 validation curves; per-source test differences with intervals

Usage: .venv/bin/python scripts/train/repetition_report.py RUNS [RUNS ...] [--out figures/train_repetition]
(`make figures` re-renders the committed figure from its own logs: RUNS = figures/train_repetition/runs)
A run is used only if it trained the steps it was asked for (a run cut short by the call's deadline
has another learning-rate schedule); the others are listed under "rejected".
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# the corpus v1 sources (the tiny models' training text), from the v2 manifest's new_in_v2 flags
V1_SOURCES = tuple(s["source"] for s in json.loads((REPO / "data/corpus/manifest_v2.json").read_text())["sources"]
                   if not s["new_in_v2"])


def load_runs(folders: list[Path]) -> tuple[dict, list]:
    runs, rejected = {}, []
    for folder in folders:
        for p in sorted(Path(folder).glob("*/training_log.json")):
            log = json.loads(p.read_text())
            asked = log["args"]["max_steps"]
            name = p.parent.name
            if log["steps"] != asked:
                rejected.append({"run": name, "steps": log["steps"], "asked": asked,
                                 "why": "stopped before its steps (deadline): another schedule"})
                continue
            runs[name] = {"path": p, "log": log}
    return dict(sorted(runs.items())), sorted(rejected, key=lambda r: r["run"])


def run_record(log: dict) -> dict:
    d, tok_step = log["data"], log["args"]["batch"] * log["args"]["seq"]
    ev = log["eval"]
    return {
        "train_docs_frac": d.get("train_docs_frac", 1.0), "doc_seed": d.get("doc_seed", 0),
        "seed": log["args"]["seed"], "train_docs": d.get("train_docs"), "unique_train_tokens": d["train_tokens"],
        "steps": log["steps"], "tokens_seen": log["steps"] * tok_step,
        "epochs": log["steps"] * tok_step / d["train_tokens"],
        "train_seconds": log["train_seconds"], "kernel_warmup_seconds": log["kernel_warmup_seconds"],
        "tokens_per_second": log["tokens_per_second"], "hardware": log["hardware"], "versions": log["versions"],
        "final": {s: {"loss": ev[s]["overall"]["loss"], "bits_per_byte": ev[s]["overall"]["bits_per_byte"]}
                  for s in ev},
        "test_bpb_per_source": {k: v["bits_per_byte"] for k, v in ev["test"]["per_source"].items()},
        "curve": [{"tokens": r["tokens"], "train_loss": r["train_loss"], "val_loss": r["val_loss"]}
                  for r in log["log"]],
    }


def t_interval(xs: list[float], level: float = 0.95) -> dict:
    from scipy import stats
    m = float(np.mean(xs))
    lo, hi = stats.t.interval(level, len(xs) - 1, loc=m, scale=stats.sem(xs))
    return {"mean": m, "lo": float(lo), "hi": float(hi), "n": len(xs), "level": level}


def compare(rec: dict, ref: dict) -> dict:
    common = sorted(set(rec["test_bpb_per_source"]) & set(ref["test_bpb_per_source"]))
    diffs = {s: rec["test_bpb_per_source"][s] - ref["test_bpb_per_source"][s] for s in common}
    out = {"per_source": diffs, "mean_over_sources": t_interval(list(diffs.values())),
           "overall_test_bpb": rec["final"]["test"]["bits_per_byte"] - ref["final"]["test"]["bits_per_byte"],
           "overall_test_loss": rec["final"]["test"]["loss"] - ref["final"]["test"]["loss"]}
    for group, names in (("v1_sources", [s for s in common if s in V1_SOURCES]),
                         ("new_sources", [s for s in common if s not in V1_SOURCES])):
        if len(names) > 1:
            out[group] = t_interval([diffs[s] for s in names])
    lo, hi = out["mean_over_sources"]["lo"], out["mean_over_sources"]["hi"]
    out["resolved"] = bool(lo > 0 or hi < 0)
    return out


def shipped() -> dict:
    res = {}
    for name in ("small-mamba2", "small-mamba"):
        p = REPO / "data/models" / name / "training_log.json"
        if p.exists():
            log = json.loads(p.read_text())
            res[name] = {"tokens_seen": log["tokens_seen"], "unique_train_tokens": log["data"]["train_tokens"],
                         "epochs": log["tokens_seen"] / log["data"]["train_tokens"],
                         "test_bits_per_byte": log["eval"]["test"]["overall"]["bits_per_byte"]}
    return res


def same_text_gap() -> dict:
    """Small vs tiny on the same test text (data/benchmarks_v2/v2_test_bpb_*.json, scripts/eval_v2_test.py):
    bits per byte and the per-byte perplexity cut 1 - 2^(small - tiny), overall and for the v1 / new sources."""
    out = {}
    for tiny, small in (("tiny-mamba2", "small-mamba2"), ("tiny-mamba", "small-mamba")):
        paths = [REPO / f"data/benchmarks_v2/v2_test_bpb_{m}.json" for m in (tiny, small)]
        if not all(p.exists() for p in paths):
            continue
        t, sm = (json.loads(p.read_text())["per_source"] for p in paths)
        rec = {}
        for group, names in (("all_sources", sorted(t)), ("v1_sources", [n for n in sorted(t) if n in V1_SOURCES]),
                             ("new_sources", [n for n in sorted(t) if n not in V1_SOURCES])):
            nbytes = sum(t[n]["bytes"] for n in names)
            bt, bs = (sum(d[n]["nll_nats"] for n in names) / nbytes / math.log(2) for d in (t, sm))
            rec[group] = {"sources": len(names), "bytes": nbytes, "tiny_bits_per_byte": bt, "small_bits_per_byte": bs,
                          "per_byte_ppl_cut": 1 - 2 ** (bs - bt)}
        out[f"{small}_vs_{tiny}"] = rec
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, r in sorted(result["runs"].items()):
        c = [p for p in r["curve"] if p["val_loss"] is not None]
        a1.plot([p["tokens"] / 1e6 for p in c], [p["val_loss"] for p in c], marker=".",
                label=f"{name}: {r['unique_train_tokens'] / 1e6:.1f}M unique, {r['epochs']:.1f} epochs")
    a1.set_xlabel("training tokens (M)")
    a1.set_ylabel("validation loss (nats/token)")
    a1.set_title("small Mamba-2 (24 x 384), same steps, nested document subsets", fontsize=10)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    pairs = result["pairs"]
    for i, (pname, pr) in enumerate(sorted(pairs.items())):
        ds = pr["per_source"]
        names = sorted(ds)
        ys = [ds[s] for s in names]
        xs = [i + 0.08 * ((k % 7) - 3) for k in range(len(names))]
        a2.scatter(xs, ys, s=14, alpha=0.6, c=["C3" if s in V1_SOURCES else "C0" for s in names])
        m = pr["mean_over_sources"]
        a2.errorbar([i + 0.4], [m["mean"]], yerr=[[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]], fmt="ks",
                    capsize=4)
    a2.set_xticks(range(len(pairs)))
    a2.set_xticklabels([p.replace("_vs_", "\nvs ") for p in sorted(pairs)], fontsize=8)
    a2.axhline(0, color="grey", lw=0.8)
    a2.set_ylabel("test bits/byte difference (run - full data)")
    a2.set_title("test bpb vs the full-data run, per source\n(red: v1 sources, blue: new; black: mean, 95% t interval)",
                  fontsize=10)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="folders holding <run>/training_log.json")
    ap.add_argument("--out", type=Path, default=REPO / "figures/train_repetition")
    a = ap.parse_args(argv)
    runs, rejected = load_runs(a.runs)
    if not runs:
        sys.exit("repetition_report: no usable run (training_log.json with its asked steps) under " +
                 ", ".join(map(str, a.runs)))
    recs = {name: run_record(r["log"]) for name, r in runs.items()}
    steps = {r["steps"] for r in recs.values()}
    if len(steps) > 1:
        sys.exit(f"repetition_report: runs of different lengths {sorted(steps)}: not comparable")
    pairs = {}
    for name, r in recs.items():
        refs = [n for n, q in recs.items() if q["train_docs_frac"] == 1.0 and q["seed"] == r["seed"] and n != name]
        if r["train_docs_frac"] < 1.0 and refs:
            pairs[f"{name}_vs_{refs[0]}"] = compare(r, recs[refs[0]])
    seeds = sorted({r["seed"] for r in recs.values() if r["train_docs_frac"] == 1.0})
    full = sorted((n for n, r in recs.items() if r["train_docs_frac"] == 1.0), key=lambda n: (recs[n]["seed"], n))
    if len(full) > 1:     # same data, another seed: how large differences are with no data effect at all
        pairs[f"{full[1]}_vs_{full[0]}"] = compare(recs[full[1]], recs[full[0]])
    result = {"what": "data-repetition probe: small Mamba-2 trained from scratch for the same steps on nested "
                      "fractions of the corpus v2 training documents (scripts/train/repetition_probe.sh)",
              "runs": recs, "pairs": pairs, "rejected": rejected, "full_data_seeds": seeds,
              "shipped_models": shipped(), "same_text_gap": same_text_gap(),
              "interval": "95% t interval of the per-source test bits-per-byte differences, sources as units "
                          "(one training run per arm: seed variation is in it only through a same-data pair)"}
    a.out.mkdir(parents=True, exist_ok=True)
    for name, r in runs.items():
        dst = a.out / "runs" / name
        dst.mkdir(parents=True, exist_ok=True)
        if Path(r["path"]).resolve() != (dst / "training_log.json").resolve():    # not when re-run on out/runs
            shutil.copy(r["path"], dst / "training_log.json")
    (a.out / "repetition.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, a.out / "repetition.png")
    for pname, pr in pairs.items():
        m = pr["mean_over_sources"]
        print(f"{pname}: test bpb {pr['overall_test_bpb']:+.4f} overall; per-source mean {m['mean']:+.4f} "
              f"[{m['lo']:+.4f}, {m['hi']:+.4f}]{'' if pr['resolved'] else ' (unresolved)'}")
    return result


if __name__ == "__main__":
    main()

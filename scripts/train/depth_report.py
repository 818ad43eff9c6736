#!/usr/bin/env python3
"""Training report of the depth-controlled family (scripts/train/depth_family.sh, issue 27).

Reads  data/models/depth-*/training_log.json (installed by join.py; the logs are committed for every
       member, the weights only for the 64-layer Mamba-2)
Writes OUT/depth_family.json  per model: shape, parameters, tokens, recipe, the device calls (tokens/s,
                              seconds, card), validation / test perplexity and bits per byte, the test
                              perplexity with a 95% bootstrap interval over the test windows; per pair of
                              neighbouring depths (same architecture and seed): the paired change of test
                              loss (nats per token) with a 95% paired bootstrap interval over the same
                              windows, and whether the deeper model is resolved better ("deeper must be
                              better at equal tokens")
       OUT/depth_family.png   validation loss vs tokens per depth; test perplexity vs depth with intervals

Usage: .venv/bin/python scripts/train/depth_report.py [--models data/models] [--out figures/depth_family]
Byte-stable: floats rounded to 6 significant digits, a fixed bootstrap seed, no timestamps in the PNG.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
N_BOOT = 10_000
SEED = 0
NAME = re.compile(r"^depth-(mamba2|mamba)-(\d+)(?:-s(\d+))?$")


def sig(x, digits: int = 6):
    """Round floats (recursively) to ``digits`` significant digits, so the JSON is the same on any machine."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: sig(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sig(v, digits) for v in x]
    return x


def test_windows(log: dict) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, targets) of every test window, sources in the log's order."""
    rows = [w for r in log["eval"]["test"]["per_source"].values() for w in r["windows"]]
    a = np.asarray(rows, dtype=np.float64)
    return a[:, 0], a[:, 1]


def boot_ppl(nll: np.ndarray, n: np.ndarray, rng) -> tuple[float, float]:
    idx = rng.integers(0, nll.size, (N_BOOT, nll.size))
    ppl = np.exp(nll[idx].sum(1) / n[idx].sum(1))
    lo, hi = np.quantile(ppl, [0.025, 0.975])
    return float(lo), float(hi)


def load(models: Path) -> dict:
    out = {}
    for d in sorted(models.glob("depth-*")):
        m = NAME.match(d.name)
        if m and (d / "training_log.json").exists():
            out[d.name] = json.loads((d / "training_log.json").read_text())
    return out


def report(logs: dict) -> dict:
    models, wins = {}, {}
    for name, log in logs.items():
        arch, layers, seed = NAME.match(name).groups()
        nll, n = test_windows(log)
        wins[name] = (nll, n)
        lo, hi = boot_ppl(nll, n, np.random.default_rng(SEED))    # as on the model card
        a = log["args"]
        models[name] = {
            "arch": arch, "layers": int(layers), "seed": int(seed or 0), "params": log["params"],
            "tokens": log["tokens_seen"], "steps": log["steps"],
            "shape": {k: a[k] for k in ("d_model", "d_state", "headdim", "expand", "chunk_size")},
            "recipe": {k: a[k] for k in ("batch", "seq", "lr", "warmup", "min_lr_frac", "wd", "grad_clip",
                                         "total_tokens")},
            "weights": {"sha256": log["weights"]["sha256"], "bytes": log["weights"]["bytes"]},
            "calls": [{k: c[k] for k in ("steps", "tokens_seen", "train_seconds", "tokens_per_second",
                                         "kernel_warmup_seconds", "hardware")} for c in log["calls"]],
            "versions": log["versions"],
            "validation": {k: log["eval"]["validation"]["overall"][k] for k in ("loss", "ppl", "bits_per_byte")},
            "test": {**{k: log["eval"]["test"]["overall"][k] for k in ("loss", "ppl", "bits_per_byte")},
                     "ppl_ci95": [lo, hi], "windows": int(nll.size), "tokens_scored": int(n.sum())},
            "val_curve": [[r["tokens"], r["val_loss"]] for r in log["log"]],
        }
    pairs = []
    groups: dict = {}
    for name, m in models.items():
        groups.setdefault((m["arch"], m["seed"]), []).append(name)
    for (arch, seed), names in sorted(groups.items()):
        names.sort(key=lambda k: models[k]["layers"])
        for shallow, deep in zip(names, names[1:]):
            (a_nll, a_n), (b_nll, b_n) = wins[shallow], wins[deep]
            if not np.array_equal(a_n, b_n):
                raise ValueError(f"{shallow} and {deep} were not scored on the same test windows")
            d = (b_nll - a_nll)
            idx = np.random.default_rng(SEED).integers(0, d.size, (N_BOOT, d.size))
            boot = d[idx].sum(1) / a_n[idx].sum(1)
            lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
            delta = float(d.sum() / a_n.sum())
            pairs.append({"arch": arch, "seed": seed, "shallow": shallow, "deep": deep, "delta_test_loss": delta,
                          "ci95": [lo, hi], "deeper_better": "resolved" if hi < 0 else
                          ("worse, resolved" if lo > 0 else "unresolved")})
    return {"what": "depth-controlled family: training and test perplexity (scripts/train/depth_report.py)",
            "bootstrap": {"resamples": N_BOOT, "seed": SEED, "unit": "test window of 1024 tokens"},
            "models": models, "pairs": pairs}


def figure(rep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, m in sorted(rep["models"].items(), key=lambda kv: kv[1]["layers"]):
        t, v = zip(*m["val_curve"])
        ax1.plot(np.asarray(t) / 1e6, v, marker=".", label=f"{m['layers']} layers")
    ax1.set(xlabel="training tokens (M)", ylabel="validation loss (nats/token)", ylim=(3.8, 4.6),
            title="validation loss, same recipe and tokens")
    ax1.legend(fontsize=8)
    for arch in sorted({m["arch"] for m in rep["models"].values()}):
        ms = sorted((m for m in rep["models"].values() if m["arch"] == arch), key=lambda m: m["layers"])
        x = [m["layers"] for m in ms]
        y = [m["test"]["ppl"] for m in ms]
        err = [[m["test"]["ppl"] - m["test"]["ppl_ci95"][0] for m in ms],
               [m["test"]["ppl_ci95"][1] - m["test"]["ppl"] for m in ms]]
        ax2.errorbar(x, y, yerr=err, marker="o", capsize=3, label={"mamba2": "Mamba-2", "mamba": "Mamba-1"}[arch])
    ax2.set(xlabel="layers", ylabel="v2 test perplexity", title="test perplexity vs depth (95% bootstrap CI)")
    ax2.set_xticks(sorted({m["layers"] for m in rep["models"].values()}))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(REPO / "data/models"))
    ap.add_argument("--out", default=str(REPO / "figures/depth_family"))
    a = ap.parse_args(argv)
    logs = load(Path(a.models))
    if not logs:
        sys.exit(f"depth_report: no data/models/depth-*/training_log.json under {a.models}")
    rep = sig(report(logs))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth_family.json").write_text(json.dumps(rep, indent=1, sort_keys=True) + "\n")
    figure(rep, out / "depth_family.png")
    for m in sorted(rep["models"].values(), key=lambda m: (m["arch"], m["seed"], m["layers"])):
        lo, hi = m["test"]["ppl_ci95"]
        print(f"{m['arch']:7s} {m['layers']:3d} layers seed {m['seed']}: {m['params'] / 1e6:5.2f}M params, "
              f"test ppl {m['test']['ppl']:.2f} [{lo:.2f}, {hi:.2f}]")
    for p in rep["pairs"]:
        print(f"{p['shallow']} -> {p['deep']}: test loss {p['delta_test_loss']:+.4f} "
              f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] nats/token ({p['deeper_better']})")
    return rep


if __name__ == "__main__":
    main()

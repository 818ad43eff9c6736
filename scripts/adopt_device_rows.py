#!/usr/bin/env python
"""Re-key a scale-length cache's rows of one model that the GPU machine measured on the same weights
installed there from the training parts (before join.py installed them here).

A row's `fingerprint` hashes every .json / .safetensors file of the model folder
(`utrc_study.experiments.sweep.model_fingerprint`). The device's folder held the same weights but not
the same side files: no training_log.json (join.py writes it here) and a config.json written by
another transformers version. So the device rows carry another fingerprint and would be recomputed.
This script checks that the local `model.safetensors` has the sha256 the device printed when it
installed the model (`--weights-sha256`; in the device log), and only then rewrites those rows'
fingerprint to the local one (new row keys), keeping the device's in `result["meta/fingerprint_device"]`
and the weights' sha256 in `result["meta/weights_sha256"]`. Rows of other models are copied unchanged.

    .venv/bin/python scripts/adopt_device_rows.py .cache/sweeps/scale_length.jsonl --model small-mamba2 \\
        --device-fingerprint FP --weights-sha256 SHA
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from utrc_study.experiments import sweep
    from utrc_lib.hosts.models import EMBEDDED, embedded_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache")
    ap.add_argument("--model", required=True)
    ap.add_argument("--device-fingerprint", required=True, help="the fingerprint in the device's rows")
    ap.add_argument("--weights-sha256", required=True, help="model.safetensors sha256 printed on the device")
    a = ap.parse_args(argv)
    folder = embedded_path(a.model) if a.model in EMBEDDED else Path(a.model)
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    if sha != a.weights_sha256:
        sys.exit(f"adopt_device_rows: {folder}/model.safetensors is {sha}, not the device's {a.weights_sha256}")
    local = sweep.model_fingerprint(a.model)
    path = Path(a.cache)
    rows = sweep.RowCache(path).load()
    out, n = [], 0
    for r in rows.values():
        p = r.get("params", {})
        if p.get("model") == a.model and p.get("fingerprint") == a.device_fingerprint:
            p = dict(p, fingerprint=local)
            r = dict(r, params=p, key=sweep.row_key(p, r.get("version", "")),
                     result=dict(r.get("result") or {}, **{"meta/fingerprint_device": a.device_fingerprint,
                                                           "meta/weights_sha256": sha}))
            n += 1
        out.append(r)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    print(f"{a.model}: {n} row(s) re-keyed {a.device_fingerprint} -> {local} (weights sha256 {sha[:16]}...)")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())

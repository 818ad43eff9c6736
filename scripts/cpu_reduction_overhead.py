"""Per-anchor cost of the reduction vs one layer forward, on CPU (transformers torch path).

    .venv/bin/python scripts/cpu_reduction_overhead.py [--out figures/cpu_reduction_overhead.json]

For each model kind (Mamba-1, Mamba-2; 12 layers, d_model 256: the embedded default's shape) and each
method, times (median of repeats, after warm-up) one layer's forward on (B, N) tokens and one
reduction step (plan + apply to hidden and residual) on tensors of the same shape.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

import utrc_lib
from utrc_study.experiments.timing import time_ms
from utrc_lib.hosts.handle import ForwardReducer


def median_ms(fn, repeats: int) -> float:
    return statistics.median(time_ms(fn, "cpu", repeats=repeats, warmup=2))


def build(kind: str, d_model: int, layers: int):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    if kind == "mamba2":
        cfg = Mamba2Config(vocab_size=8192, hidden_size=d_model, num_hidden_layers=layers, state_size=64,
                           head_dim=64, expand=2, n_groups=1, num_heads=2 * d_model // 64, chunk_size=256)
        return Mamba2ForCausalLM(cfg).eval()
    cfg = MambaConfig(vocab_size=8192, hidden_size=d_model, num_hidden_layers=layers, state_size=16, expand=2)
    return MambaForCausalLM(cfg).eval()


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="utrc,utrc_reference,evit,pumer,tome,random")
    ap.add_argument("--out", default="figures/cpu_reduction_overhead.json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for kind in ("mamba2", "mamba"):
        model = build(kind, a.d_model, 12)
        block = model.backbone.layers[2]
        x = torch.randn(a.batch, a.seq_len, a.d_model)
        layer_ms = median_ms(lambda: block(x), a.repeats)
        hidden, residual = torch.randn_like(x), torch.randn_like(x)
        ssm = torch.randn(a.batch, a.seq_len, 2 * a.d_model)
        for method in a.methods.split(","):
            cfg = utrc_lib.ReductionConfig(method, keep_ratio=0.9043, causal=method != "utrc_reference",
                                           layers=(2,))
            valid = torch.ones(a.batch, a.seq_len, dtype=torch.bool)
            sched = cfg.resolve(12)

            def step():
                red = ForwardReducer(cfg, sched, valid)
                red.step(2, hidden, residual, features=ssm)

            red_ms = median_ms(step, a.repeats)
            rows.append({"model_kind": kind, "method": method, "batch": a.batch, "seq_len": a.seq_len,
                         "d_model": a.d_model, "keep_ratio": 0.9043, "layer_forward_ms": round(layer_ms, 3),
                         "reduction_ms": round(red_ms, 3), "ratio": round(red_ms / layer_ms, 4)})
            print(f"{kind:7s} {method:15s} layer {layer_ms:8.2f} ms  reduction {red_ms:7.2f} ms  "
                  f"({100 * red_ms / layer_ms:.1f}% of a layer)")
    out = {"rows": rows, "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "utrc": utrc_lib.__version__, "platform": platform.platform(), "repeats": a.repeats,
           "note": "one anchor: plan + apply to hidden and residual, vs one Mamba block forward (torch path)"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

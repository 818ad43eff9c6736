#!/usr/bin/env python3
"""Train a small Mamba / Mamba-2 language model on the offline corpus tokens.

Backends:
  --backend mamba_ssm  GPU, mamba-ssm's MambaLMHeadModel (imported lazily; causal-conv1d not needed:
                       Mamba-1 falls back to torch's conv1d, Mamba-2 runs with use_mem_eff_path=False)
  --backend hf         CPU smoke test, transformers MambaForCausalLM / Mamba2ForCausalLM

The learning rate warms up linearly over --warmup steps, then follows a cosine to 10 % of
the peak over the planned run: --steps if given, else the wall-time budget --seconds (the
cosine follows elapsed/--seconds). Validation runs every --eval-every steps; the best
validation weights are kept and, at the end, converted to the transformers format
(utrc_lib.convert.convert_mamba_ssm_state_dict) and saved with the tokenizer, fp16
safetensors, to --out, with training_log.json and training_curve.png.

Examples (GPU machine, repo root, after `bash .gpu/setup.sh`):
  python3 scripts/train_lm.py --backend mamba_ssm --arch mamba  --d-state 16 --seconds 210 \
      --out data/models/tiny-mamba --verify
  python3 scripts/train_lm.py --backend mamba_ssm --arch mamba2 --d-state 64 --seconds 360 \
      --out data/models/tiny-mamba2 --verify
CPU smoke test:
  .venv/bin/python scripts/train_lm.py --backend hf --arch mamba2 --layers 2 --d-model 32 \
      --batch 4 --seq 64 --seconds 10 --eval-every 5 --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utrc_lib import environment  # noqa: E402
from utrc_lib.hosts.convert import (convert_mamba_ssm_state_dict, hf_to_mamba_ssm_state_dict,  # noqa: E402
                                    mamba_ssm_to_hf_config, padded_vocab)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["mamba_ssm", "hf"], default="mamba_ssm")
    ap.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba2")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-state", type=int, default=None, help="default 16 (mamba) / 64 (mamba2)")
    ap.add_argument("--headdim", type=int, default=64, help="Mamba-2 head dimension")
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=256, help="Mamba-2 chunk size")
    ap.add_argument("--pad-vocab-multiple", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=210.0, help="training wall-time budget")
    ap.add_argument("--steps", type=int, default=None, help="planned steps (cosine length); "
                    "default: follow the time budget")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val-tokens", type=int, default=0, help="cap on validation tokens (0 = all)")
    ap.add_argument("--patience", type=int, default=0,
                    help="stop after this many evals without improvement (0 = never)")
    ap.add_argument("--tokens", default=str(REPO / "data/corpus/tokens/tokens.npz"))
    ap.add_argument("--tokenizer", default=str(REPO / "data/tokenizer"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-kernel-warmup", action="store_true",
                    help="skip the untimed forward/backward passes that compile/autotune kernels")
    ap.add_argument("--verify", action="store_true",
                    help="reload the saved checkpoint with transformers and compare logits")
    a = ap.parse_args(argv)
    if a.d_state is None:
        a.d_state = 16 if a.arch == "mamba" else 64
    return a


# ----------------------------------------------------------------------------- data
def load_tokens(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.exists():
        sys.exit(f"train_lm: token file {p} not found (build it with data/corpus/train_tokenizer.py)")
    if p.suffix == ".npz":
        with np.load(p) as z:
            return {k: z[k].astype(np.int64) for k in z.files}
    # a directory of .bin files
    return {s: np.fromfile(p / f"{s}.bin", dtype=np.uint16).astype(np.int64)
            for s in ("train", "validation", "test") if (p / f"{s}.bin").exists()}


class Batcher:
    def __init__(self, tokens: np.ndarray, batch: int, seq: int, seed: int):
        if tokens.size < seq + 2:
            raise ValueError(f"training split has {tokens.size} tokens, fewer than seq+2")
        self.t = torch.from_numpy(tokens)
        self.batch, self.seq = batch, seq
        self.rng = np.random.default_rng(seed)

    def next(self) -> torch.Tensor:
        starts = self.rng.integers(0, self.t.numel() - self.seq - 1, size=self.batch)
        return torch.stack([self.t[s: s + self.seq + 1] for s in starts])


def val_windows(tokens: np.ndarray, seq: int, cap: int) -> torch.Tensor:
    t = torch.from_numpy(tokens)
    if cap:
        t = t[:cap]
    n = (t.numel() - 1) // seq
    if n < 1:
        raise ValueError("validation split is shorter than one sequence")
    # non-overlapping windows of seq+1 tokens (last token of one = first of next)
    return torch.stack([t[i * seq: i * seq + seq + 1] for i in range(n)])


# ----------------------------------------------------------------------------- models
def ssm_config_dict(a, vocab_size: int) -> dict:
    if a.arch == "mamba":
        ssm_cfg = {"layer": "Mamba1", "d_state": a.d_state, "d_conv": 4, "expand": a.expand}
    else:
        ssm_cfg = {"layer": "Mamba2", "d_state": a.d_state, "d_conv": 4, "expand": a.expand,
                   "headdim": a.headdim, "ngroups": 1, "chunk_size": a.chunk_size,
                   "rmsnorm": True, "norm_before_gate": False}
    return dict(d_model=a.d_model, d_intermediate=0, n_layer=a.layers, vocab_size=vocab_size,
                ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                pad_vocab_size_multiple=a.pad_vocab_multiple, tie_embeddings=True)


def build_model(a, cfg: dict, device):
    if a.backend == "mamba_ssm":
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        run_cfg = copy.deepcopy(cfg)
        if a.arch == "mamba2":
            run_cfg["ssm_cfg"]["use_mem_eff_path"] = False   # needs causal_conv1d otherwise
        else:
            run_cfg["ssm_cfg"]["use_fast_path"] = False      # falls back to torch conv1d anyway
        return MambaLMHeadModel(MambaConfig(**run_cfg), device=device, dtype=torch.float32)
    from transformers import AutoModelForCausalLM
    hf_cfg = mamba_ssm_to_hf_config(a.arch, cfg)
    return AutoModelForCausalLM.from_config(hf_cfg).to(device)


def logits_of(model, x):
    return model(x).logits


def lm_loss(model, batch: torch.Tensor, autocast_ctx) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    with autocast_ctx():
        logits = logits_of(model, x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, device, autocast_ctx) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, windows.size(0), batch):
        b = windows[i: i + batch].to(device, non_blocking=True)
        tot += lm_loss(model, b, autocast_ctx).item() * b.size(0)
        n += b.size(0)
    model.train()
    return tot / n


def lr_at(a, step: int, frac: float) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = min(max(frac, 0.0), 1.0)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def hardware(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device or ("cuda" if a.backend == "mamba_ssm" else "cpu"))
    if a.backend == "mamba_ssm" and device.type != "cuda":
        sys.exit("train_lm: --backend mamba_ssm needs a CUDA device")
    if a.backend == "mamba_ssm":
        try:
            import mamba_ssm  # noqa: F401
        except ImportError as e:
            sys.exit(f"train_lm: mamba-ssm is not importable ({e}); on the GPU machine run "
                     "`bash .gpu/setup.sh` first, or use --backend hf")
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    vocab = padded_vocab(len(tokenizer), a.pad_vocab_multiple)
    data = load_tokens(a.tokens)
    if int(data["train"].max()) >= len(tokenizer):
        sys.exit(f"train_lm: token id {int(data['train'].max())} >= tokenizer size {len(tokenizer)}")
    batcher = Batcher(data["train"], a.batch, a.seq, a.seed)
    vwin = val_windows(data["validation"], a.seq, a.val_tokens)

    cfg = ssm_config_dict(a, vocab)
    model = build_model(a, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{a.backend}/{a.arch}: {n_params / 1e6:.2f}M params, vocab {vocab}, "
          f"train {data['train'].size:,} tokens, validation {vwin.numel():,} tokens in {vwin.size(0)} windows",
          flush=True)

    if device.type == "cuda":
        def autocast_ctx():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        import contextlib
        autocast_ctx = contextlib.nullcontext

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")

    warm_s = 0.0
    if not a.no_kernel_warmup:
        t = time.time()
        for _ in range(2 if device.type == "cuda" else 1):
            lm_loss(model, batcher.next().to(device), autocast_ctx).backward()
        model.zero_grad(set_to_none=True)
        evaluate(model, vwin[: a.batch], a.batch, device, autocast_ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        warm_s = time.time() - t
        batcher = Batcher(data["train"], a.batch, a.seq, a.seed)   # same data order as without warm-up
        print(f"kernel warm-up (untimed): {warm_s:.1f}s", flush=True)

    log, best = [], {"val_loss": float("inf"), "step": -1, "state": None}
    tokens_per_step = a.batch * a.seq
    t0 = time.time()
    step, run_loss, run_n, bad_evals = 0, 0.0, 0, 0
    model.train()
    while True:
        elapsed = time.time() - t0
        frac = step / a.steps if a.steps else elapsed / a.seconds
        stop = elapsed >= a.seconds or (a.steps is not None and step >= a.steps)
        if step > 0 and (step % a.eval_every == 0 or stop):
            vl = evaluate(model, vwin, a.batch, device, autocast_ctx)
            el = time.time() - t0
            rec = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": round(el, 2),
                   "train_loss": run_loss / max(run_n, 1), "val_loss": vl, "val_ppl": math.exp(vl),
                   "lr": lr_at(a, step, frac)}
            log.append(rec)
            run_loss, run_n = 0.0, 0
            improved = vl < best["val_loss"]
            if improved:
                best.update(val_loss=vl, step=step,
                            state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
                bad_evals = 0
            else:
                bad_evals += 1
            print(f"step {step:6d}  tok {rec['tokens'] / 1e6:7.1f}M  {el:6.0f}s  train {rec['train_loss']:.3f}"
                  f"  val {vl:.3f}  ppl {rec['val_ppl']:.1f}{'  *' if improved else ''}", flush=True)
            if a.patience and bad_evals >= a.patience:
                print(f"no improvement for {bad_evals} evals: stopping", flush=True)
                stop = True
        if stop:
            break
        lr = lr_at(a, step, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = lm_loss(model, batcher.next().to(device, non_blocking=True), autocast_ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        run_loss += loss.item() if (step % 10 == 0 or device.type == "cpu") else 0.0
        run_n += 1 if (step % 10 == 0 or device.type == "cpu") else 0
        step += 1
    train_s = time.time() - t0
    if best["state"] is None:
        sys.exit("train_lm: no evaluation happened (budget too small?)")
    print(f"trained {step} steps in {train_s:.0f}s; best val loss {best['val_loss']:.4f} "
          f"(ppl {math.exp(best['val_loss']):.2f}) at step {best['step']}", flush=True)

    # ------------------------------------------------------------ convert + save
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.backend == "mamba_ssm":
        ssm_sd, arch = best["state"], a.arch
    else:
        hf_model_cfg = model.config
        arch, _, ssm_sd = hf_to_mamba_ssm_state_dict(best["state"], hf_model_cfg)
    eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    hf_cfg, hf_sd = convert_mamba_ssm_state_dict(ssm_sd, arch, cfg, dtype=torch.float16,
                                                 bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_config(hf_cfg)
    missing, unexpected = hf_model.load_state_dict({k: v.float() for k, v in hf_sd.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        sys.exit(f"train_lm: conversion mismatch: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    hf_model = hf_model.to(torch.float16)
    hf_model.config.dtype = torch.float16
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    wsize = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"saved {out} ({wsize / 2**20:.2f} MiB safetensors)", flush=True)
    if wsize > 16 * 2**20:
        print("WARNING: the weights exceed 16 MiB", flush=True)

    result = {
        "arch": a.arch, "backend": a.backend, "params": n_params, "vocab_size": vocab,
        "best_val_loss": best["val_loss"], "best_val_ppl": math.exp(best["val_loss"]),
        "best_step": best["step"], "steps": step, "tokens_seen": step * tokens_per_step,
        "train_seconds": round(train_s, 1), "kernel_warmup_seconds": round(warm_s, 1),
        "tokens_per_second": round(step * tokens_per_step / max(train_s, 1e-9)),
        "weights_bytes": wsize, "hardware": hardware(device), "versions": environment.versions(),
        "args": vars(a), "seed": a.seed, "mamba_ssm_config": cfg,
        "data": {"tokens": str(a.tokens), "train_tokens": int(data["train"].size),
                 "validation_tokens": int(vwin.numel())},
        "log": log,
    }

    if a.verify:
        result["verify"] = verify(a, model, best["state"], out, vwin, device)

    (out / "training_log.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot_curve(log, out / "training_curve.png", f"{a.arch} {a.layers}x{a.d_model} ({a.backend})")
    return result


@torch.no_grad()
def verify(a, model, best_state, out: Path, vwin: torch.Tensor, device) -> dict:
    """Reload the saved checkpoint with transformers and compare logits with the trained model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    # the trained model with the fp16-rounded best weights, in fp32
    model.load_state_dict({k: v.to(torch.float16).float() if v.is_floating_point() else v
                           for k, v in best_state.items()})
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    b = vwin[: min(4, vwin.size(0))].to(device)
    x, y = b[:, :-1], b[:, 1:]
    l_ref = model(x).logits.float()
    l_hf = hf(x).logits.float()
    diff = (l_ref - l_hf).abs().max().item()
    loss_ref = F.cross_entropy(l_ref.reshape(-1, l_ref.size(-1)), y.reshape(-1)).item()
    loss_hf = F.cross_entropy(l_hf.reshape(-1, l_hf.size(-1)), y.reshape(-1)).item()
    ok = abs(loss_ref - loss_hf) < 0.02
    print(f"verify: max |logits diff| {diff:.4g}; loss {a.backend} {loss_ref:.4f} vs transformers "
          f"{loss_hf:.4f} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        print("train_lm: the converted checkpoint does not reproduce the trained model", file=sys.stderr)
    return {"max_abs_logit_diff": diff, "loss_trained": loss_ref, "loss_transformers": loss_hf, "ok": ok}


def plot_curve(log, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    tok = [r["tokens"] / 1e6 for r in log]
    tr = [(t, r["train_loss"]) for t, r in zip(tok, log) if r.get("train_loss") is not None]
    ax.plot([t for t, _ in tr], [v for _, v in tr], "o-", label="train")
    ax.plot(tok, [r["val_loss"] for r in log], "s-", label="validation")
    for r in log:      # a continued run (train_small.py --init-from): where each later stage starts
        if r.get("stage") and r.get("call_tokens") == 0:
            ax.axvline(r["tokens"] / 1e6, color="0.6", ls="--", lw=1)
            ax.annotate(f"stage {r['stage'] + 1}", (r["tokens"] / 1e6, r["val_loss"]), textcoords="offset points",
                        xytext=(4, 8), fontsize=8, color="0.4")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

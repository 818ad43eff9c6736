#!/usr/bin/env python3
"""Join the weight parts a training call brought back, check them and install the model in the repo.

  .venv/bin/python scripts/train/join.py FROM_DIR --name small-mamba2 [--dest data/models/small-mamba2]

FROM_DIR holds what train_small.py wrote to $OUT: weights.safetensors.NN, training_log.json and
(optionally) train.log. Steps:
  1. every part's size and sha256, then the sha256 of the joined file, against training_log.json;
  2. the mamba-ssm state dict -> transformers (utrc_lib.hosts.convert.convert_mamba_ssm_state_dict),
     fp16 safetensors, tied embeddings, saved with the v2 tokenizer (whose sha256 must be the one the
     training used);
  3. the saved directory is loaded back with utrc_lib.load_model (CPU, fp32, the transformers torch
     path) and must reproduce the per-token NLL that the training backend computed for the reference
     windows (mean |diff| <= --tol-mean, max |diff| <= --tol-max);
  4. model card README.md, training_log.json (plus the join record), training_curve.png, train.log.
Exit status 1 when a check fails (nothing is left in --dest then).

--quick (the GPU machine, before an evaluation there): steps 1 and 2 only, saved straight to --dest (no
CPU check, model card, plot or samples); run join.py in full here afterwards. The same parts give the
same model.safetensors bytes both ways (printed sha256), which scripts/adopt_device_rows.py checks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from packing import file_sha256, join_parts, stages_of  # noqa: E402

MAX_MODEL_BYTES = 64 * 2**20
PROMPTS = ["The", "It was a dark and stormy night, and", "In the beginning", "Dear friends,",
           "The function returns", "Mr. President, the state of the Union"]
BF16_TOL = (8e-2, 1.5)   # (mean, max) |NLL diff| when the device reference was computed under bf16 autocast


@torch.no_grad()
def draw_samples(model, tok, n_new: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    out = []
    for p in PROMPTS:
        ids = torch.tensor([[tok.eos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_k=40,
                           max_new_tokens=n_new, pad_token_id=tok.eos_token_id)
        out.append({"prompt": p, "text": tok.decode(g[0, 1:].tolist())})
    return out


def fail(msg: str) -> None:
    print(f"join: ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def fixed_recipe_lines(log: dict) -> list[str]:
    """The card's training table for the fixed-token recipe: one row per device call, the schedule, and
    the test perplexity's interval (bootstrap over the test windows, as scripts/train/depth_report.py)."""
    import numpy as np
    from depth_report import boot_ppl, test_windows
    a = log["args"]
    out = ["| device call | steps | tokens | seconds | tokens/s | kernel warm-up (s, untimed) | device |",
           "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(log["calls"], 1):
        out.append(f"| {i} | {c['steps']} | {c['tokens_seen'] / 1e6:.1f}M | {c['train_seconds']:.0f} | "
                   f"{c['tokens_per_second']:,} | {c['kernel_warmup_seconds']:.0f} | {c['hardware']} |")
    lo, hi = boot_ppl(*test_windows(log), np.random.default_rng(0))
    return out + [
        "",
        f"Fixed-token recipe: {a['total_tokens']:.3g} tokens requested, {log['steps']} steps; peak lr {a['lr']}, "
        f"{a['warmup']} warm-up steps, cosine to {a['min_lr_frac']} x peak, all by step count (the same schedule "
        "whatever the device or the calls); a call that reached its deadline saved the full state (weights, "
        "AdamW moments, data order) and the next call resumed it exactly. These weights are the final ones "
        "(no best-of selection).",
        "",
        f"Test perplexity {log['eval']['test']['overall']['ppl']:.2f}, 95% bootstrap interval over the "
        f"{sum(len(r['windows']) for r in log['eval']['test']['per_source'].values())} test windows "
        f"[{lo:.2f}, {hi:.2f}] (10,000 resamples, seed 0). No perplexity on Debian's fortunes: the project "
        "reserves those packages as held-out text and keeps them out of everything here.",
    ]


def model_card(name: str, log: dict, join: dict) -> str:
    cfg = log["mamba_ssm_config"]
    ssm = cfg["ssm_cfg"]
    stages = stages_of(log)
    lines = [
        f"# {name}",
        "",
        f"{'Mamba-2' if log['arch'] == 'mamba2' else 'Mamba-1'} language model, {cfg['n_layer']} layers, "
        f"d_model {cfg['d_model']}, d_state {ssm['d_state']}"
        + (f", headdim {ssm['headdim']}" if log["arch"] == "mamba2" else "")
        + f", tied embeddings, {log['params'] / 1e6:.2f}M parameters, fp16 safetensors "
          f"({join['model_bytes'] / 2**20:.1f} MiB), vocabulary {log['vocab_size']} (byte-level BPE v2).",
        "",
        f"Trained by `scripts/train/train_small.py` on corpus v2 (data/corpus/manifest_v2.json) on "
        f"{log['hardware']} with mamba-ssm {log['versions'].get('mamba_ssm', '-')}, "
        f"{log['args']['batch']} x {log['args']['seq']} tokens per step, {log['tokens_seen'] / 1e6:.1f}M tokens "
        f"in all, AdamW (betas 0.9 / 0.95), weight decay {log['args']['wd']}, bf16 autocast"
        + ":",
        "",
        "| stage | starts from | steps | tokens | seconds | tokens/s | kernel warm-up (s, untimed) | peak lr "
        "(warm-up steps, cosine to x peak) | best step (validation loss) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, st in enumerate(stages, 1):
        lines.append(
            f"| {i} | {'random init' if not st.get('init_from') else 'stage ' + str(i - 1) + ' weights (fresh AdamW)'} "
            f"| {st['steps']} | {st['tokens_seen'] / 1e6:.1f}M | {st['train_seconds']:.0f} | "
            f"{st['tokens_per_second']:,} | {st['kernel_warmup_seconds']:.0f} | {st['lr']} ({st['warmup']}, "
            f"{st['min_lr_frac']}) | {st['best_step']} ({st['best_val_loss_in_training']:.4f}) |")
    if log.get("recipe") == "fixed-tokens":     # the depth family (scripts/train/depth_family.sh)
        lines[-len(stages) - 2:] = fixed_recipe_lines(log)
    else:
        lines += ["", "Each stage keeps its best in-training validation checkpoint; these weights are the last stage's."]
    lines += [
        "",
        "## Perplexity (fp16-rounded weights, fp32 compute, non-overlapping "
        f"{log['args']['seq']}-token windows per source)",
        "",
        "| source | validation ppl | validation bits/byte | test ppl | test bits/byte |",
        "|---|---|---|---|---|",
    ]
    ev = log["eval"]
    names = list(ev.get("test", ev.get("validation", {})).get("per_source", {}))
    for src in ["overall"] + names:
        row = []
        for split in ("validation", "test"):
            r = ev.get(split, {}).get("overall") if src == "overall" else \
                ev.get(split, {}).get("per_source", {}).get(src)
            row += [fmt(r and r["ppl"]), fmt(r and r["bits_per_byte"], 4)]
        lines.append(f"| {'**all**' if src == 'overall' else src} | " + " | ".join(row) + " |")
    lines += ["", "Training curve: `training_curve.png`, `training_log.json` (`log`).", "",
              "## Conversion check", "",
              f"The transformers checkpoint (torch path, CPU, fp32) reproduces the training backend's per-token "
              f"NLL ({join['verify']['reference_compute']} on the device) on {join['verify']['tokens']} validation tokens: mean |diff| {join['verify']['mean_abs_diff']:.2e}, "
              f"max {join['verify']['max_abs_diff']:.2e} (loss {join['verify']['loss_backend']:.4f} vs "
              f"{join['verify']['loss_transformers']:.4f}).", "",
              "## Samples (temperature 0.8, top-k 40, seed 0; transformers on CPU, drawn by join.py)", ""]
    for s in log.get("samples", []):
        lines.append("> " + s["text"].replace("\n", " ").strip())
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="folder with weights.safetensors.NN and training_log.json")
    ap.add_argument("--name", required=True, help="model name, e.g. small-mamba2")
    ap.add_argument("--dest", default=None, help="default data/models/NAME")
    ap.add_argument("--tokenizer", default=str(REPO / "data/tokenizer_v2"))
    ap.add_argument("--tol-mean", type=float, default=5e-3)
    ap.add_argument("--tol-max", type=float, default=5e-2)
    ap.add_argument("--sample-tokens", type=int, default=80)
    ap.add_argument("--quick", action="store_true", help="join and convert only, no checks on CPU (device side)")
    ap.add_argument("--card-only", action="store_true",
                    help="rewrite the model card of the installed model SRC from its training_log.json (no join)")
    a = ap.parse_args(argv)
    if a.card_only:
        log = json.loads((Path(a.src) / "training_log.json").read_text())
        (Path(a.src) / "README.md").write_text(model_card(a.name, log, log["join"]))
        return log["join"]
    src = Path(a.src)
    dest = Path(a.dest) if a.dest else REPO / "data/models" / a.name
    log = json.loads((src / "training_log.json").read_text())
    w = log["weights"]
    try:
        blob = join_parts(src, w["parts"], w["sha256"])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(f"joined {len(w['parts'])} part(s), {len(blob):,} bytes, sha256 ok")
    for f, want in log["data"]["tokenizer_sha256"].items():
        if file_sha256(Path(a.tokenizer) / f) != want:
            fail(f"{a.tokenizer}/{f} is not the tokenizer the model was trained with (sha256 differs)")

    from safetensors.torch import load as st_load
    from transformers import AutoTokenizer
    from trainer import transformers_model
    sd = st_load(blob)
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    model = transformers_model(sd, log["arch"], log["mamba_ssm_config"], tok, fail)
    if a.quick:
        model.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)
        sha = file_sha256(dest / "model.safetensors")
        print(f"installed {dest} without checks (--quick); model.safetensors sha256 {sha}")
        return {"dest": str(dest), "model_safetensors_sha256": {"model.safetensors": sha}}

    tmp = Path(tempfile.mkdtemp(prefix=f"{a.name}-", dir=dest.parent if dest.parent.exists() else None))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        if size > MAX_MODEL_BYTES:
            fail(f"weights are {size / 2**20:.1f} MiB, over the 64 MiB limit")
        # reload through the project's loader and compare with the training backend's reference
        from utrc_lib.hosts.models import load_model
        m, _ = load_model(str(tmp))
        ref = log["reference"]
        x = torch.tensor(ref["tokens"])
        with torch.no_grad():
            lg = m(x[:, :-1]).logits.float()
        nll = F.cross_entropy(lg.reshape(-1, lg.size(-1)), x[:, 1:].reshape(-1), reduction="none").view(x.size(0), -1)
        want = torch.tensor(ref["nll"])
        d = (nll - want).abs()
        tol_mean, tol_max = (a.tol_mean, a.tol_max) if ref.get("compute", "fp32") == "fp32" else BF16_TOL
        verify = {"tokens": int(want.numel()), "mean_abs_diff": d.mean().item(), "max_abs_diff": d.max().item(),
                  "loss_backend": want.mean().item(), "loss_transformers": nll.mean().item(),
                  "reference_compute": ref.get("compute", "fp32"), "tol_mean": tol_mean, "tol_max": tol_max}
        verify["ok"] = verify["mean_abs_diff"] <= tol_mean and verify["max_abs_diff"] <= tol_max
        print(f"verify: mean |NLL diff| {verify['mean_abs_diff']:.2e}, max {verify['max_abs_diff']:.2e}; loss "
              f"{verify['loss_backend']:.4f} (training backend) vs {verify['loss_transformers']:.4f} (transformers)"
              f" -> {'OK' if verify['ok'] else 'MISMATCH'}")
        if not verify["ok"]:
            fail("the transformers checkpoint does not reproduce the trained model")
        samples = draw_samples(m, tok, a.sample_tokens)
        for smp in samples[:3]:
            print(f"sample: {smp['text']!r}")
        join = {"weights_sha256": w["sha256"], "model_bytes": size, "samples": samples,
                "model_safetensors_sha256": {f.name: file_sha256(f) for f in sorted(tmp.glob("*.safetensors"))},
                "verify": verify}
        log_out = dict(log, join=join, samples=samples)
        (tmp / "training_log.json").write_text(json.dumps(log_out, indent=1, default=str) + "\n")
        if (src / "train.log").exists():
            shutil.copy2(src / "train.log", tmp / "train.log")
        if log.get("log"):
            from trainer import plot_curve
            cfg = log["mamba_ssm_config"]
            plot_curve(log["log"], tmp / "training_curve.png",
                            f"{a.name}: {log['arch']} {cfg['n_layer']}x{cfg['d_model']} (seq {log['args']['seq']})")
        (tmp / "README.md").write_text(model_card(a.name, log_out, join))
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(dest))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    ev = log["eval"].get("test", {}).get("overall", {})
    print(f"installed {dest} ({size / 2**20:.2f} MiB); test ppl {fmt(ev.get('ppl'))}, "
          f"bits/byte {fmt(ev.get('bits_per_byte'), 4)}")
    return {"dest": str(dest), **join}


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Train one second-generation embedded model (small-mamba2 / small-mamba) in one device call.

GPU (default): mamba-ssm's MambaLMHeadModel, bf16 autocast, fp32 weights, fused AdamW (betas 0.9/0.95,
weight decay on matrices), linear warm-up then cosine to --min-lr-frac of the peak over the time
budget. The budget is what is left before --end-by (a Unix time: the call's start plus its limit)
after the kernel warm-up, minus a reserve for the final evaluation and saving, capped by --max-seconds.
Validation loss every --eval-every steps; the best weights are kept (in host memory).

At the end, on the best weights rounded to fp16 (fp32 compute):
  * validation and test loss, perplexity and bits per byte, overall and per source (non-overlapping
    --seq windows over each source's documents joined by <|endoftext|>, every token scored);
  * a reference for join.py: per-token NLL of two validation windows (fp32 without TF32 when time allows).
Evaluation runs under the training autocast (bf16) and shapes, so no Triton kernel is re-tuned at the end.
Samples are drawn by join.py on CPU.
Writes to --out ($OUT on the device): weights.safetensors.NN (the fp16 mamba-ssm state dict without the
tied lm_head, cut into parts of at most --part-mib MiB), training_log.json (curve, evaluations,
reference, sha256 of the weights). The device command tees stdout into train.log.

Continuing from a checkpoint (--init-from DIR, a model directory installed by join.py): the weights
(fp16, transformers format) are converted back to the training backend's state dict and training goes
on with a fresh AdamW (its fp32 state, ~200 MB, is too big to bring back from a call), a short warm-up
and a new cosine (--lr / --warmup / --min-lr-frac; --max-tokens ends it at a token count, and the cosine
then follows the larger of the time and step fractions). The log's "tokens" count every token the
weights have seen (the earlier stages' included); "stages" lists each call's settings and speed;
"log" joins the earlier curve and this one.

Fixed-token recipe (--total-tokens N, the depth family of scripts/train/depth_family.sh): the warm-up and
cosine follow the step count alone (N / (batch * seq) steps, the same schedule whatever the device or
the call), the final weights are the model (no best-of selection), and a deadline does not shorten the
schedule: it suspends. With --ckpt-dir the full training state (fp32 weights, AdamW moments, step,
data-order generator, curve, per-call records) is saved there every --ckpt-every seconds and at the
deadline (exit code 75, "suspended"), and a later run with the same arguments resumes from it exactly
(a warm device machine keeps /tmp between calls). Per-window NLL of the final evaluation is kept in the
log, so the model card can put an interval on the test perplexity.

--smoke: CPU, transformers torch path (--backend hf), 2 layers, width 64, a few seconds; the same
outputs, so that pack -> train -> parts -> join -> load_model is testable without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from packing import STAGE_KEYS, doc_subset, file_sha256, load_packed, source_streams, stages_of, write_parts  # noqa: E402



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["mamba", "mamba2"], required=True)
    ap.add_argument("--backend", choices=["mamba_ssm", "hf"], default="mamba_ssm")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--d-state", type=int, default=None, help="default 16 (mamba) / 64 (mamba2)")
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--pad-vocab-multiple", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=540.0, help="cap on the training time (the deadline usually governs)")
    ap.add_argument("--end-by", type=float, default=None,
                    help="Unix time by which everything must be written (default: now + max-seconds + 120)")
    ap.add_argument("--reserve", type=float, default=25.0,
                    help="seconds kept before --end-by for the final evaluation and saving")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-tokens", type=float, default=None,
                    help="end after this many tokens in this call (sets --max-steps; e.g. 4e7)")
    ap.add_argument("--total-tokens", type=float, default=None,
                    help="fixed-token recipe: train exactly this many tokens, schedule by steps alone, final "
                         "weights; a deadline suspends instead of shortening (resume with --ckpt-dir)")
    ap.add_argument("--ckpt-dir", default=None,
                    help="save the full training state here (every --ckpt-every s and at the deadline) and resume "
                         "from it when present (fixed-token recipe only)")
    ap.add_argument("--ckpt-every", type=float, default=150.0)
    ap.add_argument("--call-steps", type=int, default=None,
                    help="fixed-token recipe: suspend after this many steps in this call (tests, manual splitting)")
    ap.add_argument("--final-reserve", type=float, default=None,
                    help="seconds kept before --end-by for the final evaluation and saving in the fixed-token "
                         "recipe (default: --reserve)")
    ap.add_argument("--init-from", default=None,
                    help="continue from this model directory (join.py's output: model.safetensors, config.json, "
                         "training_log.json)")
    ap.add_argument("--train-docs-frac", type=float, default=1.0,
                    help="train on this fraction of the training documents (nested subsets, packing.doc_subset): "
                         "the data-repetition probe, scripts/train/repetition_probe.sh")
    ap.add_argument("--doc-seed", type=int, default=0, help="seed of --train-docs-frac's document draw")
    ap.add_argument("--no-weights", action="store_true",
                    help="write training_log.json and no weight parts (probes that keep no model)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-tokens", type=int, default=524288, help="tokens of the in-training validation")
    ap.add_argument("--eval-max-tokens", type=int, default=0,
                    help="cap on tokens per source in the final evaluation (0 = all; bpb only when uncapped)")
    ap.add_argument("--data", default=str(REPO / ".train/tokens"))
    ap.add_argument("--tokenizer", default=str(REPO / "data/tokenizer_v2"))
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--part-mib", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run through the transformers torch path")
    a = ap.parse_args(argv)
    if a.smoke:
        a.backend, a.layers, a.d_model, a.headdim, a.chunk_size = "hf", 2, 64, 16, 32
        a.batch, a.seq, a.warmup, a.eval_every = 4, 64, 5, 5
        a.max_seconds = min(a.max_seconds, 120.0)
        a.val_tokens, a.eval_max_tokens = 2048, 1024
        a.reserve = 0.0
        if a.max_steps is None:
            a.max_steps = 30
    if a.d_state is None:
        a.d_state = 16 if a.arch == "mamba" else (16 if a.smoke else 64)
    if not 0.0 < a.train_docs_frac <= 1.0:
        ap.error("--train-docs-frac must be in (0, 1]")
    if a.total_tokens is not None:
        if a.total_tokens <= 0 or a.max_tokens is not None or a.init_from:
            ap.error("--total-tokens must be positive and excludes --max-tokens / --init-from")
        a.max_steps = math.ceil(a.total_tokens / (a.batch * a.seq))
    elif a.ckpt_dir:
        ap.error("--ckpt-dir needs the fixed-token recipe (--total-tokens)")
    if a.max_tokens is not None:
        if a.max_tokens <= 0:
            ap.error("--max-tokens must be positive")
        a.max_steps = math.ceil(a.max_tokens / (a.batch * a.seq))
    return a


# --------------------------------------------------------------------------- mamba-ssm import
def import_mamba_ssm(arch: str):
    """Import MambaLMHeadModel. Mamba-2 needs only mamba-ssm's Python/Triton code: when the Mamba-1 CUDA
    extension (selective_scan_cuda) is absent, a stand-in that fails on use is registered, so the
    Triton-only package copy (install.sh) imports."""
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        if arch != "mamba2":
            raise
        stub = types.ModuleType("selective_scan_cuda")

        def _missing(*_a, **_k):
            raise RuntimeError("selective_scan_cuda (Mamba-1 kernel) is not installed in this run")
        stub.fwd = stub.bwd = _missing
        sys.modules["selective_scan_cuda"] = stub
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
    import mamba_ssm
    return mamba_ssm.__version__


# --------------------------------------------------------------------------- helpers
def stable_header(blob: bytes) -> bytes:
    """The safetensors file with its ``__metadata__`` keys in sorted order.

    safetensors writes the metadata from a hash map, whose order changes from call to call, so two
    identical state dicts could give files (and sha256s) that differ in the header alone. The header
    keeps its length (same keys and values, padded with spaces as before), so offsets are unchanged."""
    n = int.from_bytes(blob[:8], "little")
    head = json.loads(blob[8: 8 + n])
    meta = head.pop("__metadata__", None)
    tensors = sorted(head.items(), key=lambda kv: kv[1]["data_offsets"])
    head = dict(([("__metadata__", dict(sorted(meta.items())))] if meta is not None else []) + tensors)
    text = json.dumps(head, separators=(",", ":")).encode()
    if len(text) > n:
        raise RuntimeError("stable_header: the re-written safetensors header is longer than the original")
    return blob[:8] + text.ljust(n, b" ") + blob[8 + n:]


class GpuBatcher:
    """Random windows of seq+1 tokens from the training stream, held on the device as int32."""

    def __init__(self, tokens: np.ndarray, batch: int, seq: int, seed: int, device):
        self.t = torch.from_numpy(tokens.astype(np.int32)).to(device)
        self.batch, self.seq = batch, seq
        self.g = torch.Generator(device="cpu").manual_seed(seed)
        self.off = torch.arange(seq + 1, device=device)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.t.numel() - self.seq - 1, (self.batch,), generator=self.g)
        return self.t[starts.to(self.off.device)[:, None] + self.off].long()


def windows(stream: np.ndarray, seq: int, cap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq+1 tokens scoring every next-token target of ``stream`` once: (tokens, target mask).

    Non-overlapping windows; the remainder is scored by one last window ending at the stream's end
    (only its new targets count), a stream shorter than a window is padded, so every forward pass has
    the same shape (no kernel recompilation at the end of a run)."""
    s = stream[: cap + 1] if cap else stream
    t = torch.from_numpy(s.astype(np.int64))
    n_tgt = t.numel() - 1
    n_full = n_tgt // seq
    rows = [t[i * seq: i * seq + seq + 1] for i in range(n_full)]
    masks = [torch.ones(seq, dtype=torch.bool) for _ in range(n_full)]
    r = n_tgt - n_full * seq
    if r > 0:
        if t.numel() >= seq + 1:
            rows.append(t[-(seq + 1):])
            m = torch.zeros(seq, dtype=torch.bool)
            m[-r:] = True
        else:
            rows.append(torch.cat([t, t.new_full((seq + 1 - t.numel(),), int(t[-1]))]))
            m = torch.zeros(seq, dtype=torch.bool)
            m[:r] = True
        masks.append(m)
    if not rows:
        return torch.empty(0, seq + 1, dtype=torch.long), torch.empty(0, seq, dtype=torch.bool)
    return torch.stack(rows), torch.stack(masks)


@torch.no_grad()
def nll_sum(model, x: torch.Tensor, mask: torch.Tensor, batch: int, device, ctx,
            rows: list | None = None) -> tuple[float, int]:
    """Summed NLL of the masked targets; every forward pass is ``batch`` rows (padded with row 0, unscored).
    ``rows``, when given, receives (NLL sum, targets) of every window in order."""
    tot, n = 0.0, 0
    for i in range(0, x.size(0), batch):
        b, m = x[i: i + batch], mask[i: i + batch]
        if b.size(0) < batch:
            pad = batch - b.size(0)
            b = torch.cat([b, b[:1].expand(pad, -1)])
            m = torch.cat([m, torch.zeros(pad, m.size(1), dtype=torch.bool)])
        b, m = b.to(device), m.to(device)
        with ctx():
            logits = model(b[:, :-1]).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1), reduction="none")
        tot += (nll * m.reshape(-1)).sum().item()
        n += int(m.sum().item())
        if rows is not None:
            real = min(batch, x.size(0) - i)         # the padding rows are not windows
            per, cnt = (nll.view(m.shape) * m).sum(1)[:real].tolist(), m.sum(1)[:real].tolist()
            rows.extend((round(v, 4), int(c)) for v, c in zip(per, cnt))
    return tot, n


def evaluate_split(model, split: dict, sources: list[str], man_split: dict, a, device, ctx,
                   keep_windows: bool = False) -> dict:
    """Loss, perplexity and bits per byte per source and overall; with ``keep_windows`` also each
    window's (NLL sum, targets), the units an interval on the perplexity resamples."""
    res, tot, n, nbytes, capped_any = {}, 0.0, 0, 0, False
    for name, stream in source_streams(split, sources).items():
        capped = bool(a.eval_max_tokens and stream.size - 1 > a.eval_max_tokens)
        x, m = windows(stream, a.seq, a.eval_max_tokens if capped else 0)
        rows = [] if keep_windows else None
        s, k = nll_sum(model, x, m, a.batch, device, ctx, rows)
        b = man_split["sources"][name]["bytes"]
        res[name] = {"tokens_scored": k, "loss": s / k, "ppl": math.exp(s / k),
                     "bits_per_byte": None if capped else s / math.log(2) / b, "bytes": b, "capped": capped}
        if keep_windows:
            res[name]["windows"] = rows
        tot, n, nbytes, capped_any = tot + s, n + k, nbytes + b, capped_any or capped
    return {"overall": {"tokens_scored": n, "loss": tot / n, "ppl": math.exp(tot / n),
                        "bits_per_byte": None if capped_any else tot / math.log(2) / nbytes,
                        "bytes": nbytes, "capped": capped_any},
            "per_source": res}


def load_init(a, model, cfg: dict) -> dict:
    """Load --init-from's weights into `model` (strict: every tensor, same shapes; the tied lm_head
    follows the embedding) and return what the log keeps of the earlier training."""
    from safetensors.torch import load_file
    from transformers import AutoConfig
    src = Path(a.init_from)
    hf_cfg = AutoConfig.from_pretrained(src)
    hf_sd = {k: v.float() for k, v in load_file(src / "model.safetensors").items()}
    if a.backend == "mamba_ssm":
        from utrc_lib.hosts.convert import hf_to_mamba_ssm_state_dict
        arch, init_cfg, sd = hf_to_mamba_ssm_state_dict(hf_sd, hf_cfg)
        if arch != a.arch:
            sys.exit(f"train_small: --init-from {src} is a {arch} model, not {a.arch}")
        for k in ("d_model", "n_layer", "vocab_size"):
            if init_cfg[k] != cfg[k]:
                sys.exit(f"train_small: --init-from {src} has {k}={init_cfg[k]}, this run {cfg[k]}")
    else:
        sd = dict(hf_sd)
        sd.setdefault("lm_head.weight", sd["backbone.embeddings.weight"])
    model.load_state_dict(sd, strict=True)
    prev = json.loads((src / "training_log.json").read_text()) if (src / "training_log.json").exists() else {}
    return {"from": str(src), "weights_sha256": file_sha256(src / "model.safetensors"),
            "tokens_seen": int(prev.get("tokens_seen", 0)), "log": prev.get("log", []), "stages": stages_of(prev),
            "eval_overall": {s: e.get("overall") for s, e in prev.get("eval", {}).items()}}


def to_mamba_ssm_sd(a, model, state: dict) -> dict:
    if a.backend == "mamba_ssm":
        return state
    from utrc_lib.hosts.convert import hf_to_mamba_ssm_state_dict
    return hf_to_mamba_ssm_state_dict(state, model.config)[2]


RECIPE_KEYS = ("arch", "layers", "d_model", "d_state", "headdim", "expand", "chunk_size", "batch", "seq", "lr",
               "min_lr_frac", "warmup", "wd", "grad_clip", "total_tokens", "seed", "train_docs_frac", "doc_seed")


def recipe_of(a) -> dict:
    """What a resumed run must share with the state it resumes (shape, data, schedule, seed)."""
    return {k: getattr(a, k) for k in RECIPE_KEYS}


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    t_start = time.time()
    a = parse_args(argv)
    end_by = a.end_by or (t_start + a.max_seconds + 120)
    device = torch.device(a.device or ("cuda" if a.backend == "mamba_ssm" else "cpu"))
    versions = {"torch": torch.__version__}
    if a.backend == "mamba_ssm":
        if device.type != "cuda":
            sys.exit("train_small: the mamba_ssm backend needs CUDA (use --smoke on CPU)")
        versions["mamba_ssm"] = import_mamba_ssm(a.arch)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import train_lm as base          # scripts/train_lm.py: model construction, loss, schedule, plot
    from transformers import AutoTokenizer
    import transformers
    versions["transformers"] = transformers.__version__
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    packed = load_packed(a.data)
    man, sources = packed["manifest"], packed["sources"]
    for f, want in man["tokenizer_sha256"].items():
        if file_sha256(Path(a.tokenizer) / f) != want:
            sys.exit(f"train_small: {a.tokenizer}/{f} is not the tokenizer the tokens were packed with")
    from utrc_lib.hosts.convert import padded_vocab
    vocab = padded_vocab(len(tokenizer), a.pad_vocab_multiple)
    train = packed["train"]["tokens"]
    docs_all, docs_kept = int(packed["train"]["doc_start"].size), None
    if a.train_docs_frac < 1.0:
        kept, train = doc_subset(packed["train"], a.train_docs_frac, a.doc_seed)
        docs_kept = int(kept.size)
        print(f"--train-docs-frac {a.train_docs_frac}: {docs_kept} of {docs_all} training documents, "
              f"{train.size:,} tokens", flush=True)
    if int(train.max()) >= len(tokenizer):
        sys.exit("train_small: token ids exceed the tokenizer size (packed with another tokenizer?)")
    val_stream = packed["validation"]["tokens"]
    vfull, vmask = windows(val_stream, a.seq, a.val_tokens)
    cfg = base.ssm_config_dict(a, vocab)
    model = base.build_model(a, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    init = load_init(a, model, cfg) if a.init_from else None
    tok0 = init["tokens_seen"] if init else 0
    if init:
        print(f"continuing from {a.init_from} ({tok0 / 1e6:.1f}M tokens seen, {len(init['stages'])} stage(s))",
              flush=True)
    print(f"{a.backend}/{a.arch} {a.layers}x{a.d_model}: {n_params / 1e6:.2f}M params, vocab {vocab}; train "
          f"{train.size:,} tokens, validation {vfull.numel():,} in-training tokens; data {time.time() - t_start:.0f}s",
          flush=True)
    if device.type == "cuda":
        def ctx():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        ctx = contextlib.nullcontext
    batcher = GpuBatcher(train, a.batch, a.seq, a.seed, device)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    def val_loss() -> float:
        s, k = nll_sum(model.eval(), vfull, vmask, a.batch, device, ctx)
        model.train()
        return s / k

    # kernel warm-up (Triton compile/autotune), untimed, same data order afterwards
    t = time.time()
    for _ in range(2 if device.type == "cuda" else 1):
        base.lm_loss(model, batcher.next(), ctx).backward()
    model.zero_grad(set_to_none=True)
    nll_sum(model.eval(), vfull[: a.batch], vmask[: a.batch], a.batch, device, ctx)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.time() - t
    batcher = GpuBatcher(train, a.batch, a.seq, a.seed, device)
    fixed = a.total_tokens is not None
    log, best = [], {"val_loss": float("inf"), "step": -1, "state": None}
    tok_step = a.batch * a.seq
    step0, calls, train_s_before = 0, [], 0.0
    ckpt = Path(a.ckpt_dir) / "state.pt" if a.ckpt_dir else None
    if ckpt is not None and ckpt.exists():     # resume the fixed-token run exactly where it stopped
        st = torch.load(ckpt, map_location=device, weights_only=False)
        mismatch = {k: (st["recipe"].get(k), v) for k, v in recipe_of(a).items() if st["recipe"].get(k) != v}
        if mismatch:
            sys.exit(f"train_small: {ckpt} is another run's state (differs in {mismatch}); remove it to start over")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        batcher.g.set_state(st["generator"].cpu())    # map_location moved it to the device
        step0, log, calls, train_s_before = st["step"], st["log"], st["calls"], st["train_seconds"]
        print(f"resumed from {ckpt} at step {step0} ({step0 * tok_step / 1e6:.1f}M tokens, {len(calls)} earlier "
              f"call(s))", flush=True)
        del st
    reserve = a.reserve if a.final_reserve is None or not fixed else a.final_reserve
    budget = end_by - time.time() - reserve if fixed else min(a.max_seconds, end_by - time.time() - a.reserve)
    print(f"kernel warm-up {warm_s:.1f}s; training budget {budget:.0f}s", flush=True)
    if budget <= 0:
        sys.exit("train_small: no time left for training")

    if init:    # where the earlier weights start: the curve's first point of this stage
        vl0 = val_loss()
        print(f"initial validation loss {vl0:.4f} (ppl {math.exp(vl0):.2f})", flush=True)
        log.append({"step": 0, "tokens": tok0, "call_tokens": 0, "elapsed_s": 0.0, "train_loss": None,
                    "val_loss": vl0, "val_ppl": math.exp(vl0), "lr": 0.0, "stage": len(init["stages"])})
        best.update(val_loss=vl0, step=0,   # kept if this stage never improves on the earlier weights
                    state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    def frac_done(step: int, el: float) -> float:
        if fixed:                   # the schedule follows the steps alone
            return step / a.max_steps
        f = el / budget
        return f if a.max_steps is None else max(f, step / a.max_steps)

    def call_record(steps_here: int, secs: float) -> dict:
        return {"steps": steps_here, "tokens_seen": steps_here * tok_step, "train_seconds": round(secs, 1),
                "tokens_per_second": round(steps_here * tok_step / max(secs, 1e-9)),
                "kernel_warmup_seconds": round(warm_s, 1), "hardware": base.hardware(device),
                "best_step": None, "best_val_loss_in_training": None}

    def save_state(step: int, secs: float, suspended: bool) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"recipe": recipe_of(a), "model": model.state_dict(), "opt": opt.state_dict(),
                    "generator": batcher.g.get_state(), "step": step, "log": log,
                    "calls": calls + ([call_record(step - step0, secs)] if suspended else []),
                    "train_seconds": train_s_before + secs}, tmp)
        os.replace(tmp, ckpt)

    t0 = last_ckpt = time.time()
    step, run_loss, run_n, suspended = step0, torch.zeros((), device=device), 0, False
    while True:
        el = time.time() - t0
        done = a.max_steps is not None and step >= a.max_steps
        suspend = fixed and not done and (el >= budget or (a.call_steps and step - step0 >= a.call_steps))
        stop = done or (not fixed and el >= budget)
        if step > 0 and (step % a.eval_every == 0 or stop) and not (log and log[-1]["step"] == step):
            vl = val_loss()
            rec = {"step": step, "tokens": tok0 + step * tok_step, "elapsed_s": round(time.time() - t0, 2),
                   "train_loss": (run_loss / max(run_n, 1)).item(), "val_loss": vl, "val_ppl": math.exp(vl),
                   "lr": base.lr_at(a, step, frac_done(step, el))}
            if init:
                rec.update(call_tokens=step * tok_step, stage=len(init["stages"]))
            if fixed:
                rec.update(call=len(calls), elapsed_s=round(train_s_before + time.time() - t0, 2))
            log.append(rec)
            run_loss, run_n = torch.zeros((), device=device), 0
            improved = vl < best["val_loss"]
            if improved:
                best.update(val_loss=vl, step=step,
                            state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            print(f"step {step:6d}  tok {rec['tokens'] / 1e6:7.1f}M  {rec['elapsed_s']:6.0f}s  "
                  f"train {rec['train_loss']:.3f}  val {vl:.3f}  ppl {rec['val_ppl']:.1f}{'  *' if improved else ''}",
                  flush=True)
        if suspend:
            suspended = True
            break
        if stop:
            break
        if ckpt is not None and time.time() - last_ckpt >= a.ckpt_every:
            save_state(step, time.time() - t0, suspended=True)   # a kill after this resumes from here
            last_ckpt = time.time()
        lr = base.lr_at(a, step, frac_done(step, el))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = base.lm_loss(model, batcher.next(), ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        run_loss += loss.detach()
        run_n += 1
        step += 1
    if suspended:
        secs = time.time() - t0
        if ckpt is not None:
            save_state(step, secs, suspended=True)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "suspended.json").write_text(json.dumps({
            "step": step, "of_steps": a.max_steps, "tokens": step * tok_step, "ckpt": str(ckpt),
            "calls": calls + [call_record(step - step0, secs)], "recipe": recipe_of(a)}, indent=1) + "\n")
        print(f"suspended at step {step} of {a.max_steps} ({step * tok_step / 1e6:.1f}M tokens; this call "
              f"{(step - step0) * tok_step / secs:,.0f} tokens/s); state in {ckpt}", flush=True)
        sys.exit(75)
    if fixed:                       # the fixed-token recipe's model is its final weights
        calls = calls + [call_record(step - step0, time.time() - t0)]
        best.update(step=step, val_loss=log[-1]["val_loss"] if log else float("nan"),
                    state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    train_s = time.time() - t0
    step_here = step - step0
    print(f"trained {step_here} steps ({step_here * tok_step / 1e6:.1f}M tokens) in {train_s:.0f}s = "
          f"{step_here * tok_step / train_s:,.0f} tokens/s; best val loss {best['val_loss']:.4f} at step {best['step']}",
          flush=True)

    # ------------------------------------------------ final: fp16-rounded best weights
    # Evaluation under the training autocast and shapes (already compiled kernels: no Triton re-tuning).
    t = time.time()
    model.load_state_dict({k: v.to(torch.float16).float() if v.is_floating_point() else v
                           for k, v in best["state"].items()})
    model.eval()
    evals = {s: evaluate_split(model, packed[s], sources, man["splits"][s], a, device, ctx, keep_windows=fixed)
             for s in ("validation", "test") if s in packed}
    for s, e in evals.items():
        o = e["overall"]
        print(f"{s}: loss {o['loss']:.4f} ppl {o['ppl']:.2f} bpb {o['bits_per_byte']}", flush=True)
        for name, r in e["per_source"].items():
            bpb = "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
            print(f"   {name:20s} ppl {r['ppl']:8.2f}  bpb {bpb}", flush=True)
    # reference for join.py: per-token NLL of the first two validation windows, computed in a forward
    # pass of the evaluation's shape. Under the training autocast on Mamba-2 (fp32 would make Triton
    # compile and tune its kernels again), in fp32 without TF32 on Mamba-1 (CUDA scan) when 60 s are
    # left, and in fp32 on CPU; join.py allows bf16-sized differences for a bf16 reference.
    fp32_ref = device.type != "cuda" or (a.arch == "mamba" and end_by - time.time() > 60)
    if device.type == "cuda" and fp32_ref:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rb = vfull[: a.batch]
    if rb.size(0) < a.batch:
        rb = torch.cat([rb, rb[:1].expand(a.batch - rb.size(0), -1)])
    with torch.no_grad(), (contextlib.nullcontext() if fp32_ref else ctx()):
        lg = model(rb[:, :-1].to(device)).logits[:2].float()
    ref_b = rb[:2]
    ref_nll = F.cross_entropy(lg.reshape(-1, lg.size(-1)), ref_b[:, 1:].reshape(-1).to(device),
                              reduction="none").view(2, -1).cpu()
    final_s = time.time() - t
    print(f"final evaluation {final_s:.0f}s (reference in {'fp32' if fp32_ref else 'bf16 autocast'})", flush=True)

    # ------------------------------------------------ weights in parts
    from safetensors.torch import save as st_save
    ssm_sd = to_mamba_ssm_sd(a, model, {k: v.to(torch.float16) if v.is_floating_point() else v
                                        for k, v in best["state"].items()})
    ssm_sd = {k: ssm_sd[k].contiguous() for k in sorted(ssm_sd) if k != "lm_head.weight"}   # byte-stable file
    blob = stable_header(st_save(ssm_sd, metadata={"format": "mamba_ssm", "arch": a.arch}))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [] if a.no_weights else write_parts(blob, out, "weights.safetensors", int(a.part_mib * 2**20))
    import hashlib
    result = {
        "arch": a.arch, "backend": a.backend, "params": n_params, "vocab_size": vocab,
        "mamba_ssm_config": cfg, "args": vars(a), "versions": versions,
        "hardware": base.hardware(device),
        "steps": step, "tokens_seen": tok0 + step * tok_step, "tokens_this_call": step_here * tok_step,
        "train_seconds": round(train_s_before + train_s, 1),
        "kernel_warmup_seconds": round(warm_s, 1), "final_eval_seconds": round(final_s, 1),
        "tokens_per_second": round(step * tok_step / max(train_s_before + train_s, 1e-9)),
        "recipe": "fixed-tokens" if fixed else "time-budget", "weights_kind": "final" if fixed else "best-validation",
        "best_step": best["step"], "best_val_loss_in_training": best["val_loss"],
        "data": {"train_tokens": int(train.size), "train_docs_frac": a.train_docs_frac, "doc_seed": a.doc_seed,
                 "train_docs": docs_all if docs_kept is None else docs_kept, "train_docs_all": docs_all,
                 "in_training_validation_tokens": int(vfull.numel()),
                 "tokenizer_sha256": man["tokenizer_sha256"],
                 "splits": {s: {k: v for k, v in r.items() if k != "parts"} for s, r in man["splits"].items()}},
        "log": (init["log"] if init else []) + log, "eval": evals,
        "init": None if init is None else {k: v for k, v in init.items() if k not in ("log", "stages")},
        "reference": {"tokens": ref_b.tolist(), "nll": ref_nll.tolist(),
                      "compute": "fp32" if fp32_ref else "bf16-autocast",
                      "note": "per-token NLL of the fp16-rounded best weights on the training backend"},
        "eval_compute": "bf16 autocast" if device.type == "cuda" else "fp32",
        "weights": {"file": "weights.safetensors", "bytes": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest(), "parts": parts, "dtype": "float16",
                    "naming": "mamba-ssm MambaLMHeadModel state dict, lm_head.weight omitted (tied)"},
        "wall_seconds": round(time.time() - t_start, 1),
    }
    result["calls"] = calls if fixed else None
    result["stages"] = (init["stages"] if init else []) + [{   # this call: its own steps and tokens
        **{k: result[k] for k in STAGE_KEYS}, "tokens_seen": step * tok_step,
        "lr": a.lr, "warmup": a.warmup, "min_lr_frac": a.min_lr_frac, "init_from": a.init_from}]
    (out / "training_log.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {len(parts)} weight part(s) ({len(blob) / 2**20:.2f} MiB) + training_log.json to {out} "
          f"in {time.time() - t_start:.0f}s wall", flush=True)
    return result


if __name__ == "__main__":
    main()

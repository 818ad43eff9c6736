#!/usr/bin/env python3
"""Train an embedded Mamba / Mamba-2 language model: one trainer, a preset (`FAMILIES`) per model family.

  python3 scripts/train/trainer.py --family tiny|small|depth [options]

Families (the preset gives every option's default; an option given on the command line wins):
  tiny   tiny-mamba / tiny-mamba2: 12 x 256, sequence 512, batch 64, lr 2e-3, 100 warm-up steps; the v1
         corpus tokens (data/corpus/tokens/tokens.npz) and tokenizer (data/tokenizer). The `tiny` pipeline:
         a wall-time budget (--seconds) or --steps; the best validation weights are converted to the
         transformers format and saved with the tokenizer, fp16 safetensors, to --out, with
         training_log.json and training_curve.png (--verify reloads them and compares logits).
         `scripts/train_lm.py` is this family's command (as the tiny models' records name it).
  small  small-mamba2 / small-mamba: 24 x 384, sequence 1024, batch 32, lr 1.5e-3, 200 warm-up steps;
         corpus v2 packed by scripts/train/pack.py (.train/tokens) and the v2 tokenizer. The `packed`
         pipeline: one device call, the budget is what is left before --end-by; weights in parts for
         join.py. `scripts/train/train_small.py` is this family's command (as the model cards name it).
  depth  the depth-controlled family (issue 27, scripts/train/depth_family.sh): Mamba-2 / Mamba-1,
         256 wide, sequence 1024, batch 64, lr 1.5e-3, 90 warm-up steps, 60M tokens by the fixed-token
         recipe (--total-tokens), evaluation every 100 steps on 262144 tokens; --layers (required) is the
         only change. The `packed` pipeline.

Both pipelines share the model construction (mamba-ssm's MambaLMHeadModel on the GPU, --backend
mamba_ssm; transformers' MambaForCausalLM / Mamba2ForCausalLM on the CPU, --backend hf), AdamW (betas
0.9 / 0.95, weight decay on matrices but A_log, fused on CUDA), the schedule (linear warm-up over
--warmup steps, then a cosine to --min-lr-frac of the peak), bf16 autocast with fp32 weights on CUDA,
an untimed kernel warm-up (after which the data order restarts), and the training loop (`Loop`):
validation every --eval-every steps and when the run ends, the best validation weights kept. What
differs per pipeline: its data, its batches and validation, when the run ends and what it writes.

The `packed` pipeline in detail. GPU (default): bf16 autocast, fp32 weights; the budget is what is
left before --end-by (a Unix time: the call's start plus its limit) after the kernel warm-up, minus a
reserve for the final evaluation and saving, capped by --max-seconds. At the end, on the best weights
rounded to fp16 (fp32 compute):
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

Fixed-token recipe (--total-tokens N, the depth family): the warm-up and cosine follow the step count
alone (N / (batch * seq) steps, the same schedule whatever the device or the call), the final weights
are the model (no best-of selection), and a deadline does not shorten the schedule: it suspends. With
--ckpt-dir the full training state (fp32 weights, AdamW moments, step, data-order generator, curve,
per-call records) is saved there every --ckpt-every seconds and at the deadline (exit code 75,
"suspended"), and a later run with the same arguments resumes from it exactly (a warm device machine
keeps /tmp between calls). Per-window NLL of the final evaluation is kept in the log, so the model
card can put an interval on the test perplexity.

--smoke (packed pipeline): CPU, transformers torch path (--backend hf), 2 layers, width 64, a few
seconds; the same outputs, so that pack -> train -> parts -> join -> load_model is testable without a GPU.

Examples (GPU machine, repo root):
  python3 scripts/train_lm.py --backend mamba_ssm --arch mamba  --d-state 16 --seconds 210 \\
      --out data/models/tiny-mamba --verify                       # = trainer.py --family tiny ...
  START=$(date +%s) bash scripts/train/device.sh mamba2          # small family, scripts/train/README.md
  START=$(date +%s) QUEUE="depth-mamba2-64" bash scripts/train/depth_family.sh
CPU smoke tests:
  .venv/bin/python scripts/train_lm.py --backend hf --arch mamba2 --layers 2 --d-model 32 \\
      --batch 4 --seq 64 --seconds 10 --eval-every 5 --out /tmp/smoke
  .venv/bin/python scripts/train/trainer.py --family small --arch mamba2 --smoke --out /tmp/smoke2
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from packing import STAGE_KEYS, doc_subset, file_sha256, load_packed, source_streams, stages_of, write_parts  # noqa: E402
from utrc_lib.hosts.convert import padded_vocab  # noqa: E402

PROG = "trainer"


# ============================================================================ families (presets)
class _Required:
    """An option the family leaves to the command line."""

    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()
ENV_OUT = "$OUT or ./out"   # the packed pipeline's --out default: $OUT (the device's output folder), else ./out

# every option of the trainer: dest -> add_argument keywords (a family's preset supplies its default)
OPTIONS: dict[str, dict] = {
    "backend": dict(choices=["mamba_ssm", "hf"], help="mamba_ssm: GPU, mamba-ssm's kernels; hf: CPU, transformers' torch path"),
    "arch": dict(choices=["mamba", "mamba2"], help="Mamba-1 or Mamba-2 blocks"),
    "layers": dict(type=int, help="number of blocks"),
    "d_model": dict(type=int, help="model width"),
    "d_state": dict(type=int, help="default 16 (mamba) / 64 (mamba2; 16 with --smoke)"),
    "headdim": dict(type=int, help="Mamba-2 head dimension"),
    "expand": dict(type=int, help="inner width / d_model"),
    "chunk_size": dict(type=int, help="Mamba-2 chunk size"),
    "pad_vocab_multiple": dict(type=int, help="pad the vocabulary to a multiple of this"),
    "seconds": dict(type=float, help="training wall-time budget"),
    "steps": dict(type=int, help="planned steps (cosine length); default: follow the time budget"),
    "batch": dict(type=int, help="sequences per step"),
    "seq": dict(type=int, help="tokens per sequence"),
    "lr": dict(type=float, help="peak learning rate"),
    "min_lr_frac": dict(type=float, help="the cosine ends at this fraction of the peak"),
    "warmup": dict(type=int, help="linear warm-up steps"),
    "wd": dict(type=float, help="AdamW weight decay (matrices but A_log)"),
    "grad_clip": dict(type=float, help="gradient norm clip (0: none)"),
    "max_seconds": dict(type=float, default=540.0,
                        help="cap on the training time (the deadline usually governs)"),
    "end_by": dict(type=float, default=None,
                   help="Unix time by which everything must be written (default: now + max-seconds + 120)"),
    "reserve": dict(type=float, default=25.0, help="seconds kept before --end-by for the final evaluation and saving"),
    "max_steps": dict(type=int, default=None, help="end after this many steps"),
    "max_tokens": dict(type=float, default=None,
                       help="end after this many tokens in this call (sets --max-steps; e.g. 4e7)"),
    "total_tokens": dict(type=float, default=None,
                         help="fixed-token recipe: train exactly this many tokens, schedule by steps alone, final "
                              "weights; a deadline suspends instead of shortening (resume with --ckpt-dir)"),
    "ckpt_dir": dict(default=None,
                     help="save the full training state here (every --ckpt-every s and at the deadline) and resume "
                          "from it when present (fixed-token recipe only)"),
    "ckpt_every": dict(type=float, default=150.0, help="seconds between saves of the training state"),
    "call_steps": dict(type=int, default=None,
                       help="fixed-token recipe: suspend after this many steps in this call (tests, manual splitting)"),
    "final_reserve": dict(type=float, default=None,
                          help="seconds kept before --end-by for the final evaluation and saving in the fixed-token "
                               "recipe (default: --reserve)"),
    "init_from": dict(default=None,
                      help="continue from this model directory (join.py's output: model.safetensors, config.json, "
                           "training_log.json)"),
    "train_docs_frac": dict(type=float, default=1.0,
                            help="train on this fraction of the training documents (nested subsets, packing.doc_subset): "
                                 "the data-repetition probe, scripts/train/repetition_probe.sh"),
    "doc_seed": dict(type=int, default=0, help="seed of --train-docs-frac's document draw"),
    "no_weights": dict(action="store_true",
                       help="write training_log.json and no weight parts (probes that keep no model)"),
    "eval_every": dict(type=int, help="validation every this many steps"),
    "val_tokens": dict(type=int, help="tokens of the in-training validation (0 = all)"),
    "eval_max_tokens": dict(type=int, default=0,
                            help="cap on tokens per source in the final evaluation (0 = all; bpb only when uncapped)"),
    "patience": dict(type=int, default=0, help="stop after this many evals without improvement (0 = never)"),
    "tokens": dict(help="token arrays (tokens.npz, or a folder of {split}.bin) from data/corpus/train_tokenizer.py"),
    "data": dict(help="packed tokens (scripts/train/pack.py)"),
    "tokenizer": dict(help="tokenizer folder"),
    "out": dict(help="output folder"),
    "part_mib": dict(type=float, default=15.0, help="weight parts of at most this many MiB"),
    "seed": dict(type=int, help="seed of the weights and the data order"),
    "device": dict(default=None, help="torch device (default: cuda for mamba_ssm, cpu for hf)"),
    "no_kernel_warmup": dict(action="store_true",
                             help="skip the untimed forward/backward passes that compile/autotune kernels"),
    "verify": dict(action="store_true", help="reload the saved checkpoint with transformers and compare logits"),
    "smoke": dict(action="store_true", help="tiny CPU run through the transformers torch path"),
}

# the options of each pipeline, in this order (the order of the training log's "args")
TINY_OPTIONS = ("backend", "arch", "layers", "d_model", "d_state", "headdim", "expand", "chunk_size",
                "pad_vocab_multiple", "seconds", "steps", "batch", "seq", "lr", "min_lr_frac", "warmup", "wd",
                "grad_clip", "eval_every", "val_tokens", "patience", "tokens", "tokenizer", "out", "seed", "device",
                "no_kernel_warmup", "verify")
PACKED_OPTIONS = ("arch", "backend", "layers", "d_model", "d_state", "headdim", "expand", "chunk_size",
                  "pad_vocab_multiple", "batch", "seq", "lr", "min_lr_frac", "warmup", "wd", "grad_clip",
                  "max_seconds", "end_by", "reserve", "max_steps", "max_tokens", "total_tokens", "ckpt_dir",
                  "ckpt_every", "call_steps", "final_reserve", "init_from", "train_docs_frac", "doc_seed", "no_weights",
                  "eval_every", "val_tokens", "eval_max_tokens", "data", "tokenizer", "out", "part_mib", "seed",
                  "device", "smoke")

# what every family shares: block shape, vocabulary padding, the AdamW / schedule constants, seed
SHARED = dict(backend="mamba_ssm", d_state=None, headdim=64, expand=2, chunk_size=256, pad_vocab_multiple=16,
              min_lr_frac=0.1, wd=0.1, grad_clip=1.0, seed=0)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str        # "tiny" (tokens.npz -> transformers model folder) | "packed" (.train/tokens -> parts)
    options: tuple
    preset: dict         # option -> default (REQUIRED: must be given)
    about: str


SMALL = dict(SHARED, arch=REQUIRED, layers=24, d_model=384, batch=32, seq=1024, lr=1.5e-3, warmup=200,
             eval_every=250, val_tokens=524288, data=str(REPO / ".train/tokens"),
             tokenizer=str(REPO / "data/tokenizer_v2"), out=ENV_OUT)
FAMILIES: dict[str, Family] = {
    "tiny": Family("tiny", "tiny", TINY_OPTIONS, dict(
        SHARED, arch="mamba2", layers=12, d_model=256, seconds=210.0, steps=None, batch=64, seq=512, lr=2e-3,
        warmup=100, eval_every=200, val_tokens=0, tokens=str(REPO / "data/corpus/tokens/tokens.npz"),
        tokenizer=str(REPO / "data/tokenizer"), out=REQUIRED),
        "tiny-mamba / tiny-mamba2 (v1 corpus and tokenizer; scripts/train_lm.py)"),
    "small": Family("small", "packed", PACKED_OPTIONS, SMALL,
                    "small-mamba2 / small-mamba (corpus v2, one device call; scripts/train/train_small.py)"),
    "depth": Family("depth", "packed", PACKED_OPTIONS, dict(
        SMALL, layers=REQUIRED, d_model=256, batch=64, warmup=90, eval_every=100, val_tokens=262144,
        total_tokens=6e7),
        "the depth-controlled family (fixed-token recipe, 60M tokens; scripts/train/depth_family.sh)"),
}


def build_parser(fam: Family, prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=f"{fam.name} family: {fam.about}. " + __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for dest in fam.options:
        kw = dict(OPTIONS[dest])
        if dest in fam.preset:
            default = fam.preset[dest]
            if default is REQUIRED:
                kw["required"] = True
            else:
                kw["default"] = os.environ.get("OUT", "out") if default is ENV_OUT else default
        ap.add_argument("--" + dest.replace("_", "-"), **kw)
    return ap


def parse_args(argv=None, family: str = "small"):
    fam = FAMILIES[family]
    ap = build_parser(fam)
    a = ap.parse_args(argv)
    smoke = getattr(a, "smoke", False)
    if smoke:
        a.backend, a.layers, a.d_model, a.headdim, a.chunk_size = "hf", 2, 64, 16, 32
        a.batch, a.seq, a.warmup, a.eval_every = 4, 64, 5, 5
        a.max_seconds = min(a.max_seconds, 120.0)
        a.val_tokens, a.eval_max_tokens = 2048, 1024
        a.reserve = 0.0
        if a.max_steps is None:
            a.max_steps = 30
    if a.d_state is None:
        a.d_state = 16 if a.arch == "mamba" else (16 if smoke else 64)
    if fam.pipeline == "packed":
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


# ============================================================================ models, schedule, loss
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
    from utrc_lib.hosts.convert import mamba_ssm_to_hf_config
    hf_cfg = mamba_ssm_to_hf_config(a.arch, cfg)
    return AutoModelForCausalLM.from_config(hf_cfg).to(device)


def lm_loss(model, batch: torch.Tensor, autocast_ctx) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    with autocast_ctx():
        logits = model(x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def lr_at(a, step: int, frac: float) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = min(max(frac, 0.0), 1.0)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def hardware(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def start_device(a):
    """The run's device and library versions: mamba-ssm imported (CUDA only) with TF32 on; seeds set."""
    device = torch.device(a.device or ("cuda" if a.backend == "mamba_ssm" else "cpu"))
    versions = {"torch": torch.__version__}
    if a.backend == "mamba_ssm":
        if device.type != "cuda":
            sys.exit(f"{PROG}: the mamba_ssm backend needs CUDA (on CPU: --backend hf, or --smoke)")
        try:
            versions["mamba_ssm"] = import_mamba_ssm(a.arch)
        except ImportError as e:
            sys.exit(f"{PROG}: mamba-ssm is not importable ({e}); on the GPU machine install it first "
                     "(scripts/train/device.sh), or use --backend hf")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import transformers
    versions["transformers"] = transformers.__version__
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    return device, versions


def autocast_for(device):
    """bf16 autocast on CUDA (fp32 weights), nothing on CPU."""
    if device.type == "cuda":
        def ctx():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return ctx
    return contextlib.nullcontext


def adamw(model, a, device):
    """AdamW (0.9, 0.95), weight decay on matrices but A_log."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def kernel_warmup(model, next_batch, warm_eval, device, ctx) -> float:
    """Untimed forward/backward passes and one evaluation batch (Triton compile/autotune); seconds taken.
    The caller restarts its data order afterwards."""
    t = time.time()
    for _ in range(2 if device.type == "cuda" else 1):
        lm_loss(model, next_batch(), ctx).backward()
    model.zero_grad(set_to_none=True)
    warm_eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time() - t


def snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fp16_rounded(state: dict) -> dict:
    """The weights rounded to fp16, back in fp32 (what a saved model computes with)."""
    return {k: v.to(torch.float16).float() if v.is_floating_point() else v for k, v in state.items()}


# ============================================================================ the training loop
class Loop:
    """The loop both pipelines run: at every --eval-every step (and when the run ends) the validation loss
    is logged and the best weights kept; then one AdamW step at the scheduled learning rate. A pipeline
    says when the run ends or suspends, how far the cosine is, what a log record adds and how the
    training loss is averaged."""

    def __init__(self, a, model, opt, device, ctx, next_batch, val_loss, *, log=None, best=None, step0=0, tok0=0):
        self.a, self.model, self.opt, self.device, self.ctx = a, model, opt, device, ctx
        self.next_batch, self.val_loss = next_batch, val_loss
        self.log = [] if log is None else log
        self.best = best if best is not None else {"val_loss": float("inf"), "step": -1, "state": None}
        self.step0, self.tok0, self.tok_step = step0, tok0, a.batch * a.seq

    # -- what a pipeline decides
    def frac(self, step: int, el: float) -> float:
        raise NotImplementedError

    def ends(self, step: int, el: float) -> tuple[bool, bool]:
        """(stop, suspend) at the top of a step."""
        raise NotImplementedError

    def record(self, rec: dict) -> dict:
        return rec

    def after_eval(self, improved: bool) -> bool:
        """True: stop now."""
        return False

    def between_steps(self, step: int) -> None:
        pass

    def reset_loss(self) -> None:
        raise NotImplementedError

    def add_loss(self, loss: torch.Tensor, step: int) -> None:
        raise NotImplementedError

    def mean_loss(self) -> float:
        raise NotImplementedError

    # -- the loop
    def run(self) -> tuple[int, bool]:
        """Train until the pipeline says stop or suspend; (steps done, suspended)."""
        a, model, opt = self.a, self.model, self.opt
        self.t0 = t0 = time.time()
        step = self.step0
        self.reset_loss()
        model.train()
        while True:
            el = time.time() - t0
            stop, suspend = self.ends(step, el)
            if step > 0 and (step % a.eval_every == 0 or stop) and not (self.log and self.log[-1]["step"] == step):
                vl = self.val_loss()
                rec = self.record({"step": step, "tokens": self.tok0 + step * self.tok_step,
                                   "elapsed_s": round(time.time() - t0, 2), "train_loss": self.mean_loss(),
                                   "val_loss": vl, "val_ppl": math.exp(vl), "lr": lr_at(a, step, self.frac(step, el))})
                self.log.append(rec)
                self.reset_loss()
                improved = vl < self.best["val_loss"]
                if improved:
                    self.best.update(val_loss=vl, step=step, state=snapshot(model))
                print(f"step {step:6d}  tok {rec['tokens'] / 1e6:7.1f}M  {rec['elapsed_s']:6.0f}s  "
                      f"train {rec['train_loss']:.3f}  val {vl:.3f}  ppl {rec['val_ppl']:.1f}{'  *' if improved else ''}",
                      flush=True)
                if self.after_eval(improved):
                    stop = True
            if suspend:
                return step, True
            if stop:
                return step, False
            self.between_steps(step)
            lr = lr_at(a, step, self.frac(step, el))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = lm_loss(model, self.next_batch(), self.ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if a.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            opt.step()
            self.add_loss(loss, step)
            step += 1


# ============================================================================ pipeline "tiny"
def load_tokens(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.exists():
        sys.exit(f"{PROG}: token file {p} not found (build it with data/corpus/train_tokenizer.py)")
    if p.suffix == ".npz":
        with np.load(p) as z:
            return {k: z[k].astype(np.int64) for k in z.files}
    # a directory of .bin files
    return {s: np.fromfile(p / f"{s}.bin", dtype=np.uint16).astype(np.int64)
            for s in ("train", "validation", "test") if (p / f"{s}.bin").exists()}


class Batcher:
    """Random windows of seq+1 tokens (numpy generator), on the host."""

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


class TinyLoop(Loop):
    """--seconds of wall time or --steps; the cosine follows the steps when given, else the time;
    the training loss is averaged over every 10th step on CUDA (each .item() syncs), every step on CPU;
    --patience stops after that many evaluations without improvement."""

    def frac(self, step, el):
        return step / self.a.steps if self.a.steps else el / self.a.seconds

    def ends(self, step, el):
        return el >= self.a.seconds or (self.a.steps is not None and step >= self.a.steps), False

    def after_eval(self, improved):
        self.bad_evals = 0 if improved else getattr(self, "bad_evals", 0) + 1
        if self.a.patience and self.bad_evals >= self.a.patience:
            print(f"no improvement for {self.bad_evals} evals: stopping", flush=True)
            return True
        return False

    def reset_loss(self):
        self.run_loss, self.run_n = 0.0, 0

    def add_loss(self, loss, step):
        if step % 10 == 0 or self.device.type == "cpu":
            self.run_loss += loss.item()
            self.run_n += 1

    def mean_loss(self):
        return self.run_loss / max(self.run_n, 1)


def run_tiny(a) -> dict:
    device, _ = start_device(a)
    from transformers import AutoTokenizer
    from utrc_lib import environment
    from utrc_lib.hosts.convert import hf_to_mamba_ssm_state_dict
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    vocab = padded_vocab(len(tokenizer), a.pad_vocab_multiple)
    data = load_tokens(a.tokens)
    if int(data["train"].max()) >= len(tokenizer):
        sys.exit(f"{PROG}: token id {int(data['train'].max())} >= tokenizer size {len(tokenizer)}")
    batcher = Batcher(data["train"], a.batch, a.seq, a.seed)
    vwin = val_windows(data["validation"], a.seq, a.val_tokens)

    cfg = ssm_config_dict(a, vocab)
    model = build_model(a, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{a.backend}/{a.arch}: {n_params / 1e6:.2f}M params, vocab {vocab}, "
          f"train {data['train'].size:,} tokens, validation {vwin.numel():,} tokens in {vwin.size(0)} windows",
          flush=True)
    ctx = autocast_for(device)
    opt = adamw(model, a, device)

    warm_s = 0.0
    if not a.no_kernel_warmup:
        warm_s = kernel_warmup(model, lambda: batcher.next().to(device),
                               lambda: evaluate(model, vwin[: a.batch], a.batch, device, ctx), device, ctx)
        batcher = Batcher(data["train"], a.batch, a.seq, a.seed)   # same data order as without warm-up
        print(f"kernel warm-up (untimed): {warm_s:.1f}s", flush=True)

    loop = TinyLoop(a, model, opt, device, ctx, lambda: batcher.next().to(device, non_blocking=True),
                    lambda: evaluate(model, vwin, a.batch, device, ctx))
    step, _ = loop.run()
    log, best, tokens_per_step = loop.log, loop.best, loop.tok_step
    train_s = time.time() - loop.t0
    if best["state"] is None:
        sys.exit(f"{PROG}: no evaluation happened (budget too small?)")
    print(f"trained {step} steps in {train_s:.0f}s; best val loss {best['val_loss']:.4f} "
          f"(ppl {math.exp(best['val_loss']):.2f}) at step {best['step']}", flush=True)

    # ------------------------------------------------------------ convert + save
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.backend == "mamba_ssm":
        ssm_sd, arch = best["state"], a.arch
    else:
        arch, _, ssm_sd = hf_to_mamba_ssm_state_dict(best["state"], model.config)
    hf_model = transformers_model(ssm_sd, arch, cfg, tokenizer, lambda msg: sys.exit(f"{PROG}: {msg}"))
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


def transformers_model(ssm_sd: dict, arch: str, cfg: dict, tokenizer, fail):
    """The fp16 transformers model of a mamba-ssm state dict (lm_head tied to the embedding; the
    tokenizer's end-of-text as bos / eos / pad); ``fail(message)`` when a tensor is missing or left over."""
    from transformers import AutoModelForCausalLM
    from utrc_lib.hosts.convert import convert_mamba_ssm_state_dict
    eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    hf_cfg, hf_sd = convert_mamba_ssm_state_dict(ssm_sd, arch, cfg, dtype=torch.float16,
                                                 bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in hf_sd.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        fail(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    return model


@torch.no_grad()
def verify(a, model, best_state, out: Path, vwin: torch.Tensor, device) -> dict:
    """Reload the saved checkpoint with transformers and compare logits with the trained model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    model.load_state_dict(fp16_rounded(best_state))   # the trained model with the fp16-rounded best weights
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
        print(f"{PROG}: the converted checkpoint does not reproduce the trained model", file=sys.stderr)
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
    for r in log:      # a continued run (--init-from): where each later stage starts
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


# ============================================================================ pipeline "packed"
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
            sys.exit(f"{PROG}: --init-from {src} is a {arch} model, not {a.arch}")
        for k in ("d_model", "n_layer", "vocab_size"):
            if init_cfg[k] != cfg[k]:
                sys.exit(f"{PROG}: --init-from {src} has {k}={init_cfg[k]}, this run {cfg[k]}")
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


class PackedLoop(Loop):
    """The time-budget recipe (the cosine follows the time left, or the steps when --max-steps is larger)
    or the fixed-token recipe (steps alone; a deadline or --call-steps suspends, with the state saved to
    --ckpt-dir every --ckpt-every seconds); the training loss is averaged on the device."""

    def __init__(self, *args, budget: float, fixed: bool, init: dict | None, calls: list, train_s_before: float,
                 save_state=None, **kw):
        super().__init__(*args, **kw)
        self.budget, self.fixed, self.init, self.calls = budget, fixed, init, calls
        self.train_s_before, self.save_state = train_s_before, save_state

    def frac(self, step, el):
        if self.fixed:                   # the schedule follows the steps alone
            return step / self.a.max_steps
        f = el / self.budget
        return f if self.a.max_steps is None else max(f, step / self.a.max_steps)

    def ends(self, step, el):
        a = self.a
        done = a.max_steps is not None and step >= a.max_steps
        suspend = self.fixed and not done and (el >= self.budget or (a.call_steps and step - self.step0 >= a.call_steps))
        return done or (not self.fixed and el >= self.budget), bool(suspend)

    def record(self, rec):
        if self.init:
            rec.update(call_tokens=rec["step"] * self.tok_step, stage=len(self.init["stages"]))
        if self.fixed:
            rec.update(call=len(self.calls), elapsed_s=round(self.train_s_before + time.time() - self.t0, 2))
        return rec

    def between_steps(self, step):
        if self.save_state is not None and time.time() - getattr(self, "last_ckpt", self.t0) >= self.a.ckpt_every:
            self.save_state(step, time.time() - self.t0, suspended=True)   # a kill after this resumes from here
            self.last_ckpt = time.time()

    def reset_loss(self):
        self.run_loss, self.run_n = torch.zeros((), device=self.device), 0

    def add_loss(self, loss, step):
        self.run_loss += loss.detach()
        self.run_n += 1

    def mean_loss(self):
        return (self.run_loss / max(self.run_n, 1)).item()


def run_packed(a) -> dict:
    t_start = time.time()
    end_by = a.end_by or (t_start + a.max_seconds + 120)
    device, versions = start_device(a)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    packed = load_packed(a.data)
    man, sources = packed["manifest"], packed["sources"]
    for f, want in man["tokenizer_sha256"].items():
        if file_sha256(Path(a.tokenizer) / f) != want:
            sys.exit(f"{PROG}: {a.tokenizer}/{f} is not the tokenizer the tokens were packed with")
    vocab = padded_vocab(len(tokenizer), a.pad_vocab_multiple)
    train = packed["train"]["tokens"]
    docs_all, docs_kept = int(packed["train"]["doc_start"].size), None
    if a.train_docs_frac < 1.0:
        kept, train = doc_subset(packed["train"], a.train_docs_frac, a.doc_seed)
        docs_kept = int(kept.size)
        print(f"--train-docs-frac {a.train_docs_frac}: {docs_kept} of {docs_all} training documents, "
              f"{train.size:,} tokens", flush=True)
    if int(train.max()) >= len(tokenizer):
        sys.exit(f"{PROG}: token ids exceed the tokenizer size (packed with another tokenizer?)")
    val_stream = packed["validation"]["tokens"]
    vfull, vmask = windows(val_stream, a.seq, a.val_tokens)
    cfg = ssm_config_dict(a, vocab)
    model = build_model(a, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    init = load_init(a, model, cfg) if a.init_from else None
    tok0 = init["tokens_seen"] if init else 0
    if init:
        print(f"continuing from {a.init_from} ({tok0 / 1e6:.1f}M tokens seen, {len(init['stages'])} stage(s))",
              flush=True)
    print(f"{a.backend}/{a.arch} {a.layers}x{a.d_model}: {n_params / 1e6:.2f}M params, vocab {vocab}; train "
          f"{train.size:,} tokens, validation {vfull.numel():,} in-training tokens; data {time.time() - t_start:.0f}s",
          flush=True)
    ctx = autocast_for(device)
    batcher = GpuBatcher(train, a.batch, a.seq, a.seed, device)
    opt = adamw(model, a, device)

    def val_loss() -> float:
        s, k = nll_sum(model.eval(), vfull, vmask, a.batch, device, ctx)
        model.train()
        return s / k

    def warm_eval() -> None:
        nll_sum(model.eval(), vfull[: a.batch], vmask[: a.batch], a.batch, device, ctx)
        model.train()

    warm_s = kernel_warmup(model, batcher.next, warm_eval, device, ctx)
    batcher = GpuBatcher(train, a.batch, a.seq, a.seed, device)   # same data order as without warm-up
    fixed = a.total_tokens is not None
    log, best = [], {"val_loss": float("inf"), "step": -1, "state": None}
    tok_step = a.batch * a.seq
    step0, calls, train_s_before = 0, [], 0.0
    ckpt = Path(a.ckpt_dir) / "state.pt" if a.ckpt_dir else None
    if ckpt is not None and ckpt.exists():     # resume the fixed-token run exactly where it stopped
        st = torch.load(ckpt, map_location=device, weights_only=False)
        mismatch = {k: (st["recipe"].get(k), v) for k, v in recipe_of(a).items() if st["recipe"].get(k) != v}
        if mismatch:
            sys.exit(f"{PROG}: {ckpt} is another run's state (differs in {mismatch}); remove it to start over")
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
        sys.exit(f"{PROG}: no time left for training")

    if init:    # where the earlier weights start: the curve's first point of this stage
        vl0 = val_loss()
        print(f"initial validation loss {vl0:.4f} (ppl {math.exp(vl0):.2f})", flush=True)
        log.append({"step": 0, "tokens": tok0, "call_tokens": 0, "elapsed_s": 0.0, "train_loss": None,
                    "val_loss": vl0, "val_ppl": math.exp(vl0), "lr": 0.0, "stage": len(init["stages"])})
        best.update(val_loss=vl0, step=0, state=snapshot(model))   # kept if this stage never improves on them

    def call_record(steps_here: int, secs: float) -> dict:
        return {"steps": steps_here, "tokens_seen": steps_here * tok_step, "train_seconds": round(secs, 1),
                "tokens_per_second": round(steps_here * tok_step / max(secs, 1e-9)),
                "kernel_warmup_seconds": round(warm_s, 1), "hardware": hardware(device),
                "best_step": None, "best_val_loss_in_training": None}

    def save_state(step: int, secs: float, suspended: bool) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"recipe": recipe_of(a), "model": model.state_dict(), "opt": opt.state_dict(),
                    "generator": batcher.g.get_state(), "step": step, "log": log,
                    "calls": calls + ([call_record(step - step0, secs)] if suspended else []),
                    "train_seconds": train_s_before + secs}, tmp)
        os.replace(tmp, ckpt)

    loop = PackedLoop(a, model, opt, device, ctx, batcher.next, val_loss, log=log, best=best, step0=step0, tok0=tok0,
                      budget=budget, fixed=fixed, init=init, calls=calls, train_s_before=train_s_before,
                      save_state=save_state if ckpt is not None else None)
    step, suspended = loop.run()
    t0 = loop.t0
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
        best.update(step=step, val_loss=log[-1]["val_loss"] if log else float("nan"), state=snapshot(model))
    train_s = time.time() - t0
    step_here = step - step0
    print(f"trained {step_here} steps ({step_here * tok_step / 1e6:.1f}M tokens) in {train_s:.0f}s = "
          f"{step_here * tok_step / train_s:,.0f} tokens/s; best val loss {best['val_loss']:.4f} at step {best['step']}",
          flush=True)

    # ------------------------------------------------ final: fp16-rounded best weights
    # Evaluation under the training autocast and shapes (already compiled kernels: no Triton re-tuning).
    t = time.time()
    model.load_state_dict(fp16_rounded(best["state"]))
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
    result = {
        "arch": a.arch, "backend": a.backend, "params": n_params, "vocab_size": vocab,
        "mamba_ssm_config": cfg, "args": vars(a), "versions": versions,
        "hardware": hardware(device),
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


# ============================================================================ entry point
PIPELINES = {"tiny": run_tiny, "packed": run_packed}


def main(argv=None, family: str | None = None) -> dict:
    """Train one model of ``family`` (default: the --family option) with ``argv``'s options."""
    if family is None:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--family", choices=sorted(FAMILIES))
        ns, argv = pre.parse_known_args(argv)
        if ns.family is None:
            if {"-h", "--help"} & set(argv):
                print(__doc__)
                sys.exit(0)
            sys.exit(f"{PROG}: --family is required ({', '.join(FAMILIES)})")
        family = ns.family
    a = parse_args(argv, family)
    return PIPELINES[FAMILIES[family].pipeline](a)


if __name__ == "__main__":
    main()

"""Timing and memory measurement of prefill and generation, dense vs token reduction (docs/method.md §4).

Glossary: B batch, N prompt tokens, V vocabulary, rho per-anchor keep ratio, cut token-layer FLOPs cut.

One library module for every efficiency number (style.md 11): warm-up, torch.cuda.synchronize, CUDA
events, median of repeats, torch.cuda.reset_peak_memory_stats / max_memory_allocated. On CPU the
same functions use the wall clock and report no memory.

Methods: "dense" (no patch), every name of `utrc_lib.available_methods()` (utrc_reference runs with
causal=False), and the bench-only "slice": at the same anchors keep the last ceil(rho n) tokens by
plain slicing (no scoring, no gather): the free-reduction bound any method's speed-up is compared to.

Every configuration is warmed up until two consecutive calls agree (`timing.warm_up`) before it
is timed, and a speed-up over dense above the physical bound 1 / (1 - cut) (no method can beat
dropping the tokens for free) is flagged: `speedup_suspect` in the record, "SUSPECT" in the summary.

CLI (JSON written after every record; a rerun skips records already present, retries errored ones;
exit status 1 when a requested configuration ended in an error, 2 for bad arguments):

    python -m utrc_study.bench --backend mamba_ssm --shapes mamba2-2.7b,mamba-2.8b \\
        --methods dense,slice,utrc,utrc_reference,evit,tome --cuts 0.1,0.2,0.3 --batch 16 \\
        --seq-len 2048 --out figures/03_efficiency/gpu_bench.json [--generate] [--repeats 5]

Long single-stream prefill (issue 28; scripts/gpu_long_prefill.sh runs it): one call per (batch,
length), all into one JSON (records are keyed by batch and length):

    python -m utrc_study.bench --shapes mamba2-2.7b --methods dense,slice,utrc,evit,tome --cuts 0.1,0.2,0.3 \
        --batch 1 --seq-len 32768 --repeats 5 --no-full-logits --out figures/03_efficiency/gpu_long_prefill.json

Prefill records carry prefill_ms (median) with prefill_ms_all and prefill_ms_spread, the whole
prefill's peak memory (peak_mem_gb_last_token; with full logits unless --no-full-logits), the reduction
steps' ms per anchor and their extra memory (reduction_extra_mem_gb_max: the most any step allocated
above what was live when it began), and against dense / slice: speedup_fraction_of_slice,
reduction_overhead_vs_dense, peak_mem_vs_dense_last_token, reduction_extra_mem_vs_dense_peak.

Without --out the records go to a scratch file (`DEFAULT_OUT`, under .cache/bench/): the committed
results (figures/03_efficiency/gpu_bench.json) are written only when named.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time
import traceback
from typing import Callable, Optional

import torch

from utrc_lib.core.config import (ReductionConfig, config_from_args, default_layers, keep_ratio_for_flops,
                                  token_layer_fraction)
from utrc_lib.core.plan import TokenState
from utrc_lib.core.shapes import SHAPES, shape_config
from utrc_lib.environment import CACHE, ensure_writable, versions
from utrc_lib.hosts.handle import ForwardReducer
from .timing import Stamp, median, peak_memory_gb, synchronize, time_ms, warm_up

# -- model shapes ---------------------------------------------------------------------------------
# SHAPES (imported above) is the one table of named shapes, `utrc_lib.core.shapes.SHAPES`: the
# paper's models (mamba2-2.7b, mamba2-1.3b, mamba-2.8b, mamba-1.4b) and tiny ones for CPU tests.
BACKENDS = ("mamba_ssm", "hf")
RECORD_KEY = ("kind", "model_shape", "backend", "device", "dtype", "batch", "seq_len", "method", "flops_cut", "align",
              "new_tokens")
DEFAULT_OUT = CACHE / "bench" / "bench.json"   # scratch; committed results only through --out


def ssm_config(shape: str) -> tuple[str, dict]:
    """(arch, mamba-ssm MambaConfig dict) of a named shape (`core.shapes.shape_config`)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    return shape_config(shape)


def build_model(shape: str, backend: str, device, dtype, seed: int = 0):
    """Random-weight LM of a named shape, built directly on `device` in `dtype`."""
    arch, cfg = ssm_config(shape)
    torch.manual_seed(seed)
    if backend == "mamba_ssm":
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        run_cfg = copy.deepcopy(cfg)
        if arch == "mamba2":
            run_cfg["ssm_cfg"]["use_mem_eff_path"] = False  # the fused path needs causal-conv1d
        model = MambaLMHeadModel(MambaConfig(**run_cfg), device=device, dtype=dtype)
    elif backend == "hf":
        from transformers import Mamba2ForCausalLM, MambaForCausalLM

        from utrc_lib.hosts.convert import mamba_ssm_to_hf_config

        hf_cfg = mamba_ssm_to_hf_config(arch, cfg)
        cls = MambaForCausalLM if arch == "mamba" else Mamba2ForCausalLM
        with torch.device(device):
            model = cls(hf_cfg).to(dtype)
    else:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return model.eval()


# -- the bench-only "slice" reduction and the per-anchor timer -----------------------------------

class SliceReducer(ForwardReducer):
    """Free-slicing bound: at each anchor keep the last ceil(rho n) tokens (no scoring, no gather).

    Equal-length batches only (every token valid), as the timing runs use.
    """

    def step(self, layer, hidden, residual, features=None, delta=None, scan=None):
        if not self.wants(layer):
            return hidden, residual
        n = hidden.shape[1]
        k = self.schedule.kept(n, layer)
        if k >= n:
            return hidden, residual
        st = self.state
        self.state = TokenState(st.positions[:, -k:], st.sizes[:, -k:], st.valid[:, -k:], st.protect_start)
        self.reduced = True
        self.history.append({"layer": layer, "tokens_before": n, "tokens_after": k})
        return hidden[:, -k:], residual[:, -k:]


def timed_reducer(base: type, log: list) -> type:
    """Subclass of `base` whose step appends (start, end) timers to `log` (CUDA events or wall clock)."""

    class Timed(base):
        def step(self, layer, hidden, residual, features=None, delta=None, **kw):
            if not self.wants(layer):
                return hidden, residual
            cuda = hidden.is_cuda
            if cuda:  # allocator bookkeeping on the host: no device sync, nothing added to the timing
                before = torch.cuda.memory_allocated(hidden.device)
                torch.cuda.reset_peak_memory_stats(hidden.device)
            t = Stamp(hidden.device)
            out = super().step(layer, hidden, residual, features=features, delta=delta, **kw)
            t.stop()
            t.extra_bytes = (torch.cuda.max_memory_allocated(hidden.device) - before) if cuda else None
            log.append((layer, hidden.shape[1], out[0].shape[1], t))
            return out

    return Timed


# -- forwards per backend ------------------------------------------------------------------------

def prefill_fn(model, backend: str, ids: torch.Tensor, last_only: bool) -> Callable[[], torch.Tensor]:
    """A no-grad prefill returning logits: (B, 1, V) if last_only else (B, N, V)."""
    def run():
        with torch.inference_mode():
            if backend == "mamba_ssm":
                return model(ids, num_last_tokens=1 if last_only else 0).logits
            return model(ids, use_cache=False, logits_to_keep=1 if last_only else 0).logits
    return run


# -- generation as users run it (issue 15) ---------------------------------------------------------
# mamba-ssm: CUDA-graph decoding (the decoding step captured by mamba-ssm's update_graph_cache, as
# generate(cg=True) does; utrc_lib.hosts.generation.GraphDecoder), the (reduced) prefill writing the
# state tensors the graph reads. One run generates max(checkpoints) tokens; a CUDA event after token n
# of every checkpoint n gives the time of an n-token generation (greedy: no early stop). transformers:
# its own generate() (a second row on the same weights), prefill timed alone, decoding = generate's
# total minus that prefill.

def weight_bytes(model) -> int:
    """Bytes of the model's parameters (tied weights once): what one decoding step reads at least."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth_gb_s(device, nbytes: int = 1 << 30, repeats: int = 5) -> Optional[float]:
    """Device memory bandwidth of a plain copy (bytes read + written per second, in GB/s), median of
    `repeats`; None on CPU. The decode bound divides the bytes a step must move by it."""
    if torch.device(device).type != "cuda":
        return None
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    ms = median(time_ms(lambda: y.copy_(x), device, repeats=repeats, warmup=2))
    return 2 * nbytes / (ms / 1e3) / 1e9


def _checkpoint_stats(B: int, prefill: list, decode: dict) -> dict:
    """{n: decode / end-to-end medians, tokens/s} from per-repeat prefill and decode-through-n times."""
    out = {}
    for n, dec in sorted(decode.items()):
        e2e = [p + d for p, d in zip(prefill, dec)]
        med = median(e2e)
        out[str(n)] = dict(new_tokens=n, decode_ms=median(dec), decode_ms_all=dec,
                           decode_ms_per_token=median(dec) / max(n - 1, 1), e2e_ms=med, e2e_ms_all=e2e,
                           tokens_per_s=B * n / (med / 1e3) if med > 0 else None)
    return out


def measure_graph_generation(model, ids: torch.Tensor, checkpoints, device, repeats: int = 3, *, cg: bool = True,
                             check_tokens: int = 0) -> dict:
    """mamba-ssm generation as `generate(cg=cg)` runs it: prefill and decoding timed apart (CUDA events),
    the graph capture and warm-up timed and reported on their own; medians over `repeats`.

    check_tokens > 0: also run mamba-ssm's own `model.generate(..., cg=cg)` for that many tokens, time it
    and record whether its tokens equal ours (`tokens_match_mamba_ssm`)."""
    from utrc_lib.hosts.generation import GraphDecoder

    B, N = ids.shape
    points = sorted({int(n) for n in checkpoints})
    n_max = points[-1]
    t_cap = time.perf_counter()
    dec = GraphDecoder(model, B, N + n_max + 1, cg=cg)   # captures (or reuses) the decoding graph
    capture_ms = dec.capture_ms

    def run(n_new: int):
        with torch.inference_mode():
            t = Stamp(device)
            tok = dec.prefill(ids).argmax(-1, keepdim=True)
            t.stop()
            marks = {n: Stamp(device) for n in points if 1 < n <= n_new}
            toks = [tok]
            for k in range(2, n_new + 1):  # token k comes from decoding step k - 1
                tok = dec.step(tok).argmax(-1, keepdim=True)
                toks.append(tok)
                if k in marks:
                    marks[k].stop()
            synchronize(device)
        return t.ms(), {n: (marks[n].ms() if n in marks else 0.0) for n in points if n <= n_new}, toks

    tw = time.perf_counter()
    warm = warm_up(lambda: dec.prefill(ids), device)          # prefill until two calls agree
    short = run(min(n_max, 8))                                # and a few graph replays
    warmup_ms = (time.perf_counter() - tw) * 1e3
    pre, decs, first = [], {n: [] for n in points}, None
    for _ in range(max(1, repeats)):
        p, d, toks = run(n_max)
        pre.append(p)
        for n in points:
            decs[n].append(d[n])
        first = first if first is not None else torch.cat(toks, 1)
    rec = dict(decoding="cuda_graph" if cg else "python_loop", capture_ms=capture_ms,
               capture_wall_ms=(tw - t_cap) * 1e3, warmup_ms=warmup_ms, warmup_prefill_ms=warm,
               warmup_short_run=dict(prefill_ms=short[0], new_tokens=min(n_max, 8)),
               prefill_ms=median(pre), prefill_ms_all=pre, new_tokens=n_max,
               checkpoints=_checkpoint_stats(B, pre, decs))
    st = dec.state_bytes() if hasattr(dec, "state_bytes") else None
    rec["state_bytes"] = st
    if check_tokens:
        n = min(int(check_tokens), n_max)
        gen = lambda: model.generate(ids, max_length=N + n, cg=cg)   # noqa: E731  (mamba-ssm's own decode)
        captured = cg and getattr(model, "_decoding_cache", None) is None
        if captured:
            t0 = time.perf_counter()
            gen()
            synchronize(device)
            rec["mamba_ssm_generate_capture_wall_ms"] = (time.perf_counter() - t0) * 1e3
        t = Stamp(device)
        ref = gen()
        t.stop()
        synchronize(device)
        rec["mamba_ssm_generate_ms"] = t.ms()
        rec["mamba_ssm_generate_new_tokens"] = n
        rec["tokens_match_mamba_ssm"] = bool(torch.equal(ref[:, N:].cpu(), first[:, :n].cpu()))
    return rec


def measure_hf_generation(model, ids: torch.Tensor, checkpoints, device, repeats: int = 3) -> dict:
    """transformers' `generate` (greedy, its own cache): the prefill timed alone (last-token logits, cache
    on), each checkpoint n as a full generate() of n tokens; decoding = generate's time minus the prefill
    (`decode_ms` includes generate's own set-up); medians over `repeats` after a warm-up."""
    B, N = ids.shape
    points = sorted({int(n) for n in checkpoints})
    mask = torch.ones_like(ids)

    def prefill():
        with torch.inference_mode():
            return model(ids, use_cache=True, logits_to_keep=1).logits

    def gen(n):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)

    tw = time.perf_counter()
    warm = warm_up(prefill, device)
    gen(min(points[0], 4))
    warmup_ms = (time.perf_counter() - tw) * 1e3
    pre = time_ms(prefill, device, repeats=max(1, repeats), warmup=0)
    totals = {n: time_ms(lambda n=n: gen(n), device, repeats=max(1, repeats), warmup=0) for n in points}
    decs = {n: [max(tot - p, 0.0) for tot, p in zip(totals[n], pre)] for n in points}
    return dict(decoding="transformers_generate", capture_ms=0.0, warmup_ms=warmup_ms, warmup_prefill_ms=warm,
                prefill_ms=median(pre), prefill_ms_all=pre, new_tokens=points[-1],
                generate_ms_all={str(n): v for n, v in totals.items()},
                checkpoints=_checkpoint_stats(B, pre, decs))


def hf_twin(model, shape: str, device, dtype):
    """The transformers model with the weights of mamba-ssm `model` (utrc_lib.hosts.convert)."""
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    from utrc_lib.hosts.convert import convert_mamba_ssm_state_dict

    arch, cfg = ssm_config(shape)
    hf_cfg, sd = convert_mamba_ssm_state_dict(model.state_dict(), arch, cfg)
    cls = MambaForCausalLM if arch == "mamba" else Mamba2ForCausalLM
    with torch.device(device):
        twin = cls(hf_cfg).to(dtype)
    missing, unexpected = twin.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"hf twin: missing {missing[:5]}, unexpected {unexpected[:5]}")
    twin.tie_weights()
    return twin.eval()


def bench_ask_many(model, backend: str, method: str, config, device, *, context: torch.Tensor,
                   questions: torch.Tensor, answer_tokens: int, repeats: int = 3) -> dict:
    """Reduce once, ask many: Q questions over one context.

    once: one (reduced) prefill of the context (batch 1) -> its state serves all Q questions in one batch
        (`utrc_lib.generate_from`: the question continues the state unreduced, then greedy answers);
    separate: Q full requests [context; question_q] in one batch, each prefill (reduced, the question
        protected) then greedy answers (`utrc_lib.hosts.generation.generate`).
    Both decode with CUDA graphs on mamba-ssm. Medians over `repeats` after one warm-up of each."""
    from utrc_lib.hosts import generation as G

    Q, M = questions.shape
    full = torch.cat([context.expand(Q, -1), questions], 1)
    cg = backend == "mamba_ssm" and torch.device(device).type == "cuda"
    with patched(model, backend, method, config) as handle:
        def once():
            t = Stamp(device)
            st = G.prefill(model, context)
            t.stop()
            a = Stamp(device)
            out = G.generate_from(model, st, questions, max_new_tokens=answer_tokens, cg=cg)
            a.stop()
            synchronize(device)
            return t.ms(), a.ms(), out

        def separate():
            opts = handle.options(protect_last=max(M, config.protect_last)) if handle is not None \
                else contextlib.nullcontext()
            with opts:
                t = Stamp(device)
                out = G.generate(model, full, answer_tokens, cg=cg)
                t.stop()
            synchronize(device)
            return t.ms(), out

        tw = time.perf_counter()
        once()
        separate()
        warmup_ms = (time.perf_counter() - tw) * 1e3
        o = [once() for _ in range(max(1, repeats))]
        s = [separate() for _ in range(max(1, repeats))]
    once_total = [a + b for a, b, _ in o]
    agree = (o[0][2] == s[0][1]).all(1).float().mean().item() if o[0][2].shape == s[0][1].shape else 0.0
    rec = dict(questions=Q, question_tokens=M, answer_tokens=answer_tokens, context_tokens=context.shape[1],
               decoding="cuda_graph" if cg else backend, warmup_ms=warmup_ms,
               once_prefill_ms=median([a for a, _, _ in o]), once_answers_ms=median([b for _, b, _ in o]),
               once_ms=median(once_total), once_ms_all=once_total,
               separate_ms=median([t for t, _ in s]), separate_ms_all=[t for t, _ in s],
               answers_agree=agree)
    rec["speedup_once_vs_separate"] = rec["separate_ms"] / rec["once_ms"] if rec["once_ms"] > 0 else None
    return rec


def derive_generation(records: list[dict], rec: dict) -> None:
    """End-to-end comparisons of a generate record with the dense one of its configuration (any
    max length that has the checkpoint): speed-ups, the dense prefill share p, and Amdahl's bounds
    1 / ((1 - p) + p / s) with s = the free-slicing bound 1 / (1 - cut) (`amdahl_bound`) and with s =
    the measured prefill speed-up (`amdahl_from_prefill`)."""
    if rec.get("kind") != "generate" or "error" in rec or not rec.get("checkpoints"):
        return
    dense = _find_generate(records, rec, "dense", 0.0)
    slc = _find_generate(records, rec, "slice", rec["flops_cut"]) if rec["method"] not in ("dense", "slice") else None
    if dense is None:
        return
    rec["prefill_speedup_vs_dense"] = rec["speedup_vs_dense"] = dense["prefill_ms"] / rec["prefill_ms"]
    flag_speedup(rec)
    bound = speedup_bound(rec)
    for n, c in rec["checkpoints"].items():
        d = dense["checkpoints"].get(n)
        if d is None:
            continue
        p = dense["prefill_ms"] / d["e2e_ms"]
        c["prefill_share_dense"] = p
        c["e2e_speedup_vs_dense"] = d["e2e_ms"] / c["e2e_ms"]
        c["amdahl_bound"] = 1.0 / ((1 - p) + p / bound)
        c["amdahl_from_prefill"] = 1.0 / ((1 - p) + p / rec["prefill_speedup_vs_dense"])
        if slc is not None and n in slc["checkpoints"]:
            c["e2e_speedup_slice"] = d["e2e_ms"] / slc["checkpoints"][n]["e2e_ms"]


def _find_generate(records: list[dict], rec: dict, method: str, cut: float) -> Optional[dict]:
    keys = ("kind", "model_shape", "backend", "device", "dtype", "batch", "seq_len")
    for r in records:
        if "error" in r or r.get("method") != method or float(r.get("flops_cut") or 0.0) != float(cut):
            continue
        if all(r.get(k) == rec.get(k) for k in keys) and r.get("align", 1) == rec.get("align", 1) \
                and r.get("checkpoints") and r.get("decoding") == rec.get("decoding"):
            return r
    return None


def generation_table(records: list[dict]) -> list[dict]:
    """One row per (shape, backend, decoding, method, cut, new tokens) of the generate records:
    tokens/s, end-to-end speed-up over dense, dense prefill share, Amdahl bounds, decode ms/token."""
    rows = []
    for r in records:
        if r.get("kind") != "generate" or "error" in r or not r.get("checkpoints"):
            continue
        for n, c in r["checkpoints"].items():
            rows.append(dict(model_shape=r["model_shape"], backend=r["backend"], decoding=r.get("decoding"),
                             method=r["method"], flops_cut=r["flops_cut"], new_tokens=int(n),
                             batch=r["batch"], seq_len=r["seq_len"], prefill_ms=r["prefill_ms"],
                             decode_ms_per_token=c["decode_ms_per_token"], e2e_ms=c["e2e_ms"],
                             tokens_per_s=c["tokens_per_s"], e2e_speedup_vs_dense=c.get("e2e_speedup_vs_dense"),
                             prefill_share_dense=c.get("prefill_share_dense"), amdahl_bound=c.get("amdahl_bound"),
                             amdahl_from_prefill=c.get("amdahl_from_prefill"),
                             decode_bound_ms=r.get("decode_bound_ms_weights_state")))
    return sorted(rows, key=lambda x: (x["model_shape"], x["backend"], x["new_tokens"], x["method"] != "dense",
                                       x["method"], x["flops_cut"]))


# -- one configuration ---------------------------------------------------------------------------

# `--methods ssm`: the SSM-native methods of issue 31 (docs/ssm_methods.md) and the hidden-attention
# metrics under UTRC and hattn_prune ("method@metric"), timed like every method (ms per anchor,
# prefill speed-up); each runs at the bench's keep ratio (decimamba's ratio form)
SSM_BENCH_METHODS = ("decimamba", "mtr_style", "adjacent_merge", "hattn_prune@hattn_window",
                     "hattn_prune@hattn_last", "hattn_prune@hattn_colsum", "hattn_prune@hattn_nodecay",
                     "utrc@hattn_last", "utrc@delta_l2")
METHOD_GROUPS = {"ssm": SSM_BENCH_METHODS}


def split_method(name: str) -> tuple[str, Optional[str]]:
    """'method@metric' -> (method, metric); a plain name -> (name, None)."""
    method, _, metric = name.partition("@")
    return method, (metric or None)


def bench_method_ok(name: str) -> bool:
    """Whether `name` is a bench method: dense, slice, a registered method, or 'method@metric'."""
    from utrc_lib.core.methods import available_methods, available_metrics

    method, metric = split_method(name)
    if name in ("dense", "slice"):
        return True
    return method in available_methods() and (metric is None or metric in available_metrics())


def method_config(method: str, keep_ratio: float, layers, align: int = 1) -> Optional[ReductionConfig]:
    """The ReductionConfig a bench method patches with (None = dense), built by `config_from_args`
    (causal: the method's own default). 'method@metric' scores with that metric."""
    if method == "dense":
        return None
    if method == "slice":  # anchors and ratio only; the loop runs SliceReducer (no features captured)
        return config_from_args("random", keep_ratio=keep_ratio, layers=layers, align=align)
    method, metric = split_method(method)
    return config_from_args(method, keep_ratio=keep_ratio, layers=layers, align=align, metric=metric)


@contextlib.contextmanager
def patched(model, backend: str, method: str, config: Optional[ReductionConfig], timer_log: Optional[list] = None):
    """Apply `config` to `model` (and the slice / timing reducer) for the block; yields the handle (None: dense)."""
    from utrc_lib.hosts.handle import apply

    if config is None:
        yield None
        return
    cls = SliceReducer if method == "slice" else ForwardReducer
    if timer_log is not None:
        cls = timed_reducer(cls, timer_log)
    with apply(model, config) as handle, handle.options(reducer=cls):
        yield handle


def spread(times: list[float]) -> dict:
    """Spread of repeated timings: min, max, and half the (max - min) range relative to the median."""
    if not times:
        return {}
    med = median(times)
    return {"min": min(times), "max": max(times), "rel_half_range": (max(times) - min(times)) / (2 * med) if med else None}


def bench_prefill(model, backend: str, method: str, config, ids, device, repeats: int,
                  full_logits: bool = True) -> dict:
    """prefill latency (last-token logits), peak memory (last-token / full logits), reduction time and
    the extra memory of each reduction step (max_memory_allocated during the step minus what was
    allocated when it began). full_logits=False skips the two full-logits forwards (long prompts:
    (B, N, V) logits of 131072 tokens alone take 13 GB)."""
    rec: dict = {}
    with patched(model, backend, method, config) as handle:
        run = prefill_fn(model, backend, ids, True)
        rec["warmup_ms"] = warm_up(run, device)   # this configuration's own warm-up, until it settles
        times = time_ms(run, device, repeats=repeats, warmup=0)
        rec["prefill_ms"] = median(times)
        rec["prefill_ms_all"] = times
        rec["prefill_ms_spread"] = spread(times)
        rec["peak_mem_gb_last_token"] = peak_memory_gb(prefill_fn(model, backend, ids, True), device)
        if full_logits:
            rec["peak_mem_gb_full_logits"] = peak_memory_gb(prefill_fn(model, backend, ids, False), device)
            # logits for the kept tokens only (B, N', V), as the authors' code returns them (dense: = full)
            if handle is not None:
                with handle.options(kept_only=True):
                    rec["peak_mem_gb_kept_logits"] = peak_memory_gb(prefill_fn(model, backend, ids, False), device)
            else:
                rec["peak_mem_gb_kept_logits"] = rec["peak_mem_gb_full_logits"]
    # per-anchor reduction time: CUDA events around each anchor's step inside real forwards; the
    # median over `repeats` forwards per anchor (one forward alone showed single slow anchors)
    runs: list = []
    log: list = []
    if config is not None:
        with patched(model, backend, method, config, timer_log=log):
            for _ in range(max(1, repeats)):
                log.clear()
                prefill_fn(model, backend, ids, True)()
                synchronize(device)
                runs.append([t.ms() for *_, t in log])
    per_anchor = [median(list(col)) for col in zip(*runs)] if runs and runs[0] else []
    rec["reduction_ms_per_anchor"] = sum(per_anchor) / len(per_anchor) if per_anchor else 0.0
    rec["reduction_ms_anchors"] = per_anchor
    rec["reduction_ms_anchors_runs"] = runs
    rec["tokens_per_anchor"] = [[n_in, n_out] for _, n_in, n_out, _ in log]
    extra = [t.extra_bytes for *_, t in log if getattr(t, "extra_bytes", None) is not None]
    if extra:  # the last timed forward's steps (allocations are deterministic for a fixed shape)
        rec["reduction_extra_mem_gb_anchors"] = [e / 1e9 for e in extra]
        rec["reduction_extra_mem_gb_max"] = max(extra) / 1e9
    rec["reduction_ms_spread"] = spread([sum(r) for r in runs]) if runs and runs[0] else {}
    if config is not None:  # where the cut runs and what scored (docs/ssm_methods.md)
        rec["form"], rec["scoring_metric"] = config.form, config.scoring_metric
    B, N = ids.shape
    rec["prefill_tokens_per_s"] = B * N / (rec["prefill_ms"] / 1e3)
    return rec


# -- records and files ---------------------------------------------------------------------------

def record_key(rec: dict) -> tuple:
    return tuple(rec.get(k, 1 if k == "align" else None) for k in RECORD_KEY)  # records before "align": 1


def load_records(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return data["records"] if isinstance(data, dict) else data


def derive_fields(records: list[dict], rec: dict) -> None:
    """Fill the comparison fields of prefill record `rec` from the dense and slice records of its
    configuration in `records` (whichever ran first): speed-ups, slice fraction, overheads, memory."""
    if rec.get("kind") != "prefill" or "error" in rec or not rec.get("prefill_ms"):
        return
    key = {k: rec.get(k, 1 if k == "align" else None) for k in RECORD_KEY}
    method = rec["method"]
    dense = rec if method == "dense" else _find(records, dict(key, method="dense", flops_cut=0.0))
    slc = _find(records, dict(key, method="slice"))
    rec["speedup_vs_dense"] = dense["prefill_ms"] / rec["prefill_ms"] if dense else None
    flag_speedup(rec)
    if dense and dense.get("peak_mem_gb_full_logits") and rec.get("peak_mem_gb_full_logits"):
        rec["peak_mem_reduction_full_logits"] = 1 - rec["peak_mem_gb_full_logits"] / dense["peak_mem_gb_full_logits"]
        rec["peak_mem_reduction_last_token"] = 1 - rec["peak_mem_gb_last_token"] / dense["peak_mem_gb_last_token"]
        if rec.get("peak_mem_gb_kept_logits"):
            rec["peak_mem_reduction_kept_logits"] = 1 - rec["peak_mem_gb_kept_logits"] / dense["peak_mem_gb_full_logits"]
    if dense and dense.get("peak_mem_gb_last_token") and rec.get("peak_mem_gb_last_token"):
        rec["peak_mem_vs_dense_last_token"] = rec["peak_mem_gb_last_token"] / dense["peak_mem_gb_last_token"]
        if rec.get("reduction_extra_mem_gb_max") is not None:
            rec["reduction_extra_mem_vs_dense_peak"] = rec["reduction_extra_mem_gb_max"] / dense["peak_mem_gb_last_token"]
    if dense and rec.get("reduction_ms_per_anchor"):
        rec["reduction_overhead_vs_dense"] = (len(rec["reduction_ms_anchors"]) * rec["reduction_ms_per_anchor"]
                                              / dense["prefill_ms"])
    if slc and dense and method not in ("slice", "dense") and slc.get("prefill_ms"):
        rec["speedup_fraction_of_slice"] = rec["speedup_vs_dense"] / (dense["prefill_ms"] / slc["prefill_ms"])
        # end to end: what the method costs beyond free slicing (its reduction steps, and anchor
        # layers that run unfused to hand over their SSM output), as a share of dense
        rec["overhead_vs_slice_of_dense"] = (rec["prefill_ms"] - slc["prefill_ms"]) / dense["prefill_ms"]


def speedup_bound(rec: dict) -> float:
    """The physical bound on a speed-up over dense: 1 / (1 - cut), the time left if the removed tokens
    cost nothing (1 / the realised token-layer fraction when rounding removed more)."""
    kept = 1.0 - float(rec.get("flops_cut") or 0.0)
    fraction = rec.get("token_layer_fraction")
    if isinstance(fraction, (int, float)) and 0 < fraction < kept:
        kept = float(fraction)
    return 1.0 / kept if kept > 0 else float("inf")


def flag_speedup(rec: dict) -> None:
    """Set `speedup_bound` and `speedup_suspect` (speed-up above the bound: a timing artefact, e.g.
    a dense run that absorbed a warm-up) on a record with `speedup_vs_dense`."""
    speedup = rec.get("speedup_vs_dense")
    if speedup is None:
        rec.pop("speedup_suspect", None)
        rec.pop("speedup_bound", None)
        return
    rec["speedup_bound"] = speedup_bound(rec)
    rec["speedup_suspect"] = bool(speedup > rec["speedup_bound"] * (1 + 1e-9))


def save_records(path: str, records: list[dict]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)  # a list of records (the layout)
    os.replace(tmp, path)


GEN_DEFAULTS = dict(generate=False, gen_methods=("dense", "utrc"), gen_cuts=(0.3,), gen_batch=None, gen_prompt=None,
                    new_tokens=(100,), short_new_tokens=None, long_methods=("dense",), long_cuts=(),
                    gen_hf_methods=(), gen_hf_cuts=(0.3,), gen_hf_new_tokens=None, gen_decoding="cg",
                    ask_many=False, ask_methods=("dense", "utrc"), ask_cuts=(0.3,), ask_questions=8,
                    ask_question_tokens=32, ask_answer_tokens=32, ask_context=2048)
DECODINGS = ("cg", "loop")


def _tokens(new_tokens) -> list[int]:
    return sorted({int(n) for n in ([new_tokens] if _is_int(new_tokens) else list(new_tokens))})


def plan_runs(shape: str, methods, cuts, generate: bool = False, gen_methods=(), gen_cuts=(), **gen) -> list[tuple]:
    """[(kind, method, cut, backend or None, new tokens or None)] in run order: dense prefill first,
    then each method at each cut, then generation: dense and the other long runs, reduce once / ask
    many, the short runs, the transformers rows on the same weights (the most wanted first, for a
    time budget that cuts the list)."""
    g = dict(GEN_DEFAULTS, **gen)
    runs = [("prefill", "dense", 0.0, None, None)] if "dense" in methods else []
    runs += [("prefill", m, c, None, None) for m in methods if m != "dense" for c in cuts]
    if generate:
        points = _tokens(g["new_tokens"])
        long, short = points[-1], min(g["short_new_tokens"] or points[0], points[-1])

        def length(m, c):  # long runs go to the largest checkpoint, the others to the short length
            return long if m in g["long_methods"] and (m == "dense" or c in g["long_cuts"]) else short

        gens = [(m, 0.0 if m == "dense" else float(c)) for m in gen_methods for c in (gen_cuts if m != "dense" else [0.0])]
        gens = sorted(dict.fromkeys(gens), key=lambda mc: (mc[0] != "dense", -length(*mc)))
        runs += [("generate", m, c, None, length(m, c)) for m, c in gens if length(m, c) == long]
    if g["ask_many"]:
        asks = [(m, 0.0 if m == "dense" else float(c)) for m in g["ask_methods"]
                for c in (g["ask_cuts"] if m != "dense" else [0.0])]
        runs += [("ask_many", m, c, None, g["ask_answer_tokens"]) for m, c in dict.fromkeys(asks)]
    if generate:
        runs += [("generate", m, c, None, length(m, c)) for m, c in gens if length(m, c) != long]
        hf_n = g["gen_hf_new_tokens"] or _tokens(g["new_tokens"])[0]
        hf = [(m, 0.0 if m == "dense" else float(c)) for m in g["gen_hf_methods"]
              for c in (g["gen_hf_cuts"] if m != "dense" else [0.0])]
        runs += [("generate", m, c, "hf", hf_n) for m, c in dict.fromkeys(hf)]
    return list(dict.fromkeys(runs))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(*, backend: str, shapes, methods, cuts, batch: int, seq_len: int, repeats: int, align: int,
             gen_repeats: int = 3, time_budget_s=None, **gen) -> None:
    """Check a bench request before any model is built; raises ValueError naming the field."""
    from utrc_lib.core.methods import available_methods

    g = dict(GEN_DEFAULTS, **gen)
    unknown = sorted(set(gen) - set(GEN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown bench argument(s) {unknown}")
    valid_methods = ["dense", "slice", *available_methods()]
    lists = [("methods", methods, True), ("gen_methods", g["gen_methods"], g["generate"]),
             ("gen_hf_methods", g["gen_hf_methods"], g["generate"]), ("long_methods", g["long_methods"], g["generate"]),
             ("ask_methods", g["ask_methods"], g["ask_many"])]
    for _, names, used in lists:
        for m in names if used else ():
            if m not in valid_methods and not bench_method_ok(m):
                raise ValueError(f"unknown bench method {m!r}; valid: {', '.join(valid_methods)} "
                                 f"(or 'method@metric')")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    for shape in shapes:
        ssm_config(shape)
    if not list(shapes):
        raise ValueError("shapes: give at least one shape")
    if not list(methods) and not g["generate"] and not g["ask_many"]:
        raise ValueError("methods: give at least one method (or ask for generate / ask_many)")
    if g["generate"] and not list(g["gen_methods"]) and not list(g["gen_hf_methods"]):
        raise ValueError("gen_methods: give at least one method to time generation with")
    if g["gen_hf_methods"] and g["generate"] and backend != "mamba_ssm":
        raise ValueError("gen_hf_methods: the transformers rows on the same weights need backend mamba_ssm "
                         "(with backend hf every generation row is transformers' generate already)")
    if g["gen_decoding"] not in DECODINGS:
        raise ValueError(f"gen_decoding must be one of {', '.join(DECODINGS)}, got {g['gen_decoding']!r}")
    cut_lists = [("cuts", cuts, True), ("gen_cuts", g["gen_cuts"], g["generate"]),
                 ("long_cuts", g["long_cuts"], g["generate"]), ("gen_hf_cuts", g["gen_hf_cuts"], g["generate"]),
                 ("ask_cuts", g["ask_cuts"], g["ask_many"])]
    for name, values, used in cut_lists:
        for c in values if used else ():
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= float(c) < 1.0:
                raise ValueError(f"{name}: every cut must be a number in [0, 1), got {c!r}")
    sizes = dict(batch=batch, seq_len=seq_len, repeats=repeats, align=align)
    if g["generate"]:
        nt = g["new_tokens"]
        items = [nt] if _is_int(nt) or isinstance(nt, bool) else list(nt)
        if not items:
            raise ValueError("new_tokens: give at least one length")
        for i, v in enumerate(items):
            sizes[f"new_tokens[{i}]"] = v
        sizes["gen_repeats"] = gen_repeats
        for k in ("gen_batch", "gen_prompt", "short_new_tokens", "gen_hf_new_tokens"):
            if g[k] is not None:
                sizes[k] = g[k]
    if g["ask_many"]:
        sizes.update({k: g[k] for k in ("ask_questions", "ask_question_tokens", "ask_answer_tokens", "ask_context")})
        sizes["gen_repeats"] = gen_repeats
    for name, v in sizes.items():
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if time_budget_s is not None and (isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float))
                                      or time_budget_s <= 0):
        raise ValueError(f"time_budget_s must be a number > 0, got {time_budget_s!r}")


def resolve_device(device=None, dtype=None) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, dtype name): default CUDA when available, float16 on CUDA, float32 on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype, str(dtype).replace("torch.", "")


def plan_keys(*, backend: str, shapes, methods, cuts, batch: int, seq_len: int, device=None, dtype=None,
              align: int = 1, **gen) -> list[dict]:
    """The record keys (RECORD_KEY fields) a request asks for, in run order."""
    device, _, dtype_name = resolve_device(device, dtype)
    g = dict(GEN_DEFAULTS, **{k: v for k, v in gen.items() if k in GEN_DEFAULTS})
    keys = []
    for shape in shapes:
        for kind, method, cut, be, n_new in plan_runs(shape, methods, cuts, **g):
            if kind == "prefill":
                b, n = batch, seq_len
            elif kind == "generate":
                b, n = g["gen_batch"] or batch, g["gen_prompt"] or seq_len
            else:
                b, n = g["ask_questions"], g["ask_context"]
            keys.append(dict(kind=kind, model_shape=shape, backend=be or backend, device=device.type,
                             dtype=dtype_name, batch=b, seq_len=n, method=method, flops_cut=float(cut),
                             align=int(align), new_tokens=n_new))
    return keys


def measure_generation(model, backend: str, ids: torch.Tensor, checkpoints, device, repeats: int = 3,
                       decoding: str = "cg", check_tokens: int = 0) -> dict:
    """Generation as users run it: mamba-ssm with CUDA graphs (decoding "cg"; "loop": its Python
    path), transformers with its generate()."""
    if backend == "mamba_ssm":
        return measure_graph_generation(model, ids, checkpoints, device, repeats, cg=decoding == "cg",
                                        check_tokens=check_tokens)
    return measure_hf_generation(model, ids, checkpoints, device, repeats)


def run_bench(*, backend: str, shapes, methods, cuts, batch: int, seq_len: int, out: Optional[str],
              repeats: int = 5, gen_repeats: int = 3, device=None, dtype=None, time_budget_s: Optional[float] = None,
              progress: bool = True, log: Callable[[str], None] = print, align: int = 1, check_tokens: int = 100,
              full_logits: bool = True, **gen) -> list[dict]:
    """Run every configuration not yet in `out`; returns all records (old and new).

    out: JSON file of records (None: keep them in memory only); checked for writability before the
        first model is built.
    align: ReductionConfig.align of every reduced run (kept counts rounded to multiples; slice too).
    gen: the generation / ask-many request (GEN_DEFAULTS names the fields): generate, gen_methods,
        gen_cuts, gen_batch, gen_prompt, new_tokens (the checkpoints: one run generates up to the
        largest and is timed at each), long_methods / long_cuts (runs that go to the largest; dense
        always when listed), short_new_tokens (where the other runs stop; default the smallest
        checkpoint), gen_hf_methods / gen_hf_cuts / gen_hf_new_tokens
        (transformers' generate on the same weights), gen_decoding, ask_many and its sizes.
    check_tokens: mamba-ssm generate records also run mamba-ssm's own generate() for this many
        tokens (0: off) and record whether its tokens equal the bench's.
    full_logits: also measure peak memory with full-sequence (and kept-only) logits (False: last-token
        logits only, for long prompts).
    Raises ValueError (naming the field) for a bad request, OSError for an unwritable `out`, before
    any work."""
    request = dict(backend=backend, shapes=list(shapes), methods=list(methods), cuts=list(cuts), batch=batch,
                   seq_len=seq_len, align=align, **gen)
    validate(repeats=repeats, gen_repeats=gen_repeats, time_budget_s=time_budget_s, **request)
    g = dict(GEN_DEFAULTS, **gen)
    device, dtype, dtype_name = resolve_device(device, dtype)
    records = load_records(out)
    done = {record_key(r) for r in records if "error" not in r}
    todo = [k for k in plan_keys(device=device, dtype=dtype, **request) if record_key(k) not in done]
    if out and todo:
        ensure_writable(out, "bench output (--out)", replace=True)
    common = dict(device=device.type, dtype=dtype_name, versions=versions(),
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    t_start = time.time()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), disable=not progress, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    model = model_shape_name = twin = None
    bandwidth: dict = {}
    try:
        for key in todo:
            if time_budget_s is not None and time.time() - t_start > time_budget_s:
                log(f"[bench] time budget {time_budget_s:.0f}s spent: {len(todo) - todo.index(key)} configuration(s) skipped")
                break
            shape, method, cut, kind = key["model_shape"], key["method"], key["flops_cut"], key["kind"]
            t0 = time.time()
            rec = dict(key, **common, repeats=repeats if kind == "prefill" else gen_repeats,
                       timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            try:
                if model_shape_name != shape:
                    model = twin = None
                    _free(device)
                    tb = time.time()
                    model = build_model(shape, backend, device, dtype)
                    model_shape_name = shape
                    log(f"[bench] built {shape} ({backend}, {dtype_name}) in {time.time() - tb:.1f}s")
                run_model, run_backend = model, key["backend"]
                if run_backend != backend:  # transformers' generate on the mamba-ssm weights
                    if twin is None:
                        tb = time.time()
                        twin = hf_twin(model, shape, device, dtype)
                        log(f"[bench] transformers twin of {shape} in {time.time() - tb:.1f}s")
                    run_model = twin
                    rec["weights"] = f"{backend} {shape} (converted: utrc_lib.hosts.convert)"
                L = len(model.backbone.layers)
                layers = default_layers(L)
                keep = keep_ratio_for_flops(cut, L, layers) if cut > 0 else 1.0
                rec.update(num_layers=L, anchors=list(layers), keep_ratio=keep,
                           token_layer_fraction=token_layer_fraction(L, layers, keep, key["seq_len"], align))
                rec["model_mem_gb"] = (torch.cuda.memory_allocated(device) / 1e9) if device.type == "cuda" else None
                rng = torch.Generator().manual_seed(0)
                vocab = model.backbone.embedding.num_embeddings if backend == "mamba_ssm" \
                    else model.backbone.embeddings.num_embeddings
                config = method_config(method, keep, layers, align)
                if kind == "prefill":
                    ids = torch.randint(0, vocab, (key["batch"], key["seq_len"]), generator=rng).to(device)
                    rec.update(bench_prefill(model, backend, method, config, ids, device, repeats, full_logits))
                elif kind == "generate":
                    ids = torch.randint(0, vocab, (key["batch"], key["seq_len"]), generator=rng).to(device)
                    points = [n for n in _tokens(g["new_tokens"]) if n < key["new_tokens"]] + [key["new_tokens"]]
                    with patched(run_model, run_backend, method, config):
                        rec.update(measure_generation(run_model, run_backend, ids, points, device, gen_repeats,
                                                      g["gen_decoding"],
                                                      check_tokens if run_backend == "mamba_ssm" else 0))
                    if device.type not in bandwidth:
                        bandwidth[device.type] = copy_bandwidth_gb_s(device)
                    bw = bandwidth[device.type]
                    wb = weight_bytes(run_model)
                    rec.update(weight_bytes=wb, copy_bandwidth_gb_s=bw)
                    if bw:
                        rec["decode_bound_ms_weights"] = wb / (bw * 1e9) * 1e3
                        if rec.get("state_bytes"):  # the state is read and written once per step
                            rec["decode_bound_ms_weights_state"] = (wb + 2 * rec["state_bytes"]) / (bw * 1e9) * 1e3
                else:  # ask_many
                    context = torch.randint(0, vocab, (1, key["seq_len"]), generator=rng).to(device)
                    questions = torch.randint(0, vocab, (key["batch"], g["ask_question_tokens"]), generator=rng).to(device)
                    rec.update(bench_ask_many(model, backend, method, config, device, context=context,
                                              questions=questions, answer_tokens=key["new_tokens"],
                                              repeats=gen_repeats))
            except Exception as e:  # record the failure, keep going
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc()[-4000:]
                if isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA" in str(e):
                    model, model_shape_name, twin = None, None, None  # rebuild after a CUDA failure
                _free(device)
            rec["elapsed_s"] = time.time() - t0
            records = [r for r in records if record_key(r) != record_key(rec)] + [rec]
            for r in records:  # a dense / slice record that ran later completes earlier comparisons
                derive_fields(records, r)
                derive_generation(records, r)
            save_records(out, records)
            log(_summary(rec))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model = twin = None
        _free(device)
    return records


def _find(records: list[dict], key: dict) -> Optional[dict]:
    k = record_key(key)
    for r in records:
        if record_key(r) == k and "error" not in r:
            return r
    return None


def _free(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _summary(rec: dict) -> str:
    head = f"[bench] {rec['kind']:8s} {rec['model_shape']} {rec['backend']:9s} {rec['method']:14s} cut={rec['flops_cut']:.2f}"
    if "error" in rec:
        return f"{head} ERROR {rec['error'][:300]} ({rec['elapsed_s']:.1f}s)"
    if rec["kind"] == "ask_many":
        return (f"{head} {rec['questions']} questions x {rec['question_tokens']} tok over {rec['context_tokens']} tok, "
                f"{rec['answer_tokens']} answer tok: once {rec['once_ms']:.1f} ms (prefill {rec['once_prefill_ms']:.1f}), "
                f"separate {rec['separate_ms']:.1f} ms, x{rec['speedup_once_vs_separate']:.2f}, answers agree "
                f"{100 * rec['answers_agree']:.0f}% ({rec['elapsed_s']:.1f}s)")
    parts = [f"prefill {rec['prefill_ms']:.1f} ms"]
    if rec.get("speedup_vs_dense"):
        parts.append(f"x{rec['speedup_vs_dense']:.3f}")
        if rec.get("speedup_suspect"):
            parts.append(f"SUSPECT: above the bound x{rec['speedup_bound']:.3f} = 1/(1 - cut) (timing artefact?)")
    if rec.get("speedup_fraction_of_slice"):
        parts.append(f"{100 * rec['speedup_fraction_of_slice']:.1f}% of slice")
    if rec.get("reduction_ms_per_anchor"):
        parts.append(f"reduce {rec['reduction_ms_per_anchor']:.2f} ms/anchor")
    if rec.get("peak_mem_gb_last_token") is not None:
        kept = rec.get("peak_mem_gb_kept_logits")
        parts.append(f"mem {rec['peak_mem_gb_last_token']:.2f}/{rec['peak_mem_gb_full_logits']:.2f}"
                     + (f"/{kept:.2f}" if kept else "") + " GB (last/full/kept)")
    if rec.get("checkpoints"):
        parts.append(f"{rec['decoding']}, capture {rec.get('capture_ms', 0):.0f} ms, warm-up {rec['warmup_ms']:.0f} ms")
        for n, c in rec["checkpoints"].items():
            e2e = c.get("e2e_speedup_vs_dense")
            parts.append(f"[{n} tok: decode {c['decode_ms_per_token']:.2f} ms/tok, {c['tokens_per_s']:.0f} tok/s"
                         + (f", e2e x{e2e:.3f} (Amdahl <= x{c['amdahl_bound']:.3f})" if e2e else "") + "]")
        if rec.get("decode_bound_ms_weights_state"):
            parts.append(f"decode bound {rec['decode_bound_ms_weights']:.2f} ms (weights) / "
                         f"{rec['decode_bound_ms_weights_state']:.2f} ms (+ state)")
        if "tokens_match_mamba_ssm" in rec:
            parts.append(f"tokens {'=' if rec['tokens_match_mamba_ssm'] else '!='} mamba-ssm generate() "
                         f"({rec['mamba_ssm_generate_ms']:.0f} ms for {rec['mamba_ssm_generate_new_tokens']})")
    return f"{head} " + ", ".join(parts) + f" ({rec['elapsed_s']:.1f}s)"


def _int_list(text: str) -> list[int]:
    out = []
    for item in _csv(text):
        out.append(_positive_int(item))
    if not out:
        raise argparse.ArgumentTypeError("give at least one number")
    return out


def _csv(s: str) -> list[str]:
    return [x for x in (p.strip() for p in s.split(",")) if x]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return v


def _cut_list(text: str) -> list[float]:
    cuts = []
    for item in _csv(text):
        try:
            c = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {item!r}") from None
        if not 0.0 <= c < 1.0:
            raise argparse.ArgumentTypeError(f"every cut must be in [0, 1), got {item!r}")
        cuts.append(c)
    if not cuts:
        raise argparse.ArgumentTypeError("give at least one cut")
    return cuts


def _names(valid, allow_empty: bool = False, groups=None, extra_ok=None) -> Callable[[str], list[str]]:
    """Comma list of names from `valid`; `groups` {alias: names} expand; extra_ok(name) admits more."""
    def parse(text: str) -> list[str]:
        names = []
        for n in _csv(text):
            names += list(groups[n]) if groups and n in groups else [n]
        bad = [n for n in names if n not in valid and not (extra_ok and extra_ok(n))]
        if bad or (not names and not allow_empty):
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; valid: {', '.join(valid)}" if bad
                                             else "give at least one name")
        return names
    return parse


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m utrc_study.bench` (every size and cut checked while parsing)."""
    from utrc_lib.core.methods import available_methods

    methods = ["dense", "slice", *available_methods()]
    ap = argparse.ArgumentParser(prog="python -m utrc_study.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=BACKENDS, default="mamba_ssm",
                    help="host library of the random-weight model (default mamba_ssm; hf = transformers)")
    ap.add_argument("--shapes", type=_names(list(SHAPES)), default="mamba2-2.7b,mamba-2.8b",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--methods", type=_names(methods, groups=METHOD_GROUPS, extra_ok=bench_method_ok),
                    default="dense,slice,utrc,utrc_reference,evit,tome",
                    help=f"comma list of {', '.join(methods)}; 'method@metric' (e.g. utrc@hattn_last); "
                         f"'ssm' = {','.join(SSM_BENCH_METHODS)}")
    ap.add_argument("--cuts", type=_cut_list, default="0.1,0.2,0.3", help="token-layer FLOPs cuts, each in [0, 1)")
    ap.add_argument("--batch", type=_positive_int, default=16,
                    help="prompts per prefill (default 16)")
    ap.add_argument("--seq-len", type=_positive_int, default=2048,
                    help="prompt tokens (default 2048)")
    ap.add_argument("--repeats", type=_positive_int, default=5,
                    help="timed forwards per configuration after its warm-up; the median is reported (default 5)")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="records JSON (default: a scratch file under .cache/bench; name "
                         "figures/03_efficiency/gpu_bench.json to update the committed results)")
    ap.add_argument("--no-full-logits", action="store_true",
                    help="skip the peak-memory forwards with full-sequence logits (long prompts: 131072 x V "
                         "logits alone take 13 GB); the last-token peak is always measured")
    ap.add_argument("--no-prefill", action="store_true",
                    help="skip the prefill records (only generation / ask-many)")
    ap.add_argument("--generate", action="store_true",
                    help="time generation as users run it: mamba-ssm with CUDA-graph decoding (backend mamba_ssm), "
                         "transformers' generate (backend hf); prefill and decoding apart")
    ap.add_argument("--gen-methods", type=_names(methods, True), default="dense,utrc",
                    help="methods timed for generation (default dense,utrc)")
    ap.add_argument("--gen-cuts", type=_cut_list, default="0.3",
                    help="token-layer cuts timed for generation (default 0.3)")
    ap.add_argument("--gen-batch", type=_positive_int, default=16,
                    help="prompts per generation run (default 16)")
    ap.add_argument("--gen-prompt", type=_positive_int, default=2048,
                    help="prompt tokens of a generation run (default 2048)")
    ap.add_argument("--new-tokens", type=_int_list, default="100",
                    help="checkpoints, comma list (e.g. 100,500,2000): a run generates up to its length and is "
                         "timed at each checkpoint on the way (default 100)")
    ap.add_argument("--long-methods", type=_names(methods, True), default="dense",
                    help="methods whose runs go to the largest checkpoint (default dense)")
    ap.add_argument("--long-cuts", type=_cut_list, default="0.3", help="cuts of those runs (default 0.3)")
    ap.add_argument("--short-new-tokens", type=_positive_int, default=None,
                    help="where every other run stops (default: the smallest checkpoint)")
    ap.add_argument("--gen-hf-methods", type=_names(methods, True), default="",
                    help="backend mamba_ssm: also time transformers' generate on the same weights for these "
                         "methods (default none)")
    ap.add_argument("--gen-hf-cuts", type=_cut_list, default="0.3", help="cuts of the transformers rows (default 0.3)")
    ap.add_argument("--gen-hf-new-tokens", type=_positive_int, default=None,
                    help="tokens generated in the transformers rows (default: the smallest --new-tokens)")
    ap.add_argument("--gen-decoding", choices=DECODINGS, default="cg",
                    help="mamba-ssm decoding: cg = CUDA graphs, as generate(cg=True) (default); loop = its Python path")
    ap.add_argument("--gen-repeats", type=_positive_int, default=3,
                    help="timed generation runs per configuration; the median is reported (default 3)")
    ap.add_argument("--check-tokens", type=int, default=100,
                    help="mamba-ssm: also run mamba-ssm's own generate() for this many tokens and record whether "
                         "its tokens equal the bench's (0 = off; default 100)")
    ap.add_argument("--ask-many", action="store_true",
                    help="reduce once, ask many: questions over one context (state reused) vs full prefills")
    ap.add_argument("--ask-methods", type=_names(methods, True), default="dense,utrc", help="(default dense,utrc)")
    ap.add_argument("--ask-cuts", type=_cut_list, default="0.3", help="(default 0.3)")
    ap.add_argument("--ask-questions", type=_positive_int, default=8, help="questions per context (default 8)")
    ap.add_argument("--ask-question-tokens", type=_positive_int, default=32, help="tokens per question (default 32)")
    ap.add_argument("--ask-answer-tokens", type=_positive_int, default=32, help="tokens per answer (default 32)")
    ap.add_argument("--ask-context", type=_positive_int, default=2048, help="context tokens (default 2048)")
    ap.add_argument("--device", default=None,
                    help="torch device (default cuda when available, else cpu)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                    help="weights and activations dtype (default float16 on GPU, float32 on CPU)")
    ap.add_argument("--time-budget-s", type=_positive_float, default=None,
                    help="stop starting new configurations after this")
    ap.add_argument("--align", type=_positive_int, default=1,
                    help="round kept counts to multiples of this (ReductionConfig.align; 1 = off)")
    ap.add_argument("--threads", type=_positive_int, default=None,
                    help="torch CPU threads (default: torch's). On a shared CPU, 1 avoids oversubscribed "
                         "thread pools that make small forwards erratic")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress lines")
    return ap


def device_problem(backend: str, device=None) -> Optional[str]:
    """Why this machine cannot run the request (one line), found before any configuration runs: a
    CUDA device torch cannot see, or the mamba_ssm backend (CUDA kernels) without CUDA or mamba-ssm."""
    cuda = torch.cuda.is_available()
    if device and str(device).startswith("cuda") and not cuda:
        return f"--device {device}: torch sees no CUDA device; use --device cpu (with --backend hf)"
    if backend == "mamba_ssm":
        if not cuda or (device and torch.device(device).type != "cuda"):
            return ("--backend mamba_ssm (the default) runs mamba-ssm's CUDA kernels and needs a CUDA GPU; on this "
                    "machine use --backend hf --device cpu")
        import importlib.util

        if importlib.util.find_spec("mamba_ssm") is None:
            return "--backend mamba_ssm needs mamba-ssm (pip install -e '.[gpu]'), or use --backend hf"
    return None


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    try:
        ensure_writable(a.out, "--out", replace=True)
    except OSError as exc:
        ap.error(str(exc))
    problem = device_problem(a.backend, a.device)
    if problem:
        ap.error(problem)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    request = dict(backend=a.backend, shapes=a.shapes, methods=[] if a.no_prefill else a.methods, cuts=a.cuts,
                   batch=a.batch, seq_len=a.seq_len, generate=a.generate, gen_methods=a.gen_methods,
                   gen_cuts=a.gen_cuts, gen_batch=a.gen_batch, gen_prompt=a.gen_prompt, new_tokens=a.new_tokens,
                   short_new_tokens=a.short_new_tokens, long_methods=a.long_methods, long_cuts=a.long_cuts,
                   gen_hf_methods=a.gen_hf_methods, gen_hf_cuts=a.gen_hf_cuts,
                   gen_hf_new_tokens=a.gen_hf_new_tokens, gen_decoding=a.gen_decoding, ask_many=a.ask_many,
                   ask_methods=a.ask_methods, ask_cuts=a.ask_cuts, ask_questions=a.ask_questions,
                   ask_question_tokens=a.ask_question_tokens, ask_answer_tokens=a.ask_answer_tokens,
                   ask_context=a.ask_context, device=a.device,
                   dtype=getattr(torch, a.dtype) if a.dtype else None, align=a.align)
    try:
        records = run_bench(out=a.out, repeats=a.repeats, gen_repeats=a.gen_repeats, check_tokens=max(0, a.check_tokens),
                            full_logits=not a.no_full_logits,
                            time_budget_s=a.time_budget_s, progress=not a.no_progress,
                            log=lambda s: print(s, flush=True), **request)
    except ValueError as exc:
        ap.error(str(exc))
    except KeyboardInterrupt:   # every finished configuration is already in --out (saved as it completes)
        kept = load_records(a.out)
        print(f"[bench] interrupted: {len(kept)} record(s) kept in {a.out}; run the same command again to compute "
              f"only the missing configurations", file=sys.stderr, flush=True)
        return 130
    wanted = {record_key(k) for k in plan_keys(**request)}
    mine = [r for r in records if record_key(r) in wanted]
    errors = [r for r in mine if "error" in r]
    suspect = [r for r in mine if r.get("speedup_suspect")]
    print(f"[bench] {len(records)} record(s) in {a.out}; of the {len(wanted)} requested, {len(mine)} present, "
          f"{len(errors)} with errors, {len(suspect)} with a suspect speed-up", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

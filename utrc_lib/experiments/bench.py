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

    python -m utrc_lib.bench --backend mamba_ssm --shapes mamba2-2.7b,mamba-2.8b \\
        --methods dense,slice,utrc,utrc_reference,evit,tome --cuts 0.1,0.2,0.3 --batch 16 \\
        --seq-len 2048 --out figures/03_efficiency/gpu_bench.json [--generate] [--repeats 5]

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

from ..core.config import ReductionConfig, config_from_args
from ..core.plan import TokenState
from ..core.reduce import ForwardReducer
from ..core.schedule import default_layers, keep_ratio_for_flops, token_layer_fraction
from ..core.shapes import SHAPES, shape_config
from ..environment import CACHE, ensure_writable, versions
from .timing import Stamp, median, peak_memory_gb, synchronize, time_ms, warm_up

# -- model shapes ---------------------------------------------------------------------------------
# SHAPES (imported above) is the one table of named shapes, `utrc_lib.core.shapes.SHAPES`: the
# paper's models (mamba2-2.7b, mamba2-1.3b, mamba-2.8b, mamba-1.4b) and tiny ones for CPU tests.
BACKENDS = ("mamba_ssm", "hf")
RECORD_KEY = ("kind", "model_shape", "backend", "device", "dtype", "batch", "seq_len", "method", "flops_cut", "align")
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

        from ..hosts.convert import mamba_ssm_to_hf_config

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

    def step(self, layer, hidden, residual, features=None, delta=None):
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
        def step(self, layer, hidden, residual, features=None, delta=None):
            if not self.wants(layer):
                return hidden, residual
            t = Stamp(hidden.device)
            out = super().step(layer, hidden, residual, features=features, delta=delta)
            t.stop()
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


def measure_generation(model, backend: str, ids: torch.Tensor, new_tokens: int, device, repeats: int = 1) -> dict:
    """Greedy generation of `new_tokens` tokens: prefill (first token) and decoding timed apart."""
    B, N = ids.shape

    def once(n_new: int) -> tuple[float, float]:
        with torch.inference_mode():
            if backend == "mamba_ssm":
                from mamba_ssm.utils.generation import InferenceParams

                params = InferenceParams(max_seqlen=N + n_new, max_batch_size=B)
                t = Stamp(device)
                logits = model(ids, inference_params=params, num_last_tokens=1).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
                t.stop()
                params.seqlen_offset += N
                d = Stamp(device)
                for _ in range(n_new - 1):
                    pos = torch.full((B, 1), params.seqlen_offset, dtype=torch.long, device=ids.device)
                    logits = model(tok, position_ids=pos, inference_params=params, num_last_tokens=1).logits
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                    params.seqlen_offset += 1
                d.stop()
                synchronize(device)
                return t.ms(), d.ms()
            # transformers: prefill timed alone, then generate() timed whole; decoding = the difference
            t = Stamp(device)
            model(ids, use_cache=True, logits_to_keep=1)
            t.stop()
            synchronize(device)
            g = Stamp(device)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                           min_new_tokens=n_new, do_sample=False)
            g.stop()
            synchronize(device)
            return t.ms(), max(g.ms() - t.ms(), 0.0)

    once(min(new_tokens, 3))  # warm-up (kernel compilation / autotuning)
    runs = [once(new_tokens) for _ in range(max(1, repeats))]
    pre, dec = median([r[0] for r in runs]), median([r[1] for r in runs])
    total_s = (pre + dec) / 1e3
    return dict(new_tokens=new_tokens, prefill_ms=pre, decode_ms=dec,
                decode_ms_per_token=dec / max(new_tokens - 1, 1),
                throughput_tok_s=B * new_tokens / total_s if total_s > 0 else None)


# -- one configuration ---------------------------------------------------------------------------

def method_config(method: str, keep_ratio: float, layers, align: int = 1) -> Optional[ReductionConfig]:
    """The ReductionConfig a bench method patches with (None = dense), built by `config_from_args`
    (causal: the method's own default)."""
    if method == "dense":
        return None
    if method == "slice":  # anchors and ratio only; the loop runs SliceReducer (no features captured)
        return config_from_args("random", keep_ratio=keep_ratio, layers=layers, align=align)
    return config_from_args(method, keep_ratio=keep_ratio, layers=layers, align=align)


@contextlib.contextmanager
def patched(model, backend: str, method: str, config: Optional[ReductionConfig], timer_log: Optional[list] = None):
    """Apply `config` to `model` (and the slice / timing reducer) for the block; yields the handle (None: dense)."""
    from ..hosts.handle import apply

    if config is None:
        yield None
        return
    cls = SliceReducer if method == "slice" else ForwardReducer
    if timer_log is not None:
        cls = timed_reducer(cls, timer_log)
    with apply(model, config) as handle, handle.options(reducer=cls):
        yield handle


def bench_prefill(model, backend: str, method: str, config, ids, device, repeats: int) -> dict:
    """prefill latency (last-token logits), peak memory (last-token / full logits), reduction time."""
    rec: dict = {}
    with patched(model, backend, method, config) as handle:
        run = prefill_fn(model, backend, ids, True)
        rec["warmup_ms"] = warm_up(run, device)   # this configuration's own warm-up, until it settles
        times = time_ms(run, device, repeats=repeats, warmup=0)
        rec["prefill_ms"] = median(times)
        rec["prefill_ms_all"] = times
        rec["peak_mem_gb_last_token"] = peak_memory_gb(prefill_fn(model, backend, ids, True), device)
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


def plan_runs(shape: str, methods, cuts, generate: bool, gen_methods, gen_cuts) -> list[tuple]:
    """[(kind, method, cut)] in run order: dense first, then each method at each cut, then generation."""
    runs = [("prefill", "dense", 0.0)] if "dense" in methods else []
    runs += [("prefill", m, c) for m in methods if m != "dense" for c in cuts]
    if generate:
        runs += [("generate", m, 0.0 if m == "dense" else c)
                 for m in gen_methods for c in (gen_cuts if m != "dense" else [0.0])]
        runs = list(dict.fromkeys(runs))
    return runs


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(*, backend: str, shapes, methods, cuts, batch: int, seq_len: int, repeats: int, align: int,
             generate: bool = False, gen_methods=(), gen_cuts=(), gen_batch=None, gen_prompt=None,
             new_tokens: int = 100, gen_repeats: int = 1, time_budget_s=None) -> None:
    """Check a bench request before any model is built; raises ValueError naming the field."""
    from ..core.methods import available_methods

    valid_methods = ["dense", "slice", *available_methods()]
    for m in list(methods) + list(gen_methods if generate else []):
        if m not in valid_methods:
            raise ValueError(f"unknown bench method {m!r}; valid: {', '.join(valid_methods)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    for shape in shapes:
        ssm_config(shape)
    if not list(shapes):
        raise ValueError("shapes: give at least one shape")
    if not list(methods):
        raise ValueError("methods: give at least one method")
    for name, values in (("cuts", cuts), ("gen_cuts", gen_cuts if generate else ())):
        for c in values:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= float(c) < 1.0:
                raise ValueError(f"{name}: every cut must be a number in [0, 1), got {c!r}")
    sizes = dict(batch=batch, seq_len=seq_len, repeats=repeats, align=align)
    if generate:
        sizes.update(new_tokens=new_tokens, gen_repeats=gen_repeats)
        sizes.update({k: v for k, v in (("gen_batch", gen_batch), ("gen_prompt", gen_prompt)) if v is not None})
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
              generate: bool = False, gen_methods=("dense", "utrc"), gen_cuts=(0.3,), gen_batch=None,
              gen_prompt=None, align: int = 1, **_) -> list[dict]:
    """The record keys (RECORD_KEY fields) a request asks for, in run order."""
    device, _, dtype_name = resolve_device(device, dtype)
    keys = []
    for shape in shapes:
        for kind, method, cut in plan_runs(shape, methods, cuts, generate, gen_methods, gen_cuts):
            b, n = (batch, seq_len) if kind == "prefill" else (gen_batch or batch, gen_prompt or seq_len)
            keys.append(dict(kind=kind, model_shape=shape, backend=backend, device=device.type, dtype=dtype_name,
                             batch=b, seq_len=n, method=method, flops_cut=float(cut), align=int(align)))
    return keys


def run_bench(*, backend: str, shapes, methods, cuts, batch: int, seq_len: int, out: Optional[str],
              repeats: int = 5, generate: bool = False, gen_methods=("dense", "utrc"), gen_cuts=(0.3,),
              gen_batch: Optional[int] = None, gen_prompt: Optional[int] = None, new_tokens: int = 100,
              gen_repeats: int = 1, device=None, dtype=None, time_budget_s: Optional[float] = None,
              progress: bool = True, log: Callable[[str], None] = print, align: int = 1) -> list[dict]:
    """Run every configuration not yet in `out`; returns all records (old and new).

    out: JSON file of records (None: keep them in memory only); checked for writability before the
        first model is built.
    align: ReductionConfig.align of every reduced run (kept counts rounded to multiples; slice too).
    Raises ValueError (naming the field) for a bad request, OSError for an unwritable `out`, before
    any work."""
    request = dict(backend=backend, shapes=list(shapes), methods=list(methods), cuts=list(cuts), batch=batch,
                   seq_len=seq_len, generate=generate, gen_methods=list(gen_methods), gen_cuts=list(gen_cuts),
                   gen_batch=gen_batch, gen_prompt=gen_prompt, align=align)
    validate(repeats=repeats, new_tokens=new_tokens, gen_repeats=gen_repeats, time_budget_s=time_budget_s,
             **request)
    device, dtype, dtype_name = resolve_device(device, dtype)
    records = load_records(out)
    done = {record_key(r) for r in records if "error" not in r}
    todo = [k for k in plan_keys(device=device, dtype=dtype, **request) if record_key(k) not in done]
    if out and todo:
        ensure_writable(out, "bench output (--out)", replace=True)
    common = dict(backend=backend, device=device.type, dtype=dtype_name, versions=versions(),
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    t_start = time.time()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), disable=not progress, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    model = model_shape_name = None
    try:
        for key in todo:
            if time_budget_s is not None and time.time() - t_start > time_budget_s:
                log(f"[bench] time budget {time_budget_s:.0f}s spent: {len(todo) - todo.index(key)} configuration(s) skipped")
                break
            shape, method, cut = key["model_shape"], key["method"], key["flops_cut"]
            t0 = time.time()
            rec = dict(key, **common, repeats=repeats if key["kind"] == "prefill" else gen_repeats,
                       timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            try:
                if model_shape_name != shape:
                    model = None
                    _free(device)
                    tb = time.time()
                    model = build_model(shape, backend, device, dtype)
                    model_shape_name = shape
                    log(f"[bench] built {shape} ({backend}, {dtype_name}) in {time.time() - tb:.1f}s")
                L = len(model.backbone.layers)
                layers = default_layers(L)
                keep = keep_ratio_for_flops(cut, L, layers) if cut > 0 else 1.0
                rec.update(num_layers=L, anchors=list(layers), keep_ratio=keep,
                           token_layer_fraction=token_layer_fraction(L, layers, keep, key["seq_len"], align))
                rec["model_mem_gb"] = (torch.cuda.memory_allocated(device) / 1e9) if device.type == "cuda" else None
                gen = torch.Generator().manual_seed(0)
                vocab = model.backbone.embedding.num_embeddings if backend == "mamba_ssm" \
                    else model.backbone.embeddings.num_embeddings
                ids = torch.randint(0, vocab, (key["batch"], key["seq_len"]), generator=gen).to(device)
                config = method_config(method, keep, layers, align)
                if key["kind"] == "prefill":
                    rec.update(bench_prefill(model, backend, method, config, ids, device, repeats))
                else:
                    with patched(model, backend, method, config):
                        rec["generation"] = measure_generation(model, backend, ids, new_tokens, device, gen_repeats)
                    rec["prefill_ms"] = rec["generation"]["prefill_ms"]
                    dense = rec if method == "dense" else _find(records, dict(key, method="dense", flops_cut=0.0))
                    if dense and dense.get("generation"):
                        rec["speedup_vs_dense"] = dense["prefill_ms"] / rec["prefill_ms"]
                        rec["throughput_speedup_vs_dense"] = (rec["generation"]["throughput_tok_s"]
                                                              / dense["generation"]["throughput_tok_s"])
                        flag_speedup(rec)
            except Exception as e:  # record the failure, keep going
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc()[-4000:]
                if isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA" in str(e):
                    model, model_shape_name = None, None  # rebuild after a CUDA failure
                _free(device)
            rec["elapsed_s"] = time.time() - t0
            records = [r for r in records if record_key(r) != record_key(rec)] + [rec]
            for r in records:  # a dense / slice record that ran later completes earlier comparisons
                derive_fields(records, r)
            save_records(out, records)
            log(_summary(rec))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model = None
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
    head = f"[bench] {rec['kind']:8s} {rec['model_shape']} {rec['method']:14s} cut={rec['flops_cut']:.2f}"
    if "error" in rec:
        return f"{head} ERROR {rec['error'][:300]} ({rec['elapsed_s']:.1f}s)"
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
    if rec.get("generation"):
        g = rec["generation"]
        parts.append(f"decode {g['decode_ms_per_token']:.2f} ms/tok, {g['throughput_tok_s']:.0f} tok/s")
    return f"{head} " + ", ".join(parts) + f" ({rec['elapsed_s']:.1f}s)"


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


def _names(valid) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = _csv(text)
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; valid: {', '.join(valid)}" if bad
                                             else "give at least one name")
        return names
    return parse


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m utrc_lib.bench` (every size and cut checked while parsing)."""
    from ..core.methods import available_methods

    methods = ["dense", "slice", *available_methods()]
    ap = argparse.ArgumentParser(prog="python -m utrc_lib.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=BACKENDS, default="mamba_ssm",
                    help="host library of the random-weight model (default mamba_ssm; hf = transformers)")
    ap.add_argument("--shapes", type=_names(list(SHAPES)), default="mamba2-2.7b,mamba-2.8b",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--methods", type=_names(methods), default="dense,slice,utrc,utrc_reference,evit,tome",
                    help=f"comma list of {', '.join(methods)}")
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
    ap.add_argument("--generate", action="store_true", help="also time generation (prefill and decoding apart)")
    ap.add_argument("--gen-methods", type=_names(methods), default="dense,utrc",
                    help="methods timed for generation (default dense,utrc)")
    ap.add_argument("--gen-cuts", type=_cut_list, default="0.3",
                    help="token-layer cuts timed for generation (default 0.3)")
    ap.add_argument("--gen-batch", type=_positive_int, default=16,
                    help="prompts per generation run (default 16)")
    ap.add_argument("--gen-prompt", type=_positive_int, default=2048,
                    help="prompt tokens of a generation run (default 2048)")
    ap.add_argument("--new-tokens", type=_positive_int, default=100,
                    help="tokens generated after the prompt (default 100)")
    ap.add_argument("--gen-repeats", type=_positive_int, default=1,
                    help="timed generation runs per configuration (default 1)")
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


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    try:
        ensure_writable(a.out, "--out", replace=True)
    except OSError as exc:
        ap.error(str(exc))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    request = dict(backend=a.backend, shapes=a.shapes, methods=a.methods, cuts=a.cuts, batch=a.batch,
                   seq_len=a.seq_len, generate=a.generate, gen_methods=a.gen_methods, gen_cuts=a.gen_cuts,
                   gen_batch=a.gen_batch, gen_prompt=a.gen_prompt, device=a.device,
                   dtype=getattr(torch, a.dtype) if a.dtype else None, align=a.align)
    try:
        records = run_bench(out=a.out, repeats=a.repeats, new_tokens=a.new_tokens, gen_repeats=a.gen_repeats,
                            time_budget_s=a.time_budget_s, progress=not a.no_progress,
                            log=lambda s: print(s, flush=True), **request)
    except ValueError as exc:
        ap.error(str(exc))
    wanted = {record_key(k) for k in plan_keys(**request)}
    mine = [r for r in records if record_key(r) in wanted]
    errors = [r for r in mine if "error" in r]
    suspect = [r for r in mine if r.get("speedup_suspect")]
    print(f"[bench] {len(records)} record(s) in {a.out}; of the {len(wanted)} requested, {len(mine)} present, "
          f"{len(errors)} with errors, {len(suspect)} with a suspect speed-up", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

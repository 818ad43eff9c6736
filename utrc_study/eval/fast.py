"""Fast path of the built-in evaluator: the same per-request outcomes as `scorer.score_tokens`, built
for a GPU (issue 27, "make the GPU evaluator fast first").

What is different from `scorer.score_tokens` (the "classic" path), and why the outcomes stay the same:
  * batches by token budget, not by a fixed row count: requests are sorted by input length (longest
    first, ties by index, as the classic path) and cut into batches of at most `max_tokens` padded
    tokens and `max_rows` rows, starting a new batch when a row would be padded by more than
    `pad_tolerance` of the batch length (`plan_batches`). Results return in the original order. Rows
    are left-padded with an attention mask, so a row's numbers do not depend on its batch (the classic
    path's own contract; `tests/test_fast_eval.py` checks it against the classic path);
  * the LM head runs on the scored tail only (`logits_to_keep` / mamba-ssm `num_last_tokens` = the
    batch's longest continuation): the rows before it are never read;
  * no host sync in the scoring path: every index tensor (ids, mask, targets, protected tails,
    reference rows) is built on the host from host-known lengths and copied once per batch
    (pinned, non-blocking); log-likelihood, greedy, KL, top-1 and the achieved cut of every batch are
    written into device buffers, read back once at the end. The dense reference for KL / top-1 is one
    packed (positions, V) float32 tensor kept on the model's device (`FastReference`), gathered by
    index, instead of per-row CPU tensors copied row by row. The syncs left are inside the reduction
    engine (`core/methods.py`, `core/plan.py`, a few per anchor; see `sync_report`), untouched here;
  * a request the engine refuses as too short (`SequenceTooShort`) is handled as in the classic path
    (batch split in halves, a refused single request scored dense and counted in `dense_fallback`);
    requests predicted to be refused (first anchor asks for removals from fewer than 2 reducible
    tokens; `_predict_short`) get their own batches, so a large batch is not split for them;
  * backends: transformers Mamba / Mamba-2 (any device, fp32; padding through the attention mask) and
    mamba-ssm's `MambaLMHeadModel` (`mamba_ssm_model` converts a transformers model; CUDA, fp32 or
    bf16 / fp16). mamba-ssm has no attention mask, so its batches hold requests of EXACTLY one input
    length (no padding at all); that is exact, only the batches are smaller.
The shared context of a multiple-choice item is still computed once per choice: under reduction a
choice's context is reduced with a budget that depends on the whole length (context + that choice), so
sharing it would change the outcome; dense-only sharing through a cached state is left for later.

API:
    score_tokens_fast(model, token_requests, config=None, *, max_tokens=None, max_rows=None,
                      pad_tolerance=0.25, max_length=1024, pad_token_id=0, protect=True,
                      details=False, reference=None, keep_reference=False, reference_budget=None,
                      fast=True, autocast=None) -> scoring.TokenScores
    dense_reference_fast(model, token_requests, ...) -> FastReference
    evaluate_fast(model, tokenizer, tasks, config=None, *, limit=None, items=False, ...) -> dict
        (scorer.evaluate's result structure; meta["engine"] = "fast")
    plan_batches(lengths, *, max_tokens, max_rows, pad_tolerance=0.25, exact=False) -> [[index]]
    mamba_ssm_model(hf_model, *, dtype=torch.float32, device="cuda") -> MambaLMHeadModel
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import types
from typing import Optional, Sequence

import torch

from utrc_lib.core.config import ReductionConfig
from utrc_lib.core.methods import SequenceTooShort
from utrc_lib import scoring
from utrc_lib.scoring import RequestDetail, TokenScores

from . import scorer

# defaults by device: a GPU wants large batches (launch overhead), a CPU gains little beyond ~4k tokens
DEFAULT_MAX_TOKENS = {"cuda": 1 << 16, "cpu": 4096}
DEFAULT_MAX_ROWS = {"cuda": 1024, "cpu": 64}
# (rows x longest continuation) positions of one batch's logits: bounds the (B, m, V) float32 tensors
DEFAULT_MAX_SCORED = {"cuda": 1 << 15, "cpu": 1 << 12}
# a stored reference kept on a CUDA device may take this much device memory
DEVICE_REFERENCE_BUDGET_BYTES = scoring._env_bytes("UTRC_DEVICE_REFERENCE_BUDGET_BYTES", 16 << 30)


# -- batching -------------------------------------------------------------------------------------------
def plan_batches(lengths: Sequence[int], *, max_tokens: int, max_rows: int, pad_tolerance: float = 0.25,
                 exact: bool = False, cont_lengths: Optional[Sequence[int]] = None,
                 max_scored: Optional[int] = None) -> list[list[int]]:
    """Indices of `lengths` grouped into batches: sorted by length (longest first, ties by index), a
    batch closed when one more row would exceed `max_tokens` padded tokens (rows x its longest
    length), `max_rows` rows, `max_scored` (rows x longest of `cont_lengths`), or when the next
    length is shorter than (1 - pad_tolerance) x the batch's longest (exact=True: any other length).
    A single row longer than `max_tokens` gets a batch of its own."""
    if max_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_tokens and max_rows must be >= 1, got {max_tokens}, {max_rows}")
    if not 0.0 <= pad_tolerance < 1.0:
        raise ValueError(f"pad_tolerance must be in [0, 1), got {pad_tolerance}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    top = m = 0
    for i in order:
        n = int(lengths[i])
        c = int(cont_lengths[i]) if cont_lengths is not None else 0
        if cur:
            m2 = max(m, c)
            fits = ((len(cur) + 1) * top <= max_tokens and len(cur) < max_rows
                    and (max_scored is None or (len(cur) + 1) * m2 <= max_scored)
                    and (n == top if exact else n >= (1.0 - pad_tolerance) * top))
            if fits:
                cur.append(i)
                m = m2
                continue
            batches.append(cur)
        cur, top, m = [i], n, c
    if cur:
        batches.append(cur)
    return batches


def left_pad(seqs: Sequence[Sequence[int]], pad: int, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, W) long, mask (B, W) bool): each sequence right-aligned in a row of width W (default
    the longest), `pad` before it. Vectorised (one scatter); `left_pad_simple` is the loop twin."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    W = int(lens.max()) if width is None else int(width)
    if bool((lens > W).any()):
        raise ValueError(f"a sequence is longer than width {W}")
    B = len(seqs)
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(B), lens)
    starts = torch.cumsum(lens, 0) - lens
    col = (W - lens)[row] + torch.arange(flat.numel()) - starts[row]
    ids = torch.full((B, W), pad, dtype=torch.long)
    mask = torch.zeros((B, W), dtype=torch.bool)
    ids[row, col] = flat
    mask[row, col] = True
    return ids, mask


def left_pad_simple(seqs, pad: int, width: Optional[int] = None):
    """Row-by-row twin of `left_pad`."""
    W = max(len(s) for s in seqs) if width is None else int(width)
    ids = torch.full((len(seqs), W), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), W), dtype=torch.bool)
    for b, s in enumerate(seqs):
        if s:
            ids[b, W - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[b, W - len(s):] = True
    return ids, mask


# -- scoring of one batch's tail logits -------------------------------------------------------------------
def score_tail(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               dense: Optional[torch.Tensor] = None):
    """Batched scoring of the last m positions.

    logits (B, m, V) at the scored tail (row b's continuation fills its last n_b slots, `valid` marks
    them; other slots may hold anything, NaN included); target (B, m) long; dense (B, m, V) float32
    dense log-softmax at the same slots (invalid slots: anything finite) or None.
    Returns (ll (B,) float64, greedy (B,) bool, kl (B,) float64 or None, top1 (B,) long or None,
    logp (B, m, V) float32). Device-only (no sync). `scoring._score_rows_simple` is the row-by-row twin.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(tok)
    ll = torch.where(valid, tok, zero).double().sum(1)
    argmax = logp.argmax(-1)
    greedy = ((argmax == target) | ~valid).all(1)
    kl = top1 = None
    if dense is not None:
        p = dense.exp()
        kl_tok = torch.where(p > 0, p * (dense - logp), torch.zeros_like(dense)).sum(-1)
        kl = torch.where(valid, kl_tok, zero).double().sum(1)
        top1 = ((dense.argmax(-1) == argmax) & valid).sum(1)
    return ll, greedy, kl, top1, logp


# -- reference ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FastReference:
    """Dense log-softmax at every request's scored positions, packed: rows offsets[i]:offsets[i+1] of
    `logp` (P, V) float32 are request i's continuation positions (on the model's device when it fits
    the budget). `logp` None = the recompute form (a dense forward of each batch beside the reduced
    one). `signature`: the requests, max_length and pad id (batching does not enter: rows do not
    depend on their batch)."""

    signature: tuple
    offsets: Optional[torch.Tensor] = None
    logp: Optional[torch.Tensor] = None
    nbytes: int = 0

    @property
    def stored(self) -> bool:
        return self.logp is not None


def fast_signature(token_requests, max_length: int, pad_token_id: int) -> tuple:
    h = hash(tuple((tuple(c), tuple(x)) for c, x in token_requests))
    return ("fast", len(token_requests), h, int(max_length), int(pad_token_id))


# -- backends ----------------------------------------------------------------------------------------------
def _is_mamba_ssm(model) -> bool:
    return type(model).__name__ == "MambaLMHeadModel"


def _vocab(model) -> Optional[int]:
    if _is_mamba_ssm(model):
        return getattr(model, "_utrc_vocab", None)
    return scoring._vocab_size(model)


def mamba_ssm_model(hf_model, *, dtype=torch.float32, device="cuda"):
    """mamba-ssm `MambaLMHeadModel` with the weights of a transformers Mamba / Mamba-2 model
    (`hosts.convert`), in eval mode, on `device`, in `dtype`. Mamba-2 runs without mamba-ssm's Mamba-1
    CUDA extension (a stand-in that fails on use is registered when it is absent) and, when
    causal-conv1d is absent, with `use_mem_eff_path=False` (torch conv1d + the Triton SSD scan).
    The logits are sliced back to the transformers vocabulary (mamba-ssm may pad it)."""
    import importlib.util
    import sys

    from utrc_lib.hosts.convert import hf_to_mamba_ssm_state_dict

    arch, cfg, sd = hf_to_mamba_ssm_state_dict(hf_model.state_dict(), hf_model.config)
    if importlib.util.find_spec("selective_scan_cuda") is None and "selective_scan_cuda" not in sys.modules:
        if arch != "mamba2":
            raise RuntimeError("mamba-ssm's Mamba-1 needs its CUDA extension selective_scan_cuda, which is not "
                               "importable here")
        stub = types.ModuleType("selective_scan_cuda")

        def _missing(*_a, **_k):
            raise RuntimeError("selective_scan_cuda (Mamba-1 kernel) is not installed in this run")
        stub.fwd = stub.bwd = _missing
        sys.modules["selective_scan_cuda"] = stub
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    if arch == "mamba2" and importlib.util.find_spec("causal_conv1d") is None:
        cfg["ssm_cfg"]["use_mem_eff_path"] = False
    model = MambaLMHeadModel(MambaConfig(**cfg), device=device, dtype=torch.float32)
    own = model.state_dict()
    for k, t in sd.items():
        if k in own and own[k].shape != t.shape:   # padded vocabulary: copy the real rows
            pad = own[k].clone()
            pad[: t.shape[0]] = t
            sd[k] = pad
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]   # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"mamba_ssm_model: converted weights do not fit MambaLMHeadModel (missing {missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model = model.to(dtype).eval()
    model._utrc_vocab = int(hf_model.config.vocab_size)
    return model


def _device_kind(model) -> str:
    return "cuda" if scoring._model_device(model).type == "cuda" else "cpu"


def _predict_short(config: ReductionConfig, schedule, n: int, protect: int) -> bool:
    """True when the engine would refuse an n-token input with a protected tail of `protect` tokens
    as too short at its first anchor (removals asked from < 2 reducible tokens); the same rule as
    `ForwardReducer` (exceptions still go through the split fallback, so a wrong guess costs time only)."""
    from utrc_lib.core.config import tokens_to_remove
    from utrc_lib.hosts.handle import ForwardReducer

    try:
        r = ForwardReducer(config, schedule, torch.ones(1, n, dtype=torch.bool),
                           protect_last=torch.tensor([protect]))
        if not r.active:
            return False
        layer = sorted(r.layers)[0]
        if r.absolute:
            rm = r._absolute_r(layer)
        else:
            rm = tokens_to_remove(r.state.valid, schedule.ratio(layer), schedule.align)
        return bool(rm[0] > 0) and int(r.state.reducible.sum()) < 2
    except Exception:   # pragma: no cover - a method the rule does not know: let the engine decide
        return False


# -- the scoring loop --------------------------------------------------------------------------------------
def score_tokens_fast(model, token_requests, config: Optional[ReductionConfig] = None, *,
                      max_tokens: Optional[int] = None, max_rows: Optional[int] = None,
                      max_scored: Optional[int] = None, pad_tolerance: float = 0.25, max_length: int = 1024,
                      pad_token_id: int = 0, protect: bool = True, details: bool = False,
                      reference: Optional[FastReference] = None, keep_reference: bool = False,
                      reference_budget: Optional[int] = None, fast: bool = True, autocast=None,
                      progress: bool = False, desc: str = "loglikelihood") -> TokenScores:
    """`scorer.score_tokens` on the fast path (module doc): same arguments where they exist, same
    TokenScores (with `reference` a FastReference). `autocast`: a dtype (torch.bfloat16 /
    torch.float16) to run the forward under CUDA autocast, None for none."""
    from utrc_lib.hosts.handle import ensure_unpatched

    ensure_unpatched(model, "utrc_study.eval.fast.score_tokens_fast")
    if keep_reference and config is not None:
        raise ValueError("keep_reference=True needs a dense call (config=None)")
    kind = _device_kind(model)
    device = scoring._model_device(model)
    max_tokens = DEFAULT_MAX_TOKENS[kind] if max_tokens is None else int(max_tokens)
    max_rows = DEFAULT_MAX_ROWS[kind] if max_rows is None else int(max_rows)
    max_scored = DEFAULT_MAX_SCORED[kind] if max_scored is None else int(max_scored)
    ssm = _is_mamba_ssm(model)
    prepared = scoring._prepare(token_requests, max_length)
    R = len(prepared)
    sig = fast_signature(token_requests, max_length, pad_token_id) if reference is not None or keep_reference else None
    if reference is not None:
        if not isinstance(reference, FastReference):
            raise TypeError(f"reference must be a FastReference (dense_reference_fast), got {type(reference).__name__}")
        if reference.signature != sig:
            raise ValueError("reference was computed for other requests / max_length / pad id than this call")
        details = True
    ins = [p[1] for p in prepared]
    conts = [p[2] for p in prepared]
    lens = [len(x) for x in ins]
    ncont = [len(c) for c in conts]
    offsets = torch.zeros(R + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(ncont, dtype=torch.long), 0) if R else offsets[1:]
    P = int(offsets[-1])

    # batches: predicted-short requests alone (they end dense), the rest by length
    patch_cfg = config
    short: set = set()
    if config is not None and protect and config.active:
        from utrc_lib.hosts.handle import num_layers

        unprotected = config.replace(protect_last=0, protect_from=None)
        sched = unprotected.resolve(num_layers(model))
        cache: dict = {}
        for i in range(R):
            key = (lens[i], ncont[i])
            if key not in cache:
                cache[key] = _predict_short(unprotected, sched, *key)
            if cache[key]:
                short.add(i)
    rest = [i for i in range(R) if i not in short]
    plan = plan_batches([lens[i] for i in rest], max_tokens=max_tokens, max_rows=max_rows,
                        pad_tolerance=pad_tolerance, exact=ssm, cont_lengths=[ncont[i] for i in rest],
                        max_scored=max_scored)
    batches = [[rest[j] for j in b] for b in plan] + [[i] for i in sorted(short)]

    # device buffers (read back once)
    buf_ll = torch.zeros(R, dtype=torch.float64, device=device)
    buf_greedy = torch.zeros(R, dtype=torch.bool, device=device)
    buf_kl = torch.zeros(R, dtype=torch.float64, device=device)
    buf_top1 = torch.zeros(R, dtype=torch.long, device=device)
    buf_cut = torch.zeros(R, dtype=torch.float64, device=device)
    want_kl = reference is not None
    stored_ref = reference.logp if reference is not None and reference.stored else None
    if stored_ref is not None and stored_ref.device != device:
        stored_ref = stored_ref.to(device)
    keep = None
    if keep_reference:
        V = _vocab(model)
        budget = (reference_budget if reference_budget is not None else
                  (DEVICE_REFERENCE_BUDGET_BYTES if kind == "cuda" else scoring.REFERENCE_BUDGET_BYTES))
        if V is not None and P * V * 4 <= budget:
            keep = torch.empty((P + 1, V), dtype=torch.float32, device=device)   # last row: dump slot
    pin = kind == "cuda"

    def to_dev(t):
        return t.pin_memory().to(device, non_blocking=True) if pin else t

    def forward(handle, rows, m, prot):
        ids, mask = left_pad([ins[i] for i in rows], pad_token_id)
        padded = not bool(mask.all())
        if ssm and padded:   # pragma: no cover - plan_batches(exact=True) never pads
            raise RuntimeError("mamba-ssm batches must not be padded")
        ids = to_dev(ids)
        ctx = (torch.autocast("cuda", dtype=autocast) if autocast is not None and kind == "cuda"
               else contextlib.nullcontext())
        opts = (handle.options(protect_last=prot) if handle is not None and protect else contextlib.nullcontext())
        with ctx, opts, torch.inference_mode():
            if ssm:
                out = model(ids, num_last_tokens=m)
            else:
                out = model(input_ids=ids, attention_mask=to_dev(mask.long()) if padded else None,
                            use_cache=False, logits_to_keep=m)
        logits = out.logits if hasattr(out, "logits") else out[0]
        V = _vocab(model)
        if V is not None and logits.shape[-1] != V:
            logits = logits[..., :V]
        if logits.shape[1] != m:
            raise RuntimeError(f"model returned {logits.shape[1]} logit positions, expected the last {m}")
        return logits

    def tail_index(rows, m):
        """(target (B, m), valid (B, m), packed row of each slot (B, m), P = dump) on the host."""
        target, valid = left_pad([conts[i] for i in rows], 0, m)
        n = torch.tensor([ncont[i] for i in rows], dtype=torch.long)
        start = offsets[torch.tensor(rows, dtype=torch.long)]
        slot = torch.arange(m)[None, :] - (m - n)[:, None]
        packed = torch.where(valid, start[:, None] + slot, torch.full_like(slot, P))
        return target, valid, packed

    def run(patch, rows):
        """Score `rows` reduced (or dense), the classic path's split-on-SequenceTooShort rule."""
        m = max(ncont[i] for i in rows)
        target, valid, packed = tail_index(rows, m)
        idx = torch.tensor(rows, dtype=torch.long)
        prot = to_dev(torch.tensor([ncont[i] for i in rows], dtype=torch.long))
        target_d, valid_d, packed_d, idx_d = to_dev(target), to_dev(valid), to_dev(packed), to_dev(idx)
        dense_rows = None
        if want_kl:
            if stored_ref is not None:
                dense_rows = stored_ref[packed_d.clamp_max(stored_ref.shape[0] - 1)]
            else:   # recompute form: the dense forward of this very batch
                patch.remove()
                dense_rows = torch.log_softmax(forward(None, rows, m, prot).float(), -1)
        handle = patch.handle()
        try:
            logits = forward(handle, rows, m, prot)
        except SequenceTooShort:
            if len(rows) == 1:
                patch.remove()
                patch.dense.add(rows[0])
                logits = forward(None, rows, m, prot)
                handle = None
            else:
                half = len(rows) // 2
                run(patch, rows[:half])
                run(patch, rows[half:])
                return
        ll, greedy, kl, top1, logp = score_tail(logits, target_d, valid_d, dense_rows)
        buf_ll.index_copy_(0, idx_d, ll)
        buf_greedy.index_copy_(0, idx_d, greedy)
        if kl is not None:
            buf_kl.index_copy_(0, idx_d, kl)
            buf_top1.index_copy_(0, idx_d, top1)
        if handle is not None:
            red = handle.last_reducer
            if red is not None:
                buf_cut.index_copy_(0, idx_d, red.achieved_cut().to(device, torch.float64))
        if keep is not None:
            keep.index_copy_(0, packed_d.reshape(-1), logp.reshape(-1, logp.shape[-1]))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=R, desc=desc, unit="req", leave=False)
    fast_ctx = scoring._speed(model, fast) if not ssm else contextlib.nullcontext()
    try:
        with scoring._Patch(model, patch_cfg, protect) as patch, fast_ctx:
            for rows in batches:
                run(patch, rows)
                if bar is not None:
                    bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    host = torch.stack([buf_ll, buf_greedy.double(), buf_kl, buf_top1.double(), buf_cut]).cpu().tolist()
    results = [(float(host[0][i]), bool(host[1][i])) for i in range(R)]
    detail_list = None
    if details:
        detail_list = []
        for i in range(R):
            if want_kl:
                kl, top1 = float(host[2][i]), int(host[3][i])
            elif config is None:   # a dense call is its own reference
                kl, top1 = 0.0, ncont[i]
            else:
                kl = top1 = None
            detail_list.append(RequestDetail(ll=results[i][0], tokens=ncont[i], greedy=results[i][1], kl=kl, top1=top1))
    ref_out = None
    if keep_reference:
        if keep is not None:
            ref_out = FastReference(sig, offsets, keep[:P], P * keep.shape[1] * 4)
        else:
            ref_out = FastReference(sig)
    cuts = [0.0 if (config is None or i in patch.dense) else float(host[4][i]) for i in range(R)]
    return TokenScores(results=results, dense_fallback=len(patch.dense), achieved_cut=cuts,
                       details=detail_list, reference=ref_out)


def dense_reference_fast(model, token_requests, *, max_length: int = 1024, pad_token_id: int = 0,
                         budget_bytes: Optional[int] = None, **kw) -> FastReference:
    """The FastReference of `token_requests`: one dense fast pass with its log-softmax at the scored
    positions kept (stored form) when it fits `budget_bytes`, else the recompute form."""
    return score_tokens_fast(model, token_requests, None, max_length=max_length, pad_token_id=pad_token_id,
                             keep_reference=True, reference_budget=budget_bytes, **kw).reference


def evaluate_fast(model, tokenizer, tasks: Sequence[str] = scorer.DEFAULT_TASKS,
                  config: Optional[ReductionConfig] = None, *, limit: Optional[int] = None,
                  max_length: int = 1024, protect: bool = True, items: bool = False,
                  reference: Optional[dict] = None, progress: bool = False, hf_model=None, **kw) -> dict:
    """`scorer.evaluate` on the fast path: the same result structure ({task: metrics}, "items" with
    items=True, "meta" with "engine": "fast" and the batching). `reference`: {task: FastReference}
    from an earlier dense call (`evaluate_fast(..., items=True)["references"]`); with items=True and
    a config and none given, the dense reference is computed here. `hf_model`: the transformers model
    `model` was converted from (metadata only, for a mamba-ssm `model`). Other keywords go to
    `score_tokens_fast` (max_tokens, max_rows, pad_tolerance, autocast, fast)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    was_training = model.training
    model.eval()
    results: dict = {}
    refs: dict = {}
    pad = scoring.pad_id(tokenizer)
    try:
        for task in tasks:
            t0 = time.perf_counter()
            toks, extra = scorer._task_requests(tokenizer, task, limit)
            longest = max((len(c) + len(x) - 1 for c, x in toks), default=0)
            if longest > max_length:
                raise ValueError(f"task {task!r}: a request has {longest} input tokens > max_length={max_length}")
            call = dict(max_length=max_length, pad_token_id=pad, protect=protect, progress=progress, desc=task, **kw)
            if items and config is None:
                call.update(details=True, keep_reference=True)
            elif items:
                ref = (reference or {}).get(task)
                if ref is None:
                    ref = dense_reference_fast(model, toks, max_length=max_length, pad_token_id=pad, **kw)
                call.update(reference=ref)
            scores = score_tokens_fast(model, toks, config, **call)
            if items and scores.reference is not None:
                refs[task] = scores.reference
            scorer.task_result(results, task, extra, toks, scores, items=items, reduced=config is not None, t0=t0)
    finally:
        model.train(was_training)
    meta_model = hf_model if hf_model is not None else model
    try:
        meta = scoring.run_metadata(meta_model, config, max_length=max_length, batch_size=0, limit=limit,
                                   protect=protect)
    except Exception as e:   # pragma: no cover - metadata only
        meta = {"metadata_error": repr(e)}
    meta.update(engine="fast", backend="mamba_ssm" if _is_mamba_ssm(model) else "transformers",
                batching={k: kw.get(k) for k in ("max_tokens", "max_rows", "pad_tolerance", "autocast")})
    meta["batching"]["autocast"] = str(meta["batching"]["autocast"])
    results["meta"] = meta
    if refs:
        results["references"] = refs
    return results

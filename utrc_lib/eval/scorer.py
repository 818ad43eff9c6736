"""Built-in fast evaluator (no lm-eval): log-likelihood scoring with token reduction, per request.

Scoring follows lm-eval 0.4's conventions, so the numbers are comparable with the lm-eval adapter
(`utrc_lib.eval`):
    * a request is (context, continuation); trailing whitespace of the context moves to the
      continuation; context+continuation is tokenised whole, and the continuation tokens are what
      follows the tokens of the context alone; no BOS is added (an empty context becomes the EOS
      token);
    * the model input is all tokens but the last (kept to the last `max_length`), and the
      continuation's log-probs are read at the last len(continuation) positions, aligned by
      ORIGINAL position (the patched model returns full-length logits);
    * the reduction protects each request's own scored tail: requests are sorted by length
      (longest first) and batched, and every row of a batch runs with protect_last = its own number
      of continuation tokens (per-sample protect_last), so the positions whose logits are scored
      are never removed or merged and never see later tokens; rows are LEFT-padded with an
      attention mask, so results do not depend on batch size or batch composition;
    * a request whose context is too short to reduce (the engine raises `SequenceTooShort`) is
      scored dense, alone; how many were is returned with the results (`TokenScores.dense_fallback`,
      `evaluate()`'s per-task "dense_fallback");
    * acc_norm divides the log-likelihood by the ending's character length (lm-eval:
      `len(choice)`, the choice without the leading delimiter);
    * cloze ppl = exp(-mean over items of the target's log-likelihood) (lm-eval's lambada
      "perplexity"); ppl task: token perplexity exp(-sum loglik / sum tokens) of the 64 scored tokens
      of each 256-token window given its first 192.

Item level (opt-in, the aggregates are the same numbers with it): `evaluate(items=True)` also
returns per-item arrays (correct, gold log-likelihood, KL(dense || reduced) and top-1 agreement with
the dense model at the scored positions; `_item_outcomes`). The dense reference is this scorer's own
dense pass (unpatched model, same sorted batches and padding), cached in memory per (model,
tokenizer, task, limit, batch_size, max_length): stored as float32 log-softmax at the scored positions
when that fits REFERENCE_BUDGET_BYTES (1 GiB; environment UTRC_REFERENCE_BUDGET_BYTES), else recomputed as a dense forward of each batch
beside the reduced one (exact either way; `DenseReference`). `utrc_lib.experiments.stats` turns the
arrays into paired intervals and tests.

API:
    evaluate(model, tokenizer, tasks=("cloze", "choice4", "choice2", "ppl"), config=None, *,
             limit=None, batch_size=16, progress=True, max_length=1024, protect=True,
             items=False) -> dict
    score_tokens(model, token_requests, config=None, batch_size=16, *, max_length=1024,
                 pad_token_id=0, progress=False, protect=True, details=False, reference=None,
                 keep_reference=False) -> TokenScores(results, dense_fallback, achieved_cut, details,
                                                      reference)
    dense_reference(model, token_requests, batch_size=16, *, max_length=1024, pad_token_id=0,
                    budget_bytes=None) -> DenseReference
    clear_reference_cache()
    loglikelihood_tokens(...same arguments...) -> list[(loglik, is_greedy)]   (= score_tokens(...).results)
    loglikelihood(model, tokenizer, requests, config=None, batch_size=16, *, max_length=1024,
                  progress=False, protect=True) -> list[(loglik, is_greedy)]
    encode(tokenizer, text), encode_pair(tokenizer, context, continuation) -> (ctx ids, cont ids)
    eos_id(tokenizer), pad_id(tokenizer)
    run_metadata(model, config, *, max_length, batch_size, limit, protect=True) -> dict
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import time
import weakref
from typing import Iterable, Optional, Sequence

import torch

from ..core.config import ReductionConfig
from ..core.reduce import SequenceTooShort
from .suite import available_tasks, load_task, task_kind

DEFAULT_TASKS = ("cloze", "choice4", "choice2", "ppl")
# what run_metadata()["protect"] says for protect=True / False
PROTECT_NOTE = {True: "continuation (protect_last = continuation tokens, per request)",
                False: "none (unprotected: the last n rows of the shortened sequence are scored, as the "
                       "authors' code does; scored positions may be removed / merged)"}


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """What one `score_tokens` call returns.

    results: (sum log p(continuation | context), continuation is the greedy decode) per request, in
        input order.
    dense_fallback: how many of those requests were scored dense because their context was too
        short to reduce (the engine raised `SequenceTooShort` for them); 0 without a config.
    achieved_cut: per request, the token-layer cut its forward actually reached
        (`ForwardReducer.achieved_cut()`; 0 when scored dense). Short inputs, protected tails and
        kept-count rounding put it below the nominal cut of the config.
    """

    results: list
    dense_fallback: int = 0
    achieved_cut: list = dataclasses.field(default_factory=list)  # per request: token-layer cut reached
    details: Optional[list] = None   # per request RequestDetail (score_tokens(details=True))
    reference: Optional["DenseReference"] = None   # score_tokens(keep_reference=True), dense calls only


@dataclasses.dataclass(frozen=True)
class RequestDetail:
    """Item-level outcome of one request (`score_tokens(details=True)`).

    ll: sum log p(continuation | context) (= results[i][0]); tokens: scored positions (continuation
    tokens); greedy: every continuation token is the argmax (= results[i][1]).
    kl: sum over the scored positions of KL(dense || scored model), in nats, at float32; top1: how
    many scored positions have the same argmax as the dense model. Both are None when there is
    nothing to compare with (a reduced call without `reference`); a dense call without a reference
    is its own reference (kl 0, top1 = tokens).
    """

    ll: float
    tokens: int
    greedy: bool
    kl: Optional[float] = None
    top1: Optional[int] = None


@dataclasses.dataclass
class DenseReference:
    """What fidelity needs from the dense model for one request list: its log-softmax at each
    request's scored positions, computed by the same scorer (unpatched model, same sorted batches,
    same left padding), so KL and top-1 agreement compare like with like.

    Two forms with the same numbers (the dense forward of a batch is the same computation either way):
        stored    `logp[i]` is request i's (n_i, V) float32 CPU log-softmax; a reduced call compares
                  against it (no extra forward);
        recompute `logp` is None: a reduced call runs a dense forward of each of its batches (same
                  batch, model unpatched for it) before the reduced one and compares batch by batch.
    `dense_reference` chooses stored when n_positions * V * 4 bytes fits `budget_bytes`
    (REFERENCE_BUDGET_BYTES, 1 GiB: every task at 200 items per task on V = 8192; choice4 at all 1000
    items needs about 1.1 GB), recompute otherwise.
    `signature` ties a reference to its requests, batch size, max_length and pad id.
    """

    signature: tuple
    logp: Optional[list] = None
    nbytes: int = 0

    @property
    def stored(self) -> bool:
        return self.logp is not None


# -- tokenisation -------------------------------------------------------------------------------------
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no special tokens (transformers tokenizer or a `tokenizers.Tokenizer`)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # tokenizers.Tokenizer.encode(text) -> Encoding
        return list(tokenizer.encode(text).ids)


def eos_id(tokenizer) -> int:
    """End-of-text id: eos_token_id, else pad_token_id, else "<|endoftext|>" of a raw tokenizer, else 0."""
    for name in ("eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    if hasattr(tokenizer, "token_to_id"):
        v = tokenizer.token_to_id("<|endoftext|>")
        if v is not None:
            return v
    return 0


def pad_id(tokenizer) -> int:
    """Id used for left padding: pad_token_id, else `eos_id` (padded positions are masked out)."""
    v = getattr(tokenizer, "pad_token_id", None)
    return v if isinstance(v, int) else eos_id(tokenizer)




def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: (context ids, continuation ids)."""
    if context == "":
        cont = encode(tokenizer, continuation)
        eos = eos_id(tokenizer)
        return ([eos], cont) if not cont or cont[0] != eos else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


# -- core scoring -------------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.inference_mode()
def _forward(model, rows: list[list[int]], pad_token_id: int, kept_only: bool = False) -> torch.Tensor:
    """Left-pad `rows`, run the model, return float32 logits (B, T, V) ((B, T', V), T' <= T, the kept
    rows left-padded, with `kept_only`: the handle's kept_only option is on)."""
    device = _model_device(model)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[1] != T and not (kept_only and logits.shape[1] < T):
        raise RuntimeError(f"model returned {logits.shape[1]} logit positions for {T} input tokens; "
                           f"the patched model must return logits aligned by original position")
    return logits.float()


class _Patch:
    """The reduction patch of one scoring call: installed on first use, removable for a dense
    fallback (re-installed by the next use), always removed on exit."""

    def __init__(self, model, config: Optional[ReductionConfig], protect: bool):
        self.model = model
        # with protection every forward passes per-row protect_last through handle.options()
        self.config = None if config is None else (config.replace(protect_last=0, protect_from=None)
                                                   if protect else config)
        self._handle = None
        self.dense: set = set()   # request indices scored dense (too short to reduce)

    def handle(self):
        if self.config is not None and self._handle is None:
            from ..hosts.handle import apply

            self._handle = apply(self.model, self.config)
        return self._handle

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _speed(model, fast: bool):
    if not fast:
        return contextlib.nullcontext()
    from ..hosts.speed import fast_inference

    return fast_inference(model)


def _prepare(token_requests, max_length: int) -> list[tuple[int, list[int], list[int]]]:
    """(index, model input, continuation) per request; the input is context + continuation minus its
    last token, kept to the last `max_length` tokens."""
    prepared = []
    for i, (ctx, cont) in enumerate(token_requests):
        ctx, cont = list(ctx), list(cont)
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length={max_length}")
        if not ctx:
            raise ValueError(f"request {i}: empty context (use encode_pair, which puts EOS there)")
        prepared.append((i, (ctx + cont)[-(max_length + 1):][:-1], cont))
    return prepared


def _score_rows(model, handle, batch, pad_token_id: int, protect: bool,
                cuts: Optional[dict] = None, *, details: Optional[dict] = None, ref=None,
                keep: Optional[dict] = None) -> list[tuple[float, bool]]:
    """One forward over `batch` (reduced through `handle`, or dense when None); each row protects
    its own continuation when `protect`. `cuts`, when given, receives {request index: token-layer
    cut the forward achieved for that row} (0 for a dense forward). `details`, when given, receives
    {request index: RequestDetail}, compared with `ref` ({request index: dense (n, V) log-softmax})
    when given; `keep`, when given, receives {request index: this forward's (n, V) log-softmax}
    (float32, CPU).

    The whole batch is scored with batched tensor operations and read back in one transfer
    (`_score_rows_simple` is the row-by-row twin the tests compare it with)."""
    rows = [p[1] for p in batch]
    if handle is not None and protect:
        with handle.options(protect_last=[len(p[2]) for p in batch]):
            logits = _forward(model, rows, pad_token_id)
    elif handle is not None:
        # unprotected (the authors' alignment, docs/method.md §2): rows for the kept tokens only, left
        # padded, and the last n of each row are scored, whichever positions they now stand for
        with handle.options(kept_only=True):
            logits = _forward(model, rows, pad_token_id, kept_only=True)
    else:
        logits = _forward(model, rows, pad_token_id)
    if cuts is not None:
        reducer = handle.last_reducer if handle is not None else None
        achieved = reducer.achieved_cut().tolist() if reducer is not None else [0.0] * len(batch)
        cuts.update({p[0]: float(c) for p, c in zip(batch, achieved)})
    scored, kept_logp = _score_logits(logits, batch, ref if details is not None else None, keep is not None)
    out = []
    for b, (p, (ll, greedy, kl, top1)) in enumerate(zip(batch, scored)):
        out.append((ll, greedy))
        if keep is not None:
            keep[p[0]] = kept_logp[b]
        if details is not None:
            if kl is None and ref is None and handle is None:  # a dense forward is its own reference
                kl, top1 = 0.0, len(p[2])
            details[p[0]] = RequestDetail(ll=ll, tokens=len(p[2]), greedy=greedy, kl=kl, top1=top1)
    return out


def _score_logits(logits: torch.Tensor, batch, ref=None, keep: bool = False):
    """Batched scoring of one forward's (B, T, V) logits: [(ll, greedy, kl, top1)] per row (kl / top1
    None without `ref`) and, when `keep`, each row's (n, V) float32 CPU log-softmax (else None).
    One transfer to the host; `_score_rows_simple` is its row-by-row twin."""
    device = logits.device
    ns = [len(p[2]) for p in batch]
    m = max(ns)
    # right-aligned (B, m): row b's continuation fills its last n_b slots, `valid` marks them
    target = torch.zeros((len(batch), m), dtype=torch.long)
    valid = torch.zeros((len(batch), m), dtype=torch.bool)
    for b, p in enumerate(batch):
        target[b, m - ns[b]:] = torch.tensor(p[2], dtype=torch.long)
        valid[b, m - ns[b]:] = True
    target, valid = target.to(device), valid.to(device)
    logp = torch.log_softmax(logits[:, -m:].float(), dim=-1)            # (B, m, V)
    tok_ll = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)          # (B, m)
    zero = torch.zeros_like(tok_ll)
    ll = torch.where(valid, tok_ll, zero).sum(1)
    argmax = logp.argmax(-1)
    greedy = ((argmax == target) | ~valid).all(1)
    cols = [ll.double(), greedy.double()]
    if ref is not None:
        dense = torch.zeros_like(logp)
        for b, p in enumerate(batch):
            dense[b, m - ns[b]:] = ref[p[0]].to(device)
        p_dense = dense.exp()   # 0 * log 0 = 0 where the dense probability underflows
        kl_tok = torch.where(p_dense > 0, p_dense * (dense - logp), torch.zeros_like(dense)).sum(-1)
        cols += [torch.where(valid, kl_tok, zero).sum(1).double(), ((dense.argmax(-1) == argmax) & valid).sum(1).double()]
    host = torch.stack(cols).cpu().tolist()
    rows = [(float(host[0][b]), bool(host[1][b]),
             float(host[2][b]) if ref is not None else None, int(host[3][b]) if ref is not None else None)
            for b in range(len(batch))]
    kept = None
    if keep:
        cpu = logp.detach().to("cpu", torch.float32)
        kept = [cpu[b, m - ns[b]:].clone() for b in range(len(batch))]
    return rows, kept


def _score_rows_simple(logits: torch.Tensor, batch, ref=None) -> list[tuple[float, bool, Optional[float], Optional[int]]]:
    """Row-by-row twin of `_score_rows`' scoring (given the batch's logits): (ll, greedy, kl, top1)."""
    out = []
    for row, p in zip(logits, batch):
        n = len(p[2])
        logp = torch.log_softmax(row[-n:].float(), dim=-1)
        target = torch.tensor(p[2], dtype=torch.long)
        ll = float(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum())
        greedy = bool((logp.argmax(-1) == target).all())
        kl = top1 = None
        if ref is not None:
            dense = ref[p[0]]
            p_dense = dense.exp()
            kl = float(torch.where(p_dense > 0, p_dense * (dense - logp), torch.zeros_like(dense)).sum())
            top1 = int((dense.argmax(-1) == logp.argmax(-1)).sum())
        out.append((ll, greedy, kl, top1))
    return out


def _score_split(model, patch: "_Patch", batch, pad_token_id: int, protect: bool, cuts: dict, extra: dict) -> list:
    """Score `batch` reduced; when the engine refuses a sample as too short (`SequenceTooShort`),
    split the batch in halves and retry each (a refused single request is scored dense, its index
    added to `patch.dense`). Every row's result is its own (batch independence), so splitting changes
    no number; it costs O(k log B) extra forwards for k short requests instead of B."""
    try:
        return _score_rows(model, patch.handle(), batch, pad_token_id, protect, cuts, **extra)
    except SequenceTooShort:
        if len(batch) == 1:
            patch.remove()  # dense: nothing of this context can be reduced
            patch.dense.add(batch[0][0])
            return _score_rows(model, None, batch, pad_token_id, protect, cuts, **extra)
        half = len(batch) // 2
        return (_score_split(model, patch, batch[:half], pad_token_id, protect, cuts, extra)
                + _score_split(model, patch, batch[half:], pad_token_id, protect, cuts, extra))


def request_signature(token_requests, batch_size: int, max_length: int, pad_token_id: int) -> tuple:
    """What a DenseReference is valid for: the requests (hashed), batch size, max_length, pad id."""
    h = hash(tuple((tuple(c), tuple(x)) for c, x in token_requests))
    return (len(token_requests), h, int(batch_size), int(max_length), int(pad_token_id))


def _vocab_size(model) -> Optional[int]:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except Exception:
        v = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(v) if isinstance(v, int) else None


def _env_bytes(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        n = int(float(v))
    except ValueError:
        raise ValueError(f"{name}={v!r}: expected a number of bytes") from None
    if n < 0:
        raise ValueError(f"{name}={v!r}: must be >= 0")
    return n


# largest stored DenseReference (above it: a dense forward per batch beside the reduced one), and the
# most the in-memory reference cache keeps; both overridable by environment for big-memory hosts
REFERENCE_BUDGET_BYTES = _env_bytes("UTRC_REFERENCE_BUDGET_BYTES", 1 << 30)


def dense_reference(model, token_requests, batch_size: int = 16, *, max_length: int = 1024,
                    pad_token_id: int = 0, budget_bytes: Optional[int] = None) -> "DenseReference":
    """The DenseReference of `token_requests` for `score_tokens(..., reference=...)`: stored (one
    dense scoring pass, its log-softmax at the scored positions kept) when it fits `budget_bytes`
    (default REFERENCE_BUDGET_BYTES), else the recompute form (no forward now)."""
    from ..hosts.handle import ensure_unpatched

    ensure_unpatched(model, "utrc_lib.eval.scorer.dense_reference")
    budget = REFERENCE_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    sig = request_signature(token_requests, batch_size, max_length, pad_token_id)
    V = _vocab_size(model)
    positions = sum(min(len(c), max_length) for _, c in token_requests)
    if V is not None and positions * V * 4 > budget:
        return DenseReference(sig)
    return score_tokens(model, token_requests, None, batch_size, max_length=max_length,
                        pad_token_id=pad_token_id, keep_reference=True, reference_budget=budget).reference


def score_tokens(model, token_requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                 config: Optional[ReductionConfig] = None, batch_size: int = 16, *,
                 max_length: int = 1024, pad_token_id: int = 0, progress: bool = False,
                 protect: bool = True, desc: str = "loglikelihood", details: bool = False,
                 reference: Optional[DenseReference] = None, keep_reference: bool = False,
                 reference_budget: Optional[int] = None, fast: bool = True) -> TokenScores:
    """Score (ctx_ids, cont_ids) requests with `model` reduced by `config` (dense when None).

    Requests are sorted by input length (longest first) and scored in batches of `batch_size`
    with left padding; each row's reduction protects exactly its own scored tail (per-sample
    protect_last), and results return in input order. `protect=False` applies `config` unchanged
    (no tail protection; for measuring what an unprotected reduction does). A batch in which the
    engine refuses a sample as too short to reduce (`SequenceTooShort`) is split in halves and
    rescored (recursively; `_score_split`), a refused single request dense; their number is
    `TokenScores.dense_fallback`.
    The model is unpatched again when this returns (or raises).

    Item level (opt-in; `results` are the same numbers either way):
        details=True: `TokenScores.details`, one RequestDetail per request (ll, tokens, greedy, and
            KL(dense || this) / top-1 agreement at the scored positions against `reference`).
        reference: a DenseReference of the same requests, batch size, max_length and pad id
            (`dense_reference`, or `keep_reference` of a dense call); implies details=True. The
            recompute form runs a dense forward of each batch before its reduced forward.
        keep_reference=True (dense calls only): `TokenScores.reference` holds this pass's
            log-softmax at the scored positions (stored form), or the recompute form once it would
            exceed `reference_budget` bytes (default REFERENCE_BUDGET_BYTES).

    fast=True (default) runs the model under `hosts.speed.fast_inference` (Mamba-2 chunk size by
    length, Mamba-1 parallel scan): the same numbers up to float rounding, several times faster on
    CPU. A reference and the calls compared with it must use the same setting.
    """
    from ..hosts.handle import ensure_unpatched

    ensure_unpatched(model, "utrc_lib.eval.scorer.score_tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if keep_reference and config is not None:
        raise ValueError("keep_reference=True needs a dense call (config=None)")
    prepared = _prepare(token_requests, max_length)
    ordered = sorted(prepared, key=lambda p: (-len(p[1]), p[0]))
    batches = [ordered[j:j + batch_size] for j in range(0, len(ordered), batch_size)]
    sig = None
    if reference is not None or keep_reference:
        sig = request_signature(token_requests, batch_size, max_length, pad_token_id)
    if reference is not None:
        if not isinstance(reference, DenseReference):
            raise TypeError(f"reference must be a DenseReference, got {type(reference).__name__}")
        if reference.signature != sig:
            raise ValueError("reference was computed for other requests / batch_size / max_length / pad id "
                             f"({reference.signature[0]} requests, batch_size {reference.signature[2]}) than this "
                             f"call ({sig[0]} requests, batch_size {sig[2]})")
        details = True
    detail: Optional[dict] = {} if details or keep_reference else None
    kept: Optional[dict] = {} if keep_reference else None
    kept_bytes = 0
    budget = REFERENCE_BUDGET_BYTES if reference_budget is None else int(reference_budget)
    stored_ref = dict(enumerate(reference.logp)) if reference is not None and reference.stored else None
    recompute = reference is not None and not reference.stored

    def extra(ref):   # keyword arguments of _score_rows only when item level is asked for
        if detail is None:
            return {}
        return dict(details=detail, ref=ref, keep=kept)

    results: list = [None] * len(prepared)
    cuts: dict = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prepared), desc=desc, unit="req", leave=False)
    try:
        with _Patch(model, config, protect) as patch, _speed(model, fast):
            for batch in batches:
                ref = stored_ref
                if recompute:   # the dense forward of this very batch, model unpatched for it
                    patch.remove()
                    ref = {}
                    _score_rows(model, None, batch, pad_token_id, protect, keep=ref)
                scored = _score_split(model, patch, batch, pad_token_id, protect, cuts, extra(ref))
                for p, r in zip(batch, scored):
                    results[p[0]] = r
                if kept is not None:
                    kept_bytes += sum(kept[p[0]].numel() * 4 for p in batch)
                    if kept_bytes > budget:   # too big to keep: the recompute form
                        kept = None
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    dense_ref = None
    if keep_reference:
        dense_ref = (DenseReference(sig, [kept[i] for i in range(len(prepared))], kept_bytes)
                     if kept is not None else DenseReference(sig))
    return TokenScores(results=results, dense_fallback=len(patch.dense),
                       achieved_cut=[cuts.get(i, 0.0) for i in range(len(prepared))],
                       details=None if not details else [detail[i] for i in range(len(prepared))],
                       reference=dense_ref)


def loglikelihood_tokens(model, token_requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                         config: Optional[ReductionConfig] = None, batch_size: int = 16, *,
                         max_length: int = 1024, pad_token_id: int = 0, progress: bool = False,
                         protect: bool = True, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy decode) per (ctx_ids, cont_ids):
    `score_tokens(...).results` (call `score_tokens` to also get the dense-fallback count)."""
    return score_tokens(model, token_requests, config, batch_size, max_length=max_length,
                        pad_token_id=pad_token_id, progress=progress, protect=protect, desc=desc).results


def loglikelihood(model, tokenizer, requests: Iterable[tuple[str, str]], config: Optional[ReductionConfig] = None,
                  batch_size: int = 16, *, max_length: int = 1024, progress: bool = False, protect: bool = True,
                  desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum loglik, is_greedy) of each (context, continuation) text request; see the module doc."""
    toks = [encode_pair(tokenizer, c, x) for c, x in requests]
    return loglikelihood_tokens(model, toks, config, batch_size, max_length=max_length,
                                pad_token_id=pad_id(tokenizer), progress=progress, protect=protect, desc=desc)


# -- tasks ---------------------------------------------------------------------------------------------
_TOKEN_CACHE: dict = {}  # (id(tokenizer), task, limit, task files) -> (tokenizer, token requests, extra)


def _task_requests(tokenizer, task: str, limit: Optional[int]):
    """Token requests of a task, cached per (tokenizer, task, limit, the task files' paths and
    content hashes: `suite.task_signature`) for repeated calls (sweeps)."""
    from .suite import task_signature

    key = (id(tokenizer), task, limit, task_signature(task))
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1], hit[2]
    items = load_task(task, limit)
    kind = task_kind(task)
    if kind == "cloze":
        reqs = [(it["context"], it["target"]) for it in items]
    elif kind == "choice4":
        reqs = [(it["context"], " " + e) for it in items for e in it["endings"]]
    elif kind == "choice2":
        reqs = [(it["context"], " " + o) for it in items for o in it["options"]]
    elif kind == "ppl":
        reqs = [(it["context"], it["continuation"]) for it in items]
    else:  # pragma: no cover - load_task rejects unknown names
        raise ValueError(task)
    toks = [encode_pair(tokenizer, c, x) for c, x in reqs]
    extra = {"items": items, "texts": reqs}
    _TOKEN_CACHE[key] = (tokenizer, toks, extra)
    return toks, extra


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def _score_task(task: str, items: list[dict], texts, res, toks) -> dict:
    out: dict = {"n": len(items)}
    kind = task_kind(task)
    if kind == "cloze":
        accs = [float(g) for _, g in res]
        lls = [ll for ll, _ in res]
        out.update(acc=sum(accs) / len(accs), acc_stderr=_stderr(accs), ppl=math.exp(-sum(lls) / len(lls)))
    elif kind in ("choice4", "choice2"):
        key = "endings" if kind == "choice4" else "options"
        accs, norms, j = [], [], 0
        for it in items:
            n = len(it[key])
            lls = [res[j + c][0] for c in range(n)]
            j += n
            pred = max(range(n), key=lambda c: lls[c])
            accs.append(float(pred == it["label"]))
            if kind == "choice4":
                normed = [lls[c] / len(it[key][c]) for c in range(n)]
                norms.append(float(max(range(n), key=lambda c: normed[c]) == it["label"]))
        out.update(acc=sum(accs) / len(accs), acc_stderr=_stderr(accs))
        if items and all("depth" in it for it in items):  # v2 passkey: accuracy per needle depth
            by = collections.defaultdict(list)
            for it, a in zip(items, accs):
                by[it["depth"]].append(a)
            out["acc_by_depth"] = {str(d): sum(v) / len(v) for d, v in sorted(by.items())}
        if kind == "choice4":
            out.update(acc_norm=sum(norms) / len(norms), acc_norm_stderr=_stderr(norms))
    elif kind == "ppl":
        lls = [ll for ll, _ in res]
        ntok = sum(len(t[1]) for t in toks)
        nbytes = sum(len(x.encode("utf-8")) for _, x in texts)
        out.update(ppl=math.exp(-sum(lls) / ntok), nll=-sum(lls) / ntok,
                   bits_per_byte=-sum(lls) / (math.log(2) * nbytes), tokens=ntok)
    return out


def _item_outcomes(task: str, items: list[dict], toks, details: list) -> dict:
    """Per-item arrays of one task from its requests' RequestDetails (item order = task order).

    Every task: "id"; "tokens" (scored positions of all the item's requests); "kl" (sum of
    KL(dense || scored model) over them, nats) and "kl_per_token" (kl / tokens); "top1" (fraction of
    them whose argmax equals the dense model's); "ll" (gold log-likelihood: the target, the gold
    ending / option, the window's continuation), "gold_tokens" and "ll_per_token" (ll / gold_tokens).
    "correct" (0/1): cloze greedy match, choice acc; choice4 also "correct_norm" (acc_norm). The
    ppl task has no "correct". kl / top1 are None where there was no reference.
    """
    kind = task_kind(task)
    groups = []   # (request indices of the item, gold request index)
    if kind in ("choice4", "choice2"):
        key = "endings" if kind == "choice4" else "options"
        j = 0
        for it in items:
            n = len(it[key])
            groups.append((list(range(j, j + n)), j + it["label"]))
            j += n
    else:
        groups = [([i], i) for i in range(len(items))]
    out: dict = {"id": [it.get("id") for it in items], "tokens": [], "kl": [], "kl_per_token": [], "top1": [],
                 "ll": [], "gold_tokens": [], "ll_per_token": []}
    for members, gold in groups:
        ds = [details[j] for j in members]
        ntok = sum(d.tokens for d in ds)
        have = all(d.kl is not None for d in ds)
        kl = sum(d.kl for d in ds) if have else None
        out["tokens"].append(ntok)
        out["kl"].append(kl)
        out["kl_per_token"].append(None if kl is None else kl / ntok)
        out["top1"].append(sum(d.top1 for d in ds) / ntok if have else None)
        g = details[gold]
        out["ll"].append(g.ll)
        out["gold_tokens"].append(g.tokens)
        out["ll_per_token"].append(g.ll / g.tokens)
    if kind == "cloze":
        out["correct"] = [int(details[i].greedy) for i in range(len(items))]
    elif kind in ("choice4", "choice2"):
        key = "endings" if kind == "choice4" else "options"
        out["correct"], norm = [], []
        for it, (members, _) in zip(items, groups):
            lls = [details[j].ll for j in members]
            n = len(members)
            out["correct"].append(int(max(range(n), key=lambda c: lls[c]) == it["label"]))
            if kind == "choice4":
                normed = [lls[c] / len(it[key][c]) for c in range(n)]
                norm.append(int(max(range(n), key=lambda c: normed[c]) == it["label"]))
        if kind == "choice4":
            out["correct_norm"] = norm
    return out


def _fidelity_summary(outcomes: dict) -> dict:
    """Task-level fidelity from the item arrays: kl_per_token (sum KL / sum scored tokens) and
    top1_agreement (agreeing positions / positions); empty without a reference."""
    if any(v is None for v in outcomes["kl"]):
        return {}
    ntok = sum(outcomes["tokens"])
    agree = sum(t * n for t, n in zip(outcomes["top1"], outcomes["tokens"]))
    return {"kl_per_token": sum(outcomes["kl"]) / ntok, "top1_agreement": agree / ntok}


# dense references of evaluate(items=True): (id(model), id(tokenizer), task, limit, batch_size, max_length)
# -> (weakref to the model, DenseReference); least recently used dropped beyond REFERENCE_CACHE_BYTES
_REFERENCES: "collections.OrderedDict" = collections.OrderedDict()
REFERENCE_CACHE_BYTES = _env_bytes("UTRC_REFERENCE_CACHE_BYTES", 4 << 30)


def clear_reference_cache() -> None:
    """Forget the cached dense references (call after changing a model's weights in place)."""
    _REFERENCES.clear()


def _cached_reference(model, tokenizer, task, limit, batch_size, max_length, toks):
    key = (id(model), id(tokenizer), task, limit, batch_size, max_length)
    hit = _REFERENCES.get(key)
    if hit is not None and hit[0]() is model and \
            hit[1].signature == request_signature(toks, batch_size, max_length, pad_id(tokenizer)):
        _REFERENCES.move_to_end(key)
        return key, hit[1]
    return key, None


def _store_reference(key, model, ref: DenseReference) -> None:
    _REFERENCES[key] = (weakref.ref(model), ref)
    _REFERENCES.move_to_end(key)
    while len(_REFERENCES) > 1 and sum(r.nbytes for _, r in _REFERENCES.values()) > REFERENCE_CACHE_BYTES:
        _REFERENCES.popitem(last=False)


def run_metadata(model, config: Optional[ReductionConfig], *, max_length: int, batch_size: int,
                 limit=None, protect: bool = True) -> dict:
    """What a scoring run used: the config, method, protection, batch size, max length, limit, model
    class, versions, the resolved schedule (num_layers, layers, keep_ratio, token-layer FLOPs
    fraction and cut) and the analytic FLOPs at 256 tokens. A model whose schedule or FLOPs cannot
    be derived gets "schedule_error" / "analytic_flops_error" instead of failing."""
    import platform

    import transformers

    from .. import __version__

    meta: dict = {
        "config": None if config is None else {k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in dataclasses.asdict(config).items()},
        "method": "dense" if config is None else config.method,
        "protect": PROTECT_NOTE[bool(protect)],
        "batch_size": batch_size, "max_length": max_length, "limit": limit,
        "model_class": type(model).__name__,
        "device": str(_model_device(model)),
        "dtype": str(next(iter(model.parameters())).dtype).replace("torch.", "") if any(True for _ in model.parameters()) else None,
        "versions": {"utrc_lib": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    try:
        from ..core import schedule
        from ..hosts.handle import num_layers

        L = num_layers(model)
        meta["num_layers"] = L
        if config is not None:
            layers = config.resolve_layers(L)
            rho = config.resolve_keep_ratio(L)
            meta.update(layers=list(layers), keep_ratio=rho,
                        token_layer_fraction=schedule.token_layer_fraction(L, layers, rho))
            meta["flops_reduction_token_layer"] = 1.0 - meta["token_layer_fraction"]
        else:
            meta.update(layers=[], keep_ratio=1.0, token_layer_fraction=1.0, flops_reduction_token_layer=0.0)
    except Exception as e:  # unsupported model class: metadata only
        meta["schedule_error"] = repr(e)
    try:
        from ..core.flops import flops

        rep = flops(model, 256, config)
        meta["analytic_flops_seq256"] = {"dense": rep.dense, "reduced": rep.reduced, "flops_cut": rep.flops_cut}
    except Exception as e:
        meta["analytic_flops_error"] = repr(e)
    return meta


def task_result(results: dict, task: str, extra: dict, toks, scores: "TokenScores", *, items: bool, reduced: bool,
                t0: float) -> None:
    """Fill results[task] (and results["items"][task] with `items`) from one task's TokenScores: the task
    metrics, fidelity to dense, the dense-fallback count and the achieved cut (reduced runs), the seconds
    since `t0`. Shared by `evaluate` and the fast path (`utrc_lib.eval.fast.evaluate_fast`)."""
    results[task] = _score_task(task, extra["items"], extra["texts"], scores.results, toks)
    if items:
        outcomes = _item_outcomes(task, extra["items"], toks, scores.details)
        results.setdefault("items", {})[task] = outcomes
        results[task].update(_fidelity_summary(outcomes))
    if reduced:
        results[task]["dense_fallback"] = scores.dense_fallback
        cuts = scores.achieved_cut
        results[task]["achieved_token_layer_cut"] = sum(cuts) / len(cuts) if cuts else 0.0
        results[task]["achieved_token_layer_cut_min"] = min(cuts) if cuts else 0.0
    results[task]["seconds"] = time.perf_counter() - t0


def evaluate(model, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, config: Optional[ReductionConfig] = None, *,
             limit: Optional[int] = None, batch_size: int = 16, progress: bool = True,
             max_length: int = 1024, protect: bool = True, items: bool = False,
             protocol: Optional[str] = None) -> dict:
    """Score `model` (patched with `config`, or dense when None) on the offline suite.

    protocol: None (as `protect` says), "leak_free" (protected, the default behaviour) or "authors" (the
    released code's protocol: `utrc_lib.eval.protocol`); "meta" records the protocol and the method run.

    Returns {task: {metric: value, ..., "n": items, "seconds": s}, "meta": run_metadata(...)}.
    Metrics: cloze acc/ppl, choice4 acc/acc_norm, choice2 acc, ppl ppl/nll/bits_per_byte/tokens
    (+ *_stderr for accuracies); with a config also "dense_fallback", the task's requests scored
    dense because their context was too short to reduce, and "achieved_token_layer_cut" (mean over
    the task's requests, "_min" the smallest) beside the nominal cut in "meta". `protect=False` applies `config` unchanged
    (scored positions may be reduced). Task data and tokenised requests are cached, so repeated
    calls (sweeps) only run the model.

    items=True (opt-in; the aggregate numbers are the same either way) adds "items": {task: per-item
    arrays} (`_item_outcomes`: correct, ll, ll_per_token, kl, kl_per_token, top1, tokens, ...) and per
    task "kl_per_token" / "top1_agreement", fidelity to the dense model at the scored positions. The
    dense reference is computed by this scorer (unpatched model, same batches) once per (model,
    tokenizer, task, limit, batch_size, max_length) and kept in memory (`DenseReference`: stored
    log-softmax when it fits REFERENCE_BUDGET_BYTES, else a dense forward of each batch beside the
    reduced one); a dense call with items=True builds it from its own pass.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in available_tasks("all")]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(available_tasks('all'))}")
    if config is not None and not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a utrc_lib.ReductionConfig or None, got {type(config).__name__}")
    from ..hosts.handle import ensure_unpatched

    ensure_unpatched(model, "utrc_lib.eval.scorer.evaluate")
    asked = config
    if protocol is not None:
        from .protocol import resolve_protocol

        config, protect = resolve_protocol(config, protocol)
    else:
        protocol = "leak_free" if protect else "unprotected"
    was_training = model.training
    model.eval()
    results: dict = {}
    # every task is loaded (items validated on load) and length-checked before any scoring starts
    prepared = {}
    for task in tasks:
        toks, extra = _task_requests(tokenizer, task, limit)
        longest = max((len(c) + len(x) - 1 for c, x in toks), default=0)
        if longest > max_length:  # the context would be cut on the left (e.g. v2 long tasks, passkey)
            from .suite import task_path

            raise ValueError(f"task {task!r} ({task_path(task)}): a request has {longest} input tokens > "
                             f"max_length={max_length}; pass max_length >= {longest}")
        prepared[task] = (toks, extra)
    try:
        for task in tasks:
            t0 = time.perf_counter()
            toks, extra = prepared[task]
            kw = {}
            if items:
                ref_key, ref = _cached_reference(model, tokenizer, task, limit, batch_size, max_length, toks)
                if config is None:
                    kw = dict(details=True, keep_reference=ref is None)
                else:
                    if ref is None:
                        ref = dense_reference(model, toks, batch_size, max_length=max_length,
                                              pad_token_id=pad_id(tokenizer))
                        _store_reference(ref_key, model, ref)
                    kw = dict(reference=ref)
            scores = score_tokens(model, toks, config, batch_size, max_length=max_length,
                                  pad_token_id=pad_id(tokenizer), progress=progress, protect=protect, desc=task,
                                  **kw)
            if items and scores.reference is not None:
                _store_reference(ref_key, model, scores.reference)
            task_result(results, task, extra, toks, scores, items=items, reduced=config is not None, t0=t0)
    finally:
        model.train(was_training)
    results["meta"] = run_metadata(model, config, max_length=max_length, batch_size=batch_size, limit=limit,
                                   protect=protect)
    results["meta"].update(protocol=protocol, method_asked="dense" if asked is None else asked.method)
    return results

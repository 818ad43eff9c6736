"""Log-likelihood scoring of a (reduced) model, per request: the library's scoring primitive.

What `score_tokens` computes follows lm-eval 0.4's conventions, so its numbers are comparable with
lm-eval (`utrc_lib.integrations.lm_eval` is the `--model utrc` of lm-eval and scores through it):
    * a request is (context, continuation) token ids (`encode_pair` tokenises text the lm-eval way:
      trailing whitespace of the context moves to the continuation; context+continuation is
      tokenised whole; no BOS; an empty context becomes the EOS token);
    * the model input is all tokens but the last (kept to the last `max_length`), and the
      continuation's log-probs are read at the last len(continuation) positions, aligned by
      ORIGINAL position (the patched model returns full-length logits);
    * the reduction protects each request's own scored tail: requests are sorted by length (longest
      first) and batched, every row runs with protect_last = its own number of continuation tokens,
      so the scored positions are never removed or merged and never see later tokens; rows are
      LEFT-padded with an attention mask, so results do not depend on batch size or composition;
    * a request whose context is too short to reduce (`SequenceTooShort`) is scored dense, alone,
      and counted (`TokenScores.dense_fallback`); so is, without protection, a request whose
      continuation is longer than the rows the reduction leaves of its sequence.
With `details=True` each request also gets KL(dense || reduced) and top-1 agreement with the dense
model at the scored positions, against a `DenseReference` (this module's own dense pass).

The offline task suite, per-item outcomes and paired statistics built on it live in the study
harness (`utrc_study.eval.scorer.evaluate`).

API:
    score_tokens(model, token_requests, config=None, batch_size=16, *, max_length=1024,
                 pad_token_id=0, progress=False, protect=True, details=False, reference=None,
                 keep_reference=False) -> TokenScores(results, dense_fallback, achieved_cut, details,
                                                      reference)
    dense_reference(model, token_requests, batch_size=16, *, max_length=1024, pad_token_id=0,
                    budget_bytes=None) -> DenseReference
    loglikelihood_tokens(...same arguments...) -> list[(loglik, is_greedy)]   (= score_tokens(...).results)
    loglikelihood(model, tokenizer, requests, config=None, batch_size=16, *, max_length=1024,
                  progress=False, protect=True) -> list[(loglik, is_greedy)]
    encode(tokenizer, text), encode_pair(tokenizer, context, continuation) -> (ctx ids, cont ids)
    eos_id(tokenizer), pad_id(tokenizer)
    run_metadata(model, config, *, max_length, batch_size, limit, protect=True) -> dict
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterable, Optional, Sequence

import torch

from utrc_lib.core.config import ReductionConfig
from utrc_lib.core.methods import SequenceTooShort

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
            from utrc_lib.hosts.handle import apply

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
    from utrc_lib.hosts.speed import fast_inference

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
    short = []
    if handle is not None and protect:
        with handle.options(protect_last=[len(p[2]) for p in batch]):
            logits = _forward(model, rows, pad_token_id)
    elif handle is not None:
        # unprotected (the authors' alignment, docs/method.md §2): rows for the kept tokens only, left
        # padded, and the last n of each row are scored, whichever positions they now stand for
        with handle.options(kept_only=True):
            logits = _forward(model, rows, pad_token_id, kept_only=True)
        positions = handle.output_positions
        if positions is not None:
            # a row must keep at least its continuation's length: otherwise "the last n rows" reach into
            # the left padding. Such a request is refused as too short (_score_split scores it dense,
            # counted); the other rows are scored from this same forward (under ratio_basis="batch" their
            # reduction depends on the batch they were in, so they are not run again)
            have = (positions >= 0).sum(1).tolist()
            short = [b for b, (h, p) in enumerate(zip(have, batch)) if h < len(p[2])]
    else:
        logits = _forward(model, rows, pad_token_id)
    skip = set(short)
    sel = [b for b in range(len(batch)) if b not in skip]
    if short and not sel:
        raise _RowsTooShort(short, {})
    if short:
        logits = logits[sel]
    if cuts is not None:
        reducer = handle.last_reducer if handle is not None else None
        achieved = reducer.achieved_cut().tolist() if reducer is not None else [0.0] * len(batch)
        cuts.update({batch[b][0]: float(achieved[b]) for b in sel})
    part = [batch[b] for b in sel]
    scored, kept_logp = _score_logits(logits, part, ref if details is not None else None, keep is not None)
    out = []
    for b, (p, (ll, greedy, kl, top1)) in enumerate(zip(part, scored)):
        out.append((ll, greedy))
        if keep is not None:
            keep[p[0]] = kept_logp[b]
        if details is not None:
            if kl is None and ref is None and handle is None:  # a dense forward is its own reference
                kl, top1 = 0.0, len(p[2])
            details[p[0]] = RequestDetail(ll=ll, tokens=len(p[2]), greedy=greedy, kl=kl, top1=top1)
    if short:
        raise _RowsTooShort(short, dict(zip(sel, out)))
    return out


class _RowsTooShort(SequenceTooShort):
    """An unprotected forward left some rows (batch positions `short`) fewer kept rows than their
    continuation has tokens; `scored` holds {batch position: (ll, greedy)} of the others, scored from
    that same forward."""

    def __init__(self, short: list, scored: dict):
        super().__init__(f"the reduction left {len(short)} request(s) fewer rows than their continuation has tokens")
        self.short, self.scored = short, scored


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
    no number; it costs O(k log B) extra forwards for k short requests instead of B. A refusal known
    only after the forward (unprotected scoring: fewer kept rows than the continuation, `_RowsTooShort`)
    costs one dense forward of the refused rows; the others keep this forward's results."""
    try:
        return _score_rows(model, patch.handle(), batch, pad_token_id, protect, cuts, **extra)
    except _RowsTooShort as e:   # unprotected: the refused rows dense, together; the others already scored
        patch.remove()
        patch.dense.update(batch[b][0] for b in e.short)
        dense = _score_rows(model, None, [batch[b] for b in e.short], pad_token_id, protect, cuts, **extra)
        got = {**e.scored, **dict(zip(e.short, dense))}
        return [got[b] for b in range(len(batch))]
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
    from utrc_lib.hosts.handle import ensure_unpatched

    ensure_unpatched(model, "utrc_study.eval.scorer.dense_reference")
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
    from utrc_lib.hosts.handle import ensure_unpatched

    ensure_unpatched(model, "utrc_study.eval.scorer.score_tokens")
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


def run_metadata(model, config: Optional[ReductionConfig], *, max_length: int, batch_size: int,
                 limit=None, protect: bool = True) -> dict:
    """What a scoring run used: the config, method, protection, batch size, max length, limit, model
    class, versions, the resolved schedule (num_layers, layers, keep_ratio, token-layer FLOPs
    fraction and cut) and the analytic FLOPs at 256 tokens. A model whose schedule or FLOPs cannot
    be derived gets "schedule_error" / "analytic_flops_error" instead of failing."""
    import platform

    import transformers

    from utrc_lib import __version__

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
        from utrc_lib.core.config import token_layer_fraction
        from utrc_lib.hosts.handle import num_layers

        L = num_layers(model)
        meta["num_layers"] = L
        if config is not None:
            layers = config.resolve_layers(L)
            rho = config.resolve_keep_ratio(L)
            meta.update(layers=list(layers), keep_ratio=rho,
                        token_layer_fraction=token_layer_fraction(L, layers, rho))
            meta["flops_reduction_token_layer"] = 1.0 - meta["token_layer_fraction"]
        else:
            meta.update(layers=[], keep_ratio=1.0, token_layer_fraction=1.0, flops_reduction_token_layer=0.0)
    except Exception as e:  # unsupported model class: metadata only
        meta["schedule_error"] = repr(e)
    try:
        from utrc_lib.core.flops import flops

        rep = flops(model, 256, config)
        meta["analytic_flops_seq256"] = {"dense": rep.dense, "reduced": rep.reduced, "flops_cut": rep.flops_cut}
    except Exception as e:
        meta["analytic_flops_error"] = repr(e)
    return meta

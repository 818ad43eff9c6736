"""Analyses behind the notebooks: token importance, reduction traces, error growth, output change, CPU timing.

Glossary: B batch, N input tokens, N' tokens after reductions, D d_model, L layers, V vocabulary.

All functions take a transformers Mamba / Mamba-2 causal LM and token ids (B, N) (no padding) and run
the model through `utrc_lib.apply`; the dense reference goes through the same patched layer loop with
method "none", so dense and reduced per-layer states follow one convention.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.config import ReductionConfig

Tensor = torch.Tensor
DENSE = ReductionConfig(method="none")


@torch.no_grad()
def run(model, input_ids: Tensor, config: Optional[ReductionConfig] = None, *, record: bool = False) -> dict:
    """One prefill through the patched layer loop.

    Returns {"logits": (B, N, V) by original position, "states": [L x (B, N_l', D)] residual stream after
    each layer, "history": per-anchor history (plans when record=True)}.
    """
    from ..hosts.handle import apply

    cfg = DENSE if config is None else config
    with apply(model, cfg) as handle, handle.options(record=record):
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        reducer = handle.last_reducer
    L = len(model.backbone.layers)
    return {"logits": out.logits.float(), "states": list(out.hidden_states[:L]),
            "history": list(reducer.history) if reducer is not None else []}


def positions_per_layer(history: Sequence[dict], num_layers: int, batch: int, num_tokens: int) -> list[Tensor]:
    """(B, N_l') original positions of the tokens in the residual stream after each layer."""
    cur = torch.arange(num_tokens).expand(batch, num_tokens)
    by_layer = {h["layer"]: h["positions"] for h in history}
    out = []
    for layer in range(num_layers):
        if layer in by_layer:
            cur = by_layer[layer]
        out.append(cur)
    return out


@torch.no_grad()
def layer_errors(model, input_ids: Tensor, config: ReductionConfig, dense: Optional[dict] = None) -> dict:
    """Relative L2 error of the reduced residual stream against the dense one, per layer.

    At layer l, each reduced token is compared with the dense token at its original position:
    err_l = ||h_red - h_dense[pos]|| / ||h_dense[pos]|| over all kept (valid) tokens of the batch.
    Also returns the tokens per layer and the KL(dense || reduced) of the next-token distribution at
    the last position.
    """
    dense = run(model, input_ids) if dense is None else dense
    red = run(model, input_ids, config)
    B, N = input_ids.shape
    L = len(red["states"])
    errs, ntok = [], []
    for layer, (hd, hr, pos) in enumerate(zip(dense["states"], red["states"],
                                              positions_per_layer(red["history"], L, B, N))):
        ok = pos >= 0
        ref = hd.gather(1, pos.clamp_min(0)[..., None].expand(-1, -1, hd.shape[-1]))
        diff = ((hr.float() - ref.float()) * ok[..., None]).norm()
        errs.append(float(diff / (ref.float() * ok[..., None]).norm().clamp_min(1e-12)))
        ntok.append(float(ok.sum(1).float().mean()))
    return {"layer": list(range(L)), "rel_error": errs, "tokens": ntok,
            "anchors": [h["layer"] for h in red["history"]],
            "kl_last": next_token_kl(dense["logits"][:, -1], red["logits"][:, -1])}


def next_token_kl(dense_logits: Tensor, reduced_logits: Tensor) -> float:
    """Mean over the batch of KL(p_dense || p_reduced) (nats) of (B, V) logits."""
    lp = F.log_softmax(dense_logits.float(), -1)
    lq = F.log_softmax(reduced_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@torch.no_grad()
def token_importance(model, input_ids: Tensor, metric: str = "clip") -> Tensor:
    """(L, N) importance of every token after every layer (dense run, sample 0), from the SSM output y.

    Reads the input of each mixer's out_proj (the SSM output y, the paper's "hidden states") with
    forward hooks and applies `utrc_lib.core.metrics.importance(metric, y)`.
    """
    from ..core.metrics import importance

    feats = {}
    hooks = [layer.mixer.out_proj.register_forward_pre_hook(
        lambda mod, args, i=i: feats.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.backbone.layers)]
    try:
        model(input_ids=input_ids[:1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([importance(metric, feats[i])[0] for i in range(len(feats))])


@torch.no_grad()
def trace(model, tokenizer, text: str, config: ReductionConfig, *, max_tokens: int = 160) -> dict:
    """Which tokens of `text` a method removes, where and how, and how the next-token prediction changes.

    Returns {"tokens": [str], "ids", "fates": [utrc_lib.report.provenance.token_fates], "tokens_per_layer",
    "anchors", "kl_last", "top_dense"/"top_reduced": [(token, prob)] x 5, "logits_dense"/"logits_reduced"}.
    """
    from ..report.provenance import token_fates

    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    N = ids.shape[1]
    dense = run(model, ids)
    red = run(model, ids, config, record=True)
    L = len(red["states"])
    tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
    protect = None
    if config.protect_last:
        protect = N - config.protect_last
    elif config.protect_from is not None:
        protect = config.protect_from

    def top(logits, k=5):
        p = logits.softmax(-1)
        v, i = p.topk(k)
        return [(tokenizer.decode([int(j)]), float(x)) for x, j in zip(v, i)]

    return {"tokens": tokens, "ids": ids[0].tolist(), "fates": token_fates(red["history"], N, protect),
            "tokens_per_layer": [int(s.shape[1]) for s in red["states"]], "num_layers": L,
            "anchors": [h["layer"] for h in red["history"]],
            "kl_last": next_token_kl(dense["logits"][:, -1], red["logits"][:, -1]),
            "top_dense": top(dense["logits"][0, -1]), "top_reduced": top(red["logits"][0, -1]),
            "logits_dense": dense["logits"][0], "logits_reduced": red["logits"][0]}


# -- CPU timing -----------------------------------------------------------------------------------
@torch.no_grad()
def cpu_prefill_ms(model, batch: int, seq_len: int, config: Optional[ReductionConfig] = None, *,
                   logits: str = "last", repeats: int = 5, warmup: int = 1, vocab: Optional[int] = None,
                   seed: int = 0) -> dict:
    """Median wall time (ms) of one prefill forward on CPU (random token ids), dense or reduced.

    logits="last" asks the model for the last position only (logits_to_keep=1); "all" for all
    positions. Returns {"median_ms", "min_ms", "times_ms", "tokens_per_s"}.
    Timed with utrc_lib.experiments.bench.time_ms (warm-up, then `repeats` calls; median reported).
    """
    from ..hosts.handle import apply

    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    keep = 1 if logits == "last" else 0
    handle = apply(model, config) if config is not None else None
    try:
        def step():
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits

        try:
            from .timing import time_ms
        except ImportError:  # pragma: no cover - bench is optional
            time_ms = None
        if time_ms is not None:
            times = time_ms(step, "cpu", repeats=repeats, warmup=warmup)
        else:
            for _ in range(warmup):
                step()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
    finally:
        if handle is not None:
            handle.remove()
    med = statistics.median(times)
    return {"median_ms": med, "min_ms": min(times), "times_ms": times,
            "tokens_per_s": batch * seq_len / (med / 1e3)}

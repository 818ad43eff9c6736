"""Teaching helpers: the steps of UTRC on a toy sequence and on the real model, drawn from the library.

Glossary: utrc_lib/GLOSSARY.md (N tokens, D width, C feature width, r tokens removed, q hybrid prune
fraction, side A / side B, f_i / g_i the best match of a_i and its cosine).

Every number these helpers show comes from the library's own functions: importance from
`core.methods.importance` (`core.methods.feature_stats` with the inverse norms, as the reducer calls it), the split from `core.methods.importance_halves`, the best matches and the
kept edges from `core.methods.bipartite_match`, the reduced tokens from `core.methods.reduce_tokens`
(whose plan is what the model's layer loop applies), the authors' behaviour from
`core.reference.reference_edges` and method "utrc_reference", the schedule from `core.config` and
the FLOPs from `core.flops`. The only values computed here for display are the full A x B cosine
matrix and the authors' per-channel sorted matrix, and tests/test_teaching.py checks that their argmax /
ranking give the library's matches and edges.

Used by notebooks/05_algorithm_step_by_step.py and notebooks/06_add_your_own_method.py.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from utrc_lib.core.config import ReductionConfig, config_from_args
from utrc_lib.core.methods import (available_metrics, bipartite_match, feature_stats, importance, importance_halves,
                                   reduce_tokens)
from utrc_lib.core.reference import reference_edges

Tensor = torch.Tensor

TOY_TEXT = "the cat sat on the mat and the dog sat on the rug ."
A_COLOUR, B_COLOUR = "#56B4E9", "#E69F00"        # side A (candidates for removal), side B
MERGE_COLOUR, PRUNE_COLOUR = "#009E73", "#D55E00"  # kept edge merged / pruned in the hidden branch
FEATURE_METRICS = ("clip", "sum", "l1", "l2")       # the paper's metric and its ablated alternatives


# -- the toy sequence -----------------------------------------------------------------------------
@dataclass
class Toy:
    """A toy layer output of one sequence: tokens (N words), y (N, C) SSM output (importance and
    similarity source), hidden (N, D) mixer output, residual (N, D) residual stream."""

    tokens: list
    y: Tensor
    hidden: Tensor
    residual: Tensor
    seed: int = 0


def toy_sequence(text: str = TOY_TEXT, dim: int = 8, seed: int = 0, noise: float = 0.35) -> Toy:
    """Random but structured toy features: one random vector per distinct word plus per-position noise,
    so repeated words ("the", "sat", "on") are similar and the matching has something to find.

    Args: text: whitespace-separated words (N = number of words, at least 4); dim: C = D; seed: the
    generator seed; noise: per-position noise scale.
    """
    words = text.split()
    if len(words) < 4:
        raise ValueError(f"the toy needs at least 4 words, got {len(words)}: {text!r}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    g = torch.Generator().manual_seed(int(seed))
    vocab = sorted(set(words))
    table = torch.randn(len(vocab), 3, dim, generator=g)
    idx = torch.tensor([vocab.index(w) for w in words])
    noise_t = noise * torch.randn(len(words), 3, dim, generator=g)
    y, hidden, residual = (table[idx, k] + noise_t[:, k] for k in range(3))
    return Toy(words, y, hidden, residual, seed)


# -- step 1 and 2: importance and the split -------------------------------------------------------
def importance_scores(y: Tensor, metrics: Sequence[str] = FEATURE_METRICS) -> dict:
    """{metric: (N,) scores} of one sequence's features y (N, C), by `core.methods.importance`."""
    if y.dim() != 2:
        raise ValueError(f"y must be (N, C) for one sequence, got shape {tuple(y.shape)}")
    unknown = [m for m in metrics if m not in available_metrics()]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {', '.join(available_metrics())}")
    return {m: importance(m, y[None])[0] for m in metrics}


@dataclass
class Steps:
    """UTRC's steps on one sequence at one layer (every field from the library, see module doc).

    scores (N,); is_a / is_b (N,) bool: the split; a_idx / b_idx: token indices of side A / B by
    position; cos (|A|, |B|): cosine of every a_i with every b (display matrix); f (|A|,) token index
    of each a_i's best match (library); g (|A|,) its cosine; kept (|A|,) bool: the r edges kept
    (library); r; result: `reduce_tokens` output (plan, reduced branches, positions, sizes);
    edges: [(source, destination, merged in hidden, merged in residual)] read from the plan.
    """

    tokens: list
    metric: str
    q: float
    n_keep: int
    r: int
    scores: Tensor
    is_a: Tensor
    is_b: Tensor
    a_idx: list
    b_idx: list
    cos: Tensor
    f: list
    g: list
    kept: list
    result: object
    edges: list = field(default_factory=list)
    config: Optional[ReductionConfig] = None


def plan_edges(plan, n_sources: int) -> list:
    """[(source, destination, merged in hidden, merged in residual)] of a single-sample Plan.

    Source and destination are input token indices (the destination is the base token of the slot
    the source joins); `n_sources` = tokens the plan removes (the first entries of plan.src).
    """
    src = plan.src[0, :n_sources].tolist()
    slot = plan.src_slot[0, :n_sources].tolist()
    base = plan.base[0].tolist()
    w_h = plan.src_weight.get("hidden")
    w_r = plan.src_weight.get("residual")
    out = []
    for j, s in enumerate(src):
        mh = w_h is not None and float(w_h[0, j]) > 0
        mr = w_r is not None and float(w_r[0, j]) > 0
        out.append((int(s), int(base[slot[j]]) if (mh or mr) else None, mh, mr))
    return out


def utrc_steps(toy: Toy, n_keep: int, *, q: float = 0.5, metric: str = "clip", causal: bool = True,
               method: str = "utrc") -> Steps:
    """Run UTRC's steps on the toy: importance, split, matching, kept edges, hybrid / merge reduction.

    n_keep: tokens kept (r = N - n_keep, at most |A| = floor(N / 2) in one matching round).
    """
    N = len(toy.tokens)
    if not 1 <= n_keep <= N:
        raise ValueError(f"n_keep must be in [1, {N}], got {n_keep}")
    r = N - n_keep
    if r > N // 2:
        raise ValueError(f"one matching round removes at most floor(N/2) = {N // 2} tokens; n_keep >= {N - N // 2}")
    cfg = ReductionConfig(method, metric=metric, keep_ratio=n_keep / N, q=q, causal=causal)
    res = reduce_tokens(toy.hidden[None], toy.residual[None], config=cfg, n_keep=n_keep, metric=toy.y[None])
    return steps_from_features(toy.tokens, toy.y, r, res.plan, q=q, metric=metric, result=res, config=cfg)


def steps_from_features(tokens: Sequence[str], y: Tensor, r: int, plan, *, q: float = 0.5, metric: str = "clip",
                        result=None, config: Optional[ReductionConfig] = None) -> Steps:
    """Steps 1-4 on one sequence's features y (N, C), beside the `plan` that was applied (the toy's
    `reduce_tokens` plan, or the plan a real forward recorded at its first anchor)."""
    N = len(tokens)
    yb = y[None]
    every = torch.ones(1, N, dtype=torch.bool)
    scores, inv_norm = feature_stats(metric, yb, valid=every)        # (1, N) importance, 1 / ||y||
    is_a, is_b = importance_halves(scores, every)                    # paper step 2
    is_src, dst = bipartite_match(yb, is_a, is_b, torch.tensor([r]), inv_norm=inv_norm)  # paper steps 3-4
    a_idx = is_a[0].nonzero()[:, 0].tolist()
    b_idx = is_b[0].nonzero()[:, 0].tolist()
    yn = F.normalize(y.double(), dim=-1)
    cos = (yn[a_idx] @ yn[b_idx].T).float()                          # display matrix (|A|, |B|)
    f = [int(dst[0, a]) for a in a_idx]
    g = [float(cos[i, b_idx.index(fi)]) for i, fi in enumerate(f)]
    kept = [bool(is_src[0, a]) for a in a_idx]
    steps = Steps(list(tokens), metric, q, N - r, r, scores[0], is_a[0], is_b[0], a_idx, b_idx, cos, f, g,
                  kept, result, config=config)
    steps.edges = plan_edges(plan, N - plan.num_out)
    return steps


@torch.no_grad()
def real_anchor_steps(model, tokenizer, text: str, *, cut: float = 0.3, max_tokens: int = 24, q: float = 0.5,
                      metric: str = "clip") -> tuple:
    """Steps 1-4 at the first anchor of a real forward (UTRC at token-layer cut `cut`).

    The forward runs through the patched model with plan recording; y at the first anchor is read
    from a dense pass (the first anchor sees the full sequence, so its y is the dense y). Returns
    (Steps, {"anchor", "ids", "tokens_before", "tokens_after", "history"}).
    """
    from ..experiments import analysis

    cfg = ReductionConfig("utrc", flops_reduction=cut, q=q, metric=metric)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    red = analysis.run(model, ids, cfg, record=True)
    if not red["history"]:
        raise ValueError(f"nothing was reduced at cut {cut} on {ids.shape[1]} tokens")
    h0 = red["history"][0]
    anchor = h0["layer"]
    feats = {}
    hook = model.backbone.layers[anchor].mixer.out_proj.register_forward_pre_hook(
        lambda mod, args: feats.__setitem__("y", args[0].detach()))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
    r = h0["tokens_before"] - h0["tokens_after"]
    steps = steps_from_features(tokens, feats["y"][0].float(), r, h0["plan"], q=q, metric=metric, config=cfg)
    return steps, {"anchor": anchor, "ids": ids, "tokens_before": h0["tokens_before"],
                   "tokens_after": h0["tokens_after"], "history": red["history"]}


# -- drawing --------------------------------------------------------------------------------------
def _strip(ax, tokens, colours, y0=0.0, fontsize=9, labels=True):
    for i, (t, c) in enumerate(zip(tokens, colours)):
        ax.add_patch(_rect(i - 0.45, y0 - 0.3, 0.9, 0.6, c))
        if labels:
            ax.text(i, y0, t, ha="center", va="center", fontsize=fontsize)
    ax.set_xlim(-0.7, len(tokens) - 0.3)


def _rect(x, y, w, h, colour, **kw):
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colour, ec="#333333", lw=0.6, **kw)


def draw_scores(ax, tokens: Sequence[str], scores: dict) -> None:
    """Grouped bars: the importance of each token under each metric (each metric scaled to max |S| = 1)."""
    import numpy as np

    n, k = len(tokens), len(scores)
    width = 0.8 / k
    for j, (name, s) in enumerate(scores.items()):
        v = s.float().numpy()
        scale = float(np.abs(v).max()) or 1.0
        ax.bar(np.arange(n) - 0.4 + width * (j + 0.5), v / scale, width, label=f"{name} (/{scale:.2f})")
    ax.set_xticks(range(n), tokens, rotation=0, fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("importance S (scaled)")
    ax.legend(fontsize=7, ncol=k, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)


def draw_split(ax, steps: Steps) -> None:
    """The token strip coloured by side (A = less important half), with each token's score and rank."""
    colours = [A_COLOUR if a else B_COLOUR for a in steps.is_a.tolist()]
    _strip(ax, steps.tokens, colours)
    rank = steps.scores.argsort().argsort().tolist()
    for i, (s, rk) in enumerate(zip(steps.scores.tolist(), rank)):
        ax.text(i, -0.55, f"{s:.2f}\n#{rk}", ha="center", va="top", fontsize=7)
    ax.set_ylim(-1.4, 0.6)
    ax.axis("off")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(fc=A_COLOUR, label=f"A: less important half ({len(steps.a_idx)})"),
                       Patch(fc=B_COLOUR, label=f"B: the rest ({len(steps.b_idx)})")],
              loc="upper center", bbox_to_anchor=(0.5, 1.25), ncol=2, fontsize=8, frameon=False)


def draw_similarity(ax, steps: Steps) -> None:
    """A x B cosine heatmap; each row's best match boxed (black), the r kept edges boxed thick (green)."""
    from matplotlib.patches import Rectangle

    im = ax.imshow(steps.cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_yticks(range(len(steps.a_idx)), [f"{steps.tokens[a]} ({a})" for a in steps.a_idx], fontsize=7)
    ax.set_xticks(range(len(steps.b_idx)), [f"{steps.tokens[b]} ({b})" for b in steps.b_idx], fontsize=7,
                  rotation=60)
    ax.set_ylabel("side A: a_i"); ax.set_xlabel("side B")
    ax.grid(False)
    for i, (fi, k) in enumerate(zip(steps.f, steps.kept)):
        j = steps.b_idx.index(fi)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=MERGE_COLOUR if k else "black",
                               lw=2.5 if k else 1.0))
        ax.text(j, i, f"{steps.g[i]:.2f}", ha="center", va="center", fontsize=6)
    ax.figure.colorbar(im, ax=ax, fraction=0.04, label="cos(a_i, b)")


def _arc(ax, x0, x1, height, **kw):
    import numpy as np

    t = np.linspace(0, 1, 40)
    xs = x0 + (x1 - x0) * t
    ys = 0.35 + height * 4 * t * (1 - t)
    ax.plot(xs, ys, **kw)
    ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-4], ys[-4]),
                arrowprops=dict(arrowstyle="-|>", color=kw.get("color", "black"), lw=kw.get("lw", 1)))


def draw_arcs(ax, steps: Steps) -> None:
    """Each a_i -> f_i as an arc over the token strip; the r kept edges thick (green: merged in the
    hidden branch, red dashed: pruned there), the others thin grey."""
    colours = [A_COLOUR if a else B_COLOUR for a in steps.is_a.tolist()]
    _strip(ax, steps.tokens, colours)
    hidden_merged = {s: mh for s, _, mh, _ in steps.edges}
    for a, fi, k in zip(steps.a_idx, steps.f, steps.kept):
        h = 0.25 + 0.12 * abs(fi - a)
        if not k:
            _arc(ax, a, fi, h, color="#AAAAAA", lw=0.8)
        elif hidden_merged.get(a):
            _arc(ax, a, fi, h, color=MERGE_COLOUR, lw=2.4)
        else:
            _arc(ax, a, fi, h, color=PRUNE_COLOUR, lw=2.4, ls="--")
    ax.set_ylim(-0.5, 0.6 + 0.25 + 0.12 * len(steps.tokens))
    ax.axis("off")
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color="#AAAAAA", label="best match f_i (edge not kept)"),
                       Line2D([], [], color=MERGE_COLOUR, lw=2.4, label="kept: merged in hidden and residual"),
                       Line2D([], [], color=PRUNE_COLOUR, lw=2.4, ls="--",
                              label="kept: pruned in hidden, merged in residual")],
              loc="upper center", bbox_to_anchor=(0.5, 1.05), ncol=3, fontsize=7, frameon=False)


def edge_table(steps: Steps):
    """One row per a_i: its best match f_i, the cosine g_i, the rank of the edge, kept or not, and what
    each branch does with it (from the plan)."""
    import pandas as pd

    fate = {s: (mh, mr) for s, _, mh, mr in steps.edges}
    order = sorted(range(len(steps.g)), key=lambda i: -steps.g[i])
    rank = {i: k for k, i in enumerate(order)}
    rows = []
    for i, (a, fi) in enumerate(zip(steps.a_idx, steps.f)):
        mh, mr = fate.get(a, (None, None))
        rows.append({"a_i": f"{steps.tokens[a]} ({a})", "f_i": f"{steps.tokens[fi]} ({fi})",
                     "g_i": round(steps.g[i], 3), "edge rank": rank[i], "kept": steps.kept[i],
                     "hidden branch": "-" if mh is None else ("merge" if mh else "prune"),
                     "residual branch": "-" if mr is None else ("merge" if mr else "prune")})
    return pd.DataFrame(rows).sort_values("edge rank").reset_index(drop=True)


def merge_example(steps: Steps, toy: Toy, channels: int = 4):
    """Before / after numbers of one slot that receives sources (the first one with a hidden merge
    and a hidden prune if any, else the first receiver): a DataFrame with the base token, its sources
    (weights per branch) and the reduced rows `reduce_tokens` returned, first `channels` channels.
    Also returns {"slot", "position", "size", "base", "sources"}."""
    import pandas as pd

    res = steps.result
    by_dst: dict = {}
    for s, d, mh, mr in steps.edges:
        if d is not None:
            by_dst.setdefault(d, []).append((s, mh, mr))
    if not by_dst:
        raise ValueError("this plan merges nothing (every kept edge is pruned in both branches)")
    pick = next((d for d, v in by_dst.items() if any(mh for _, mh, _ in v) and any(not mh for _, mh, _ in v)),
                next(iter(by_dst)))
    base_tokens = res.plan.base[0].tolist()
    slot = base_tokens.index(pick)
    c = slice(0, channels)
    fmt = lambda v: [round(float(x), 3) for x in v[c]]
    rows = [{"row": f"before: base {toy.tokens[pick]} ({pick})", "weight hidden": 1.0, "weight residual": 1.0,
             "hidden[:k]": fmt(toy.hidden[pick]), "residual[:k]": fmt(toy.residual[pick])}]
    for s, mh, mr in by_dst[pick]:
        rows.append({"row": f"before: source {toy.tokens[s]} ({s})", "weight hidden": float(mh),
                     "weight residual": float(mr), "hidden[:k]": fmt(toy.hidden[s]),
                     "residual[:k]": fmt(toy.residual[s])})
    rows.append({"row": f"after: slot {slot}", "weight hidden": None, "weight residual": None,
                 "hidden[:k]": fmt(res.hidden[0, slot]), "residual[:k]": fmt(res.residual[0, slot])})
    info = {"slot": slot, "position": int(res.positions[0, slot]), "size": float(res.sizes[0, slot]),
            "base": pick, "sources": by_dst[pick]}
    return pd.DataFrame(rows), info


def draw_branches(axes, steps: Steps) -> None:
    """Two strips (hidden, residual branch) of the reduced sequence: each output slot labelled with the
    tokens it holds (base + merged sources) and the original position it takes."""
    res = steps.result
    base = res.plan.base[0].tolist()
    pos = res.positions[0].tolist()
    for ax, branch, k in zip(axes, ("hidden", "residual"), (2, 3)):
        members = {b: [b] for b in base}
        for e in steps.edges:
            if e[1] is not None and e[k]:
                members[e[1]].append(e[0])
        labels = ["+".join(steps.tokens[m] for m in sorted(members[b])) + f"\n@{p}" for b, p in zip(base, pos)]
        colours = [MERGE_COLOUR if len(members[b]) > 1 else "#EEEEEE" for b in base]
        _strip(ax, labels, colours, fontsize=7)
        pruned = [steps.tokens[s] for s, d, mh, mr in steps.edges if not (mh if branch == "hidden" else mr)]
        ax.set_title(f"{branch} branch: {len(base)} slots" + (f"; pruned: {', '.join(pruned)}" if pruned else
                                                              "; nothing pruned (merge-only)"), fontsize=9)
        ax.set_ylim(-0.6, 0.6)
        ax.axis("off")


def toy_fates(result, n_tokens: int) -> list:
    """`experiments.analysis.token_fates` of a one-layer `reduce_tokens` result (layer labelled 0)."""
    from ..experiments.analysis import token_fates

    hist, n = [], n_tokens
    for p in result.plans:  # one entry per matching round
        hist.append({"layer": 0, "plan": p, "tokens_before": n, "tokens_after": int(p.num_out)})
        n = int(p.num_out)
    return token_fates(hist, n_tokens)


# -- step 5: the causal rule ----------------------------------------------------------------------
@contextlib.contextmanager
def fixed_merges(pairs: dict, name: str = "teaching_fixed_merge"):
    """Register, for the block, a method that merges the given {source: destination} token indices
    (both branches) through the library's `build_plan`, so its causal placement rule is the one every
    method uses. Yields the method name. Needs causal=False to show the non-causal placement."""
    from utrc_lib.core.methods import Method, register_method, unregister_method
    from utrc_lib.core.plan import build_plan

    def fn(ctx):
        B, N = ctx.state.valid.shape
        is_src = torch.zeros(B, N, dtype=torch.bool)
        dst = torch.arange(N).expand(B, N).clone()
        for s_, d_ in pairs.items():
            if not (0 <= s_ < N and 0 <= d_ < N) or s_ == d_:
                raise ValueError(f"fixed merge {s_} -> {d_} is not a pair of distinct tokens of {N}")
            is_src[:, s_], dst[:, s_] = True, d_
        return build_plan(ctx.state.valid, is_src, dst, {b: is_src for b in ctx.rules}, ctx.causal)

    register_method(Method(name, fn, "merge fixed token pairs (teaching)", needs_features=False,
                           repeat_rounds=False), replace=True)
    try:
        yield name
    finally:
        unregister_method(name)


@torch.no_grad()
def two_token_example(model, tokenizer, first: str, seconds: Sequence[str]) -> dict:
    """The causal rule on the real model: inputs [first, x1] for each x1 in `seconds`; after layer 0 the
    later token x1 is merged into the earlier one (`fixed_merges({1: 0})`), once with the non-causal
    placement (the merged row keeps position 0) and once with the causal one (it takes position 1).

    Returns {"first", "rows": [{"x1", "dense" (2, V), "noncausal" (1, V), "noncausal_positions",
    "causal" (1, V), "causal_positions"}]}: logits of the kept rows and the original position of each
    (`kept_only` output and `handle.output_positions`).
    """
    from utrc_lib.hosts.handle import apply

    first_ids = tokenizer(first)["input_ids"]
    if len(first_ids) != 1:
        raise ValueError(f"first must be one token, {first!r} is {len(first_ids)}")
    rows = []
    with fixed_merges({1: 0}) as name:
        for x1 in seconds:
            ids1 = tokenizer(x1)["input_ids"]
            if len(ids1) != 1:
                raise ValueError(f"each second token must be one token, {x1!r} is {len(ids1)}")
            ids = torch.tensor([first_ids + ids1])
            row = {"x1": x1, "dense": model(input_ids=ids, use_cache=False).logits[0].float()}
            for key, causal in (("noncausal", False), ("causal", True)):
                cfg = ReductionConfig(name, keep_ratio=0.5, layers=(0,), causal=causal)
                with apply(model, cfg) as h, h.options(kept_only=True):
                    row[key] = model(input_ids=ids, use_cache=False).logits[0].float()
                    row[f"{key}_positions"] = h.output_positions[0].tolist()
            rows.append(row)
    return {"first": first, "rows": rows}


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the rows both have (a patched model's removed positions are NaN rows); inf
    when the two leave different rows absent."""
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return float("inf")
    d = (a - b).abs().masked_fill(na, 0.0)
    return float(d.max()) if d.numel() else 0.0


def leak_summary(example: dict) -> dict:
    """How much the prediction at position 0 moves when only the later token x1 changes (max |logit
    difference| between the first two x1), dense vs non-causal; and the positions each run keeps."""
    a, b = example["rows"][0], example["rows"][1]
    return {"dense position 0": float((a["dense"][0] - b["dense"][0]).abs().max()),
            "non-causal row at position 0": float((a["noncausal"][0] - b["noncausal"][0]).abs().max()),
            "non-causal positions": a["noncausal_positions"], "causal positions": a["causal_positions"]}


def causal_table(example: dict, tokenizer, k: int = 3):
    """Rows per (x1, run, position): top-k next tokens and KL from the dense prediction at that position."""
    import pandas as pd

    from ..experiments.analysis import next_token_kl

    def top(v):
        p = v.softmax(-1)
        val, idx = p.topk(k)
        return ", ".join(f"{tokenizer.decode([int(i)])!r} {float(x):.2f}" for x, i in zip(val, idx))

    out = []
    for r in example["rows"]:
        seq = f"{example['first']!r} + {r['x1']!r}"
        out.append({"input": seq, "run": "dense", "position": 0, "sees": "token 0",
                    "logit[0]": round(float(r["dense"][0, 0]), 4), "top next tokens": top(r["dense"][0]),
                    "KL vs dense at that position": 0.0})
        out.append({"input": seq, "run": "dense", "position": 1, "sees": "tokens 0-1",
                    "logit[0]": round(float(r["dense"][1, 0]), 4), "top next tokens": top(r["dense"][1]),
                    "KL vs dense at that position": 0.0})
        for run, key in (("non-causal merge", "noncausal"), ("causal merge", "causal")):
            for row, p in enumerate(r[f"{key}_positions"]):
                out.append({"input": seq, "run": run, "position": p, "sees": "tokens 0-1 (merged)",
                            "logit[0]": round(float(r[key][row, 0]), 4), "top next tokens": top(r[key][row]),
                            "KL vs dense at that position": next_token_kl(r["dense"][p][None], r[key][row][None])})
    return pd.DataFrame(out)


# -- step 6: the authors' released behaviour ------------------------------------------------------
def reference_steps(toy: Toy, n_keep: int, q: float = 0.5) -> dict:
    """The authors' code on the toy (method utrc_reference): the clipped, normalised, per-channel sorted
    matrix it matches (display), its source / destination token indices (`reference_edges`, mapped to
    even / odd positions) and the `reduce_tokens` result. Returns {"sorted" (N, D), "mid", "src", "dst",
    "result", "config", "r"}."""
    N = len(toy.tokens)
    r = min(N - n_keep, N // 2)
    cfg = ReductionConfig("utrc_reference", keep_ratio=n_keep / N, q=q, causal=False)
    m = toy.hidden.clamp(min=0)
    norm = m.norm(dim=-1, keepdim=True)
    m = torch.where(norm > 0, m / norm.where(norm > 0, torch.ones_like(norm)), torch.zeros_like(m))
    s = m.sort(dim=0, descending=True).values                       # per channel, along tokens (display)
    src_idx, dst_idx = reference_edges(toy.hidden[None], r)
    res = reduce_tokens(toy.hidden[None], toy.residual[None], config=cfg, n_keep=n_keep)
    return {"sorted": s, "mid": N // 2, "src": (2 * src_idx[0]).tolist(), "dst": (2 * dst_idx[0] + 1).tolist(),
            "result": res, "config": cfg, "r": r}


def draw_reference_sort(ax, toy: Toy, ref: dict) -> None:
    """The per-channel sorted matrix: rows are rank levels, not tokens; the lower half (a) is matched
    to the upper half (b)."""
    im = ax.imshow(ref["sorted"].numpy(), cmap="magma", aspect="auto")
    ax.axhline(ref["mid"] - 0.5, color="white", lw=2)
    ax.set_ylabel("rank level (row), not a token")
    ax.set_xlabel("channel")
    ax.set_title(f"per-channel sort: rows 0-{ref['mid'] - 1} = b, rows {ref['mid']}+ = a", fontsize=9)
    ax.grid(False)
    ax.figure.colorbar(im, ax=ax, fraction=0.04, label="clipped, normalised value")


def draw_fates_strip(ax, tokens: Sequence[str], fates: Sequence[dict], title: str) -> None:
    """One strip: kept tokens white, merged green (with '->j' the token it joined), pruned red,
    hybrid (pruned in hidden, merged in residual) hatched green."""
    colours, hatch = [], []
    for f in fates:
        colours.append({"kept": "#FFFFFF", "merged": MERGE_COLOUR, "hybrid": MERGE_COLOUR,
                        "pruned": PRUNE_COLOUR, "protected": "#DDDDDD"}[f["fate"]])
    _strip(ax, tokens, colours, fontsize=8)
    for i, f in enumerate(fates):
        if f["fate"] == "hybrid":
            ax.add_patch(_rect(i - 0.45, -0.3, 0.9, 0.6, "none", hatch="///"))
        if f["into"] is not None:
            ax.text(i, -0.45, f"->{f['into']}", ha="center", va="top", fontsize=7)
        ax.text(i, 0.4, str(i), ha="center", va="bottom", fontsize=6, color="#666666")
    ax.set_ylim(-0.9, 0.7)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


# -- step 7: the schedule -------------------------------------------------------------------------
def schedule_table(num_layers: int, seq_len: int, cuts: Sequence[float], model=None, *, method: str = "utrc"):
    """One row per target token-layer cut: anchors, keep ratio rho per anchor, tokens kept after the
    last anchor, the token-layer cut reached with integer counts, and (with `model`) the analytic
    FLOPs cut of `core.flops.flops` at `seq_len` tokens (all-position logits)."""
    import pandas as pd

    from utrc_lib.core.flops import flops
    from utrc_lib.core.config import default_layers, keep_ratio_for_flops, token_layer_fraction, tokens_per_layer

    layers = default_layers(num_layers)
    rows = []
    for cut in cuts:
        rho = keep_ratio_for_flops(cut, num_layers, layers)
        counts = tokens_per_layer(seq_len, num_layers, layers, rho)
        row = {"target cut": cut, "anchors": list(layers), "keep ratio rho": round(rho, 4),
               "tokens per layer": [int(c) for c in counts],
               "token-layer cut (integer counts)": round(1 - token_layer_fraction(num_layers, layers, rho, seq_len), 4)}
        if model is not None:
            rep = flops(model, seq_len, ReductionConfig(method, flops_reduction=cut))
            row["analytic FLOPs cut"] = round(rep.analytic_cut, 4)
        rows.append(row)
    return pd.DataFrame(rows)


def draw_schedule(ax, table, num_layers: int, seq_len: int) -> None:
    """Tokens per layer for each row of `schedule_table`; anchors as dotted lines."""
    ax.step(range(num_layers), [seq_len] * num_layers, where="post", color="black", ls="--", label="dense")
    for _, row in table.iterrows():
        ax.step(range(num_layers), row["tokens per layer"], where="post", lw=1.6,
                label=f"{row['target cut']:.0%} cut: rho = {row['keep ratio rho']:.3f}")
    for a in table.iloc[0]["anchors"]:
        ax.axvline(a + 0.5, color="#999999", ls=":", lw=1)
    ax.set_xlabel("layer (0-based); dotted: a reduction after layer l shortens layer l+1 on")
    ax.set_ylabel("tokens the layer processes")
    ax.legend(fontsize=7)


# -- the real-model explorer (ipywidgets) ---------------------------------------------------------
EXPLORER_DEFAULTS = dict(method="utrc", metric="clip", cut=0.3, q=0.5, paragraph=3)


def explorer_config(method: str, metric: str, cut: float, q: float) -> ReductionConfig:
    """The config the explorer runs (config_from_args: utrc_reference gets causal=False)."""
    cfg = config_from_args(method, flops_reduction=cut, metric=metric, q=q)
    if cfg is None:
        raise ValueError(f"method {method!r} at cut {cut} is the dense model: pick a method and a cut > 0")
    return cfg


def explorer_data(model, tokenizer, text: str, *, method: str, metric: str, cut: float, q: float,
                  max_tokens: int = 64) -> dict:
    """What the explorer draws for one setting: `experiments.analysis.trace` (token fates, tokens per
    layer, logits) plus the positions that keep their own output row and the KL there."""
    from ..experiments import analysis

    cfg = explorer_config(method, metric, cut, q)
    t = analysis.trace(model, tokenizer, text, cfg, max_tokens=max_tokens)
    ids = torch.tensor([t["ids"]])
    red = analysis.run(model, ids, cfg)
    L = t["num_layers"]
    own = sorted(int(p) for p in analysis.positions_per_layer(red["history"], L, 1, ids.shape[1])[-1][0] if p >= 0)
    kl = analysis.kl_per_position(t["logits_dense"], t["logits_reduced"])
    return {"trace": t, "own": own, "kl": kl, "config": cfg}


def draw_explorer(fig, data: dict, title: str = "") -> None:
    """Three panels of one explorer setting: token fates, tokens per layer, KL at the own rows."""
    from . import plotting
    from .provenance import fate_counts_text, plot_token_fates, token_fate_counts

    t, cfg = data["trace"], data["config"]
    gs = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    ax0 = fig.add_subplot(gs[0, :])
    plot_token_fates(ax0, t["tokens"], t["fates"], t["anchors"],
                     title=title or f"{cfg.method}, metric {cfg.metric}, q {cfg.q}: "
                                    f"{fate_counts_text(token_fate_counts(t['fates']))}")
    L, N = t["num_layers"], len(t["tokens"])
    ax1 = fig.add_subplot(gs[1, 0])
    st = plotting.style(cfg.method)
    ax1.step(range(L), [N] * L, where="post", color="black", ls="--", label="dense")
    ax1.step(range(L), t["tokens_per_layer"], where="post", color=st["color"], lw=2, label=st["label"])
    ax1.set_xlabel("layer (0-based)"); ax1.set_ylabel("tokens"); ax1.legend(fontsize=7)
    ax1.set_title("Sequence length through the model")
    ax2 = fig.add_subplot(gs[1, 1])
    kl = data["kl"].numpy()
    ax2.plot(data["own"], kl[data["own"]], ".-", color=st["color"], lw=1, ms=3)
    ax2.set_yscale("symlog", linthresh=1e-3); ax2.set_ylim(0, None)
    ax2.set_xlabel("position (own output rows only)"); ax2.set_ylabel("KL(dense || reduced), nats")
    ax2.set_title(f"Next-token KL; last position {t['kl_last']:.2f} nats")
    fig.tight_layout()


def explorer(model, tokenizer, texts: Sequence[str], *, max_tokens: int = 64, defaults: Optional[dict] = None):
    """ipywidgets controls (method, metric, cut, hidden-branch q, paragraph) that re-draw the explorer's
    three panels into an Output below them. Returns the widget box (display it). Under papermill the
    box is inert; the notebook draws the default setting as a static figure before it."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from utrc_lib.core.methods import available_methods

    d = dict(EXPLORER_DEFAULTS, **(defaults or {}))
    methods = [m for m in available_methods() if m != "none"]
    ctl = {
        "method": w.Dropdown(options=methods, value=d["method"], description="method"),
        "metric": w.Dropdown(options=[m for m in available_metrics() if m != "delta"], value=d["metric"],
                             description="metric"),
        "cut": w.FloatSlider(value=d["cut"], min=0.05, max=0.6, step=0.05, description="cut",
                             continuous_update=False, readout_format=".0%"),
        "q": w.FloatSlider(value=d["q"], min=0.0, max=1.0, step=0.25, description="hidden q",
                           continuous_update=False),
        "paragraph": w.IntSlider(value=min(d["paragraph"], len(texts) - 1), min=0, max=len(texts) - 1,
                                 description="paragraph", continuous_update=False),
    }
    out = w.Output()
    status = w.HTML(value="<i>change a control to re-draw the three panels below</i>")

    def redraw(_=None):
        v = {k: c.value for k, c in ctl.items()}
        with out:
            out.clear_output(wait=True)
            try:
                data = explorer_data(model, tokenizer, texts[v["paragraph"]], method=v["method"],
                                     metric=v["metric"], cut=v["cut"], q=v["q"], max_tokens=max_tokens)
            except ValueError as e:  # e.g. an unreachable cut: say so in the panel
                status.value = f"<b>cannot run this setting:</b> {e}"
                return
            fig = plt.figure(figsize=(11, 5.5))
            draw_explorer(fig, data)
            display(fig)
            plt.close(fig)
            status.value = (f"{v['method']} / {v['metric']} / cut {v['cut']:.0%} / q {v['q']} / paragraph "
                            f"{v['paragraph']}: last-position KL {data['trace']['kl_last']:.3f} nats")

    for c in ctl.values():
        c.observe(redraw, names="value")
    box = w.VBox([w.HBox([ctl["method"], ctl["metric"]]), w.HBox([ctl["cut"], ctl["q"], ctl["paragraph"]]),
                  status, out])
    box.controls, box.output, box.redraw = ctl, out, redraw
    return box


# -- "add your own method": the checks a new method must pass, and a small sweep ------------------
def random_ids(batch: int, n: int, vocab: int, seed: int = 0) -> Tensor:
    """(batch, n) seeded random token ids."""
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def check_method(model, method: str, *, keep_ratio: float = 0.6, n: int = 28, protect: int = 8,
                 seed: int = 0, causal: bool = True) -> list:
    """The library's guarantees, run on a method by name through the real model (the same properties
    tests/test_model.py and tests/test_reliability.py assert for the built-in methods):

    - "order": kept tokens stay in ascending original position (`reduce_tokens` on random features);
    - "causal placement": every merged source sits at or before the position of the slot it joins;
    - "causal (protected tail)": with the last `protect` tokens protected, changing them never
      changes an earlier logit (max |difference| must be <= 1e-6);
    - "batch": a left-padded batch of three lengths gives each sample's single-sequence logits (1e-4).

    Returns one dict per check: {"check", "passed", "detail"}; exceptions raised by the method are
    reported as a failed check with the error.
    """
    from utrc_lib.hosts.handle import apply

    out = []

    def record(name, fn):
        try:
            ok, detail = fn()
        except Exception as e:  # a broken method must show up as a failed check, not a crash
            ok, detail = False, f"{type(e).__name__}: {e}"
        out.append({"check": name, "passed": bool(ok), "detail": detail})

    cfg = ReductionConfig(method, keep_ratio=keep_ratio, causal=causal)
    g = torch.Generator().manual_seed(seed)
    hidden, residual = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
    n_keep = math.ceil(n * keep_ratio)

    def order():
        res = reduce_tokens(hidden, residual, config=cfg, n_keep=n_keep)
        pos = res.positions
        ok = bool((pos[:, 1:] > pos[:, :-1]).all()) and res.hidden.shape[1] < n
        return ok, f"{n} -> {res.hidden.shape[1]} tokens; positions ascending: {bool((pos[:, 1:] > pos[:, :-1]).all())}"

    def placement():
        res = reduce_tokens(hidden, residual, config=cfg, n_keep=n_keep)
        bad = []
        for b in range(2):
            p = res.plans[0]
            n_src = n - p.num_out
            for s_, slot, w in zip(p.src[b, :n_src].tolist(), p.src_slot[b, :n_src].tolist(),
                                   p.src_weight["residual"][b, :n_src].tolist()):
                if w > 0 and int(res.positions[b, slot]) < s_:
                    bad.append((s_, int(res.positions[b, slot])))
        return not bad, ("every merged source moves to a later (or its own) position" if not bad else
                         f"source -> earlier position (source, slot position): {bad[:4]}")

    def protected():
        ids = random_ids(2, n, model.config.vocab_size, seed)
        with apply(model, cfg.replace(protect_last=protect)):
            base = model(input_ids=ids, use_cache=False).logits
            changed = ids.clone()
            changed[:, n - protect:] = (changed[:, n - protect:] + 1) % model.config.vocab_size
            new = model(input_ids=changed, use_cache=False).logits
        diff = _max_abs_diff(new[:, :n - protect], base[:, :n - protect])
        return diff <= 1e-6, f"max |logit change| before the protected tail: {diff:.2e}"

    def batch():
        lengths = [n, n - 7, n - 13]
        seqs = [random_ids(1, k, model.config.vocab_size, seed + i)[0] for i, k in enumerate(lengths)]
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s_ in enumerate(seqs):  # left padding
            ids[i, n - len(s_):], mask[i, n - len(s_):] = s_, 1
        worst = 0.0
        with apply(model, cfg.replace(protect_last=3)):
            both = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for i, s_ in enumerate(seqs):
                single = model(input_ids=s_[None], use_cache=False).logits[0]
                worst = max(worst, _max_abs_diff(both[i, n - len(s_):], single))
        return worst <= 1e-4, f"max |batched - single| over 3 left-padded lengths: {worst:.2e}"

    import warnings

    from utrc_lib.core.methods import ReductionShortfall

    with warnings.catch_warnings():  # short test sequences run out of reducible tokens: not what is checked
        warnings.simplefilter("ignore", ReductionShortfall)
        for name, fn in (("order", order), ("causal placement", placement),
                         ("causal (protected tail)", protected), ("batch", batch)):
            record(name, fn)
    return out


def accuracy_sweep(model, tokenizer, methods: Sequence[str], cuts: Sequence[float], *,
                   tasks: Sequence[str] = ("cloze", "choice2"), limit: int = 20, batch_size: int = 16):
    """Accuracy against the token-layer cut with the built-in evaluator (leak-free scoring), dense row
    first: a DataFrame with method, target cut, token-layer cut achieved, analytic FLOPs cut (at 128
    tokens) and each task's accuracy. Runs any registered method (no sweep cache: a user's method
    may change between runs)."""
    import pandas as pd

    from utrc_lib.core.flops import flops
    from ..eval.scorer import evaluate

    rows = []
    for method, cut in [("none", 0.0)] + [(m, c) for m in methods for c in cuts]:
        cfg = None if method == "none" else ReductionConfig(method, flops_reduction=cut,
                                                            causal=method != "utrc_reference")
        res = evaluate(model, tokenizer, tasks=tuple(tasks), config=cfg, limit=limit, batch_size=batch_size,
                       progress=False)
        row = {"method": method, "target_token_layer_cut": cut,
               "analytic_flops_cut": flops(model, 128, cfg, logits="last").analytic_cut}
        for t in tasks:
            for k in ("acc", "acc_norm"):
                if k in res[t]:
                    row[f"{t}/{k}"] = res[t][k]
        ach = [res[t]["achieved_token_layer_cut"] for t in tasks if "achieved_token_layer_cut" in res[t]]
        row["achieved_token_layer_cut"] = sum(ach) / len(ach) if ach else 0.0
        rows.append(row)
    df = pd.DataFrame(rows)
    acc_cols = [c for c in df if c.endswith("/acc")]
    df["mean_acc"] = df[acc_cols].mean(axis=1)
    return df

"""Sentences and table cells rendered from the numbers: the notebooks quote no number by hand.

Every number a notebook's text states about its results is produced here from the tables the
notebook computed (and wrote to results.json), so the text follows the numbers when they change:

    fmt_ci(0.012, -0.003, 0.027)             -> "1.2 [-0.3, 2.7]"            (points; scale 100)
    fmt_p(0.0, resamples=10_000)             -> "< 0.0001"                    (a bootstrap p never reads 0)
    margin_summary(cmp)                      -> Markdown: UTRC minus each baseline, range and Holm verdicts
    paper_scale(ours, paper_models)          -> how much larger the paper's checkpoints are than ours
    walkthrough_kl(kl_rows)                  -> 00's paragraph on the last-position KL
    failure_findings(stats, cmp, ...)        -> 04's "what the figure shows"

Statements are conditional on the numbers (an interval that excludes zero is called a difference, one
that does not is called unresolved); the wording of each branch is fixed here, the numbers are not.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..experiments.stats import format_p

__all__ = ["fmt_ci", "fmt_p", "fmt_signed", "join", "label", "margin_summary", "paper_scale", "walkthrough_kl",
           "failure_findings", "protocol_findings", "design_findings"]

fmt_p = format_p


SHORT_LABELS = {"utrc": "UTRC", "utrc_reference": "UTRC as the authors' code does it", "none": "dense"}


def label(method: str) -> str:
    from .plotting import style

    return SHORT_LABELS.get(method) or style(method)["label"]


def clauses(pairs: Sequence[tuple], empty: str) -> str:
    """"better at a and b, worse at c" from (prefix, items) pairs, skipping empty ones; `empty` if all are."""
    said = [f"{prefix} {join(items)}" for prefix, items in pairs if items]
    return ", ".join(said) if said else empty


def short(model) -> str:
    return Path(str(model)).name


def fmt_ci(e, lo, hi, scale: float = 100.0, digits: int = 1) -> str:
    """"e [lo, hi]" times `scale` with `digits` decimals ("" when e is missing)."""
    if e is None or (isinstance(e, float) and math.isnan(e)):
        return ""
    return f"{scale * e:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def fmt_signed(v: float, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * v:+.{digits}f}"


def join(words: Iterable[str], empty: str = "none") -> str:
    """"a", "a and b", "a, b and c"; `empty` when there is nothing."""
    w = list(words)
    if not w:
        return empty
    return w[0] if len(w) == 1 else ", ".join(w[:-1]) + " and " + w[-1]


def _excludes_zero(lo: float, hi: float) -> bool:
    return lo > 0 or hi < 0


# -- 01: UTRC against each baseline ------------------------------------------------------------------
MEASURES = {"avg_acc": ("mean accuracy", "points", 100.0, 1),
            "kl:ppl": ("KL(dense || method) per token on the ppl task", "nats/token; negative = UTRC closer to dense",
                       1.0, 4)}


def margin_summary(cmp, metrics: Sequence[str] = ("avg_acc", "kl:ppl"), *, family: Optional[str] = None) -> str:
    """Markdown: per measure and baseline, the range of UTRC minus the baseline over the models and
    cuts of `cmp` (a `paired.comparison_table`), where each end was measured, and which comparisons
    survive the table's Holm correction (`family`: its description, default `paired.holm_family`)."""
    from ..experiments.paired import holm_family

    if cmp is None or not len(cmp):
        return "No UTRC-vs-baseline comparisons in this run."
    fam = family or holm_family(cmp)
    out = [f"Holm correction over {fam}; intervals are unadjusted 95% bootstrap intervals."]
    for metric in metrics:
        d = cmp[cmp["metric"] == metric]
        if d.empty:
            continue
        name, unit, scale, digits = MEASURES.get(metric, (metric, "", 1.0, 4))
        out.append(f"\n**{name[0].upper() + name[1:]}, UTRC minus each baseline** ({unit}; "
                   f"{d['model'].nunique()} model(s) x {d['cut'].nunique()} cut(s)):\n")
        for b in dict.fromkeys(d["baseline"]):
            s = d[d["baseline"] == b]
            lo, hi = s.loc[s["delta"].idxmin()], s.loc[s["delta"].idxmax()]
            where = lambda r: f"{short(r['model'])} at {r['cut']:.0%}"  # noqa: E731
            span = (f"{fmt_signed(lo['delta'], scale, digits)} ({where(lo)})" if len(s) == 1 else
                    f"from {fmt_signed(lo['delta'], scale, digits)} ({where(lo)}) to "
                    f"{fmt_signed(hi['delta'], scale, digits)} ({where(hi)})")
            beats = [where(r) for _, r in s[s["verdict"] == "beats"].iterrows()]
            beaten = [where(r) for _, r in s[s["verdict"] == "beaten"].iterrows()]
            raw = int(sum(_excludes_zero(r["low"], r["high"]) for _, r in s.iterrows()))
            every = f"every model and cut ({len(s)})"
            holm = clauses([("UTRC better at", [every] if len(beats) == len(s) > 1 else beats),
                            ("UTRC worse at", [every] if len(beaten) == len(s) > 1 else beaten)], "no difference resolved")
            out.append(f"* {label(b)}: {span}; after Holm: {holm}; {raw} of {len(s)} unadjusted intervals exclude 0.")
    return "\n".join(out)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([BM])$", re.I)


def model_size(name: str) -> Optional[float]:
    """Parameters of a checkpoint named like "Mamba-2-2.7B" / "mamba-130m" (None when the name says none)."""
    m = _SIZE.search(str(name).strip())
    if not m:
        return None
    return float(m.group(1)) * (1e9 if m.group(2).upper() == "B" else 1e6)


def paper_scale(ours: dict, paper_models: Sequence[str]) -> str:
    """How much larger the paper's checkpoints are than ours: ours = {model name: parameters}."""
    theirs = {m: model_size(m) for m in paper_models}
    theirs = {m: v for m, v in theirs.items() if v}
    if not ours or not theirs:
        return ""
    lo = min(theirs.values()) / max(ours.values())
    hi = max(theirs.values()) / min(ours.values())
    mine = join(f"{short(k)} {v / 1e6:.1f}M" for k, v in ours.items())
    return (f"Our models ({mine} parameters) are {lo:.0f}-{hi:.0f}x smaller than the paper's "
            f"({join(f'{k} {v / 1e9:.1f}B' for k, v in theirs.items())}).")


# -- 00: the last-position KL of one paragraph -------------------------------------------------------
def walkthrough_kl(kl_rows: Sequence[dict]) -> str:
    """00's paragraph on the bar chart (one KL per method at the last position), from its `kl_rows`
    (method, "KL at last position", "median KL after it (own rows)", "last token", "first removed token")."""
    if not kl_rows:
        return ""
    by = {r["method"]: r for r in kl_rows}
    last = sorted(by, key=lambda m: by[m]["KL at last position"])
    med = {m: by[m]["median KL after it (own rows)"] for m in by}
    med_ok = {m: v for m, v in med.items() if v is not None and not math.isnan(v)}
    hi, lo = last[-1], last[0]
    ratio = by[hi]["KL at last position"] / max(by[lo]["KL at last position"], 1e-12)
    parts = [f"The bar chart above compares one number per method: the KL at the last position of one paragraph. "
             f"In this run it ranges from {by[lo]['KL at last position']:.2f} nats ({label(lo)}) to "
             f"{by[hi]['KL at last position']:.2f} nats ({label(hi)}), a factor of {ratio:.1f}; in between: "
             + join(f"{label(m)} {by[m]['KL at last position']:.2f}" for m in last[1:-1]) + "."]
    if med_ok:
        order = sorted(med_ok, key=med_ok.get)
        parts.append(f"Over all positions that keep their own output row after the first removal, the median KL is "
                     f"{min(med_ok.values()):.2f}-{max(med_ok.values()):.2f} nats ({label(order[-1])} highest), so "
                     f"one position is an observation, not a property of the methods.")
    parts.append("The last token's fate: " + "; ".join(f"{label(m)}: {by[m]['last token']}" for m in by)
                 + " (the last token is not protected here, since nothing is scored).")
    first0 = [m for m in by if by[m]["first removed token"] == 0]
    if first0:
        parts.append(f"{join(label(m) for m in first0)} remove the very first token of the paragraph, so no "
                     f"position escapes the reduction under {'it' if len(first0) == 1 else 'them'}.")
    return " ".join(parts)


# -- 04: what the error curves and the tests show ----------------------------------------------------
def failure_findings(errs, *, error_layer: int, texts: int, kl_cmp=None, resamples: int) -> str:
    """04's "what the figure shows", from `analysis.error_statistics` (`errs`: per model and method the
    final-layer relative error and the last-position KL with 95% intervals over `texts` passages, and
    UTRC minus each method, paired) and 01-style KL comparisons on the ppl task (`kl_cmp`, optional)."""
    lines = [f"Computed from {texts} passages per model (95% bootstrap intervals over passages, {resamples} "
             f"resamples; one reduction after layer {error_layer})."]
    for model, e in errs.items():
        m = e["methods"]
        order = sorted(m, key=lambda k: m[k]["final"]["estimate"])
        grows = [k for k in m if m[k]["grows"]]
        lines.append(f"\n**{short(model)}**\n")
        lines.append(f"* Relative error at the last layer, smallest to largest: "
                     + ", ".join(f"{label(k)} {fmt_ci(m[k]['final']['estimate'], m[k]['final']['low'], m[k]['final']['high'], 1, 3)}"
                                 for k in order) + ".")
        lines.append(f"* The error grows from layer {error_layer + 1} to the last layer for "
                     + ("every method" if len(grows) == len(m) else f"{join(label(k) for k in grows)} "
                        f"(not for {join(label(k) for k in m if k not in grows)})") + ".")
        if "utrc" in m:
            worse, better, tied = [], [], []
            for k, d in e["utrc_minus"].items():
                (worse if d["low"] > 0 else better if d["high"] < 0 else tied).append(label(k))
            lines.append("* UTRC's final-layer error against each method (paired, unadjusted 95% intervals): "
                         + clauses([("larger than", worse), ("smaller than", better), ("unresolved against", tied)],
                                   "no other method") + ".")
            transformer = [k for k in e["utrc_minus"] if k in ("evit", "pumer", "tome")]
            if transformer:
                below = [k for k in transformer if e["utrc_minus"][k]["high"] < 0]
                verdict = ("agrees with" if len(below) == len(transformer) else
                           "partly agrees with" if below else "does not support")
                lines.append(f"  On this measure UTRC's error is resolved below {len(below)} of {len(transformer)} "
                             f"transformer-style methods: this {verdict} the paper's Figure 1 (UTRC smallest).")
            kl_order = sorted(m, key=lambda k: m[k]["kl_last"]["estimate"])
            lines.append("* Next-token KL at the last position, smallest to largest: "
                         + ", ".join(f"{label(k)} {fmt_ci(m[k]['kl_last']['estimate'], m[k]['kl_last']['low'], m[k]['kl_last']['high'], 1, 3)}"
                                     for k in kl_order)
                         + (". It ranks the methods as the residual error does." if kl_order == order else
                            ". It ranks the methods differently from the residual error: the error measures how far "
                            "the residual stream moves, not how much the prediction suffers."))
        if kl_cmp is not None and len(kl_cmp):
            d = kl_cmp[(kl_cmp["model"] == model) & (kl_cmp["metric"] == "kl:ppl")]
            if len(d):
                beats = sorted({label(b) for b in d[d["verdict"] == "beats"]["baseline"]})
                beaten = sorted({label(b) for b in d[d["verdict"] == "beaten"]["baseline"]})
                lines.append("* On the scored positions of the ppl task (01's KL per token, every cut; Holm over "
                             "every comparison of 04's accuracy-and-KL family, the notebook's verdict list): " + clauses(
                                 [("UTRC is closer to dense than", beats), ("further from dense than", beaten)],
                                 "no difference from UTRC is resolved") + (" (in at least one cut)." if beats or beaten
                                                                           else "."))
    return "\n".join(lines)


# -- 04: the authors' protocol beside ours -------------------------------------------------------------
def protocol_findings(margins, cost, explained, fallbacks=None, coverage: str = "") -> str:
    """Markdown: UTRC minus each baseline under each protocol (`margin_summary` per protocol), what the
    authors' protocol does to each method (leak-free minus authors, Holm over the table) and the share of
    each method's loss under the authors' protocol that the protocol alone explains (median over cells);
    `coverage` (a sentence on which configurations the authors' rows cover) first, and from `fallbacks`
    (`protocols.fallbacks`) the cells where unprotected scoring had to score items dense."""
    out = [coverage] if coverage else []
    if fallbacks is not None and len(fallbacks):
        fb = fallbacks[fallbacks["dense_fallback"] > 0]
        if len(fb):
            worst = fb.loc[fb["share"].idxmax()]
            out.append(f"Under the authors' protocol, {int(fb['dense_fallback'].sum())} of "
                       f"{int(fallbacks['n'].sum())} scored requests (one per choice of an item; {len(fb)} of "
                       f"{len(fallbacks)} model x method x cut x task cells) kept fewer rows than their continuation "
                       f"has tokens and were scored dense "
                       f"(as the released code cannot score them); the most, {100 * worst['share']:.0f}% of the "
                       f"{worst['task']} requests for {label(worst['method'])} at {worst['cut']:.0%} on {short(worst['model'])}. "
                       f"Those cells are pulled toward dense: the authors' protocol looks better there than it "
                       f"would if it could score them.\n")
        else:
            out.append("Under the authors' protocol no item had to be scored dense.\n")
    for proto, title in (("leak_free", "Leak-free protocol (ours)"), ("authors", "Authors' protocol")):
        m = margins[margins["protocol"] == proto]
        if len(m):
            out.append(f"\n### {title}\n\n" + margin_summary(m, ("avg_acc",), family=f"the {len(margins)} UTRC-vs-baseline"
                                                           f" comparisons of both protocols"))
    if cost is not None and len(cost):
        out.append(f"\n### What the protocol alone does (leak-free minus authors' mean accuracy, points; Holm over "
                   f"{len(cost)} comparisons)\n")
        for method in dict.fromkeys(cost["method"]):
            s = cost[cost["method"] == method]
            lo, hi = s["delta"].min(), s["delta"].max()
            up = int((s["verdict"] == "beats").sum())
            down = int((s["verdict"] == "beaten").sum())
            share = explained[explained["method"] == method]["explained_by_protocol"].dropna() \
                if explained is not None and "explained_by_protocol" in explained else []
            expl = (f"; of its loss under the authors' protocol, the protocol alone explains a median "
                    f"{100 * float(share.median()):.0f}% ({len(share)} cells with a loss)" if len(share) else "")
            out.append(f"* {label(method)}: from {fmt_signed(lo)} to {fmt_signed(hi)} over {len(s)} cells; higher under "
                       f"leak-free at {up}, lower at {down}, unresolved at {len(s) - up - down}{expl}.")
    return "\n".join(out) if out else "No protocol comparison in this run."


# -- 02: the paper's choice against each alternative ----------------------------------------------------
SWEEP_NAMES = {"metric": "importance metric", "location": "reduction location", "hidden_q": "hidden-branch q",
               "residual_rule": "residual-branch rule", "matching": "split x hidden rule"}


def design_findings(tests) -> str:
    """Markdown: per design sweep (02's `choice_tests`, a stack of `paired.comparison_table`s with a
    "sweep" column), whether the paper's choice is better than, worse than or unresolved against each
    alternative, on mean accuracy and on KL, with the resolved differences' intervals."""
    if tests is None or not len(tests):
        return "No design comparisons in this run."
    out = ["The paper's choice against each alternative of its sweep (paired over items; Holm over the "
           "alternatives of one sweep and measure; accuracy in points, KL in nats/token, where negative means "
           "closer to dense):"]
    for sweep in dict.fromkeys(tests["sweep"]):
        s = tests[tests["sweep"] == sweep]
        parts = []
        for metric in dict.fromkeys(s["metric"]):
            m = s[s["metric"] == metric]
            scale, digits = (100.0, 1) if metric == "avg_acc" else (1.0, 4)

            def said(verdict):
                return [f"{r['baseline']} ({fmt_ci(r['delta'], r['low'], r['high'], scale, digits)})"
                        for _, r in m[m["verdict"] == verdict].iterrows()]
            unresolved = list(m[m["verdict"] == "unresolved"]["baseline"])
            parts.append(f"{'accuracy' if metric == 'avg_acc' else 'KL'}: " + clauses(
                [("better than", said("beats")), ("worse than", said("beaten")), ("unresolved against", unresolved)],
                "no comparison"))
        models = ", ".join(short(x) for x in dict.fromkeys(s["model"]))
        out.append(f"* **{SWEEP_NAMES.get(sweep, sweep)}**, {s['reference'].iloc[0]} ({models}): " + "; ".join(parts) + ".")
    return "\n".join(out)

"""Sentences rendered from the numbers (utrc_study.report.prose, report.main_results): the text follows
the numbers when they change, and no number in it is typed by hand."""
import numpy as np
import pandas as pd
import pytest

from utrc_study.experiments import paired
from utrc_study.report import main_results as mr, prose


def _cmp(deltas, verdicts, metric="avg_acc", holm_over=""):
    recs = []
    for (model, cut, b), d in deltas.items():
        recs.append(dict(model=model, cut=cut, metric=metric, reference="utrc", baseline=b, delta=d, low=d - 0.01,
                         high=d + 0.01, p=0.0 if abs(d) > 0.02 else 0.4, test="stratified_bootstrap", resamples=10000,
                         p_holm=0.001 if verdicts[(model, cut, b)] != "unresolved" else 1.0,
                         verdict=verdicts[(model, cut, b)], family_size=len(deltas), holm_over=holm_over, n=3000))
    return pd.DataFrame(recs)


def test_margin_summary_follows_the_numbers():
    deltas = {("tiny-mamba", 0.2, "evit"): 0.0003, ("tiny-mamba", 0.3, "evit"): 0.008,
              ("tiny-mamba2", 0.2, "evit"): 0.03, ("tiny-mamba", 0.2, "tome"): -0.011}
    verdicts = {k: "beats" if v > 0.02 else "unresolved" for k, v in deltas.items()}
    text = prose.margin_summary(_cmp(deltas, verdicts))
    assert "Holm correction over all 4 comparisons of the table" in text
    assert "* EViT: from +0.0 (tiny-mamba at 20%) to +3.0 (tiny-mamba2 at 20%); after Holm: UTRC better at " \
           "tiny-mamba2 at 20%; 1 of 3 unadjusted intervals exclude 0." in text
    assert "* ToMe: -1.1 (tiny-mamba at 20%); after Holm: no difference resolved; 1 of 1" in text
    deltas[("tiny-mamba2", 0.2, "evit")] = -0.05          # the numbers change: so does the text
    verdicts[("tiny-mamba2", 0.2, "evit")] = "beaten"
    text = prose.margin_summary(_cmp(deltas, verdicts))
    assert "from -5.0 (tiny-mamba2 at 20%) to +0.8 (tiny-mamba at 30%); after Holm: UTRC worse at tiny-mamba2" in text


def test_margins_markdown_prints_bootstrap_p_of_zero_as_a_bound():
    deltas = {("m", 0.2, "evit"): 0.05, ("m", 0.2, "tome"): 0.001}
    md = mr.margins_markdown(_cmp(deltas, {k: "beats" if v > 0.02 else "unresolved" for k, v in deltas.items()}))
    assert "| < 0.0001 |" in md and "| 0 |" not in md and "Holm correction over all 2 comparisons" in md


def test_walkthrough_and_paper_scale_sentences():
    rows = [{"method": "utrc", "KL at last position": 4.8, "median KL after it (own rows)": 0.55,
             "last token": "merged after layer 8 into #3", "first removed token": 0},
            {"method": "tome", "KL at last position": 0.9, "median KL after it (own rows)": 0.6,
             "last token": "kept to the last layer", "first removed token": 5},
            {"method": "evit", "KL at last position": 5.1, "median KL after it (own rows)": 0.5,
             "last token": "kept to the last layer", "first removed token": 0}]
    text = prose.walkthrough_kl(rows)
    assert "from 0.90 nats (ToMe) to 5.10 nats (EViT), a factor of 5.7; in between: UTRC 4.80." in text
    assert "median KL is 0.50-0.60 nats (ToMe highest)" in text and "UTRC and EViT remove the very first token" in text
    rows[0]["KL at last position"] = 9.0
    assert "to 9.00 nats (UTRC)" in prose.walkthrough_kl(rows)
    s = prose.paper_scale({"tiny-mamba2": 7.0e6, "tiny-mamba": 9.0e6}, ["Mamba-2-2.7B", "Mamba-2.8B"])
    assert s.startswith("Our models (tiny-mamba2 7.0M and tiny-mamba 9.0M parameters) are 300-400x smaller")
    assert prose.model_size("mamba-130m") == 130e6 and prose.model_size("tiny-mamba") is None


def _stats(final, kl, minus, grows=True):
    m = {k: {"final": {"estimate": v, "low": v - 0.01, "high": v + 0.01}, "grows": grows,
             "kl_last": {"estimate": kl[k], "low": kl[k] - 0.1, "high": kl[k] + 0.1}} for k, v in final.items()}
    return {"m": {"methods": m, "utrc_minus": {k: {"low": lo, "high": hi} for k, (lo, hi) in minus.items()}}}


def test_failure_findings_follow_the_numbers():
    final = {"utrc": 0.58, "evit": 0.57, "tome": 0.56, "random": 0.52}
    kl = {"utrc": 2.2, "evit": 3.1, "tome": 0.8, "random": 0.2}
    minus = {"evit": (-0.01, 0.03), "tome": (0.005, 0.04), "random": (0.04, 0.08)}
    text = prose.failure_findings(_stats(final, kl, minus), error_layer=2, texts=200, resamples=10000)
    assert "Computed from 200 passages" in text and "smallest to largest: random drop 0.520" in text
    assert "larger than ToMe and random drop, unresolved against EViT" in text
    assert "resolved below 0 of 2 transformer-style methods: this does not support the paper's Figure 1" in text
    assert "ranks the methods differently" in text
    final = {"utrc": 0.40, "evit": 0.57, "tome": 0.56, "random": 0.52}       # now UTRC is smallest: the text agrees
    minus = {"evit": (-0.2, -0.1), "tome": (-0.2, -0.1), "random": (-0.15, -0.1)}
    kl = {"utrc": 0.1, "evit": 3.1, "tome": 0.8, "random": 0.2}
    text = prose.failure_findings(_stats(final, kl, minus), error_layer=2, texts=200, resamples=10000)
    assert "smaller than EViT, ToMe and random drop" in text and "this agrees with the paper's Figure 1" in text
    assert "It ranks the methods as the residual error does." in text
    cmp = pd.DataFrame([dict(model="m", cut=0.2, metric="kl:ppl", baseline="evit", verdict="beats")])
    assert "UTRC is closer to dense than EViT (in at least one cut)." in prose.failure_findings(
        _stats(final, kl, minus), error_layer=2, texts=200, resamples=10000, kl_cmp=cmp)


def test_error_statistics_on_known_arrays():
    import torch

    from utrc_study.experiments import analysis

    n, L = 30, 4
    r2 = torch.ones(n, L, dtype=torch.float64)
    items = {"utrc": {"d2": torch.full((n, L), 0.25, dtype=torch.float64), "r2": r2, "kl_last": torch.ones(n, dtype=torch.float64)},
             "evit": {"d2": torch.full((n, L), 0.01, dtype=torch.float64), "r2": r2, "kl_last": torch.ones(n, dtype=torch.float64)}}
    items["utrc"]["d2"][:, :2] = 0
    st = analysis.error_statistics(items, error_layer=1, resamples=200)
    u = st["methods"]["utrc"]
    assert u["rel_error"] == pytest.approx([0, 0, 0.5, 0.5]) and u["final"]["low"] == pytest.approx(0.5)
    assert not u["grows"] and st["utrc_minus"]["evit"]["estimate"] == pytest.approx(0.4)

"""Evaluation protocols (issue 26): `leak_free` (ours) beside `authors` (the released code's scoring)."""
from __future__ import annotations

import pytest
import torch

import utrc_lib as u
from utrc_study.eval.protocol import PROTOCOLS, resolve_protocol
from utrc_study.eval.scorer import score_tokens


def test_resolve_protocol_maps_the_authors_choices():
    cfg = u.ReductionConfig("evit", keep_ratio=0.7)
    assert resolve_protocol(cfg, "leak_free") == (cfg, True)
    run, protect = resolve_protocol(cfg, "authors")
    assert (run.method, run.causal, run.ratio_basis, protect) == ("evit_reference", False, "batch", False)
    assert resolve_protocol(u.ReductionConfig("pumer", keep_ratio=0.7), "authors")[0].method == "tome"
    assert resolve_protocol(u.ReductionConfig("utrc", keep_ratio=0.7, protect_last=3), "authors")[0].protect_last == 0
    assert resolve_protocol(None, "authors") == (None, False)
    assert set(PROTOCOLS) == {"leak_free", "authors"}
    with pytest.raises(ValueError, match="unknown protocol 'paper'; valid: leak_free, authors"):
        resolve_protocol(cfg, "paper")
    with pytest.raises(ValueError, match="ratio_basis must be one of sample, batch"):
        u.ReductionConfig("utrc", keep_ratio=0.7, ratio_basis="padded")


def _kept_and_fused(method, hidden, n_keep):
    out = u.reduce_tokens(hidden, hidden.clone(), config=u.ReductionConfig(method, keep_ratio=0.5), n_keep=n_keep)
    return set(out.positions[0].tolist())


@pytest.mark.parametrize("seed", range(5))
def test_evit_reference_keeps_the_lowest_scoring_tokens(seed):
    """Simple twin: the authors' EViT keeps the n_keep - 1 LOWEST clipped-mean tokens and fuses the rest
    into one token at the latest fused position; our EViT keeps the highest."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, 14, 6, generator=g)
    score = h.clamp_min(0).mean(-1)[0]
    order = torch.argsort(score).tolist()                    # ascending; random floats: no ties
    n_keep = 6
    for method, kept in (("evit_reference", order[:n_keep - 1]), ("evit", order[::-1][:n_keep - 1])):
        fused = [t for t in range(14) if t not in kept]
        assert _kept_and_fused(method, h, n_keep) == set(kept) | {max(fused)}, method


@torch.no_grad()
def test_batch_ratio_basis_removes_the_padded_count_from_every_row(model):
    """ratio_basis="batch": r from the padded length for every row (capped by what a row can lose);
    "sample": from each row's own length."""
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0                                          # row 1 has 12 tokens, left-padded
    removed = {}
    for basis in ("sample", "batch"):
        cfg = u.ReductionConfig("utrc", keep_ratio=0.75, layers=[1], ratio_basis=basis)
        with u.apply(model, cfg) as handle:
            model(ids, attention_mask=mask)
            removed[basis] = handle.last_reducer.history[-1]["removed"].tolist()
    assert removed["sample"] == [6, 3]                        # 24 - ceil(0.75 * 24), 12 - ceil(0.75 * 12)
    assert removed["batch"] == [6, 6]


@torch.no_grad()
def test_unprotected_scoring_reads_the_last_rows_of_the_shortened_sequence(model):
    """protect=False (the authors' alignment): the scored rows are the last n rows of the kept-only
    output, never NaN rows of removed positions; protected scoring reads the model's own rows."""
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(1, 64, (n,), generator=g).tolist(), torch.randint(1, 64, (3,), generator=g).tolist())
            for n in (30, 22)]
    cfg = u.ReductionConfig("utrc", keep_ratio=0.6, layers=[1, 3])
    unprot = score_tokens(model, reqs, cfg, batch_size=2, protect=False).results
    prot = score_tokens(model, reqs, cfg, batch_size=2, protect=True).results
    assert all(torch.isfinite(torch.tensor(ll)) for ll, _ in unprot + prot)
    for (ctx, cont), (ll, _) in zip(reqs, unprot):        # twin: one request alone, kept-only rows
        ids = torch.tensor([(ctx + cont)[:-1]])
        with u.apply(model, cfg) as handle, handle.options(kept_only=True):
            logp = torch.log_softmax(model(ids).logits[0, -len(cont):].float(), -1)
        want = float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
        assert abs(ll - want) < 1e-3
    assert unprot != prot


@torch.no_grad()
def test_unprotected_continuation_longer_than_the_kept_rows_is_scored_dense(model):
    """protect=False: a continuation longer than the rows the reduction leaves would read "the last n
    rows" out of the left padding (on the GPU run it raised a size mismatch at batch 256): such a
    request is scored dense and counted, and batched results equal single-request results."""
    from utrc_lib.scoring import score_tokens as score

    g = torch.Generator().manual_seed(2)
    reqs = [(torch.randint(1, 64, (6,), generator=g).tolist(), torch.randint(1, 64, (17,), generator=g).tolist()),
            (torch.randint(1, 64, (40,), generator=g).tolist(), torch.randint(1, 64, (2,), generator=g).tolist())]
    cfg = u.ReductionConfig("utrc", keep_ratio=0.5, layers=[0, 1, 2])
    both = score(model, reqs, cfg, batch_size=2, protect=False)
    alone = [score(model, [r], cfg, batch_size=1, protect=False) for r in reqs]
    dense = score(model, reqs[:1], None, batch_size=1).results[0]
    assert both.dense_fallback == 1 and alone[0].dense_fallback == 1 and alone[1].dense_fallback == 0
    assert abs(both.results[0][0] - dense[0]) < 1e-4                      # the long continuation: dense
    for b, a in zip(both.results, alone):
        assert abs(b[0] - a.results[0][0]) < 1e-4



@torch.no_grad()
def test_unprotected_short_rows_cost_one_dense_forward_and_keep_the_others(model, monkeypatch):
    """Many refused requests in one unprotected batch: one reduced forward and one dense forward of the
    refused rows (the halving split cost O(k log B) forwards: minutes per configuration on the GPU at a
    30% cut); the other rows keep that batch's results, which under ratio_basis="batch" depend on the
    batch, so they must not be run again in a smaller one."""
    import utrc_lib.scoring as scoring

    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(12):    # alternate: short context + long continuation (refused), long context + short
        n_ctx, n_cont = (5, 15) if i % 2 == 0 else (36 + i, 2)
        reqs.append((torch.randint(1, 64, (n_ctx,), generator=g).tolist(),
                     torch.randint(1, 64, (n_cont,), generator=g).tolist()))
    calls = []
    real = scoring._forward
    monkeypatch.setattr(scoring, "_forward", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    for basis in ("sample", "batch"):
        cfg = u.ReductionConfig("utrc", keep_ratio=0.5, layers=[0, 1, 2], ratio_basis=basis)
        calls.clear()
        got = scoring.score_tokens(model, reqs, cfg, batch_size=12, protect=False)
        # batch basis: r from the padded length can refuse long-context rows too
        assert got.dense_fallback == 6 if basis == "sample" else got.dense_fallback >= 6
        assert calls == [12, got.dense_fallback], (basis, calls)
        dense = scoring.score_tokens(model, reqs[0::2], None, batch_size=12).results
        for (ll, _), (want, _) in zip(got.results[0::2], dense):
            assert abs(ll - want) < 1e-4                              # refused: scored dense
        if basis == "sample":                                         # batch independence holds
            alone = [scoring.score_tokens(model, [r], cfg, batch_size=1, protect=False).results[0] for r in reqs[1::2]]
            for (ll, _), (want, _) in zip(got.results[1::2], alone):
                assert abs(ll - want) < 1e-4

@pytest.mark.heavy
def test_evaluate_records_the_protocol(tmp_path):
    from utrc_study.eval.scorer import evaluate
    model, tok = u.load_model("tiny-mamba2")
    res = evaluate(model, tok, ["choice2"], u.ReductionConfig("pumer", flops_reduction=0.2), limit=4,
                   batch_size=4, progress=False, protocol="authors")
    assert res["meta"]["protocol"] == "authors" and res["meta"]["method_asked"] == "pumer"
    assert res["meta"]["method"] == "tome" and res["meta"]["protect"].startswith("none")
    dense = evaluate(model, tok, ["choice2"], None, limit=4, batch_size=4, progress=False)
    assert dense["meta"]["protocol"] == "leak_free"
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(model, tok, ["choice2"], None, limit=4, protocol="lenient")


@pytest.mark.heavy
def test_sweep_rows_record_their_protocol():
    from utrc_study.experiments.sweep import evaluate_config
    kw = dict(tasks=["choice2"], limit=4, batch_size=4)
    row = evaluate_config("tiny-mamba2", "evit", 0.2, protocol="authors", **kw)
    assert row["protocol"] == "authors" and row["protect"] is False and row["meta/method"] == "evit_reference"
    assert evaluate_config("tiny-mamba2", "evit", 0.2, **kw)["protocol"] == "leak_free"
    assert evaluate_config("tiny-mamba2", "evit", 0.2, protect=False, **kw)["protocol"] == "unprotected"


@torch.no_grad()
def test_layer_error_items_with_shared_dense_runs_equal_their_own(model):
    """04's error curves share one dense pass between methods (`analysis.dense_runs`): the same numbers
    as each method running its own dense pass; a dense list of the wrong chunking is refused."""
    from utrc_study.experiments import analysis

    ids = torch.randint(1, 64, (5, 24), generator=torch.Generator().manual_seed(4))
    cfg = u.ReductionConfig("utrc", keep_ratio=0.6, layers=[1], causal=True)
    dense = analysis.dense_runs(model, ids, batch=2)
    own = analysis.layer_error_items(model, ids, cfg, batch=2)
    shared = analysis.layer_error_items(model, ids, cfg, dense=dense, batch=2)
    for k in ("d2", "r2", "kl_last"):
        assert torch.equal(own[k], shared[k]), k
    assert own["tokens"] == shared["tokens"] and own["anchors"] == shared["anchors"]
    with pytest.raises(ValueError, match="3 chunks of 2 passages expected"):
        analysis.layer_error_items(model, ids, cfg, dense=dense[:2], batch=2)


def test_protocol_table_markdown_prints_p_floor_and_missing_cells():
    import pandas as pd

    from utrc_study.report import protocols

    margins = pd.DataFrame([dict(model="tiny-mamba2", cut=0.3, protocol="authors", baseline="evit", delta=-0.0347,
                                 low=-0.0503, high=-0.019, p=0.0, test="stratified_bootstrap", resamples=10000,
                                 p_holm=0.0052, verdict="beaten", family_size=1, holm_over="")])
    explained = pd.DataFrame([dict(model="tiny-mamba2", method="tome", cut=0.3, drop_authors=float("nan"),
                                   drop_leak_free=-0.03, explained_by_protocol=float("nan"))])
    text = protocols.table_markdown(margins, explained)
    assert "| tiny-mamba2 | 30%   | authors    | evit       | -3.5 [-5.0, -1.9]" in text
    assert "< 0.0001" in text and "0.0000" not in text
    assert "| tome     | 30%   | n/c" in text and "-3.0" in text


def test_fallback_share_is_out_of_requests_not_items():
    """dense_fallback counts requests (one per choice): 120 refused of 50 choice4 items is 60% of the 200
    requests, never a share above 1."""
    from types import SimpleNamespace

    from utrc_study.report import protocols

    row = {"params": {"model": "m", "method": "utrc", "cut": 0.3, "tasks": ["choice4", "cloze"]},
           "result": {"choice4/n": 50, "choice4/dense_fallback": 120, "cloze/n": 50, "cloze/dense_fallback": 5}}
    fb = protocols.fallbacks(SimpleNamespace(rows=[row])).set_index("task")
    assert fb.loc["choice4", "n"] == 200 and abs(fb.loc["choice4", "share"] - 0.6) < 1e-12
    assert fb.loc["cloze", "n"] == 50 and abs(fb.loc["cloze", "share"] - 0.1) < 1e-12
    assert (fb["share"] <= 1).all()

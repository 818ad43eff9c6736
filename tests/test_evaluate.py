"""Built-in evaluator: scoring conventions, batch-size independence, tail protection, sanity."""
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from utrc_lib import ReductionConfig
from utrc_study.eval import scorer as ev
from utrc_study.eval.suite import load_task
from utrc_lib import scoring  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "data" / "models" / "tiny-mamba2"
checkpoint_exists = (CKPT / "config.json").is_file()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer"))


@pytest.fixture(scope="module")
def m2():
    return tiny_model("mamba2", layers=4, vocab=8192)


def _requests():
    reqs = [(it["context"], it["target"]) for it in load_task("cloze", limit=6)]
    for it in load_task("choice2", limit=2):
        reqs += [(it["context"], " " + o) for o in it["options"]]
    return reqs


def test_encode_pair_lm_eval_convention(tok):
    ctx, cont = ev.encode_pair(tok, "The cat sat ", "on the mat")
    assert ctx == scoring.encode(tok, "The cat sat")
    assert ctx + cont == scoring.encode(tok, "The cat sat on the mat")
    ctx, cont = ev.encode_pair(tok, "", "hello")
    assert ctx == [tok.eos_token_id] and cont == scoring.encode(tok, "hello")


@pytest.mark.parametrize("reduced", [False, True])
def test_batch_size_independent(m2, tok, reduced):
    cfg = ReductionConfig("utrc", keep_ratio=0.6, layers=(0, 2)) if reduced else None
    reqs = _requests()
    a = scoring.loglikelihood(m2, tok, reqs, cfg, batch_size=1)
    b = scoring.loglikelihood(m2, tok, reqs, cfg, batch_size=4)
    assert [g for _, g in a] == [g for _, g in b]
    for (x, _), (y, _) in zip(a, b):
        assert math.isfinite(x) and abs(x - y) < 1e-4
    assert getattr(m2, "_utrc_handle", None) is None  # patch removed


def test_batch_size_independent_mamba1(tok):
    m = tiny_model("mamba", layers=3, vocab=8192)
    cfg = ReductionConfig("utrc", keep_ratio=0.6, layers=(0, 1))
    reqs = [(it["context"], it["target"]) for it in load_task("cloze", limit=4)]
    a = scoring.loglikelihood(m, tok, reqs, cfg, batch_size=1)
    b = scoring.loglikelihood(m, tok, reqs, cfg, batch_size=4)
    assert all(abs(x[0] - y[0]) < 1e-4 for x, y in zip(a, b))


def test_scores_read_at_original_positions(m2, tok):
    """Dense scores equal a direct unbatched forward; keep_ratio=1 equals dense."""
    reqs = _requests()[:3]
    dense = scoring.loglikelihood(m2, tok, reqs, None, batch_size=3)
    for (c, x), (ll, _) in zip(reqs, dense):
        ctx, cont = ev.encode_pair(tok, c, x)
        ids = torch.tensor([ctx + cont[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(m2(ids).logits[0, -len(cont):].float(), -1)
        ref = float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
        assert abs(ref - ll) < 1e-4
    same = scoring.loglikelihood(m2, tok, reqs, ReductionConfig("utrc", keep_ratio=1.0), batch_size=2)
    assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(dense, same))


def test_reduction_changes_context_not_tail_protection(m2, tok):
    """With protection the scored tail is never reduced; reducing the context changes the score."""
    reqs = [(it["context"], it["continuation"]) for it in load_task("ppl", limit=2)]
    cfg = ReductionConfig("utrc", keep_ratio=0.5, layers=(0, 1, 2))
    dense = scoring.loglikelihood(m2, tok, reqs, None)
    red = scoring.loglikelihood(m2, tok, reqs, cfg)
    assert all(math.isfinite(r[0]) for r in red)
    assert any(abs(a[0] - b[0]) > 1e-6 for a, b in zip(dense, red))


def test_evaluate_structure_and_cache(m2, tok):
    cfg = ReductionConfig("utrc", flops_reduction=0.2)
    r = ev.evaluate(m2, tok, config=cfg, limit=2, batch_size=4, progress=False)
    assert set(r) == {"cloze", "choice4", "choice2", "ppl", "meta"}
    assert {"acc", "ppl", "n"} <= set(r["cloze"]) and r["cloze"]["n"] == 2
    assert {"acc", "acc_norm"} <= set(r["choice4"]) and "acc" in r["choice2"]
    assert r["ppl"]["tokens"] == 128 and r["ppl"]["ppl"] > 1
    meta = r["meta"]
    assert meta["method"] == "utrc" and meta["config"]["flops_reduction"] == 0.2
    assert abs(meta["flops_reduction_token_layer"] - 0.2) < 1e-6 and 0 < meta["keep_ratio"] < 1
    assert "torch" in meta["versions"]
    again = ev.evaluate(m2, tok, tasks="cloze", config=cfg, limit=2, progress=False)
    assert again["cloze"]["acc"] == r["cloze"]["acc"]
    with pytest.raises(ValueError, match="unknown task"):
        ev.evaluate(m2, tok, tasks=("nope",), progress=False)


def test_random_model_near_chance(tok):
    m = tiny_model("mamba2", layers=2, vocab=8192, seed=1)
    r = ev.evaluate(m, tok, tasks=("choice4",), limit=32, batch_size=32, progress=False)
    assert r["choice4"]["acc"] < 0.4


@pytest.fixture(scope="module")
def trained():
    from utrc_lib import load_model

    return load_model("tiny-mamba2")


@pytest.mark.skipif(not checkpoint_exists, reason="trained tiny-mamba2 checkpoint not present")
def test_trained_model_ppl_and_reduction(trained):
    """Fast check (2 windows): trained ppl is sane; a 20% FLOPs cut costs some but not everything."""
    model, tokenizer = trained
    dense = ev.evaluate(model, tokenizer, tasks=("ppl",), limit=2, batch_size=2, progress=False)["ppl"]
    red = ev.evaluate(model, tokenizer, tasks=("ppl",), limit=2, batch_size=2, progress=False,
                      config=ReductionConfig("utrc", flops_reduction=0.2))["ppl"]
    assert dense["ppl"] < 100, dense
    assert dense["ppl"] <= red["ppl"] * 1.05 and red["ppl"] < 3 * dense["ppl"], (dense, red)


@pytest.mark.slow
@pytest.mark.skipif(not checkpoint_exists, reason="trained tiny-mamba2 checkpoint not present")
def test_trained_model_beats_chance(trained):
    model, tokenizer = trained
    r = ev.evaluate(model, tokenizer, tasks=("cloze", "choice4", "choice2"), limit=200, batch_size=32,
                    progress=False)
    # dense tiny-mamba2 at limit=200 (CPU): cloze acc 0.205 (ppl 207), choice4 acc 0.385 / acc_norm 0.43,
    # choice2 acc 0.93 (ppl task, 200 windows: 41.3); chance: 0.25 / 0.5
    assert r["choice4"]["acc"] > 0.30 and r["choice4"]["acc_norm"] > 0.35, r
    assert r["choice2"]["acc"] > 0.75, r
    assert r["cloze"]["acc"] > 0.10, r


def test_dense_fallback_returned_with_the_results(m2, tok):
    """A context too short to reduce is scored dense; the count comes back with that call's results."""
    assert not hasattr(ev, "LAST_STATS")  # no module-global statistics
    reqs = [("a", " b c"), ("The", " cat")] + _requests()[:3]
    toks = [ev.encode_pair(tok, c, x) for c, x in reqs]
    cfg = ReductionConfig("utrc", keep_ratio=0.5, layers=(0, 2))
    dense = ev.score_tokens(m2, toks, None, 2, pad_token_id=ev.pad_id(tok))
    assert isinstance(dense, ev.TokenScores) and dense.dense_fallback == 0
    one, four = (ev.score_tokens(m2, toks, cfg, bs, pad_token_id=ev.pad_id(tok)) for bs in (1, 4))
    # " b c" after "a": 2 input tokens, both protected, one to remove -> refused; "The" + " cat" has
    # a single input token, so the schedule removes none (no error, nothing reduced)
    assert one.dense_fallback == four.dense_fallback == 1
    third = scoring.loglikelihood_tokens(m2, toks, cfg, 3, pad_token_id=ev.pad_id(tok))
    for a, b, c in zip(one.results, four.results, third):
        assert a[1] == b[1] == c[1] and a[0] == pytest.approx(b[0], abs=1e-4) == pytest.approx(c[0], abs=1e-4)
    assert one.results[0][0] == pytest.approx(dense.results[0][0], abs=1e-4)  # the refused one: dense
    assert getattr(m2, "_utrc_handle", None) is None


def test_dense_fallback_splits_the_batch(m2, tok, monkeypatch):
    """One refused request in a batch of 8 costs O(log B) extra forwards (halving), not B; every
    other request is still reduced and every result equals the batch-of-one result."""
    reqs = _requests()[:7] + [("a", " b c")]          # the last is refused as too short
    toks = [ev.encode_pair(tok, c, x) for c, x in reqs]
    cfg = ReductionConfig("utrc", keep_ratio=0.5, layers=(0, 2))
    real, calls = scoring._score_rows, []

    def counting(model, handle, batch, *a, **kw):
        calls.append((handle is not None, len(batch)))
        return real(model, handle, batch, *a, **kw)

    monkeypatch.setattr(scoring, "_score_rows", counting)
    eight = ev.score_tokens(m2, toks, cfg, 8, pad_token_id=ev.pad_id(tok))
    assert eight.dense_fallback == 1
    assert len(calls) <= 1 + 2 * 3 + 1, calls        # full batch, two halves per level, one dense
    assert calls.count((False, 1)) == 1              # only the refused request ran dense
    monkeypatch.setattr(scoring, "_score_rows", real)
    one = ev.score_tokens(m2, toks, cfg, 1, pad_token_id=ev.pad_id(tok))
    assert one.dense_fallback == 1
    for a, b in zip(eight.results, one.results):
        assert a[1] == b[1] and a[0] == pytest.approx(b[0], abs=1e-4)
    assert eight.achieved_cut == pytest.approx(one.achieved_cut, abs=1e-6)


def test_dense_fallback_decided_by_exception_type(m2, tok, monkeypatch):
    """SequenceTooShort means "score dense"; any other ValueError, whatever its text, propagates."""
    from utrc_lib.core.methods import SequenceTooShort

    toks = [ev.encode_pair(tok, c, x) for c, x in _requests()[:3]]
    dense = scoring.loglikelihood_tokens(m2, toks, None, 3)
    real = scoring._score_rows
    cfg = ReductionConfig("utrc", keep_ratio=0.5, layers=(0, 2))
    for error, falls_back in ((SequenceTooShort("refused"), True), (ValueError("sequence too short"), False)):
        def refuse_reduced(model, handle, batch, pad, protect, *rest, error=error, **kw):
            if handle is not None:
                raise error
            return real(model, handle, batch, pad, protect, *rest, **kw)

        monkeypatch.setattr(scoring, "_score_rows", refuse_reduced)
        if falls_back:
            got = ev.score_tokens(m2, toks, cfg, 2)
            assert got.dense_fallback == 3
            assert [g for _, g in got.results] == [g for _, g in dense]
            assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(got.results, dense))
        else:
            with pytest.raises(ValueError, match="sequence too short"):
                ev.score_tokens(m2, toks, cfg, 2)
        assert getattr(m2, "_utrc_handle", None) is None


def test_evaluate_reports_fallback_and_protection(m2, tok):
    cfg = ReductionConfig("utrc", keep_ratio=0.5, layers=(0, 2))
    r = ev.evaluate(m2, tok, tasks=("cloze",), config=cfg, limit=2, batch_size=2, progress=False)
    assert r["cloze"]["dense_fallback"] == 0 and r["meta"]["protect"] == scoring.PROTECT_NOTE[True]
    u = ev.evaluate(m2, tok, tasks=("cloze",), config=cfg, limit=2, batch_size=2, progress=False, protect=False)
    assert u["meta"]["protect"] == scoring.PROTECT_NOTE[False]
    toks = [ev.encode_pair(tok, it["context"], it["target"]) for it in load_task("cloze", limit=2)]
    raw = scoring.loglikelihood_tokens(m2, toks, cfg, 2, pad_token_id=ev.pad_id(tok), protect=False)
    assert u["cloze"]["ppl"] == math.exp(-sum(ll for ll, _ in raw) / len(raw))
    meta = ev.run_metadata(m2, cfg, max_length=1024, batch_size=2, limit=2)
    assert meta["layers"] == [0, 2] and meta["keep_ratio"] == 0.5 and meta["num_layers"] == 4
    assert scoring.eos_id(tok) == tok.eos_token_id and ev.pad_id(tok) in (tok.pad_token_id, tok.eos_token_id)


# -- item-level outcomes (evaluate(items=True), score_tokens(details / reference)) ---------------------
def _without_seconds(r):
    return {t: {k: v for k, v in m.items() if k != "seconds"} for t, m in r.items() if t not in ("meta", "items")}


@pytest.mark.heavy
def test_items_keep_aggregates_identical_and_consistent(m2, tok):
    cfg = ReductionConfig("utrc", keep_ratio=0.6, layers=(0, 2))
    ev.clear_reference_cache()
    plain = ev.evaluate(m2, tok, config=cfg, limit=3, batch_size=2, progress=False)
    rich = ev.evaluate(m2, tok, config=cfg, limit=3, batch_size=2, progress=False, items=True)
    assert "items" not in plain
    base = _without_seconds(plain)
    extra = _without_seconds(rich)
    for task, metrics in base.items():   # the aggregates of today, bit-identical
        assert {k: extra[task][k] for k in metrics} == metrics
        assert 0 <= extra[task]["kl_per_token"] and 0 <= extra[task]["top1_agreement"] <= 1
    it = rich["items"]
    assert set(it) == {"cloze", "choice4", "choice2", "ppl"}
    for task, arr in it.items():
        assert all(len(v) == 3 for v in arr.values()), task
        assert arr["id"] == [x["id"] for x in load_task(task, limit=3)]
        assert all(k >= 0 for k in arr["kl"]) and all(0 <= t <= 1 for t in arr["top1"])
    assert sum(it["cloze"]["correct"]) / 3 == plain["cloze"]["acc"]
    assert math.exp(-sum(it["cloze"]["ll"]) / 3) == pytest.approx(plain["cloze"]["ppl"], rel=1e-12)
    assert sum(it["choice4"]["correct"]) / 3 == plain["choice4"]["acc"]
    assert sum(it["choice4"]["correct_norm"]) / 3 == plain["choice4"]["acc_norm"]
    assert sum(it["choice2"]["correct"]) / 3 == plain["choice2"]["acc"]
    assert "correct" not in it["ppl"] and sum(it["ppl"]["gold_tokens"]) == plain["ppl"]["tokens"] == 192
    assert math.exp(-sum(it["ppl"]["ll"]) / 192) == pytest.approx(plain["ppl"]["ppl"], rel=1e-12)
    assert it["choice4"]["tokens"][0] > it["choice4"]["gold_tokens"][0]   # all four endings are scored
    # the dense run: its own reference (KL 0, top-1 1), same aggregates as without items
    d = ev.evaluate(m2, tok, config=None, limit=3, batch_size=2, progress=False, items=True)
    d0 = ev.evaluate(m2, tok, config=None, limit=3, batch_size=2, progress=False)
    assert {t: {k: v for k, v in m.items() if k in _without_seconds(d0)[t]} for t, m in _without_seconds(d).items()} \
        == _without_seconds(d0)
    assert all(k == 0 for a in d["items"].values() for k in a["kl"])
    assert all(t == 1 for a in d["items"].values() for t in a["top1"])


def _direct_logp(model, ctx, cont, cfg=None):
    """log-softmax at the scored positions from one unbatched forward (reduced through apply)."""
    from utrc_lib import apply

    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        if cfg is None:
            logits = model(ids).logits
        else:
            with apply(model, cfg) as h, h.options(protect_last=[len(cont)]):
                logits = model(ids).logits
    return torch.log_softmax(logits[0, -len(cont):].float(), -1)


def test_kl_and_top1_match_a_direct_computation(m2, tok):
    toks = [ev.encode_pair(tok, c, x) for c, x in _requests()]
    cfg = ReductionConfig("utrc", keep_ratio=0.5, layers=(0, 2))
    ref = ev.dense_reference(m2, toks, 1, pad_token_id=ev.pad_id(tok))
    assert ref.stored and len(ref.logp) == len(toks)
    got = ev.score_tokens(m2, toks, cfg, 1, pad_token_id=ev.pad_id(tok), reference=ref)
    plain = ev.score_tokens(m2, toks, cfg, 1, pad_token_id=ev.pad_id(tok))
    assert got.results == plain.results and plain.details is None
    for (ctx, cont), d in zip(toks, got.details):
        p, q = _direct_logp(m2, ctx, cont), _direct_logp(m2, ctx, cont, cfg)
        kl = float((p.exp() * (p - q)).sum())
        assert d.kl == pytest.approx(kl, abs=1e-4) and d.tokens == len(cont)
        assert d.top1 == int((p.argmax(-1) == q.argmax(-1)).sum())
        assert d.ll == pytest.approx(float(q[torch.arange(len(cont)), torch.tensor(cont)].sum()), abs=1e-4)
    assert any(d.kl > 1e-4 for d in got.details)
    # keep_ratio = 1 reduces nothing: KL ~ 0, every argmax agrees
    same = ev.score_tokens(m2, toks, ReductionConfig("utrc", keep_ratio=1.0), 1, pad_token_id=ev.pad_id(tok),
                           reference=ref)
    assert all(abs(d.kl) < 1e-5 and d.top1 == d.tokens for d in same.details)


def test_stored_and_recomputed_references_agree(m2, tok):
    reqs = [("a", " b c")] + _requests()[:5]   # the first is refused as too short: dense fallback
    toks = [ev.encode_pair(tok, c, x) for c, x in reqs]
    cfg = ReductionConfig("utrc", keep_ratio=0.5, layers=(0, 2))
    stored = ev.dense_reference(m2, toks, 3, pad_token_id=ev.pad_id(tok))
    recompute = ev.dense_reference(m2, toks, 3, pad_token_id=ev.pad_id(tok), budget_bytes=0)
    assert stored.stored and not recompute.stored and recompute.nbytes == 0
    a = ev.score_tokens(m2, toks, cfg, 3, pad_token_id=ev.pad_id(tok), reference=stored)
    b = ev.score_tokens(m2, toks, cfg, 3, pad_token_id=ev.pad_id(tok), reference=recompute)
    c = ev.score_tokens(m2, toks, cfg, 3, pad_token_id=ev.pad_id(tok))
    assert a.results == b.results == c.results and a.dense_fallback == b.dense_fallback == 1
    for x, y in zip(a.details, b.details):
        assert x.kl == pytest.approx(y.kl, abs=1e-6) and x.top1 == y.top1
    assert a.details[0].kl == pytest.approx(0.0, abs=1e-5)   # scored dense: agrees with the reference
    assert getattr(m2, "_utrc_handle", None) is None
    # a dense pass over budget hands back the recompute form
    kept = ev.score_tokens(m2, toks, None, 3, pad_token_id=ev.pad_id(tok), keep_reference=True, reference_budget=10)
    assert not kept.reference.stored
    with pytest.raises(ValueError, match="other requests"):
        ev.score_tokens(m2, toks[:3], cfg, 3, pad_token_id=ev.pad_id(tok), reference=stored)
    with pytest.raises(ValueError, match="other requests"):
        ev.score_tokens(m2, toks, cfg, 2, pad_token_id=ev.pad_id(tok), reference=stored)
    with pytest.raises(ValueError, match="dense call"):
        ev.score_tokens(m2, toks, cfg, 3, keep_reference=True)


def test_dense_reference_computed_once_per_task(m2, tok, monkeypatch):
    ev.clear_reference_cache()
    calls = []
    real = ev.dense_reference
    monkeypatch.setattr(ev, "dense_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    for method in ("utrc", "evit"):
        ev.evaluate(m2, tok, tasks=("cloze", "choice2"), config=ReductionConfig(method, keep_ratio=0.6, layers=(0, 2)),
                    limit=2, batch_size=2, progress=False, items=True)
    assert len(calls) == 2   # one per task, shared by both methods
    ev.evaluate(m2, tok, tasks=("cloze",), config=None, limit=2, batch_size=2, progress=False, items=True)
    ev.evaluate(m2, tok, tasks=("cloze",), config=ReductionConfig("utrc", keep_ratio=0.6, layers=(0, 2)),
                limit=2, batch_size=4, progress=False, items=True)   # another batch size: its own reference
    assert len(calls) == 3

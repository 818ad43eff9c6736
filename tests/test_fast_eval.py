"""Fast path of the evaluator (utrc_study.eval.fast): same per-item outcomes as the classic scorer.

Tolerance (stated in the fast module's report, scripts/gpu_eval_speed.py uses the same): per request
|ll_fast - ll_classic| <= 1e-4 + 1e-5 |ll| (float32 rounding of other batch shapes and chunk sizes;
measured <= 3e-5 on tiny-mamba2), per item correctness identical, KL within 1e-4 + 1e-3 KL, top-1 and
the achieved cut identical.
"""
import random
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from utrc_lib import ReductionConfig
from utrc_study.eval import fast
from utrc_study.eval import scorer
from utrc_lib import scoring  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LL_ABS, LL_REL = 1e-4, 1e-5


def _close(a, b, abs_=LL_ABS, rel=LL_REL):
    return abs(a - b) <= abs_ + rel * abs(b)


# -- twins on random inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_left_pad_matches_its_loop_twin(seed):
    g = random.Random(seed)
    seqs = [[g.randrange(100) for _ in range(g.randrange(0, 12))] for _ in range(g.randrange(1, 9))]
    seqs[0] = seqs[0] or [1]
    width = max(len(s) for s in seqs) + g.randrange(0, 3)
    a = fast.left_pad(seqs, 7, width)
    b = fast.left_pad_simple(seqs, 7, width)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_ref", [False, True])
def test_score_tail_matches_row_by_row_twin(seed, with_ref):
    g = torch.Generator().manual_seed(seed)
    B, T, V = 5, 9, 11
    logits = torch.randn(B, T, V, generator=g) * 3
    ns = torch.randint(1, 5, (B,), generator=g).tolist()
    batch = [(b, None, torch.randint(0, V, (ns[b],), generator=g).tolist()) for b in range(B)]
    ref = {b: torch.log_softmax(torch.randn(ns[b], V, generator=g), -1) for b in range(B)} if with_ref else None
    want = scoring._score_rows_simple(logits, batch, ref)
    m = max(ns)
    target, valid = fast.left_pad([p[2] for p in batch], 0, m)
    dense = None
    if with_ref:
        dense = torch.zeros(B, m, V)
        for b in range(B):
            dense[b, m - ns[b]:] = ref[b]
    tail = logits[:, -m:].clone()
    tail[~valid] = float("nan")   # slots outside the scored tail are never read
    ll, greedy, kl, top1, _ = fast.score_tail(tail, target, valid, dense)
    for b, (wl, wg, wk, wt) in enumerate(want):
        assert ll[b].item() == pytest.approx(wl, abs=1e-5)
        assert bool(greedy[b]) == wg
        if with_ref:
            assert kl[b].item() == pytest.approx(wk, abs=1e-5)
            assert int(top1[b]) == wt


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exact", [False, True])
def test_plan_batches_partitions_within_budget(seed, exact):
    g = random.Random(seed)
    lens = [g.randrange(1, 60) for _ in range(g.randrange(1, 80))]
    conts = [g.randrange(1, 5) for _ in lens]
    out = fast.plan_batches(lens, max_tokens=200, max_rows=7, pad_tolerance=0.3, exact=exact,
                            cont_lengths=conts, max_scored=20)
    assert sorted(i for b in out for i in b) == list(range(len(lens)))
    for b in out:
        top = max(lens[i] for i in b)
        assert lens[b[0]] == top
        if len(b) > 1:
            assert len(b) * top <= 200 and len(b) <= 7 and len(b) * max(conts[i] for i in b) <= 20
            assert all(lens[i] >= 0.7 * top for i in b)
            if exact:
                assert all(lens[i] == top for i in b)


# -- same outcomes as the classic path, batch independence, causality -------------------------------------
def _requests(vocab, n=14, seed=0):
    g = random.Random(seed)
    reqs = []
    for _ in range(n):
        ctx = [g.randrange(1, vocab) for _ in range(g.randrange(3, 40))]
        reqs.append((ctx, [g.randrange(1, vocab) for _ in range(g.randrange(1, 5))]))
    reqs.append(([5], [6, 7]))   # too short to reduce: dense fallback
    return reqs


@pytest.fixture(scope="module")
def m2():
    return tiny_model("mamba2", layers=6, vocab=64)


@pytest.mark.heavy
@pytest.mark.parametrize("method", [None, "utrc", "evit", "tome"])
def test_fast_matches_classic_and_is_batch_independent(m2, method):
    cfg = None if method is None else ReductionConfig(method, flops_reduction=0.3)
    reqs = _requests(64)
    a = scorer.score_tokens(m2, reqs, cfg, 4)
    b = fast.score_tokens_fast(m2, reqs, cfg, max_tokens=160, max_rows=6)
    one = fast.score_tokens_fast(m2, reqs, cfg, max_tokens=1, max_rows=1)   # every request alone
    for x, y, z in zip(a.results, b.results, one.results):
        assert _close(y[0], x[0]) and y[1] == x[1]
        assert _close(z[0], y[0]) and z[1] == y[1]
    assert b.achieved_cut == pytest.approx(a.achieved_cut, abs=1e-9)
    assert b.dense_fallback == a.dense_fallback == one.dense_fallback


def test_fast_is_causal(m2):
    """A row's scores do not depend on its batch neighbours, and a scored position sees only the past
    (the chain rule over the continuation holds exactly up to rounding)."""
    cfg = ReductionConfig("utrc", flops_reduction=0.3)
    ctx = list(range(1, 30))
    base = fast.score_tokens_fast(m2, [(ctx, [40, 41])], cfg).results[0]
    # a batch neighbour that differs only in its continuation does not change the row
    both = fast.score_tokens_fast(m2, [(ctx, [40, 41]), (ctx, [50, 51])], cfg).results[0]
    assert _close(both[0], base[0])
    # dense: the log-prob of the first continuation token does not depend on the second
    d1 = fast.score_tokens_fast(m2, [(ctx, [40])]).results[0][0]
    d2 = fast.score_tokens_fast(m2, [(ctx, [40, 41]), (ctx + [40], [41])]).results
    assert _close(d2[0][0] - d2[1][0], d1)


@pytest.mark.heavy
def test_fast_reference_kl_matches_classic(m2):
    cfg = ReductionConfig("utrc", flops_reduction=0.3)
    reqs = _requests(64, seed=3)
    ref_c = scorer.dense_reference(m2, reqs, 4)
    a = scorer.score_tokens(m2, reqs, cfg, 4, reference=ref_c)
    ref_f = fast.dense_reference_fast(m2, reqs, max_tokens=160)
    assert ref_f.stored
    b = fast.score_tokens_fast(m2, reqs, cfg, reference=ref_f, max_tokens=160)
    rec = fast.score_tokens_fast(m2, reqs, cfg, reference=fast.FastReference(ref_f.signature), max_tokens=160)
    for x, y, z in zip(a.details, b.details, rec.details):
        assert y.kl == pytest.approx(x.kl, abs=1e-4, rel=1e-3) and y.top1 == x.top1
        assert z.kl == pytest.approx(y.kl, abs=1e-5) and z.top1 == y.top1
    with pytest.raises(ValueError, match="other requests"):
        fast.score_tokens_fast(m2, reqs[:3], cfg, reference=ref_f)


@pytest.mark.heavy
def test_fake_mamba_ssm_backend_exact_length_batches():
    """The mamba-ssm backend (CPU stand-in): exact-length batches, same numbers as one at a time."""
    import fake_mamba_ssm

    model = fake_mamba_ssm.MambaLMHeadModel().eval()
    reqs = _requests(64, seed=5)[:-1] + [(list(range(1, 20)), [3, 4]), (list(range(2, 21)), [5])]
    for cfg in (None, ReductionConfig("utrc", flops_reduction=0.3)):
        b = fast.score_tokens_fast(model, reqs, cfg, max_tokens=400, max_rows=8)
        one = fast.score_tokens_fast(model, reqs, cfg, max_tokens=1, max_rows=1)
        for y, z in zip(b.results, one.results):
            assert _close(y[0], z[0]) and y[1] == z[1]


# -- the embedded tiny models: per item, fast vs classic ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny2():
    import utrc_lib

    if not (ROOT / "data/models/tiny-mamba2/model.safetensors").is_file():
        pytest.skip("tiny-mamba2 weights absent")
    return utrc_lib.load_model("tiny-mamba2")


@pytest.mark.heavy
@pytest.mark.parametrize("method", [None, "utrc", "evit", "tome"])
def test_tiny_mamba2_items_fast_equals_classic(tiny2, method):
    model, tok = tiny2
    cfg = None if method is None else ReductionConfig(method, flops_reduction=0.2)
    tasks = ("cloze", "choice4", "choice2", "ppl")
    kw = dict(limit=6, items=True, progress=False)
    a = scorer.evaluate(model, tok, tasks, cfg, batch_size=8, **kw)
    b = fast.evaluate_fast(model, tok, tasks, cfg, **kw)
    assert b["meta"]["engine"] == "fast"
    for t in tasks:
        ia, ib = a["items"][t], b["items"][t]
        for key in ("correct", "correct_norm"):
            if key in ia:
                assert ia[key] == ib[key], (t, key)
        for x, y in zip(ia["ll"], ib["ll"]):
            assert _close(y, x), (t, x, y)
        for x, y in zip(ia["kl"], ib["kl"]):
            assert y == pytest.approx(x, abs=1e-4, rel=1e-3), (t, x, y)
        assert ia["top1"] == ib["top1"], t
        if cfg is not None:
            assert b[t]["achieved_token_layer_cut"] == pytest.approx(a[t]["achieved_token_layer_cut"], abs=1e-9)
            assert b[t]["dense_fallback"] == a[t]["dense_fallback"]


@pytest.mark.heavy
def test_sweep_fast_engine_rows_equal_classic_rows():
    """A sweep row scored with engine="fast" has the classic row's per-item outcomes (same items, same
    correctness, log-likelihoods within float tolerance), and its dense reference is reused."""
    from utrc_study.experiments import sweep

    common = dict(tasks=("cloze", "choice2"), limit=4, items=True)
    for method, cut in (("none", 0.0), ("utrc", 0.2)):
        a = sweep.evaluate_config("tiny-mamba2", method, cut, **common)
        b = sweep.evaluate_config("tiny-mamba2", method, cut, engine="fast", **common)
        assert b["meta/engine"] == "fast"
        for task in common["tasks"]:
            ia, ib = a["items"][task], b["items"][task]
            assert list(ia["id"]) == list(ib["id"]) and list(ia["correct"]) == list(ib["correct"])
            assert all(abs(x - y) <= 1e-4 + 1e-5 * abs(x) for x, y in zip(ia["ll"], ib["ll"]))
            if method != "none":
                assert all(abs(x - y) <= 1e-4 for x, y in zip(ia["kl"], ib["kl"]))
    assert any(k[1] == "fast" for k in sweep._FAST_REFERENCES)
    with pytest.raises(ValueError, match="unknown engine"):
        sweep.evaluate_config("tiny-mamba2", "utrc", 0.2, engine="turbo", **common)

"""Paired per-item statistics: known answers for intervals, exact tests and power."""
import math

import numpy as np
import pytest

from utrc_study.experiments import stats as st


def _binom_two_sided_by_hand(k, n):
    tail = sum(math.comb(n, j) for j in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_identical_arrays_give_zero_delta_and_no_signal():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 50)
    d = st.paired_bootstrap(a, a)
    assert d.estimate == 0 and d.low == d.high == 0 and d.contains(0) and not d.excludes_zero
    assert d.p_value == 1.0 and (d.seed, d.resamples, d.level, d.n) == (0, 10_000, 0.95, 50)
    t = st.mcnemar_exact(a, a)
    assert (t.a_only, t.b_only, t.p_value) == (0, 0, 1.0)
    pa = st.paired_accuracy(a, a)
    assert not pa.significant and pa.mde.discordance == 0 and pa.mde.exact is None


def test_all_discordant_one_way_is_significant():
    a = np.r_[np.ones(12), np.zeros(28)]
    b = np.zeros(40)
    t = st.mcnemar_exact(a, b)
    assert (t.a_only, t.b_only, t.n) == (12, 0, 40)
    assert t.p_value == pytest.approx(2 * 0.5 ** 12, rel=1e-12)   # both tails of Bin(12, 1/2) at 0 and 12
    pa = st.paired_accuracy(a, b)
    assert pa.significant and pa.delta.estimate == pytest.approx(0.3) and pa.delta.low > 0
    rev = st.paired_accuracy(b, a)
    assert rev.significant and rev.delta.high < 0 and rev.mcnemar.p_value == t.p_value


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (2, 10), (3, 10), (5, 10), (7, 10), (4, 25), (12, 25), (40, 100)])
def test_mcnemar_matches_hand_computed_binomial_tails(k, n):
    # k items only a gets right, n - k only b; 7 concordant items of each kind do not matter
    a = [1] * k + [0] * (n - k) + [1] * 7 + [0] * 7
    b = [0] * k + [1] * (n - k) + [1] * 7 + [0] * 7
    t = st.mcnemar_exact(a, b)
    assert (t.a_only, t.b_only, t.discordant) == (k, n - k, n)
    assert t.p_value == pytest.approx(_binom_two_sided_by_hand(k, n), rel=1e-12)
    assert st.binomial_two_sided(k, n) == t.p_value


def test_known_mcnemar_values():
    assert st.binomial_two_sided(2, 10) == pytest.approx(0.109375)          # 2 * (1 + 10 + 45) / 1024
    assert st.binomial_two_sided(1, 10) == pytest.approx(0.021484375)       # 2 * 11 / 1024
    assert st.binomial_two_sided(5, 10) == 1.0
    assert st.binomial_two_sided(0, 0) == 1.0


def test_bootstrap_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, 400)
    iv = st.bootstrap_mean(x, resamples=20_000, seed=3)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert iv.estimate == pytest.approx(x.mean())
    assert iv.low == pytest.approx(x.mean() - 1.959964 * se, abs=0.06 * se * 1.96)
    assert iv.high == pytest.approx(x.mean() + 1.959964 * se, abs=0.06 * se * 1.96)
    assert iv.seed == 3 and iv.resamples == 20_000
    # the seed is recorded and fixes the interval
    assert st.bootstrap_mean(x, resamples=2000, seed=3) == st.bootstrap_mean(x, resamples=2000, seed=3)
    assert st.bootstrap_mean(x, resamples=2000, seed=3) != st.bootstrap_mean(x, resamples=2000, seed=4)


def test_paired_delta_interval_against_normal_approximation_of_differences():
    rng = np.random.default_rng(11)
    a = rng.integers(0, 2, 300)
    flip = rng.random(300) < 0.2
    b = np.where(flip, 1 - a, a)
    d = st.paired_bootstrap(a, b, resamples=20_000)
    diff = a - b
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert d.estimate == pytest.approx(diff.mean())
    assert d.low == pytest.approx(diff.mean() - 1.96 * se, abs=0.2 * 1.96 * se)
    assert d.high == pytest.approx(diff.mean() + 1.96 * se, abs=0.2 * 1.96 * se)


def test_bootstrap_ppl():
    ll = np.array([-200.0, -230.0, -180.0, -250.0])
    tok = np.array([64, 64, 64, 64])
    iv = st.bootstrap_ppl(ll, tok, resamples=5000)
    assert iv.estimate == pytest.approx(math.exp(-ll.sum() / tok.sum()))
    lo, hi = math.exp(-ll.max() / 64), math.exp(-ll.min() / 64)   # any resample lies between the extremes
    assert lo <= iv.low <= iv.estimate <= iv.high <= hi
    const = st.bootstrap_ppl([-128.0] * 10, [64] * 10, resamples=500)
    assert const.low == const.high == pytest.approx(math.exp(2.0))
    cloze = st.bootstrap_ppl([-1.0, -3.0], resamples=100)   # per-item: exp(-mean ll)
    assert cloze.estimate == pytest.approx(math.exp(2.0))
    same = st.paired_bootstrap_ppl(ll, ll, tok, resamples=500)
    assert same.estimate == same.low == same.high == 0.0
    worse = st.paired_bootstrap_ppl(ll - 6.4, ll, tok, resamples=500)   # 0.1 nats per token worse on every item
    assert worse.low > 0 and worse.estimate == pytest.approx(math.exp(-ll.sum() / 256) * (math.exp(0.1) - 1))


def test_minimum_detectable_effect_formula():
    m = st.minimum_detectable_effect(200, 0.15)
    z = 1.959963984540054
    assert m.resolvable == pytest.approx(z * math.sqrt(0.15 / (200 + z * z)))
    # the resolvable difference d solves d = z * sqrt((p_d - d^2) / n)
    assert m.resolvable == pytest.approx(z * math.sqrt((0.15 - m.resolvable ** 2) / 200))
    assert m.at_power == pytest.approx((z + 0.8416212335729143) * math.sqrt(0.15 / 200))
    # exact: 30 discordant items; the largest minority count m with 2 P(X <= m) < 0.05 under Bin(30, 1/2)
    mm = max(k for k in range(16) if _binom_two_sided_by_hand(k, 30) < 0.05)
    assert m.exact == pytest.approx((30 - 2 * mm) / 200)
    assert st.minimum_detectable_effect(100, 0.2).exact == pytest.approx(0.10)   # 5 vs 15 of 20: p = 0.041
    assert st.minimum_detectable_effect(400, 0.15).resolvable < m.resolvable    # more items resolve less
    with pytest.raises(ValueError):
        st.minimum_detectable_effect(0, 0.1)


def test_compare_sorts_methods_into_beats_beaten_unresolved():
    n = 100
    utrc = np.r_[np.ones(50), np.zeros(50)]
    evit = np.r_[np.ones(30), np.zeros(70)]             # utrc right on 20 more items, never wrong where evit is right
    tome = utrc.copy()
    tome[[0, 60]] = 1 - tome[[0, 60]]                    # one discordant each way
    oracle = np.r_[np.ones(75), np.zeros(25)]
    c = st.compare({"utrc": utrc, "evit": evit, "tome": tome, "oracle": oracle}, "utrc")
    assert c.beats == ["evit"] and c.beaten_by == ["oracle"] and c.unresolved == ["tome"]
    assert c.details["evit"]["test"] == "mcnemar_exact" and c.details["evit"]["delta"]["estimate"] == pytest.approx(0.2)
    assert c.details["tome"]["p_value"] == 1.0 and c.details["evit"]["p_adjusted"] >= c.details["evit"]["p_value"]
    assert c.seed == 0 and c.correction == "holm" and c.details["evit"]["mde"]["n"] == n
    # continuous, lower is better (KL): the paired bootstrap decides
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.05, n)
    k = st.compare({"utrc": base, "pumer": base + 0.05, "same": base}, "utrc", metric="kl", resamples=2000)
    assert k.beats == ["pumer"] and k.unresolved == ["same"] and k.details["pumer"]["test"] == "paired_bootstrap"


def test_holm_correction():
    adj = st._holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_input_checks_and_item_arrays():
    with pytest.raises(ValueError, match="differ in length"):
        st.paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        st.mcnemar_exact([0.5, 1], [1, 0])
    with pytest.raises(ValueError, match="missing"):
        st.bootstrap_mean([0.1, None])
    row_a = {"id": ["x", "y"], "correct": [1, 0]}
    row_b = {"id": ["y", "x"], "correct": [1, 0]}
    assert st.item_array(row_a, "correct").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="not paired"):
        st.item_array(row_b, "correct", ids=row_a["id"])
    with pytest.raises(KeyError, match="kl"):
        st.item_array(row_a, "kl")


def test_bootstrap_p_of_zero_prints_below_one_over_resamples():
    """A bootstrap p of 0 only says that no draw crossed 0: printed "< 1/n", corrected as 1/n."""
    assert st.format_p(0.0, 10_000) == "< 0.0001" and st.format_p(0.0, 2000) == "< 0.0005"
    assert st.format_p(0.0123, 10_000) == "0.0123" and st.format_p(0.0) == "0"    # exact p: as it is
    assert st.format_p(None) == "" and st.format_p(float("nan"), 100) == ""
    assert st.p_floor(0.0, 10_000) == 1e-4 and st.p_floor(0.2, 10_000) == 0.2 and st.p_floor(0.0, None) == 0.0
    a, b = np.ones(40), np.zeros(40)
    d = st.paired_bootstrap(a + np.linspace(0, 0.1, 40), b, resamples=500)
    assert d.p_value == 0.0 and st.format_p(d.p_value, d.resamples) == "< 0.002"
    c = st.compare({"utrc": a + np.linspace(0, 0.1, 40), "x": b}, metric="ll", resamples=500)
    assert c.details["x"]["p_adjusted"] == pytest.approx(1 / 500) and c.beats == ["x"]

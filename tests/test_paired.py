"""Paired tables of sweep rows (experiments.paired): known cases on synthetic item arrays."""
import numpy as np
import pytest

from utrc_study.experiments import paired, stats
from utrc_study.experiments.sweep import SweepResult


def _items(correct_by_task, kl=0.0, ll=-1.0, n_ppl=8):
    out = {}
    for t, c in correct_by_task.items():
        n = len(c)
        it = {"id": list(range(n)), "correct": list(c), "tokens": [2] * n, "kl": [kl * 2] * n,
              "kl_per_token": [kl] * n, "top1": [1.0 if kl == 0 else 0.5] * n, "ll": [ll] * n,
              "gold_tokens": [1] * n, "ll_per_token": [ll] * n}
        if t == "choice4":
            it["correct_norm"] = list(c)
        out[t] = it
    out["ppl"] = {"id": list(range(n_ppl)), "tokens": [4] * n_ppl, "kl": [4 * kl] * n_ppl, "kl_per_token": [kl] * n_ppl,
                  "top1": [1.0] * n_ppl, "ll": [4 * ll] * n_ppl, "gold_tokens": [4] * n_ppl, "ll_per_token": [ll] * n_ppl}
    return out


def _result(rows):
    return SweepResult([{"params": p, "status": "ok", "items": it, "result": {}} for p, it in rows], 0, 0, "mem")


def _grid(seed=0, n=60):
    rng = np.random.default_rng(seed)
    dense = {t: rng.integers(0, 2, n) for t in paired.TASK_ACC}
    rows = [({"model": "m", "method": "none", "cut": 0.0}, _items(dense))]
    # utrc = dense; evit: every item wrong (far worse); tome: dense with 2 items flipped
    rows.append(({"model": "m", "method": "utrc", "cut": 0.2}, _items(dense, kl=0.01)))
    rows.append(({"model": "m", "method": "evit", "cut": 0.2}, _items({t: np.zeros(n, int) for t in dense}, kl=0.5, ll=-2.0)))
    flipped = {t: v.copy() for t, v in dense.items()}
    for t in flipped:
        flipped[t][:2] = 1 - flipped[t][:2]
    rows.append(({"model": "m", "method": "tome", "cut": 0.2}, _items(flipped, kl=0.01)))
    return _result(rows), dense


def test_stratified_bootstrap_known_cases():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    one = paired.stratified_bootstrap([a], [b], resamples=2000)
    ref = stats.paired_bootstrap(a, b, resamples=2000)
    assert one.estimate == pytest.approx(ref.estimate)
    assert abs(one.low - ref.low) < 0.05 and abs(one.high - ref.high) < 0.05
    same = paired.stratified_bootstrap([a, b], [a, b], resamples=500)
    assert same.estimate == 0 and same.low == 0 and same.high == 0 and same.p_value == 1.0
    avg = paired.stratified_bootstrap([np.ones(5), np.zeros(7)], resamples=200)
    assert avg.estimate == 0.5 and avg.low == avg.high == 0.5 and avg.n == 12
    with pytest.raises(ValueError, match="same sizes"):
        paired.stratified_bootstrap([a], [b[:3]])
    with pytest.raises(ValueError, match="at least one"):
        paired.stratified_bootstrap([[]])


def test_accuracy_table_deltas_and_tests():
    res, dense = _grid()
    acc = paired.accuracy_table(res, resamples=2000)
    u = acc[(acc.method == "utrc") & (acc.metric == "avg_acc")].iloc[0]
    assert u.delta == 0 and u.p_vs_dense == 1.0
    e = acc[(acc.method == "evit") & (acc.metric == "cloze")].iloc[0]
    assert e.acc == 0 and e.delta == pytest.approx(-dense["cloze"].mean()) and e.p_vs_dense < 1e-6
    assert e.delta_high < 0
    d = acc[(acc.method == "none") & (acc.metric == "choice2")].iloc[0]
    assert d.acc == pytest.approx(dense["choice2"].mean()) and d.acc_low <= d.acc <= d.acc_high
    assert np.isnan(d.get("delta", np.nan))


def test_comparison_verdicts_and_power():
    res, _ = _grid()
    cmp = paired.comparison_table(res, baselines=["evit", "tome"], resamples=2000)
    v = paired.verdicts(cmp)[("m", 0.2)]
    assert v["beats"] == ["evit"] and v["unresolved"] == ["tome"] and v["beaten"] == []
    kl = cmp[(cmp.metric == "kl:ppl") & (cmp.baseline == "evit")].iloc[0]
    assert kl.delta < 0 and kl.verdict == "beats"     # lower KL is better
    assert set(cmp.p_holm) and (cmp.p_holm >= cmp.p - 1e-12).all()
    pw = paired.power_table(res)
    assert set(pw.task) == set(paired.TASK_ACC) and (pw.n == 60).all()
    assert (pw.resolvable > 0).all() and (pw.at_power > pw.resolvable).all()


def test_fidelity_and_perplexity_tables():
    res, _ = _grid()
    fid = paired.fidelity_table(res, resamples=500)
    kl = fid[(fid.method == "evit") & (fid.measure == "kl_per_token") & (fid.task == "ppl")].iloc[0]
    assert kl.estimate == pytest.approx(0.5) and kl.low == pytest.approx(0.5)
    dll = fid[(fid.method == "evit") & (fid.measure == "delta_ll_per_token") & (fid.task == "cloze")].iloc[0]
    assert dll.estimate == pytest.approx(-1.0)
    ppl = paired.perplexity_table(res, resamples=500)
    p = ppl[(ppl.method == "evit") & (ppl.task == "ppl")].iloc[0]
    assert p.ppl == pytest.approx(np.exp(2.0)) and p.delta == pytest.approx(np.exp(2.0) - np.exp(1.0))


def test_rows_without_items_are_refused():
    res = SweepResult([{"params": {"model": "m", "method": "none", "cut": 0}, "status": "ok", "result": {}}], 0, 0, "m")
    with pytest.raises(ValueError, match="items=True"):
        paired.accuracy_table(res)


def test_holm_family_is_the_table_a_figure_shows():
    """holm_over=() corrects over every row of the table (models x cuts x metrics x baselines); the
    default over the baselines of one (model, cut, metric); a bootstrap p of 0 enters as 1/resamples."""
    res, _ = _grid()
    kw = dict(baselines=["evit", "tome"], metrics=[paired.AVG, "kl:ppl"], resamples=1000)
    cell = paired.comparison_table(res, **kw)
    table = paired.comparison_table(res, holm_over=(), **kw)
    assert set(cell.family_size) == {2} and set(table.family_size) == {4}
    assert paired.holm_family(table) == "all 4 comparisons of the table"
    assert paired.holm_family(cell) == "the 2 comparisons that share model, cut, metric"
    assert (table.p_holm >= cell.p_holm - 1e-12).all()                   # a larger family: never smaller
    e = table[(table.metric == "kl:ppl") & (table.baseline == "evit")].iloc[0]
    assert e.p == 0 and e.test == "paired_bootstrap" and e.resamples == 1000
    assert e.p_holm == pytest.approx(4 / 1000) and e.verdict == "beats"  # 0 -> 1/1000, times 4 (Holm's first step)
    acc = paired.comparison_table(res, baselines=["evit"], metrics=["cloze"], resamples=200)
    assert acc.test.iloc[0] == "mcnemar_exact" and acc.resamples.isna().all()   # an exact p is not floored

"""scripts/gpu_depth_eval.py: the depth family's schedules and its order of work (no model is run)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gpu_depth_eval as g  # noqa: E402
from utrc_study.experiments import depth  # noqa: E402


def test_schedules():
    assert depth.schedule_layers("library", 64) == [12, 17, 22, 27, 32, 37, 42]       # the paper's
    assert depth.schedule_layers("library", 48) == [10, 15, 20, 25, 30, 35]           # the paper's
    for L in (12, 24, 48, 64):
        rel = depth.schedule_layers("relative", L)
        assert rel == sorted(set(rel)) and 0 <= rel[0] and rel[-1] < L
        # the same fractions of the stack as the paper's 64-layer anchors
        assert len(rel) == 7 and all(abs(x / L - a / 64) <= 0.5 / L + 1e-9 for x, a in zip(rel, depth.PAPER_64))
        for s in depth.SCHEDULES:
            assert depth.schedule_of(L, depth.schedule_layers(s, L)) in (s, "library")   # at 64 both are the paper's
    assert depth.schedule_of(24, [1, 2]) == "custom"
    with pytest.raises(ValueError, match="unknown schedule"):
        depth.schedule_layers("uniform", 24)


def test_plan_order_and_no_duplicates():
    cfgs = depth.plan(["tiny-mamba2"], ["utrc", "tome"], [0.2, 0.1], list(depth.SCHEDULES), ["cloze_v2"], 2, "fast")
    assert cfgs[0]["method"] == "none" and "layers" not in cfgs[0]
    assert all(c["engine"] == "fast" and c["max_length"] == depth.MAX_LENGTH for c in cfgs)
    cuts = [c["cut"] for c in cfgs[1:]]
    assert cuts == sorted(cuts, key=lambda c: c != 0.2)          # the first cut of every schedule first
    keys = [(c["method"], c["cut"], tuple(c.get("layers", ()))) for c in cfgs]
    assert len(keys) == len(set(keys)) == 1 + 2 * 2 * 2         # tiny-mamba2: the schedules differ


def _row(model, method, cut, layers, correct, kl):
    n = len(correct)
    it = {"id": list(range(n)), "correct": list(correct), "kl": list(kl), "tokens": [1] * n,
          "gold_tokens": [1] * n, "ll": [-1.0] * n}
    p = {"model": model, "method": method, "cut": cut, "tasks": ["choice2_v2"]}
    if layers is not None:
        p["layers"] = layers
    return {"status": "ok", "params": p, "items": {"choice2_v2": it}}


def test_margins_and_slopes_on_known_rows():
    depths = {"a": 12, "b": 24}
    lib = {m: depth.schedule_layers("library", L) for m, L in depths.items()}
    rng = np.random.default_rng(0)
    n = 200
    dense = rng.random(n) < 0.9
    rows = []
    for m, L in depths.items():
        rows.append(_row(m, "none", 0.0, None, dense.astype(int), [0.0] * n))
        rows.append(_row(m, "utrc", 0.2, lib[m], dense.astype(int), [0.1] * n))
        worse = dense & (rng.random(n) < (1.0 if m == "a" else 0.6))       # tome loses 40% of b's hits
        rows.append(_row(m, "tome", 0.2, lib[m], worse.astype(int), [0.1 if m == "a" else 0.3] * n))
    t = depth.margins(rows, depths.get, resamples=2000)
    acc = t[t["metric"] == "acc"].set_index("model")
    assert acc.loc["a", "margin"] == 0 and acc.loc["b", "margin"] > 0.2 and acc.loc["b", "low"] > 0
    kl = t[t["metric"] == "kl"].set_index("model")
    assert abs(kl.loc["b", "margin"] - 0.2) < 1e-9 and abs(kl.loc["a", "margin"]) < 1e-12
    norm = t[t["metric"] == "norm"].set_index("model")
    gap = dense.mean() - 0.5
    assert abs(norm.loc["b", "margin"] - acc.loc["b", "margin"] / gap) < 1e-9
    s = depth.slopes(t).set_index("metric")
    assert s.loc["acc", "verdict"] == "grows" and s.loc["acc", "beats_from"] == 24
    assert s.loc["kl", "verdict"] == "grows"
    assert depth.p_text(0.0, 10000) == "p < 1e-04" and depth.p_text(0.031, 10000) == "p = 0.031"
    col = depth.collapsed(rows, depths.get, resamples=500)
    at = col.set_index(["model", "method"])["at_chance"]
    assert not at[("a", "utrc")] and not at[("b", "utrc")] and not at[("a", "tome")]
    assert at[("b", "tome")]          # 0.9 x 0.6 = 0.54 of 200 two-choice items: chance is inside its interval


def test_script_help_names_the_grid(capsys):
    with pytest.raises(SystemExit) as e:
        g.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--models" in text and "--deadline" in text and "--evidence" in text

"""scripts/gpu_depth_eval.py: the depth family's schedules and its order of work (no model is run)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gpu_depth_eval as g  # noqa: E402


def test_schedules():
    assert g.schedule_layers("library", 64) == [12, 17, 22, 27, 32, 37, 42]       # the paper's
    assert g.schedule_layers("library", 48) == [10, 15, 20, 25, 30, 35]           # the paper's
    for L in (12, 24, 48, 64):
        rel = g.schedule_layers("relative", L)
        assert rel == sorted(set(rel)) and 0 <= rel[0] and rel[-1] < L
        # the same fractions of the stack as the paper's 64-layer anchors
        assert len(rel) == 7 and all(abs(x / L - a / 64) <= 0.5 / L + 1e-9 for x, a in zip(rel, g.PAPER_64))
        for s in g.SCHEDULES:
            assert g.schedule_of(L, g.schedule_layers(s, L)) in (s, "library")   # at 64 both are the paper's
    assert g.schedule_of(24, [1, 2]) == "custom"
    with pytest.raises(ValueError, match="unknown schedule"):
        g.schedule_layers("uniform", 24)


def test_plan_order_and_no_duplicates():
    cfgs = g.plan(["tiny-mamba2"], ["utrc", "tome"], [0.2, 0.1], list(g.SCHEDULES), ["cloze_v2"], 2, "fast")
    assert cfgs[0]["method"] == "none" and "layers" not in cfgs[0]
    assert all(c["engine"] == "fast" and c["max_length"] == g.MAX_LENGTH for c in cfgs)
    cuts = [c["cut"] for c in cfgs[1:]]
    assert cuts == sorted(cuts, key=lambda c: c != 0.2)          # the first cut of every schedule first
    keys = [(c["method"], c["cut"], tuple(c.get("layers", ()))) for c in cfgs]
    assert len(keys) == len(set(keys)) == 1 + 2 * 2 * 2         # tiny-mamba2: the schedules differ

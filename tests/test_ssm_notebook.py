"""Notebook 09 (issue 31, SSM-native baselines): its grid, its evidence plumbing and its statistics.

The notebook itself runs in quick mode in tests/test_notebooks.py::test_09_ssm_methods."""
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from utrc_study.report import evidence
from utrc_study.report import figures as runner

REPO = Path(__file__).resolve().parent.parent
NAME = "09_ssm_methods"
SSM = ["decimamba", "hattn_prune", "mtr_style", "adjacent_merge"]


def test_notebook_configs_is_the_main_grid_with_the_ssm_methods():
    """dense + UTRC + the SSM-native methods + the ToP-ViM preset x 10/20/30% x both tiny models, with 01's
    tasks, seed and size conventions; dense and UTRC are the very configurations of 01's evidence."""
    from utrc_lib.core.presets import topvim_layers

    configs, common = evidence.notebook_configs(NAME, limit=None, batch_size=256)
    d01 = evidence.notebook_defaults("01_main_results")
    assert common == {"tasks": d01["tasks"], "limit": None, "seed": d01["seed"], "batch_size": 256}
    models, cuts = ["tiny-mamba2", "tiny-mamba"], [0.1, 0.2, 0.3]
    assert len(configs) == len(models) * (1 + (2 + len(SSM)) * len(cuts))
    key = lambda c: (c["model"], c["method"], c["cut"], c.get("metric"), tuple(c.get("layers") or ()))  # noqa: E731
    got = {key(c) for c in configs}
    for m in models:
        assert (m, "none", 0.0, None, ()) in got
        for c in cuts:
            for method in ["utrc"] + SSM:
                assert (m, method, c, None, ()) in got
            assert (m, "prune_only", c, "clip", tuple(topvim_layers(12))) in got   # the preset, as a configuration
    assert all(c["fingerprint"] for c in configs)
    # the dense and UTRC rows are 01's configurations (read from its evidence, not computed again)
    first, _ = evidence.notebook_configs("01_main_results", limit=None, batch_size=256)
    shared = {evidence.match_key({**common, **c}) for c in first}
    mine = [c for c in configs if evidence.match_key({**common, **c}) in shared]
    assert sorted({c["method"] for c in mine}) == ["none", "utrc"] and len(mine) == 2 + 2 * 3
    assert evidence.SHARED[NAME] == ("01_main_results",)
    folder = REPO / evidence.FOLDERS["01_main_results"]
    if evidence.exists(folder):
        held, missing = evidence.present(configs, folder, common)
        assert len(held) == 8 and {c["method"] for c in held} == {"none", "utrc"}


def test_the_pilot_never_renders_into_the_figures_folder(tmp_path, monkeypatch):
    """Without the GPU evidence, `make figures` renders the pilot into figures/09_ssm_methods/cpu_pilot,
    labelled "CPU pilot, n=... items per task", at the pilot's size; with neither, 09 is skipped; with the
    GPU evidence, figures/09_ssm_methods itself."""
    from utrc_study.report import notebooks

    from test_evidence import _row

    figs = tmp_path / "figures"
    monkeypatch.setattr(notebooks, "FIGURES", figs)
    monkeypatch.setattr(runner, "FRESH", figs / "fresh")
    monkeypatch.setattr(runner, "REPO", tmp_path)
    full, pilot, render = "figures/09_ssm_methods/evidence", "figures/09_ssm_methods/cpu_pilot/evidence", \
        "figures/09_ssm_methods/cpu_pilot"
    monkeypatch.setitem(evidence.FOLDERS, NAME, full)
    monkeypatch.setitem(evidence.PILOTS, NAME, (pilot, render))
    quiet = dict(fresh=False, per_machine=False, quick=False, cuda=False, log=lambda m: None)
    params, label, note = runner.plan(NAME, {}, **quiet)
    assert params is None and note.startswith("SKIPPED")                       # neither: nothing written
    evidence.write([_row("none", 0.0, limit=3), _row("utrc", 0.2, limit=3)], tmp_path / pilot, command="t",
                   machine={"torch_device": "cpu"},
                   extra={"pilot": "CPU pilot", "run_label": "CPU pilot, n=3 items per task"})
    params, label, note = runner.plan(NAME, {}, **quiet)
    assert params["out_dir"] == str(tmp_path / render) and params["evidence"] == str(tmp_path / pilot)
    assert Path(params["out_dir"]) != figs / NAME and params["limit"] == 3
    assert label == "CPU pilot, n=3 items per task"
    evidence.write([_row("none", 0.0, limit=None)], tmp_path / full, command="t", machine={})
    params, label, _ = runner.plan(NAME, {}, **quiet)                            # the GPU evidence: figures/09 itself
    assert params["out_dir"] == str(figs / NAME) and params["limit"] is None and label == ""


def test_the_committed_pilot_is_labelled_and_apart():
    """The committed pilot (if any) is rendered only under figures/09_ssm_methods/cpu_pilot, and says so."""
    root = REPO / "figures" / NAME
    if not (root / "cpu_pilot" / "results.json").is_file():
        pytest.skip("no committed pilot")
    assert not evidence.exists(REPO / evidence.FOLDERS[NAME]) or (root / "results.json").is_file()
    if not evidence.exists(REPO / evidence.FOLDERS[NAME]):   # nothing in figures/09_ssm_methods but the pilot
        assert sorted(p.name for p in root.iterdir()) == ["cpu_pilot"]
    doc = json.loads((root / "cpu_pilot" / "results.json").read_text())
    assert doc["run"]["label"].startswith("CPU pilot, n=") and doc["data"]["source"] == doc["run"]["label"]
    man = json.loads((root / "cpu_pilot" / "evidence" / evidence.MANIFEST).read_text())
    assert man["run_label"] == doc["run"]["label"] and man["complete"]


def _fake(method, model="m", cut=0.2, correct=None, kl=None, n=40):
    rng = np.random.default_rng(zlib.crc32(f"{method} {cut}".encode()))
    items = {}
    for task in ("cloze", "choice4", "choice2", "ppl"):
        it = {"id": [str(i) for i in range(n)], "ll": list(-rng.random(n)), "gold_tokens": [1] * n, "tokens": [2] * n,
              "kl": [0.0] * n if method == "none" else list((kl or 0.1) * (1 + rng.random(n))),
              "top1": [1.0] * n}
        it["ll_per_token"] = it["ll"]
        it["kl_per_token"] = [k / 2 for k in it["kl"]]
        if task != "ppl":
            p = correct if correct is not None else 0.5
            it["correct"] = list((rng.random(n) < p).astype(int))
            it["correct_norm"] = it["correct"]
        items[task] = it
    return {"params": {"model": model, "method": method, "cut": cut}, "status": "ok", "items": items}


def test_presets_are_named_back_and_best_and_family_intervals_follow_the_rows():
    """`labelled` names a preset's rows; the best method per cell is the highest mean accuracy / lowest KL and
    is tested against every other one; the family-corrected intervals contain the unadjusted ones."""
    from utrc_study.experiments.sweep import SweepResult
    from utrc_study.report import ssm_methods as ssm

    common = {"tasks": ["cloze"], "limit": 3, "seed": 0, "batch_size": 1}
    pre = ssm.preset_labels(["tiny-mamba2"], ["utrc", "topvim"], [0.2], common)
    (k, v), = pre.items()
    row = {"params": {**common, "model": "tiny-mamba2", "cut": 0.2, **ssm.fields("topvim", "tiny-mamba2"),
                      "fingerprint": "x", "batch_size": 64}, "status": "ok"}
    got = ssm.labelled(SweepResult([row], computed=0, cached=1, cache_path=""), pre).rows[0]["params"]
    assert v == "topvim" and got["method"] == "topvim" and got["ran_as"] == "prune_only"
    rows = [_fake("none", correct=0.9), _fake("utrc", correct=0.8, kl=0.1), _fake("decimamba", correct=0.3, kl=1.0),
            _fake("topvim", correct=0.78, kl=0.12)]
    res = SweepResult(rows, computed=0, cached=len(rows), cache_path="")
    best = ssm.best_per_cell(res, ["utrc", "decimamba", "topvim"], ["avg_acc", "kl:ppl"], resamples=300, seed=0)
    acc = best[best["metric"] == "avg_acc"]
    assert set(acc["best"]) == {"utrc"} and set(acc["other"]) == {"decimamba", "topvim"}
    assert acc.set_index("other").loc["decimamba", "verdict"] == "resolved"     # 80% vs 30% on 120 items
    assert set(best[best["metric"] == "kl:ppl"]["best"]) == {"utrc"}
    cmp = ssm.comparisons(res, baselines=["decimamba", "topvim"], metrics=["avg_acc", "kl:ppl"], resamples=300, seed=0)
    assert set(cmp["family_size"]) == {4} and (cmp["family_level"] > 0.95).all()
    assert (cmp["low_family"] <= cmp["low"] + 1e-12).all() and (cmp["high_family"] >= cmp["high"] - 1e-12).all()
    text = ssm.findings(best, cmp, src="test rows")
    assert "UTRC" in text and "resolved ahead of" in text and "test rows" in text

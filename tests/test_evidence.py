"""Committed evidence (issue 25): the per-item rows round-trip, a sweep takes what the evidence holds and
computes only the rest, a smaller run never replaces a larger one, results.json is byte-stable, and the
committed code_version is current."""
import json
from pathlib import Path

import pytest

from utrc_study.report import evidence, provenance
from utrc_study.report import figures as runner

REPO = Path(__file__).resolve().parent.parent


def _row(method="utrc", cut=0.2, limit=3, model="m", kl=True, acc_shift=0.0):
    n = 3 if limit is None else limit
    items, result = {}, {}
    for task in ("cloze", "choice4", "ppl"):
        it = {"id": [f"{task}-{i:04d}" for i in range(n)], "ll": [-1.23456789 * (i + 1) for i in range(n)],
              "gold_tokens": [i + 1 for i in range(n)], "tokens": [2 * (i + 1) for i in range(n)],
              "kl": [0.0123456789 * i for i in range(n)] if kl else [None] * n,
              "top1": [1.0 - 0.1 * i for i in range(n)] if kl else [None] * n}
        if task != "ppl":
            it["correct"] = [i % 2 for i in range(n)]
            result[f"{task}/acc"] = sum(it["correct"]) / n + acc_shift
        if task == "choice4":
            it["correct_norm"] = [1] * n
            result["choice4/acc_norm"] = 1.0
        result[f"{task}/n"] = n
        items[task] = it
    result.update({"keep_ratio": 0.887012345678, "layers": [2, 4], "meta/device": "cpu"})
    params = {"model": model, "method": method, "cut": cut, "tasks": ["cloze", "choice4", "ppl"], "limit": limit,
              "seed": 0, "batch_size": 16}
    return {"key": "k", "params": params, "status": "ok", "result": result, "items": items}


def test_write_load_roundtrip(tmp_path):
    rows = [_row("none", 0.0), _row("utrc", 0.2), {"params": {"model": "m"}, "status": "error"}]
    man = evidence.write(rows, tmp_path / "ev", command="test", machine={"gpu": "none"}, notebooks=["x"])
    assert man["configurations"] == 2 and man["item_rows"] == 2 * 3 * 3
    assert man["items_per_task"] == {"cloze": 3, "choice4": 3, "ppl": 3} and man["machine"] == {"gpu": "none"}
    ev = evidence.load(tmp_path / "ev")
    assert [r["params"]["method"] for r in ev.rows] == ["none", "utrc"]
    it = ev.rows[1]["items"]["cloze"]
    assert it["ll"] == [-1.23457, -2.46914, -3.70370]            # 6 significant digits
    assert it["ll_per_token"][1] == pytest.approx(-2.46914 / 2)   # derived on load
    assert it["kl_per_token"][2] == pytest.approx(0.0246914 / 6)
    assert "correct" not in ev.rows[1]["items"]["ppl"] and ev.rows[1]["items"]["choice4"]["correct_norm"] == [1, 1, 1]
    assert ev.rows[1]["result"]["keep_ratio"] == 0.887012
    assert ev.lookup({**_row("utrc", 0.2)["params"], "batch_size": 512}) is ev.rows[1]   # batch size not matched
    assert ev.lookup(_row("utrc", 0.2, limit=2)["params"]) is None                        # another size: no
    assert ev.lookup(_row("evit", 0.2)["params"]) is None


def test_load_refuses_changed_or_inconsistent_files(tmp_path):
    evidence.write([_row()], tmp_path / "a", command="t", machine={})
    (tmp_path / "a" / evidence.CONFIGS).write_text((tmp_path / "a" / evidence.CONFIGS).read_text() + " ")
    with pytest.raises(ValueError, match="sha256"):
        evidence.load(tmp_path / "a")
    evidence.write([_row(acc_shift=0.25)], tmp_path / "b", command="t", machine={})   # stored acc != its items
    with pytest.raises(ValueError, match="items give"):
        evidence.load(tmp_path / "b")


def test_run_takes_the_evidence_and_computes_only_the_rest(tmp_path):
    evidence.write([_row("utrc", 0.2, limit=3)], tmp_path / "ev", command="t", machine={})
    calls = []

    def fn(model, method, cut, items=False, **kw):
        calls.append((method, kw["limit"]))
        return {"cloze/acc": 0.5, "items": {"cloze": {"id": ["cloze-0000"], "correct": [1]}}}

    common = {"tasks": ["cloze", "choice4", "ppl"], "limit": 3, "seed": 0, "batch_size": 4}
    res = evidence.run(fn, [{"model": "m", "method": "utrc", "cut": 0.2}, {"model": "m", "method": "evit", "cut": 0.2}],
                       tmp_path / "cache.jsonl", evidence=tmp_path / "ev", common=common, progress=False)
    assert calls == [("evit", 3)]                                  # only what the evidence lacks
    assert res.rows[0]["source"] == str(tmp_path / "ev") and res.rows[0]["params"]["batch_size"] == 16
    assert res.rows[1]["params"]["method"] == "evit" and res.cached == 1 and res.computed == 1
    calls.clear()
    evidence.run(fn, [{"model": "m", "method": "utrc", "cut": 0.2}], tmp_path / "c2.jsonl", evidence=tmp_path / "ev",
                 common={**common, "limit": 2}, progress=False)
    assert calls == [("utrc", 2)]                                  # another size is not taken from it


def test_a_smaller_run_never_replaces_a_larger_one(tmp_path, monkeypatch):
    from utrc_study.report import notebooks

    figs = tmp_path / "figures"
    monkeypatch.setattr(notebooks, "FIGURES", figs)
    monkeypatch.setattr(runner, "FRESH", figs / "fresh")
    name = "01_main_results"
    (figs / name).mkdir(parents=True)
    (figs / name / "results.json").write_text(json.dumps({"parameters": {"limit": None, "tasks": ["cloze"]},
                                                          "data": {"items_per_task": {"cloze": 1000}}}))
    assert runner.smaller((False, 80), runner.committed_size(name)) and not runner.smaller((True, 0), (True, 3200))
    assert runner.smaller((False, 20), (False, 40)) and not runner.smaller((False, 40), (False, 40))
    # the committed evidence holds every item: rendered into figures/<name>, at its size
    ev = tmp_path / "ev"
    evidence.write([_row(limit=None)], ev, command="t", machine={})
    monkeypatch.setitem(evidence.FOLDERS, name, str(ev))
    params, label, _ = runner.plan(name, {}, fresh=False, per_machine=False, quick=False, cuda=False, log=lambda m: None)
    assert params["out_dir"] == str(figs / name) and params["limit"] is None and params["evidence"] == str(ev)
    assert label == ""
    # a smaller limit asked for: goes to figures/fresh, labelled
    params, label, _ = runner.plan(name, {"limit": 20}, fresh=False, per_machine=False, quick=False, cuda=False,
                                   log=lambda m: None)
    assert params["out_dir"] == str(figs / "fresh" / name) and "n=20" in label
    # no evidence: the committed figures are left alone and the notebook is not run (FRESH=1 runs a subset)
    monkeypatch.setitem(evidence.FOLDERS, name, str(tmp_path / "missing"))
    said = []
    params, label, note = runner.plan(name, {}, fresh=False, per_machine=False, quick=False, cuda=False, log=said.append)
    assert params is None and note.startswith("SKIPPED: no committed evidence")
    assert any("LEFT UNTOUCHED" in s for s in said)
    # fresh mode writes only to figures/fresh, for every notebook
    for nb in ("00_walkthrough", name, "03_efficiency", "07_scale_and_length"):
        params, label, _ = runner.plan(nb, {}, fresh=True, per_machine=False, quick=False, cuda=False, log=lambda m: None)
        assert params["out_dir"] == str(figs / "fresh" / nb) and label.startswith("fresh run")


def test_results_json_is_rounded_and_machine_free(tmp_path):
    data = {"x": 0.1 + 0.2, "y": [1 / 3, 2, None], "z": {"seconds": 1.5, "w": 123456.789}}
    a = provenance.write_results(tmp_path / "a", "nb", parameters={"seed": 0, "out_dir": "q", "evidence": "e"},
                                 data=data, seed=0)
    doc = json.loads(a.read_text())
    assert doc["data"] == {"x": 0.3, "y": [0.333333, 2, None], "z": {"w": 123457.0}}
    assert set(doc["rendered_on"]["versions"]) <= set(provenance.STABLE_VERSIONS) and "evidence" not in doc["parameters"]
    log = json.loads((tmp_path / "a" / "run_log.json").read_text())
    assert "python" in log["machine"] and "torch_threads" in log["machine"]
    b = provenance.write_results(tmp_path / "b", "nb", parameters={"seed": 0}, data=data, seed=0)
    assert a.read_bytes() == b.read_bytes()


def test_committed_code_version_is_current():
    """Every committed results.json names the code version of this checkout (`make figures` would
    rewrite a stale one; re-render the notebooks after a change to the numeric code)."""
    from utrc_lib.environment import code_version

    stale = {}
    for path in sorted((REPO / "figures").glob("[0-9][0-9]_*/results.json")):
        if path.parent.name in runner.PER_MACHINE:   # a recorded measurement, not rewritten by default
            continue
        if path.parent.name in evidence.FOLDERS and not evidence.exists(REPO / evidence.FOLDERS[path.parent.name]):
            continue   # awaiting its GPU evidence: make figures leaves it untouched (and says so) until then
        v = provenance.rendered_versions(json.loads(path.read_text())).get("utrc_code_version")
        if v != code_version():
            stale[str(path.relative_to(REPO))] = v
    assert not stale, f"stale code_version (now {code_version()}): {stale}"


@pytest.mark.notebooks
@pytest.mark.timeout(900)
def test_rendering_from_evidence_computes_nothing_and_restores_a_deleted_json(tmp_path):
    """01 rendered from a small evidence set (computed here first): no configuration is computed again,
    and a deleted results.json comes back byte-identical (figures too)."""
    from utrc_study.experiments import sweep

    nb = runner.NOTEBOOKS / "01_main_results.ipynb"
    small = dict(model_names=["tiny-mamba2"], methods=["utrc", "evit"], cuts=[0.2], limit=2, resamples=200,
                 batch_size=8)
    runner.run_notebook(nb, dict(small, evidence="", out_dir=str(tmp_path / "computed"),
                                 cache_dir=str(tmp_path / "cache")), tmp_path, engine="script", log=lambda m: None)
    rows = [r for r in sweep.RowCache(tmp_path / "cache" / "eval.jsonl").load().values()]
    assert len(rows) == 3
    evidence.write(rows, tmp_path / "ev", command="test", machine={"device": "cpu"})
    render = dict(small, evidence=str(tmp_path / "ev"), out_dir=str(tmp_path / "fig"), cache_dir=str(tmp_path / "empty"))
    runner.run_notebook(nb, render, tmp_path, engine="script", log=lambda m: None)
    assert not (tmp_path / "empty" / "eval.jsonl").exists()          # every row came from the evidence
    first = {p.name: p.read_bytes() for p in sorted((tmp_path / "fig").iterdir()) if p.name != "run_log.json"}
    doc = json.loads(first["results.json"])
    assert doc["evidence"]["configurations"] == 3 and doc["evidence"]["machine"] == {"device": "cpu"}
    # computed on the evidence's machine (its manifest), rendered here: both recorded, apart
    assert [(c["rows"], c["machine"]) for c in doc["computed_on"]] == [(3, {"device": "cpu"})]
    assert doc["rendered_on"]["versions"]["utrc_code_version"] and "versions" not in doc
    assert "evidence" not in doc["parameters"] and doc["data"]["items_per_task"]["cloze"] == 2
    (tmp_path / "fig" / "results.json").unlink()
    runner.run_notebook(nb, render, tmp_path, engine="script", log=lambda m: None)
    again = {p.name: p.read_bytes() for p in sorted((tmp_path / "fig").iterdir()) if p.name != "run_log.json"}
    assert again.keys() == first.keys()
    assert [k for k in first if first[k] != again[k]] == []
    # the verification subset recomputes the first items here: it agrees with these rows, and fails loudly
    # on rows that are not what this code computes (one gold log-likelihood moved by 0.1 nats)
    stats = evidence.verify(tmp_path / "ev", items=1, ppl_items=1, cache=tmp_path / "verify.jsonl", log=lambda m: None)
    assert stats["ok"] and stats["outcome_flips"] == 0 and stats["ll_outside"] == 0 and stats["ll_compared"] == 3 * 4
    bad = evidence.load(tmp_path / "ev").rows
    bad[1]["items"]["choice2"]["ll"][0] += 0.1
    evidence.write(bad, tmp_path / "bad", command="test", machine={})
    stats = evidence.verify(tmp_path / "bad", items=1, ppl_items=1, cache=tmp_path / "verify.jsonl", log=lambda m: None)
    assert not stats["ok"] and stats["ll_outside"] == 1 and "choice2" in stats["outside"][0]
    assert "VERIFICATION FAILED" in evidence.verify_report(stats, "bad")
    # rows a later fix made stale are listed in the manifest: rendered, not verified, and said so
    man = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    method = bad[1]["params"]["method"]
    man["stale"] = [{"method": method, "reason": "a fix since"}]
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(man))
    stats = evidence.verify(tmp_path / "bad", items=1, ppl_items=1, cache=tmp_path / "verify.jsonl", log=lambda m: None)
    assert stats["ok"] and stats["configurations"] == 3 - sum(r["params"]["method"] == method for r in bad)
    assert "NOT VERIFIED" in evidence.verify_report(stats, "bad") and "a fix since" in stats["stale"][0]

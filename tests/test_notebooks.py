"""Run every notebook with quick=True through papermill and check the numbers it records.

Uses the embedded models when data/models holds them, else small random stand-ins saved to a temp
folder (same architecture family, 4 layers) so that the notebooks are always exercised.
"""
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.notebooks, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parent.parent
NB = REPO / "notebooks"
pm = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")


@pytest.fixture(scope="session")
def model_names(tmp_path_factory):
    real = [REPO / "data" / "models" / n for n in ("tiny-mamba2", "tiny-mamba")]
    if all((p / "config.json").is_file() for p in real):
        return ["tiny-mamba2", "tiny-mamba"]
    import torch
    from transformers import AutoTokenizer

    from conftest import hf_config, hf_model

    tok = AutoTokenizer.from_pretrained(str(REPO / "data" / "tokenizer"))
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = []
    for name, model in (
        ("m2", hf_model(hf_config("mamba2", layers=12, hidden=64, vocab=len(tok), chunk_size=32))),
        ("m1", hf_model(hf_config("mamba", layers=12, hidden=64, vocab=len(tok)))),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(str(root / name))
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sweep-cache"))  # shared: 04 reuses the rows of 01


def run(name, tmp_path, **params):
    """Execute notebook `name` the way the figures runner does (quiet kernel), quick mode, into tmp_path/name."""
    from utrc_study.report.figures import execute

    out = tmp_path / name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    execute(NB / f"{name}.ipynb", tmp_path / f"{name}.out.ipynb", dict(quick=True, out_dir=str(out), **params))
    res = json.loads((out / "results.json").read_text())
    assert res["notebook"] == name and res["parameters"]["quick"] is True
    assert res["seed"] == 0 and res["rendered_on"]["versions"]["torch"] and "token-layer" in res["flops_definition"]
    assert res["computed_on"] and all("source" in c for c in res["computed_on"])   # and the computing machine(s)
    for fig in res["figures"]:  # every figure listed exists, as png and pdf
        assert (out / fig).is_file()
    assert any(f.endswith(".png") for f in res["figures"]) and any(f.endswith(".pdf") for f in res["figures"])
    # byte-stable layout: no clock, no durations, no output folders, no commit; those are in the run log
    assert "created" not in res and "git_commit" not in res["rendered_on"]["versions"] and "out_dir" not in res["parameters"]
    assert not [k for k in _keys(res["data"]) if k == "seconds" or k.endswith("/seconds") or k in ("cut", "flops_cut")]
    log = json.loads((out / "run_log.json").read_text())
    assert log["notebook"] == name and log["created"] and log["locations"]["out_dir"] == str(out)
    streams = "".join(o.get("text", "") for c in nbformat.read(tmp_path / f"{name}.out.ipynb", as_version=4).cells
                      for o in c.get("outputs", []))
    assert "IProgress not found" not in streams  # ipywidgets (the notebooks extra) is installed
    return res


def _keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def finite(x):
    return x is not None and math.isfinite(x)


def test_sources_and_notebooks_in_sync():
    """Each notebooks/0X_*.py (jupytext percent source) and its paired .ipynb hold the same cells."""
    from utrc_study.report import notebooks

    assert len(notebooks.sources(NB)) == 10  # 00-04 + teaching 05, 06 + 07 scale and length + 08 depth + 09 SSM methods
    problems = notebooks.out_of_sync(NB)
    assert not problems, "\n".join(problems)
    for src in notebooks.sources(NB):
        names = notebooks.parameter_names(notebooks.parameters_cell(src.stem, NB))
        assert names[0] == "quick" and {"seed", "out_dir"} <= set(names), src.name


def _code_lines(src: Path) -> int:
    """Non-blank lines of a percent source's code cells (markdown cells and the header excluded)."""
    from utrc_study.report.notebooks import _percent_cells

    return sum(1 for marker, body in _percent_cells(src.read_text()) if marker and "[markdown]" not in marker
               for line in body if line.strip())


@pytest.mark.parametrize("name", [p.stem for p in sorted(NB.glob("[0-9][0-9]_*.py"))])
def test_notebook_sources_are_short(name):
    """Issue 29: a notebook's source has at most ~150 code lines; helpers live in utrc_study."""
    assert _code_lines(NB / f"{name}.py") <= 150


def test_typed_numbers_are_not_in_the_results_prose():
    """Issue 26: the claims the notebooks make about their numbers are rendered from them, not typed."""
    for name, typed in {"00_walkthrough": ["about 4.8", "about 0.9", "0.5-0.6 nats"],
                        "04_failure_of_transformer_methods": ["UTRC has the largest final-layer error"],
                        "07_scale_and_length": ["nearly agree"], "05_algorithm_step_by_step": ["about 0.82"],
                        "01_main_results": ["200-400x", "UTRC (ours"]}.items():
        text = (NB / f"{name}.py").read_text()
        assert not [t for t in typed if t in text], name


def test_sync_check_and_parameters(tmp_path):
    """sync writes byte-stable .ipynb files; a changed source is reported by name with the re-sync command."""
    import shutil

    from utrc_study.report import notebooks

    src = tmp_path / "00_walkthrough.py"
    shutil.copy(NB / src.name, src)
    assert notebooks.out_of_sync(tmp_path) == [f"{src} has no generated 00_walkthrough.ipynb: run "
                                               f"`{notebooks.SYNC_COMMAND}`"]
    assert notebooks.sync(tmp_path, log=lambda *_: None) == [src.with_suffix(".ipynb")]
    first = src.with_suffix(".ipynb").read_bytes()
    assert notebooks.sync(tmp_path, log=lambda *_: None) == [] and notebooks.out_of_sync(tmp_path) == []
    assert first == (NB / "00_walkthrough.ipynb").read_bytes()  # the committed file is what sync writes
    src.write_text(src.read_text().replace("max_tokens: int = 120", "max_tokens: int = 64"))
    (problem,) = notebooks.out_of_sync(tmp_path)
    assert "00_walkthrough.ipynb" in problem and notebooks.SYNC_COMMAND in problem and "cell 1" in problem
    assert notebooks.parameter_names('quick: bool = False  # c\nDEFAULT_OUT = "x"\nout_dir: str = DEFAULT_OUT\n'
                                     'seed: int = 0\n') == ["quick", "out_dir", "seed"]
    ns = {"quick": True, "seed": 0, "out_dir": ""}
    ctx = notebooks.setup("x", ns, parameters_source="quick: bool = True\nseed: int = 0\nout_dir: str = 'y'\n")
    assert ns["out_dir"] == str(ctx.out) and "figures" not in ns["out_dir"]  # quick: a temp folder
    ns["quick"] = "changed later"
    assert ctx.parameters() == {"quick": "changed later", "seed": 0, "out_dir": str(ctx.out)}


def test_hand_runs_write_to_scratch():
    """A notebook run with its default parameters (JupyterLab, nbconvert, papermill without parameters)
    writes to a scratch folder; only the figures runner passes figures/<name>."""
    from utrc_study.report import figures as runner
    from utrc_study.report import notebooks

    figures = (REPO / "figures").resolve()
    for src in notebooks.sources(NB):
        ns = {}
        exec(notebooks.parameters_cell(src.stem, NB), ns)  # the defaults a hand run sees
        for quick in (False, True):
            out = notebooks.output_folder(src.stem, ns["out_dir"], quick).resolve()
            assert not out.is_relative_to(figures), (src.name, quick, out)
        assert notebooks.output_folder(src.stem, ns["out_dir"], False) == notebooks.SCRATCH / src.stem
        passed = runner.notebook_parameters(src.stem, {}, quick=False)
        assert Path(passed["out_dir"]).resolve() == figures / src.stem  # `make figures` refreshes figures/
        assert notebooks.output_folder(src.stem, passed["out_dir"], False).resolve() == figures / src.stem
        assert "out_dir" not in runner.notebook_parameters(src.stem, {"quick": True}, quick=True)
        assert runner.notebook_parameters(src.stem, {"out_dir": "/x"}, quick=False)["out_dir"] == "/x"


def test_figures_are_byte_stable(tmp_path):
    """FigureSaver writes no date and no software version: two saves of one figure are byte-identical."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utrc_study.report import plotting

    files = {}
    for run_name in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1, 0, 2], label="x")
        ax.set_xlabel(plotting.TOKEN_LAYER_CUT_LABEL); ax.legend()
        saver = plotting.FigureSaver(tmp_path / run_name)
        files[run_name] = saver(fig, "f")
        plt.close(fig)
    for a, b in zip(files["a"], files["b"]):
        assert a.read_bytes() == b.read_bytes(), a.name
    pdf, png = files["a"][1].read_bytes(), files["a"][0].read_bytes()
    assert b"CreationDate" not in pdf and b"Matplotlib" not in pdf and b"/ID" not in pdf
    assert b"Software" not in png and b"Matplotlib" not in png


def test_results_document_layout():
    """results.json holds no clock, durations, folders or commit (they go to the run log); cuts are named."""
    from utrc_study.report import provenance

    rows = [{"cut": 0.2, "token_layer_cut": 0.2000001, "analytic_flops_cut": 0.07, "cloze/acc": 0.5,
             "cloze/seconds": 1.25, "seconds": 3.0}]
    doc, log = provenance.results_document("nb", parameters={"quick": True, "out_dir": "/tmp/x", "cut": 0.2},
                                           data={"rows": rows, "gpu": [{"flops_cut": 0.1}]}, seed=0)
    assert doc["data"]["rows"] == [{"target_token_layer_cut": 0.2, "token_layer_cut": 0.2,   # 6 significant digits
                                    "analytic_flops_cut": 0.07, "cloze/acc": 0.5}]
    assert doc["data"]["gpu"] == [{"target_token_layer_cut": 0.1}]
    assert log["timings"] == {"data/rows[0]/cloze/seconds": 1.25, "data/rows[0]/seconds": 3.0}
    assert doc["parameters"] == {"quick": True, "cut": 0.2} and log["locations"] == {"out_dir": "/tmp/x"}
    assert "created" not in doc and "git_commit" not in doc["rendered_on"]["versions"] and "git_commit" in log
    assert set(doc["rendered_on"]["versions"]) >= {"torch", "transformers", "numpy", "utrc_code_version"}
    assert doc["computed_on"] == provenance.COMPUTED_HERE and "versions" not in doc   # computed while rendering
    gpu = [{"source": "figures/x/evidence", "rows": 3, "machine": {"gpu": "NVIDIA H200", "versions": {"torch": "2.11"}}}]
    doc, _ = provenance.results_document("nb", parameters={}, data={}, seed=0, computed_on=gpu)
    assert doc["computed_on"] == gpu and doc["rendered_on"]["versions"]["torch"] != "2.11"   # the two machines apart
    assert "docs/method.md §1" in doc["flops_definition"]
    with pytest.raises(ValueError):
        provenance.results_document("nb", parameters={}, data={"r": [{"cut": 1, "target_token_layer_cut": 1}]}, seed=0)
    assert provenance.fate_counts_text({"hybrid": 32, "kept": 55, "merged": 33}) == \
        "55 kept, 33 merged, 32 hybrid (pruned in hidden, merged in residual)"


def test_00_walkthrough(tmp_path, model_names, capfd):
    res = run("00_walkthrough", tmp_path, model_names=model_names[:1])
    again = tmp_path / "again"
    again.mkdir()
    run("00_walkthrough", again, model_names=model_names[:1])
    first, second = tmp_path / "00_walkthrough", again / "00_walkthrough"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "run_log.json" in names
    for n in names:  # a regeneration with the same numbers is byte-identical (the run log aside)
        if n != "run_log.json":
            assert (first / n).read_bytes() == (second / n).read_bytes(), f"{n} differs between two runs"
    assert "without encryption" not in capfd.readouterr().err  # the runner's kernel is quiet
    d = res["data"]
    N = len(d["tokens"])
    assert len(d["importance_clip"]) == 12 and len(d["importance_clip"][0]) == N
    for m, v in d["methods"].items():
        assert len(v["fates"]) == N and v["anchors"] == [2, 4, 6, 8]
        tpl = v["tokens_per_layer"]
        assert tpl[0] == N and all(a >= b for a, b in zip(tpl, tpl[1:])) and tpl[-1] < N  # the sequence shrinks
        removed = sum(1 for f in v["fates"] if f["layer"] is not None)
        assert removed == N - tpl[-1]  # every removed token has a fate
        assert v["kl_last"] >= 0
    assert d["methods"]["utrc"]["fate_counts"].get("hybrid", 0) > 0  # hidden hybrid / residual merge


def test_01_main_results(tmp_path, model_names, cache_dir):
    res = run("01_main_results", tmp_path, model_names=model_names, cache_dir=cache_dir)
    p = res["parameters"]
    rows = res["data"]["rows"]
    assert not res["errors"]
    assert len(rows) == len(p["model_names"]) * (1 + len(p["methods"]) * len(p["cuts"]))
    assert res["protected"] is True and all(r["protect"] for r in rows)  # leak-free scoring was used
    for r in rows:
        for k in ("cloze/acc", "choice4/acc_norm", "choice2/acc", "avg_acc"):
            assert 0.0 <= r[k] <= 1.0
        assert r["ppl/ppl"] > 1 and r["cloze/n"] == p["limit"]
        if r["method"] != "none":
            assert abs(r["token_layer_cut"] - r["target_token_layer_cut"]) < 0.05  # the FLOPs target was met
            assert 0 < r["analytic_flops_cut"] < 1 and 0 < r["keep_ratio"] < 1
    for m in p["model_names"]:  # dense >= reduced within noise (accuracy); perplexity not below dense
        dense = next(r for r in rows if r["model"] == m and r["method"] == "none")
        for r in rows:
            if r["model"] == m and r["method"] != "none":
                assert r["avg_acc"] <= dense["avg_acc"] + 3 * (r["avg_acc_stderr"] or 0) + 0.2
                assert r["ppl/ppl"] >= 0.8 * dense["ppl/ppl"]
    assert res["data"]["paper"] and "their" in res["data"]["paper_source"].lower()


def test_01_main_results_with_lm_eval_tasks(tmp_path, monkeypatch):
    """01 run with lm-eval task names and a hub model id (issue 26, section 4), offline: the local YAMLs
    over the local JSONL stand in for lambada_openai, hellaswag, ..., and a hub id whose repo (a tiny
    checkpoint in the state-spaces layout: mamba-ssm config.json + pytorch_model.bin) sits in a local
    Hugging Face cache stands in for state-spaces/mamba2-2.7b. The tasks go through lm-eval with
    per-sample logging, and the same paired statistics, tables and figures come out of their per-item rows."""
    pytest.importorskip("lm_eval")
    from conftest import save_hub_cache_checkpoint

    repo = save_hub_cache_checkpoint(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))   # read by the notebook's kernel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = ["utrc_cloze", "utrc_choice4", "utrc_choice2", "utrc_ppl"]
    res = run("01_main_results", tmp_path, model_names=[repo], tasks=tasks, cache_dir=str(tmp_path / "cache"))
    d, p = res["data"], res["parameters"]
    assert not res["errors"] and p["tasks"] == tasks and p["model_names"] == [repo]
    acc_cols = ["utrc_cloze/acc", "utrc_choice4/acc_norm", "utrc_choice2/acc"]
    assert d["avg_acc_tasks"] == acc_cols and d["items_per_task"] == {t: p["limit"] for t in tasks}
    assert len(d["rows"]) == 1 + len(p["methods"]) * len(p["cuts"])
    for r in d["rows"]:
        assert r["avg_acc"] == pytest.approx(sum(r[c] for c in acc_cols) / 3, abs=1e-6)
        assert r["utrc_ppl/token_perplexity"] > 1 and r["protect"]
    cmp = d["comparisons"]
    avg = [c for c in cmp if c["metric"] == "avg_acc"]
    assert avg and all(c["n"] == 3 * p["limit"] and c["low"] <= c["delta"] <= c["high"] for c in avg)
    # the margins figure's family (mean accuracy, KL on the lm-eval ppl task) and the per-task family
    assert {c["metric"] for c in cmp} == {"avg_acc", "kl:utrc_ppl"}
    assert {"utrc_cloze", "utrc_choice4", "utrc_choice2", "ll:utrc_ppl"} == {c["metric"] for c in d["task_comparisons"]}
    assert {"utrc_cloze", "utrc_choice4", "utrc_choice2", "avg_acc"} == {a["metric"] for a in d["accuracy"]}
    assert {f["task"] for f in d["fidelity"]} == set(tasks)
    assert {"accuracy_vs_flops.png", "fidelity_vs_flops.png", "utrc_margins.png"} <= set(res["figures"])


def test_02_design_choices(tmp_path, model_names, cache_dir):
    res = run("02_design_choices", tmp_path, model_names=model_names[:1], cache_dir=cache_dir)
    d = res["data"]
    p = res["parameters"]
    assert len(d["metric"]) == len(p["metrics"]) and len(d["location"]) == len(p["starts"])
    assert len(d["hidden_q"]) == len(p["qs"]) and len(d["residual_rule"]) == len(p["residual_rules"])
    assert [r["method"] for r in d["matching"]] == p["matching"]   # the split x hidden-rule sweep
    modes = d["modes_table"]
    assert {r["protect"] for r in modes} == {True, False}
    assert {r["mode"] for r in modes} >= {"dense", "paper text, causal (ours)", "authors' code (utrc_reference)"}
    for r in modes:
        assert 0.0 <= r["avg_acc"] <= 1.0
    for r in d["survival"]:
        assert r["protected"] >= 0 and r["unprotected"] >= 0


def test_03_efficiency(tmp_path, model_names):
    res = run("03_efficiency", tmp_path, model_names=model_names[:1], gpu_bench=str(tmp_path / "missing.json"))
    cpu = res["data"]["cpu_prefill"]
    assert {r["method"] for r in cpu} >= {"none", res["parameters"]["methods"][0]}
    assert {r["logits"] for r in cpu} == {"last", "all"}
    for r in cpu:
        assert r["prefill_ms"] > 0 and r["tokens_per_s"] > 0 and r["speedup_vs_dense"] > 0
        assert -0.2 < r["analytic_flops_cut"] < 1
    for r in res["data"]["cpu_decode"]:
        assert r["decode_ms_per_token"] >= 0
    assert res["data"]["gpu"] is None  # no benchmark file: GPU panels skipped, not invented
    assert all("target_token_layer_cut" in r and "analytic_flops_cut" in r for r in cpu)


def test_04_failure(tmp_path, model_names, cache_dir):
    res = run("04_failure_of_transformer_methods", tmp_path, model_names=model_names, cache_dir=cache_dir)
    p = res["parameters"]
    acc = res["data"]["accuracy"]
    assert res["protected"] is True and len(acc) == len(p["model_names"]) * (1 + len(p["methods"]) * len(p["cuts"]))
    errs = res["data"]["layer_errors"]
    assert len(errs) == len(p["model_names"]) * (len(p["methods"]) + 1)
    for e in errs:
        rel = e["rel_error"]
        assert len(rel) == 12 and e["anchors"] == [p["error_layer"]]
        assert all(v < 1e-5 for v in rel[: p["error_layer"]])  # nothing changes before the reduction
        assert rel[p["error_layer"] + 1] > 0 and all(finite(v) for v in rel)
        assert e["tokens"][-1] < e["tokens"][0]
    proto = res["data"]["protocols"]   # the authors' protocol beside ours (quick: the first two protocol methods)
    margins = pd.DataFrame(proto["margins"])
    assert set(margins["protocol"]) == {"leak_free", "authors"} and set(margins["reference"]) == {"utrc"}
    drops = pd.DataFrame(proto["drops"])
    assert len(drops) == 2 * len(p["model_names"]) * (1 + 2 * len(p["cuts"]))
    red = drops[drops["method"] != "none"]
    assert (red["delta_low"] <= red["delta"]).all() and (red["delta"] <= red["delta_high"]).all()
    cost = pd.DataFrame(proto["cost"])
    assert set(cost["reference"]) == {"leak_free"} and set(cost["baseline"]) == {"authors"}
    for name in p["model_names"]:  # the ranking the text reports is computed from the same numbers
        rank = res["data"]["error_ranking"][name]
        final = {e["method"]: e["rel_error"][-1] for e in errs if e["model"] == name}
        assert rank["largest_final_error"] == max(final, key=final.get)
        assert rank["smallest_final_error"] == min(final, key=final.get)


def test_07_scale_and_length(tmp_path, model_names):
    res = run("07_scale_and_length", tmp_path, cpu_models=model_names[:1])
    out = tmp_path / "07_scale_and_length"
    for name in ("dense_accuracy.md", "long_context_table.md", "utrc_margin_scale_length.png",
                 "utrc_margin_scale_length.pdf"):
        assert (out / name).is_file()
    data, p = res["data"], res["parameters"]
    assert data["rows"] == len(p["cpu_tasks"]) * (1 + len(p["methods"]))   # dense + every method at 30%
    assert {r["task"] for r in data["dense"]} == set(p["cpu_tasks"])
    assert all("target_token_layer_cut" in r and "analytic_flops_cut" in r for r in data["long_context"])
    assert {r["baseline"] for r in data["margins"]} == {"utrc_reference", "evit", "pumer", "tome"}
    assert {r["task"] for r in data["margins"]} == set(p["cpu_tasks"])    # every task on its own
    assert data["missing_methods"] == [] and "cut" in data["text"]["cut_agreement"]
    assert {r["family_size"] for r in data["margins"]} == {len(data["margins"])}   # one cut: one Holm family
    assert res["computed_on"][0]["device"] == "cpu" and res["computed_on"][0]["rows"] == data["rows"]


def test_08_depth(tmp_path):
    res = run("08_depth", tmp_path)
    data, p = res["data"], res["parameters"]
    assert sorted(data["depths"].values()) == [12, 24]
    # one margin per depth, baseline and metric; the answer's lines are generated from them
    assert len(data["margins"]) == 2 * (len(p["methods"]) - 1) * 3
    assert {s["verdict"] for s in data["slopes"]} <= {"grows", "shrinks", "unresolved"}
    assert any("UTRC vs" in line for line in res["answer"])
    assert {"depth_margins.png", "depth_accuracy_vs_cut.png"} <= set(res["figures"])


def test_09_ssm_methods(tmp_path, model_names, cache_dir):
    """Quick mode computes its small grid (no evidence), writes results.json and every figure; the preset's
    rows are named back to it, every margin has both intervals, the text is rendered from the tables."""
    res = run("09_ssm_methods", tmp_path, model_names=model_names, cache_dir=cache_dir)
    d, p = res["data"], res["parameters"]
    assert not res["errors"] and res["protected"] is True and "topvim" in p["methods"]
    assert len(d["rows"]) == len(p["model_names"]) * (1 + len(p["methods"]) * len(p["cuts"]))
    assert {r["method"] for r in d["rows"]} == {"none", *p["methods"]}
    assert all(r["ran_as"] == "prune_only" for r in d["rows"] if r["method"] == "topvim")
    assert d["source"].startswith("computed here, n=") and d["items_per_task"] == {t: p["limit"] for t in p["tasks"]}
    cmp = d["comparisons"]
    assert {c["baseline"] for c in cmp} == set(p["methods"]) - {"utrc"} and {c["metric"] for c in cmp} == {"avg_acc", "kl:ppl"}
    assert {c["family_size"] for c in cmp} == {len(cmp)}                        # one Holm family: the figure
    assert all(c["low_family"] <= c["low"] + 1e-9 and c["high"] <= c["high_family"] + 1e-9 for c in cmp)
    assert {b["best"] for b in d["best"]} <= set(p["methods"]) and "best" in d["text"]["findings"]
    assert {c["method"] for c in d["cost"]} == set(p["methods"]) and all(c["flops_per_anchor"] > 0 for c in d["cost"])
    assert "not measured yet" in d["text"]["cost"]                           # no GPU ms for the SSM methods
    for name, fa in d["token_fates"].items():
        assert set(fa["methods"]) == set(p["methods"])
        for m, v in fa["methods"].items():
            assert len(v["fates"]) == len(fa["tokens"]) == p["fate_tokens"]
            assert any(f != "kept" for f in v["fates"])                        # the first anchor removes something
    assert {"accuracy_kl_vs_cut.png", "margins_vs_utrc.png", "cost_and_keep.png", "token_fates.png"} <= set(res["figures"])

"""docs/results.md is rendered from the committed results (utrc_study.report.results_page): the committed
page equals its rendering, and the renderer's own frame types no number."""
import json
import re

import pytest

from utrc_study.report import results_page


def test_committed_page_is_its_rendering():
    assert results_page.PAGE.read_text() == results_page.render(), (
        "docs/results.md differs from its rendering: run `python -m utrc_study.report.results_page`")


def _digits_left(text: str) -> list[str]:
    """Lines of `text` that still hold a digit once names that carry one are removed (notebook numbers,
    file and folder names, model family names, the paper's Figure 1, fp16, the CI level named by the JSON
    key ppl_ci95)."""
    allowed = [r"\b0\d(?=[:_ ',)]|$)", r"Figure 1\b", r"\bfp16\b", r"`[^`]*`", r"\([^)]*\.md[^)]*\)", r"Mamba-2", r"\[95% CI\]", r"#0\d[\w-]*"]
    out = []
    for line in text.splitlines():
        stripped = line
        for pat in allowed:
            stripped = re.sub(pat, "", stripped)
        if re.search(r"\d", stripped):
            out.append(line)
    return out


def test_frame_types_no_number(tmp_path):
    """With no results at all the page is only the frame: every section says its results are missing,
    and no digit is left but those inside names."""
    text = results_page.render(tmp_path)
    assert text.count("No results for") >= 7
    assert _digits_left(text) == []


def test_sections_read_each_notebooks_own_text(tmp_path):
    """A section shows exactly the text its notebook saved, the source line its evidence, and a pilot's label."""
    folder = tmp_path / "02_design_choices"
    folder.mkdir()
    findings = "* **residual-branch rule**: better than prune (1.5 [0.8, 2.4])."
    (folder / "results.json").write_text(json.dumps({
        "data": {"findings": findings},
        "evidence": {"folder": "figures/02_design_choices/evidence", "configurations": 29, "item_rows": 92800,
                     "items_per_task": {"cloze": 1000}},
        "computed_on": [{"devices": ["cuda:0 (NVIDIA H100 80GB HBM3)"]}]}))
    pilot = tmp_path / "09_ssm_methods" / "cpu_pilot"
    pilot.mkdir(parents=True)
    (pilot / "results.json").write_text(json.dumps({"run": {"label": "CPU pilot, n=40 items per task"},
                                                    "data": {"text": {"findings": "best is X at 50.8%"}},
                                                    "computed_on": [{"device": "cpu"}]}))
    text = results_page.render(tmp_path)
    assert findings in text
    assert "29 configurations, 92800 item rows; items per task: cloze 1000" in text
    assert "computed: cuda:0 (NVIDIA H100 80GB HBM3)" in text
    assert "run: **CPU pilot, n=40 items per task**" in text and "best is X at 50.8%" in text
    assert "No results for 02" not in text and "No results for 09" not in text


def test_gpu_prefill_block_rows(tmp_path):
    base = {"kind": "prefill", "model_shape": "mamba2-2.7b", "batch": 16, "seq_len": 2048, "align": 1, "gpu": "H100"}
    recs = [{**base, "method": "dense", "flops_cut": 0.0, "prefill_ms": 618.3, "speedup_vs_dense": 1.0},
            {**base, "method": "slice", "flops_cut": 0.3, "prefill_ms": 444.5, "speedup_vs_dense": 1.390},
            {**base, "method": "utrc", "flops_cut": 0.3, "prefill_ms": 453.2, "speedup_vs_dense": 1.363,
             "speedup_fraction_of_slice": 0.981, "reduction_ms_per_anchor": 1.62,
             "reduction_overhead_vs_dense": 0.0183, "overhead_vs_slice_of_dense": 0.0141}]
    (tmp_path / "03_efficiency").mkdir()
    (tmp_path / "03_efficiency" / "gpu_bench.json").write_text(json.dumps(recs))
    table = results_page.gpu_prefill_block(tmp_path).splitlines()
    assert len(table) == 3   # header, rule, one row per (shape, align, cut): dense is the reference, not a row
    assert table[2] == "| mamba2-2.7b | 1 | 30% | 618 | 1.390x | 1.363x (98.1%) | 1.62 | 1.83% / 1.41% | - | - | H100 |"
    assert "No results for the GPU prefill" in results_page.gpu_prefill_block(tmp_path / "none")


def test_generated_blocks_of_the_docs_pages_are_current():
    pages = results_page.pages_with_blocks()
    assert any(p.name == "gpu.md" for p in pages)
    for p in pages:
        text = p.read_text()
        assert results_page.update_blocks(text) == text, (
            f"{p.name}: a generated block differs from its rendering: run `python -m utrc_study.report.results_page`")


def test_blocks_render_from_the_json_and_refuse_unknown_names(tmp_path):
    page = "a\n<!-- generated: gpu-prefill (x) -->\nold typed table\n<!-- end: gpu-prefill -->\nb\n"
    out = results_page.update_blocks(page, tmp_path)   # no JSON here: the block says so instead of failing
    assert "old typed table" not in out and "No results for the GPU prefill benchmark" in out
    assert out.startswith("a\n<!-- generated: gpu-prefill (x) -->\n") and out.endswith("<!-- end: gpu-prefill -->\nb\n")
    with pytest.raises(KeyError, match="unknown generated block 'nope'"):
        results_page.update_blocks("<!-- generated: nope -->\nx\n<!-- end: nope -->\n", tmp_path)


def test_window_accuracy_block(tmp_path):
    assert "python scripts/window_accuracy.py" in results_page.window_accuracy_block(tmp_path)
    (tmp_path / "03_efficiency").mkdir()
    doc = {"parameters": {"model": "tiny-mamba2", "cut": 0.3, "windows": [64], "resamples": 10000},
           "items_per_task": {"lr_cloze_1024": 100}, "holm": "over all 2 comparisons in this file",
           "machine": {"torch_device": "cpu"},
           "comparisons": [{"metric": "lr_cloze_1024", "baseline": "64", "delta": 0.02, "low": -0.01, "high": 0.05,
                            "p_holm": 0.4, "verdict": "unresolved"},
                           {"metric": "ll:lr_cloze_1024", "baseline": "64", "delta": 0.031, "low": 0.012,
                            "high": 0.05, "p_holm": 0.001, "verdict": "beats"}]}
    (tmp_path / "03_efficiency" / "window_accuracy.json").write_text(json.dumps(doc))
    text = results_page.window_accuracy_block(tmp_path)
    assert "| accuracy, lr_cloze_1024 | 64 | +2 [-1, +5] points | 0.4 | unresolved |" in text
    assert "| gold log-likelihood, lr_cloze_1024 | 64 | +0.031 [+0.012, +0.05] nats/token | 0.001 | global better |" in text
    assert "items per task: lr_cloze_1024 100" in text and "computed on cpu" in text

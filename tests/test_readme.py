"""The README and the docs/ pages: their ```python snippets run as written and print what they say,
their links resolve, their generated table matches the committed results, and the versions they
quote match pyproject.toml.

`python tests/test_readme.py` rewrites the README's generated results table from the committed
`figures/01_main_results/table_intervals.md` (the table a test compares it with).
"""
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
API = DOCS / "api.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
TINY = ROOT / "data" / "models" / "tiny-mamba2" / "model.safetensors"

FLOAT = r"(-?[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)"


def snippets(path: Path = README) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def run_snippets(path: Path, capsys) -> list[str]:
    """Run every python snippet of `path` in order, in one namespace; return what each printed."""
    if not TINY.is_file():
        pytest.skip("embedded model not present")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__readme__"}
    printed = []
    capsys.readouterr()
    for i, code in enumerate(snippets(path)):
        try:
            exec(compile(code, f"{path.name} snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # name the snippet that fails
            raise AssertionError(f"{path.name} python snippet {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
        printed.append(capsys.readouterr().out)
    return printed


def test_pages_have_snippets():
    assert len(snippets(README)) == 1
    assert len(snippets(API)) >= 8


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    head = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert head.splitlines()[0].startswith("make figures   # main job")
    assert head.splitlines()[1].startswith("make test ")
    for page in ("method", "api", "evaluation", "reproducing", "gpu", "models-and-data", "limitations"):
        assert f"(docs/{page}.md)" in text, page


# -- the snippets print what the pages say ------------------------------------------------------------
@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_readme_snippet_prints_a_reduced_forward(capsys):
    import utrc_lib

    (out,) = run_snippets(README, capsys)
    m = re.search(r"logits \(1, (\d+), (\d+)\) rows kept (\d+) of (\d+)", out)
    assert m, out
    n, vocab, kept, total = map(int, m.groups())
    model, tok = utrc_lib.load_model("tiny-mamba2")
    assert n == total and vocab == model.config.vocab_size
    assert 0 < kept < n                                   # some positions removed, the protected last one kept
    token, analytic = map(float, re.search(rf"token-layer cut {FLOAT} analytic FLOPs cut {FLOAT}", out).groups())
    assert abs(token - 0.2) <= 0.01                        # the requested cut, reached within the shortfall tolerance
    assert 0 < analytic < 0.3
    assert abs(analytic - utrc_lib.flops(model, n, utrc_lib.ReductionConfig("utrc", flops_reduction=0.2, protect_last=1)).analytic_cut) < 1e-3
    answer = out.strip().splitlines()[-1]
    assert answer.startswith("'") and len(answer) > 2       # a non-empty decoded continuation


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_api_snippets_print_what_the_page_says(capsys):
    import utrc_lib

    out = run_snippets(API, capsys)
    text = API.read_text(encoding="utf-8")
    # 1: the tour: the token history, the achieved cut, both cuts of the same config
    hist = re.search(r"^\[(\(.*\))\]$", out[0], flags=re.M).group(1)
    steps = [tuple(map(int, t)) for t in re.findall(r"\((\d+), (\d+), (\d+)\)", hist)]
    assert [s[0] for s in steps] == list(utrc_lib.default_layers(12))
    assert all(b > a for _, b, a in steps) and all(s[2] == t[1] for s, t in zip(steps, steps[1:]))
    achieved = float(re.search(rf"token-layer cut achieved: {FLOAT}", out[0]).group(1))
    token, analytic = map(float, re.search(rf"token-layer cut: {FLOAT} analytic FLOPs cut: {FLOAT}", out[0]).groups())
    assert abs(achieved - token) < 1e-6 and abs(token - 0.2) <= 0.01
    # 2: kept-only logits: (B, N', V) rows, their original positions increasing
    m = re.search(r"torch.Size\(\[1, (\d+), (\d+)\]\) \[([0-9, ]+)\]", out[1])
    assert m, out[1]
    n_kept, pos = int(m.group(1)), [int(p) for p in m.group(3).split(",")]
    assert n_kept % 16 == 0 and pos == sorted(set(pos))
    # 3: one layer's tensors: (2, 128, 64) -> (2, 96, 64), every row standing for 128 tokens
    assert "torch.Size([2, 96, 64]) torch.Size([2, 96]) tensor([128., 128.])" in out[2], out[2]
    # 4: loose arguments -> a config
    assert out[3].startswith("ReductionConfig(method='utrc'") and "layers=(2, 4, 6)" in out[3]
    assert "flops_reduction=0.3" in out[3]
    # 5: reduce once, ask many: tokens per layer shrink at the anchors; two answers; the pipeline
    layers = eval(re.search(r"tokens per layer: (\([0-9, ]+\))", out[4]).group(1))
    assert len(layers) == 12 and layers[0] > layers[-1] and list(layers) == sorted(layers, reverse=True)
    assert int(re.search(r"state: (\d+) bytes", out[4]).group(1)) > 0
    answers = re.findall(r"^('.*')$", out[4], flags=re.M)
    assert len(answers) == 2
    piped = re.search(r"^\{'answers': \[(.*)\]\}$", out[4], flags=re.M)
    assert piped and piped.group(1) == ", ".join(answers)  # the pipeline answers as generate_from does
    # 6: the keep-ratio table printed equals the schedule solver's
    depths = []
    for line in out[5].strip().splitlines():
        depth = int(line.split()[0])
        anchors = tuple(map(int, re.search(r"anchors \(([0-9, ]+)\)", line).group(1).split(",")))
        assert anchors == utrc_lib.default_layers(depth)
        pairs = re.findall(rf"{FLOAT}: {FLOAT}", line)
        assert [float(c) for c, _ in pairs] == [0.1, 0.2, 0.3]
        for cut, rho in pairs:   # the printed (rounded) keep ratio reaches the cut
            assert abs(utrc_lib.token_layer_fraction(depth, anchors, float(rho)) - (1 - float(cut))) < 1e-3
        depths.append(depth)
    assert depths == [64, 48, 24, 12]
    # 7: a new method registers, runs, reports its cut, and leaves the registry as it was
    assert "neighbour_merge" in out[6] and "neighbour_merge" not in utrc_lib.available_methods()
    assert abs(float(re.search(rf"achieved token-layer cut {FLOAT}", out[6]).group(1)) - 0.3) <= 0.01
    # 8: scoring: one (log-likelihood, is_greedy) per request, dense and reduced
    pairs = re.findall(rf"\({FLOAT}, (True|False)\)", out[7])
    assert len(pairs) == 4 and all(float(ll) < 0 for ll, _ in pairs)
    assert pairs[:2] != pairs[2:]                          # the reduction changed the scores
    assert "analytic cut (" in text                        # the two-cuts sentence (tests/test_reliability2.py checks its numbers)


# -- links ------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown page's headings."""
    out = set()
    for h in re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page):
    bad = []
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):     # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: links to nothing: {bad}"


# -- the generated results table --------------------------------------------------------------------
INTERVALS = ROOT / "figures" / "01_main_results" / "table_intervals.md"
TABLE_BEGIN = "<!-- results-table: generated by `python tests/test_readme.py` from figures/01_main_results/table_intervals.md; tests/test_readme.py checks it -->"
TABLE_END = "<!-- results-table: end -->"
TABLE_MODELS = ("tiny-mamba2", "tiny-mamba")
TABLE_METHODS = ("utrc", "utrc_reference", "evit", "pumer", "tome", "prune_only", "merge_only", "random")


def _markdown_rows(path: Path) -> list[dict]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def results_table() -> str:
    """The README's results block: dense and every method at the largest cut, both tiny models."""
    rows = _markdown_rows(INTERVALS)
    cut = max(float(r["cut"]) for r in rows)
    n = {r["n"] for r in rows}
    assert len(n) == 1, n
    acc, delta = "mean acc % [95% CI]", "vs dense, points [95% CI]"
    get = {(r["model"], r["method"], float(r["cut"])): r for r in rows}
    out = [TABLE_BEGIN,
           f"Mean accuracy over cloze, choice4, choice2 ({n.pop()} items per configuration) at a "
           f"{cut:.0%} token-layer cut, % [95% CI]; dense is the unreduced model.",
           "",
           "| method | " + " | ".join(f"{m} | vs dense, points" for m in TABLE_MODELS) + " |",
           "|---|" + "---|---|" * len(TABLE_MODELS)]
    for method, c in [("none", 0.0)] + [(m, cut) for m in TABLE_METHODS]:
        cells = []
        for model in TABLE_MODELS:
            r = get[(model, method, c)]
            cells += [r[acc], r[delta]]
        name = {"none": "dense", "utrc_reference": "utrc_reference (the authors' code)"}.get(method, method)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append(TABLE_END)
    return "\n".join(out)


def _block(text: str) -> str:
    start = text.index(TABLE_BEGIN)
    return text[start:text.index(TABLE_END, start) + len(TABLE_END)]


# -- the generated depth answer (notebook 08: the full GPU grid when committed, else its labelled pilot) -------
DEPTH_RESULTS = (ROOT / "figures" / "08_depth" / "results.json", ROOT / "figures" / "08_depth" / "cpu_pilot" / "results.json")
DEPTH_BEGIN = "<!-- depth-result: generated by `python tests/test_readme.py` from notebook 08's results.json; tests/test_readme.py checks it -->"
DEPTH_END = "<!-- depth-result: end -->"


def depth_result() -> str:
    """Two sentences on whether UTRC's margin grows with depth, from 08's slopes (the first results.json
    of DEPTH_RESULTS that exists), saying which run they come from."""
    import json

    src = next((p for p in DEPTH_RESULTS if p.is_file()), None)
    if src is None:
        return "\n".join([DEPTH_BEGIN, "The depth-family evaluation (notebook 08) has no results yet.", DEPTH_END])
    r = json.loads(src.read_text(encoding="utf-8"))
    d = r["data"]
    label = (r.get("run") or {}).get("label") or "full run"
    depths = sorted(int(v) for v in d["depths"].values())
    n = sorted(set(d["items_per_task"].values()))
    slopes = [s for s in d["slopes"] if s["metric"] in ("acc", "kl")]
    cuts = sorted({s["token_layer_cut"] for s in slopes})
    grows = {m: sorted({s["baseline"] for s in slopes if s["metric"] == m and s["verdict"] == "grows"}) for m in ("acc", "kl")}
    shrinks = {m: sorted({s["baseline"] for s in slopes if s["metric"] == m and s["verdict"] == "shrinks"}) for m in ("acc", "kl")}
    bases = sorted({s["baseline"] for s in slopes})
    at_chance = sorted({c["method"] for c in d["at_chance"] if c["layers"] == depths[-1] and c["at_chance"]
                        and c["method"] != "utrc"})

    from utrc_study.report.prose import label as _label

    def names(xs):
        return ", ".join(_label(x) for x in xs) if xs else "none"
    size = "" if "n=" in label else f"{'/'.join(map(str, n))} items per task; "
    tested = sorted({c["method"] for c in d["at_chance"] if c["layers"] == depths[-1] and c["method"] != "utrc"})
    first = (f"On the depth family ({'/'.join(map(str, depths))} layers; {label}; {size}at a "
             f"{' / '.join(f'{c:.0%}' for c in cuts)} cut), of {len(bases)} baselines ({names(bases)}) UTRC's accuracy "
             f"margin grows with depth over {names(grows['acc'])} and shrinks over {names(shrinks['acc'])}; its "
             f"KL-to-dense margin grows over {names(grows['kl'])} and shrinks over {names(shrinks['kl'])} (slope "
             f"against log2 depth, 95% bootstrap interval excluding zero).")
    second = (f"Of the baselines run at {depths[-1]} layers ({names(tested)}), those whose accuracy is indistinguishable "
              f"from chance: {names(at_chance)} (the paper reports EViT and PuMer collapsing there); details and "
              f"figures in {src.relative_to(ROOT).parent.as_posix()}/.")
    return "\n".join([DEPTH_BEGIN, first, second, DEPTH_END])


def _depth_block(text: str) -> str:
    start = text.index(DEPTH_BEGIN)
    return text[start:text.index(DEPTH_END, start) + len(DEPTH_END)]


def test_readme_depth_result_is_the_generated_one():
    assert _depth_block(README.read_text(encoding="utf-8")) == depth_result(), (
        "README.md's depth result differs from notebook 08's results.json: run `python tests/test_readme.py`")


def test_readme_results_table_is_the_generated_one():
    assert _block(README.read_text(encoding="utf-8")) == results_table(), (
        "README.md's results table differs from figures/01_main_results/table_intervals.md: "
        "run `python tests/test_readme.py`")


def test_readme_prose_types_no_numbers():
    """Outside code, the generated table and link targets, the README names no measured number."""
    text = README.read_text(encoding="utf-8")
    text = text.replace(_block(text), "").replace(_depth_block(text), "")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`]*`", "", text)                    # code, names, versions
    text = re.sub(r"\]\([^)]*\)", "]", text)                # link targets
    text = re.sub(r"EMNLP\s+2024", "", text)
    text = re.sub(r"Supported: transformers\S*", "", text)   # the pinned versions (checked against pyproject.toml)
    numbers = re.findall(r"(?<![\w.-])[0-9]+(?:\.[0-9]+)?%?", text)
    assert not numbers, numbers


def test_readme_quotes_the_pinned_transformers_versions():
    """The README's supported transformers versions are the ones pyproject.toml pins."""
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"transformers\b", d)).replace(" ", "")
    readme = README.read_text(encoding="utf-8")
    quoted = re.findall(r"Supported: (transformers[^ ,]*(?:,[<>=!][^ ,]*)*)", readme)
    assert quoted == [spec], (quoted, spec)


def test_api_page_names_every_export():
    """docs/api.md documents every name of `utrc_lib.__all__`, and names nothing the package lacks."""
    import utrc_lib

    text = API.read_text(encoding="utf-8")
    missing = [n for n in utrc_lib.__all__ if f"`{n}" not in text and n != "__version__"]
    assert not missing, missing
    import importlib.util

    for name in re.findall(r"`utrc_lib\.([A-Za-z_][A-Za-z0-9_]*)", text):
        assert hasattr(utrc_lib, name) or importlib.util.find_spec(f"utrc_lib.{name}"), name


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    new = text.replace(_block(text), results_table()).replace(_depth_block(text), depth_result())
    if new != text:
        README.write_text(new, encoding="utf-8")
    print("README.md results table and depth result:", "rewritten" if new != text else "unchanged")
    sys.exit(0)

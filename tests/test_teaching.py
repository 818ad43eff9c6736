"""The teaching helpers show the library's numbers: matches, kept edges, merges, the reference fold,
the schedule, the causal example, the method checks and the registry API they rely on."""
import math

import pytest
import torch

import utrc_lib as u
from utrc_lib.core import methods as M
from utrc_lib.core.plan import build_plan
from utrc_study.report import teaching as T


@pytest.fixture(scope="module")
def toy():
    return T.toy_sequence(seed=0)


@pytest.fixture(scope="module")
def real():
    """The embedded tiny-mamba2 and its tokenizer (the notebooks' model)."""
    from utrc_lib.environment import REPO
    from utrc_study.experiments import sweep

    if not (REPO / "data" / "models" / "tiny-mamba2" / "config.json").is_file():
        pytest.skip("embedded model data/models/tiny-mamba2 missing")
    return sweep.get_model("tiny-mamba2")


@pytest.fixture(scope="module")
def m2():
    from conftest import tiny_model

    return tiny_model("mamba2")


def test_toy_is_seeded_and_validated():
    a, b = T.toy_sequence(seed=3), T.toy_sequence(seed=3)
    assert torch.equal(a.y, b.y) and not torch.equal(a.y, T.toy_sequence(seed=4).y)
    assert a.y.shape == (14, 8) and len(a.tokens) == 14
    with pytest.raises(ValueError, match="at least 4 words"):
        T.toy_sequence("a b")
    with pytest.raises(ValueError, match="unknown metric"):
        T.importance_scores(a.y, ["clip", "nope"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 1.0])
def test_steps_equal_the_reducer(seed, q):
    toy = T.toy_sequence(seed=seed)
    st = T.utrc_steps(toy, 10, q=q)
    N, r = 14, 4
    # step 1-2: scores and split as the metric / importance_halves give them
    assert torch.allclose(st.scores, T.importance_scores(toy.y, ["clip"])["clip"])
    assert sorted(st.a_idx + st.b_idx) == list(range(N)) and len(st.a_idx) == N // 2
    assert max(st.scores[st.a_idx]) <= min(st.scores[st.b_idx])
    # step 3: the displayed cosine matrix gives the library's best matches and cosines
    for i, fi in enumerate(st.f):
        j = int(st.cos[i].argmax())
        assert st.b_idx[j] == fi or math.isclose(float(st.cos[i, j]), st.g[i], abs_tol=1e-6)
        assert math.isclose(st.g[i], float(st.cos[i].max()), abs_tol=1e-5)
    # the r kept edges are the r largest g_i, and they are exactly the plan's sources and destinations
    kept_a = [a for a, k in zip(st.a_idx, st.kept) if k]
    top = sorted(range(len(st.g)), key=lambda i: (-st.g[i], i))[:r]
    assert sorted(kept_a) == sorted(st.a_idx[i] for i in top)
    plan_src = st.result.plan.src[0, :r].tolist()
    assert sorted(plan_src) == sorted(kept_a) == sorted(s for s, *_ in st.edges)
    best = dict(zip(st.a_idx, st.f))
    for s, d, mh, mr in st.edges:
        assert d == best[s] and mr  # residual merges every edge, into the matched token
    # step 4: the hybrid rule prunes floor(q r) sources in the hidden branch, the least important ones
    pruned = [s for s, _, mh, _ in st.edges if not mh]
    assert len(pruned) == math.floor(q * r + 1e-9)
    merged_srcs = [s for s, _, mh, _ in st.edges if mh]
    if pruned and merged_srcs:
        assert max(st.scores[pruned]) <= min(st.scores[merged_srcs])


def test_merge_example_numbers_are_the_reduced_rows(toy):
    st = T.utrc_steps(toy, 10)
    table, info = T.merge_example(st, toy, channels=8)
    res = st.result
    slot, base = info["slot"], info["base"]
    srcs = info["sources"]
    for branch, x, k in (("hidden", toy.hidden, 1), ("residual", toy.residual, 2)):
        members = [base] + [s for s, *w in srcs if w[k - 1]]
        want = torch.stack([x[m] for m in members]).mean(0)   # sizes are 1 on the toy
        got = (res.hidden if branch == "hidden" else res.residual)[0, slot]
        assert torch.allclose(got, want, atol=1e-5), branch
        assert table.iloc[-1][f"{branch}[:k]"] == [round(float(v), 3) for v in got]
    assert info["position"] == max([base] + [s for s, *_ in srcs])  # causal: latest member
    assert info["size"] == 1 + len(srcs)


def test_branch_strips_show_plan_slots(toy):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = T.utrc_steps(toy, 10)
    fig, axes = plt.subplots(2, 1)
    T.draw_branches(axes, st)
    labels = [t.get_text() for t in axes[1].texts]
    assert len(labels) == st.result.plan.num_out
    assert [int(t.rsplit("@", 1)[1]) for t in labels] == st.result.positions[0].tolist()
    for ax in (T.draw_split, T.draw_arcs, T.draw_similarity):
        f, a = plt.subplots()
        ax(a, st)
        plt.close(f)
    plt.close(fig)


def test_reference_fold_matches_library(toy):
    ref = T.reference_steps(toy, 10)
    assert ref["r"] == 4
    # the displayed sorted matrix gives the library's edges: best a-rows -> rows of b
    s, mid = ref["sorted"], ref["mid"]
    scores = s[mid:] @ s[:mid].T
    node_max, node_idx = scores.max(-1)
    edges = node_max.argsort(descending=True)[: ref["r"]]
    assert sorted((2 * edges).tolist()) == ref["src"]
    fates = T.toy_fates(ref["result"], 14)
    removed = sorted(i for i, f in enumerate(fates) if f["layer"] is not None)
    assert removed == ref["src"]
    assert all(fates[i]["into"] == d for i, d in zip(ref["src"], ref["dst"]) if fates[i]["into"] is not None)
    assert ref["result"].hidden.shape[1] == 10


def test_real_anchor_edges_equal_the_forward_plan(real):
    m2, tok = real
    text = "In the beginning the farmer went to the market and bought three sheep and a goat for the winter."
    st, info = T.real_anchor_steps(m2, tok, text, cut=0.3, max_tokens=24)
    kept_a = sorted(a for a, k in zip(st.a_idx, st.kept) if k)
    assert kept_a == sorted(s for s, *_ in st.edges)  # matching on y == the plan the forward applied
    assert len(kept_a) == info["tokens_before"] - info["tokens_after"]
    best = dict(zip(st.a_idx, st.f))
    assert all(d == best[s] for s, d, mh, mr in st.edges if d is not None)


def test_schedule_table_matches_core():
    from utrc_lib.core.config import keep_ratio_for_flops, token_layer_fraction

    tab = T.schedule_table(64, 2048, [0.1, 0.2, 0.3])
    assert list(tab.iloc[0]["anchors"]) == [12, 17, 22, 27, 32, 37, 42]
    for _, row in tab.iterrows():
        rho = keep_ratio_for_flops(row["target cut"], 64, row["anchors"])
        assert row["keep ratio rho"] == round(rho, 4)
        assert abs(1 - token_layer_fraction(64, row["anchors"], rho) - row["target cut"]) < 1e-6
        assert row["tokens per layer"][0] == 2048 and row["tokens per layer"][-1] < 2048
    assert T.schedule_table(64, 2048, [0.1])["keep ratio rho"].iloc[0] == 0.9729  # paper table (docs/method.md)


def test_two_token_causal_example(real):
    m2, tok = real
    ex = T.two_token_example(m2, tok, "The", [" cat", " house"])
    leak = T.leak_summary(ex)
    assert leak["dense position 0"] == 0.0                  # a causal model: position 0 ignores x1
    assert leak["non-causal row at position 0"] > 1e-3      # the merged row at position 0 sees x1
    assert leak["non-causal positions"] == [0] and leak["causal positions"] == [1]
    for r in ex["rows"]:  # same computation, different placement
        assert torch.allclose(r["noncausal"], r["causal"])
    assert "teaching_fixed_merge" not in u.available_methods()  # registered for the block only


def test_register_method_api():
    def fn(ctx):
        return M.identity_plan(ctx.state.valid)

    with pytest.raises(ValueError, match="built-in"):
        M.register_method(M.Method("utrc", fn, "x"))
    with pytest.raises(TypeError):
        M.register_method("nope")
    with pytest.raises(ValueError, match="not registered"):
        M.unregister_method("never_registered")
    M.register_method(M.Method("t_identity", fn, "keeps all"))
    try:
        with pytest.raises(ValueError, match="already registered"):
            M.register_method(M.Method("t_identity", fn, "again"))
        assert "t_identity" in u.available_methods()
        res = u.reduce_tokens(torch.randn(1, 8, 4), torch.randn(1, 8, 4),
                              config=u.ReductionConfig("t_identity", keep_ratio=0.5), n_keep=4)
        assert res.hidden.shape[1] == 8  # the registered function ran (it keeps everything)
    finally:
        M.unregister_method("t_identity")
    assert "t_identity" not in u.available_methods()
    with pytest.raises(ValueError, match="unknown method"):
        u.ReductionConfig("t_identity", keep_ratio=0.5)


def test_check_method_passes_builtin_and_catches_a_fold(m2):
    def fold(ctx):
        red = ctx.state.reducible
        B, N = red.shape
        first = red.float().argmax(1, keepdim=True)
        is_src = M.lowest(ctx.scores, red, torch.minimum(ctx.r, red.sum(1) - 1)) & (torch.arange(N)[None] != first)
        return build_plan(ctx.state.valid, is_src, first.expand(B, N), {b: is_src for b in ctx.rules}, causal=False)

    good = {c["check"]: c["passed"] for c in T.check_method(m2, "utrc")}
    assert good == {"order": True, "causal placement": True, "causal (protected tail)": True, "batch": True}
    M.register_method(M.Method("t_fold", fold, "broken"), replace=True)
    try:
        bad = {c["check"]: c for c in T.check_method(m2, "t_fold")}
    finally:
        M.unregister_method("t_fold")
    assert not bad["causal placement"]["passed"] and "earlier position" in bad["causal placement"]["detail"]

    def crash(ctx):
        raise RuntimeError("boom")

    M.register_method(M.Method("t_crash", crash, "raises"), replace=True)
    try:
        res = T.check_method(m2, "t_crash")
    finally:
        M.unregister_method("t_crash")
    assert not any(c["passed"] for c in res) and all("boom" in c["detail"] for c in res)


@pytest.mark.heavy
def test_explorer_widgets_redraw(real):
    pytest.importorskip("ipywidgets")
    m2, tok = real
    texts = ["The farmer went to the market and bought three sheep and a goat for the long winter ahead."] * 2
    box = T.explorer(m2, tok, texts, max_tokens=20, defaults={"cut": 0.2})
    assert set(box.controls) == {"method", "metric", "cut", "q", "paragraph"}
    box.controls["method"].value = "tome"  # a change re-draws
    assert "tome" in box.children[2].value and "KL" in box.children[2].value
    with pytest.raises(ValueError, match="not reachable"):  # 4 anchors of 12 layers cut at most 75%
        T.explorer_config("utrc", "clip", 0.8, 0.5).resolve(12)
    d = T.explorer_data(m2, tok, texts[0], method="utrc", metric="clip", cut=0.2, q=0.5, max_tokens=20)
    assert d["trace"]["tokens_per_layer"][-1] < 20 and len(d["own"]) == d["trace"]["tokens_per_layer"][-1]


@pytest.mark.notebooks
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["05_algorithm_step_by_step", "06_add_your_own_method"])
def test_teaching_notebooks_run(tmp_path, real, name):
    """Quick papermill runs of the teaching notebooks record the library's numbers."""
    import json

    from utrc_study.report.figures import execute
    from utrc_lib.environment import REPO

    out = tmp_path / name
    execute(REPO / "notebooks" / f"{name}.ipynb", tmp_path / f"{name}.out.ipynb", {"quick": True, "out_dir": str(out)})
    res = json.loads((out / "results.json").read_text())
    d = res["data"]
    assert all((out / f).is_file() for f in res["figures"])
    if name.startswith("05"):
        st = T.utrc_steps(T.toy_sequence(seed=res["parameters"]["toy_seed"]), res["parameters"]["toy_keep"],
                          q=res["parameters"]["q"])
        assert d["kept_edges"] == [list(e) for e in st.edges] and d["best_match"] == st.f
        assert d["causal"]["dense position 0"] == 0.0 and d["causal"]["non-causal row at position 0"] > 0
        assert d["reference"]["destinations"] and set(d["reference"]["destinations"]) == {1}
        assert "explorer_default.png" in res["figures"]
    else:
        assert all(c["passed"] for c in d["checks"])
        assert not next(c for c in d["broken_checks"] if c["check"] == "causal placement")["passed"]
        assert {r["method"] for r in d["rows"]} == {"none", "utrc", "neighbour_merge"}
        assert all(0 <= r["mean_acc"] <= 1 for r in d["rows"])

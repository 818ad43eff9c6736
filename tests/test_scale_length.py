"""scripts/scale_length_eval.py (cached scale x length sweep) and its renderer utrc_study.report.scale_length."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (REPO / "data/models/tiny-mamba2/config.json").is_file(),
                                reason="needs the embedded tiny-mamba2")


def _script():
    spec = importlib.util.spec_from_file_location("scale_length_eval", REPO / "scripts/scale_length_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARGS = ["--models", "tiny-mamba2", "--tasks", "cloze_v2", "passkey_512", "--limit", "2", "--cuts", "0.3",
        "--methods", "utrc", "evit", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("sl") / "c.jsonl"
    assert _script().main(ARGS + ["--cache", str(path)]) == 0
    return path


@pytest.mark.heavy
def test_script_rows(cache):
    from utrc_study.experiments.sweep import RowCache

    rows = list(RowCache(cache).load().values())
    assert len(rows) == 2 * 3 and all(r["status"] == "ok" and isinstance(r.get("items"), dict) for r in rows)
    for r in rows:
        p, res = r["params"], r["result"]
        task = p["tasks"][0]
        assert p["limit"] == 2 and res[f"{task}/n"] == 2 and p["flops_seq_len"] == (128 if task == "cloze_v2" else 512)
        assert ("max_length" in p) == (task == "passkey_512") and res["meta/max_length"] == (1024 if task == "cloze_v2" else 4096)
        assert "token_layer_cut" in res and "analytic_flops_cut" in res
        if p["method"] != "none":
            assert abs(res["token_layer_cut"] - 0.3) < 1e-6 and 0 < res["analytic_flops_cut"] < 0.3
    assert len((Path(str(cache) + ".log.jsonl")).read_text().splitlines()) == 6


@pytest.mark.heavy
def test_resume_computes_nothing(cache, capsys):
    before = cache.read_bytes()
    assert _script().main(ARGS + ["--cache", str(cache)]) == 0
    assert cache.read_bytes() == before
    assert "0 to compute" in capsys.readouterr().out


def test_deadline_and_errors(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    assert _script().main(ARGS + ["--cache", str(path), "--deadline-s", "0"]) == 0
    assert not path.exists() and "deadline" in capsys.readouterr().out
    # an error of one configuration is a cached error row, the run goes on
    mod = _script()
    real = mod.evaluate_row
    mod.evaluate_row = lambda **p: (_ for _ in ()).throw(ValueError("boom")) if p["method"] == "evit" else real(**p)
    assert mod.main(ARGS[:4] + ARGS[5:] + ["--cache", str(path)]) == 0
    from utrc_study.experiments.sweep import RowCache

    rows = list(RowCache(path).load().values())
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok"]


@pytest.mark.heavy
def test_max_length_keeps_row_keys():
    """Rows that do not list max_length keep their parameters and keys; the default is today's 1024."""
    import inspect

    from utrc_study.eval import scorer
    from utrc_study.experiments import sweep

    assert inspect.signature(sweep.evaluate_config).parameters["max_length"].default == 1024 == \
        inspect.signature(scorer.evaluate).parameters["max_length"].default
    c = dict(model="tiny-mamba2", method="utrc", cut=0.2, tasks=["cloze"], limit=4, seed=0, batch_size=16)
    assert sweep.row_key(c, "v") == sweep.row_key(dict(c), "v")
    assert sweep.row_key({**c, "max_length": 4096}, "v") != sweep.row_key(c, "v")
    mod = _script()
    short = mod.config("tiny-mamba2", "utrc", 0.2, "cloze_v2", limit=4, batch_size=8, seed=0, fingerprint="f", task_sha="s")
    assert "max_length" not in short
    a = sweep.evaluate_config("tiny-mamba2", "none", 0.0, tasks=["cloze"], limit=2)
    b = sweep.evaluate_config("tiny-mamba2", "none", 0.0, tasks=["cloze"], limit=2, max_length=1024)
    assert a["cloze/acc"] == b["cloze/acc"] and a["cloze/ppl"] == b["cloze/ppl"] and a["meta/max_length"] == 1024


@pytest.mark.heavy
def test_renderer(cache, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from utrc_study.report import scale_length as sl

    slim = tmp_path / "slim.jsonl"
    info = sl.slim_cache(cache, slim)
    assert info["rows"] == 6 and info["bytes"] < cache.stat().st_size
    for src in (cache, slim):
        rows = sl.load_rows(src)
        dense = sl.dense_table(rows, resamples=100)
        long = sl.long_context_table(rows, resamples=100)
        margin = sl.margin_table(rows, resamples=100, baselines=["evit"])
        assert set(dense["task"]) == {"cloze_v2", "passkey_512"} and set(dense["chance"]) == {0.0, 0.25}
        assert len(long) == 4 and {"delta", "token_layer_cut", "analytic_flops_cut"} <= set(long.columns)
        assert sorted(margin["length"]) == [128, 512] and set(margin["measure"]) == {"acc"}
        md = sl.markdown(dense, long, margin)
        assert "passkey_512" in md["dense_accuracy.md"] and "analytic FLOPs cut" in md["long_context_table.md"]
    fig = sl.plot_margins(margin)
    fig.savefig(tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.heavy
def test_stale_rows(cache):
    """Rows of other weights or another task file are named; current rows are not."""
    import copy

    from utrc_study.report import scale_length as sl

    rows = sl.load_rows(cache)
    assert sl.stale_rows(rows) == []
    old_w, old_t = copy.deepcopy(rows[0]), copy.deepcopy(rows[1])
    old_w["params"]["fingerprint"] = "0" * 16
    old_t["params"]["task_sha"] = "f" * 16
    stale = sl.stale_rows([old_w, old_t, rows[2]])
    assert [s["why"].split(" ")[0] for s in stale] == ["weights", "task"]
    assert stale[0]["model"] == "tiny-mamba2" and stale[1]["task"] == old_t["params"]["tasks"][0]


@pytest.mark.heavy
def test_adopt_device_rows(cache, tmp_path):
    """Device rows of the same weights (sha256 checked) get the local fingerprint and key; a wrong
    sha256 changes nothing."""
    import hashlib
    import json

    from utrc_study.experiments import sweep

    spec = importlib.util.spec_from_file_location("adopt", REPO / "scripts/adopt_device_rows.py")
    adopt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adopt)
    rows = list(sweep.RowCache(cache).load().values())
    dev = tmp_path / "dev.jsonl"
    with dev.open("w") as f:
        for r in rows:
            p = dict(r["params"], fingerprint="d" * 16)
            f.write(json.dumps(dict(r, params=p, key=sweep.row_key(p, r["version"]))) + "\n")
    sha = hashlib.sha256((REPO / "data/models/tiny-mamba2/model.safetensors").read_bytes()).hexdigest()
    args = [str(dev), "--model", "tiny-mamba2", "--device-fingerprint", "d" * 16]
    with pytest.raises(SystemExit):
        adopt.main(args + ["--weights-sha256", "0" * 64])
    assert all(r["params"]["fingerprint"] == "d" * 16 for r in sweep.RowCache(dev).load().values())
    assert adopt.main(args + ["--weights-sha256", sha]) == 0
    got = sweep.RowCache(dev).load()
    assert set(got) == {r["key"] for r in rows}          # the keys the local plan looks for
    assert all(r["result"]["meta/fingerprint_device"] == "d" * 16 for r in got.values())


def _synthetic_rows(n=40):
    """Rows of two models' worth of nothing: utrc right on every passkey item, evit wrong on every one;
    lr_cloze the same for both; longppl: utrc's ll higher by 0.1 nats/token."""
    import numpy as np

    rng = np.random.default_rng(0)
    cloze = [int(v) for v in rng.integers(0, 2, n)]
    out = []
    for method, cut in (("none", 0.0), ("utrc", 0.3), ("evit", 0.3)):
        for task in ("lr_cloze_512", "passkey_512", "longppl_1024"):
            ids = list(range(n))
            if task.startswith("longppl"):
                llpt = [-2.0 + (0.1 if method == "utrc" else 0.0) + 0.01 * i for i in range(n)]
                items = {"id": ids, "ll": [4 * v for v in llpt], "gold_tokens": [4] * n, "ll_per_token": llpt}
            else:
                correct = cloze if task.startswith("lr_cloze") else [int(method != "evit")] * n
                items = {"id": ids, "correct": correct}
            gap = 0.001 if method == "evit" else 0.08   # evit's analytic cut is close to its token-layer cut
            out.append({"params": {"model": "m", "method": method, "cut": cut, "tasks": [task]}, "status": "ok",
                        "version": "v", "result": {"token_layer_cut": cut, "analytic_flops_cut": cut - gap,
                                                   "analytic_flops_seq_len": 512, "meta/device": "cuda:0"},
                        "items": {task: items}})
    return out


def test_margins_per_task_holm_and_rendered_text(tmp_path):
    """Every task is its own comparison (passkey never averaged with lr_cloze), Holm covers every
    comparison at a cut, a bootstrap p of 0 prints as "< 1/resamples", and the sentences follow the numbers."""
    import matplotlib

    matplotlib.use("Agg")
    from utrc_study.report import scale_length as sl

    rows = _synthetic_rows()
    margin = sl.margin_table(rows, baselines=["utrc_reference", "evit"], resamples=1000)
    assert sorted(margin["task"]) == ["longppl_1024", "lr_cloze_512", "passkey_512"]   # one row per task
    pk = margin[margin["task"] == "passkey_512"].iloc[0]
    assert pk["delta"] == 1.0 and pk["p"] == 0.0 and pk["verdict"] == "beats"
    cl = margin[margin["task"] == "lr_cloze_512"].iloc[0]
    assert cl["delta"] == 0.0 and cl["verdict"] == "unresolved"
    assert set(margin["family_size"]) == {3} and (margin["p_holm"] >= margin["p"]).all()
    long = sl.long_context_table(rows, resamples=1000)
    md = sl.markdown(sl.dense_table(rows, resamples=100), long, margin, resamples=1000)["long_context_table.md"]
    assert "< 0.001" in md and "| 0 |" not in md and "Holm over every comparison at the same cut (3 comparisons" in md
    text = sl.margin_summary(margin)
    assert "1 of 3 comparisons" not in text and "2 of 3 comparisons" in text   # passkey and longppl survive
    assert "better than evit on passkey_512 (m, +100.0 points)" in text and "lr_cloze" in text
    agree = sl.cut_agreement(long)
    assert "agree within 2 points (every model and target cut) at 512 tokens for evit" in agree
    assert "furthest apart for utrc" in agree
    assert sl.missing_methods(rows, ["utrc", "utrc_reference", "evit"]) == ["utrc_reference"]
    (tmp_path / "gpu_run.log").write_text("# GPU part, one NVIDIA H200\nhost vm; NVIDIA H200\n"
                                          "torch 2.11.0+cu130 transformers 5.17.0 cuda True\n")
    on = sl.computed_on(rows, tmp_path / "cache.jsonl")
    assert on == [{"source": "cache.jsonl", "device": "cuda:0", "rows": 9, "code_versions": ["v"],
                   "machine": [{"log": "gpu_run.log", "header": "GPU part, one NVIDIA H200", "host": "vm; NVIDIA H200",
                                "torch": "2.11.0+cu130", "transformers": "5.17.0", "cuda": "True"}]}]
    sl.plot_margins(margin).savefig(tmp_path / "m.png")

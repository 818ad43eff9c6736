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

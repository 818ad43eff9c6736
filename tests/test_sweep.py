"""Cached, resumable sweeps: interruption, resume without recomputation, error rows."""
import json

import pytest

from utrc_lib.experiments import sweep


def test_grid_and_keys():
    g = sweep.grid(a=[1, 2], b=["x", "y"])
    assert g == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    k = sweep.row_key({"a": 1, "b": (1, 2)}, "v1")
    assert k == sweep.row_key({"b": [1, 2], "a": 1}, "v1")  # order and tuple/list do not matter
    assert k != sweep.row_key({"a": 1, "b": (1, 2)}, "v2")  # code version enters the key
    assert k != sweep.row_key({"a": 2, "b": (1, 2)}, "v1")


def test_interrupt_resume_and_error_rows(tmp_path):
    cache = tmp_path / "rows.jsonl"
    configs = sweep.grid(x=[0, 1, 2, 3, 4])
    calls = []

    def interrupted(x):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the sweep after two rows
        calls.append(x)
        return {"y": x * 10}

    with pytest.raises(KeyboardInterrupt):
        sweep.run(interrupted, configs, cache, version="v", progress=False)
    assert calls == [0, 1]
    assert len(cache.read_text().splitlines()) == 2  # both finished rows are on disk

    calls2 = []

    def flaky(x):
        calls2.append(x)
        if x == 3:
            raise RuntimeError("boom")
        return {"y": x * 10}

    with pytest.warns(UserWarning, match="boom"):
        res = sweep.run(flaky, configs, cache, version="v", progress=False)
    assert calls2 == [2, 3, 4]  # only the missing rows were computed
    assert (res.computed, res.cached) == (3, 2)
    assert [r["params"]["x"] for r in res.rows] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in res.rows] == ["ok", "ok", "ok", "error", "ok"]
    err = res.errors[0]
    assert err["params"] == {"x": 3} and "RuntimeError: boom" in err["error"] and "Traceback" in err["traceback"]
    assert "FAILED" in res.report() and "boom" in res.report()
    df = res.frame()
    assert list(df["x"]) == [0, 1, 2, 4] and list(df["y"]) == [0, 10, 20, 40]
    assert len(res.frame(errors=True)) == 5

    # third run: everything cached (the error row is reported again, not recomputed) ...
    calls3 = []

    def count(x):
        calls3.append(x)
        return {"y": x * 10}

    with pytest.warns(UserWarning):
        res = sweep.run(count, configs, cache, version="v", progress=False)
    assert calls3 == [] and res.cached == 5
    # ... unless asked to retry errors; a new code version recomputes everything
    res = sweep.run(count, configs, cache, version="v", progress=False, retry_errors=True)
    assert calls3 == [3] and not res.errors
    sweep.run(count, configs[:2], cache, version="v2", progress=False)
    assert calls3 == [3, 0, 1]


def test_truncated_line_is_ignored(tmp_path):
    cache = tmp_path / "rows.jsonl"
    sweep.run(lambda x: {"y": x}, sweep.grid(x=[1, 2]), cache, version="v", progress=False)
    with cache.open("a") as f:
        f.write('{"key": "abc", "params": {"x"')  # a write cut off by a crash
    with pytest.warns(UserWarning, match="unreadable"):
        res = sweep.run(lambda x: {"y": x}, sweep.grid(x=[1, 2]), cache, version="v", progress=False)
    assert res.cached == 2 and res.computed == 0


def test_common_parameters_and_json(tmp_path):
    cache = tmp_path / "rows.jsonl"
    res = sweep.run(lambda x, limit: {"s": x + limit}, sweep.grid(x=[1]), cache, common={"limit": 5},
                    version="v", progress=False)
    assert res.rows[0]["params"] == {"limit": 5, "x": 1} and res.rows[0]["result"] == {"s": 6}
    row = json.loads(cache.read_text().splitlines()[0])
    assert row["status"] == "ok" and row["seconds"] >= 0


def test_code_version_is_stable():
    assert sweep.code_version() == sweep.code_version() and len(sweep.code_version()) == 16


def test_make_config_dense_and_reduced():
    assert sweep.make_config("none", 0.2) is None
    assert sweep.make_config("utrc", 0.0) is None
    cfg = sweep.make_config("utrc_reference", 0.2)
    assert cfg.causal is False and cfg.flops_reduction == 0.2
    assert sweep.make_config("utrc", 0.1, layers=[1, 3]).layers == (1, 3)

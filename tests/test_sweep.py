"""Cached, resumable sweeps: interruption, resume without recomputation, error rows."""
import json

import pytest

from utrc_study.experiments import sweep


def test_grid_and_keys():
    g = sweep.grid(a=[1, 2], b=["x", "y"])
    assert g == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    k = sweep.row_key({"a": 1, "b": (1, 2)}, "v1")
    assert k == sweep.row_key({"b": [1, 2], "a": 1}, "v1")  # order and tuple/list do not matter
    assert k != sweep.row_key({"a": 1, "b": (1, 2)}, "v2")  # code version enters the key
    assert k != sweep.row_key({"a": 2, "b": (1, 2)}, "v1")


def _lines_parse(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _untimed(rows):
    """Rows without their wall-clock fields (how long a row took, when it finished), in key order."""
    return sorted(({k: v for k, v in r.items() if k not in ("seconds", "finished")} for r in rows),
                  key=lambda r: r["key"])


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
    # the resumed rows, returned and on disk, are those of an uninterrupted run (but for their timings)
    with pytest.warns(UserWarning, match="boom"):
        whole = sweep.run(flaky, configs, tmp_path / "whole.jsonl", version="v", progress=False)
    assert whole.computed == 5 and _untimed(res.rows) == _untimed(whole.rows)
    assert _untimed(_lines_parse(cache)) == _untimed(_lines_parse(tmp_path / "whole.jsonl"))

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


# -- reliability: torn tails, unwritable caches, errors of the machine ------------------------------


def test_torn_last_line_is_cut_before_the_next_append(tmp_path):
    """A kill mid-write leaves the last row without its end: the rerun recomputes that configuration
    and its row lands on a line of its own (before, it was glued to the torn one, unreadable)."""
    cache = tmp_path / "rows.jsonl"
    configs = sweep.grid(x=[1, 2])
    sweep.run(lambda x: {"y": x}, configs, cache, version="v", progress=False)
    text = cache.read_text()
    cache.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])   # the second row torn
    calls = []

    def fn(x):
        calls.append(x)
        return {"y": x}

    with pytest.warns(UserWarning):
        res = sweep.run(fn, configs, cache, version="v", progress=False)
    assert calls == [2] and res.computed == 1
    rows = _lines_parse(cache)   # every line is a whole row
    assert [r["params"]["x"] for r in rows] == [1, 2]
    again = sweep.run(fn, configs, cache, version="v", progress=False)
    assert calls == [2] and again.cached == 2


def test_complete_last_row_without_newline_is_kept(tmp_path):
    cache = tmp_path / "rows.jsonl"
    sweep.run(lambda x: {"y": x}, sweep.grid(x=[1]), cache, version="v", progress=False)
    cache.write_text(cache.read_text().rstrip("\n"))   # the newline lost, the row whole
    res = sweep.run(lambda x: {"y": x}, sweep.grid(x=[1, 2]), cache, version="v", progress=False)
    assert res.computed == 1 and [r["params"]["x"] for r in _lines_parse(cache)] == [1, 2]


def test_glued_rows_of_old_caches_are_recovered(tmp_path):
    cache = tmp_path / "rows.jsonl"
    sweep.run(lambda x: {"y": x}, sweep.grid(x=[1]), cache, version="v", progress=False)
    row = cache.read_text()
    cache.write_text('{"key": "abc", "params": {"x"' + row)   # a torn row, then a whole one on its line
    assert list(sweep.RowCache(cache).load().values())[0]["params"] == {"x": 1}


def test_unwritable_cache_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    calls = []
    with pytest.raises(OSError, match="sweep cache .* not writable"):
        sweep.run(lambda x: calls.append(x) or {"y": x}, sweep.grid(x=[1, 2]), blocker / "rows.jsonl",
                  version="v", progress=False)
    assert calls == []


def test_machine_errors_are_reported_not_cached(tmp_path):
    import torch

    cache = tmp_path / "rows.jsonl"
    configs = sweep.grid(x=[1, 2])

    def oom(x):
        if x == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"y": x}

    with pytest.warns(UserWarning, match="not cached"):
        res = sweep.run(oom, configs, cache, version="v", progress=False)
    assert [r["status"] for r in res.rows] == ["ok", "error"] and res.rows[1]["transient"]
    assert [r["params"]["x"] for r in _lines_parse(cache)] == [1]   # the error row is not on disk
    res = sweep.run(lambda x: {"y": x}, configs, cache, version="v", progress=False)
    assert res.computed == 1 and not res.errors
    # an error of the machine cached by an earlier version (no "transient" mark) is retried too
    legacy = dict(_lines_parse(cache)[0], key=sweep.row_key({"x": 3}, "v"), params={"x": 3}, status="error",
                  result=None, error="WorkerDied: the worker on cuda:0 exited with code -9")
    sweep.RowCache(cache).append(legacy)
    res = sweep.run(lambda x: {"y": x}, sweep.grid(x=[3]), cache, version="v", progress=False)
    assert res.computed == 1 and res.rows[0]["status"] == "ok"
    assert not sweep.is_environment_error(RuntimeError("boom"))


def test_make_config_builds_through_config_from_args(monkeypatch):
    from utrc_lib.core import config as core_config

    seen = []
    real = core_config.config_from_args

    def spy(method=None, **kw):
        seen.append((method, kw))
        return real(method, **kw)

    monkeypatch.setattr(core_config, "config_from_args", spy)
    cfg = sweep.make_config("utrc", 0.2, layers="1,3", align=8)
    assert seen == [("utrc", {"flops_reduction": 0.2, "layers": "1,3", "align": 8})]
    assert cfg.layers == (1, 3) and cfg.align == 8 and cfg.causal
    with pytest.raises(ValueError, match="align"):
        sweep.make_config("utrc", 0.2, align="x")


def test_model_fingerprint_follows_the_data_folder(tmp_path, monkeypatch):
    model_dir = tmp_path / "models" / "tiny-mamba2"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "mamba2"}')
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path))
    fp = sweep.model_fingerprint   # memoised by file size and mtime, not by name
    import hashlib

    expected = hashlib.sha256(b"config.json" + b'{"model_type": "mamba2"}').hexdigest()[:16]
    assert fp("tiny-mamba2") == expected            # the embedded model's folder under UTRC_DATA_DIR
    assert fp(str(model_dir)) == expected           # a local checkpoint directory
    assert fp("org/some-hub-model") == "unknown"


@pytest.mark.heavy
def test_evaluate_config_takes_a_model_loader():
    asked = []

    def loader(name):
        asked.append(name)
        return sweep.get_model("tiny-mamba2")

    out = sweep.evaluate_config("tiny-mamba2", "utrc", 0.2, tasks=("ppl",), limit=2, batch_size=2,
                                model_loader=loader)
    assert asked == ["tiny-mamba2"] and any(k.startswith("ppl/") for k in out)


# -- item-level outcomes in the rows ---------------------------------------------------------------
def test_item_rows_resume_and_old_rows_recomputed(tmp_path):
    cache = tmp_path / "rows.jsonl"
    configs = sweep.grid(x=[1, 2])
    sweep.run(lambda x: {"y": x}, configs[:1], cache, version="v", progress=False)   # an old row, no items
    calls = []

    def fn(x, items=False):
        calls.append((x, items))
        out = {"y": x}
        if items:
            out["items"] = {"t": {"correct": [1, 0, x % 2], "ll": [-1.5, -2.0, -0.25]}}
        return out

    res = sweep.run(fn, configs, cache, version="v", progress=False)   # without items: the old row serves
    assert calls == [(2, False)] and res.cached == 1 and "items" not in res.rows[0]
    res = sweep.run(fn, configs, cache, version="v", progress=False, items=True)   # both lack items
    assert calls[1:] == [(1, True), (2, True)] and res.computed == 2
    row = res.rows[1]
    assert row["result"] == {"y": 2} and row["items"] == {"t": {"correct": [1, 0, 0], "ll": [-1.5, -2.0, -0.25]}}
    assert list(res.frame().columns) == ["x", "y"]   # the frame holds the aggregates only
    again = sweep.run(fn, configs, cache, version="v", progress=False, items=True)   # resumed from the cache
    assert len(calls) == 3 and again.cached == 2 and again.rows[0]["items"]["t"]["correct"] == [1, 0, 1]
    assert _untimed(again.rows) == _untimed(res.rows)   # the cached rows are the computed ones, items included
    sweep.run(fn, configs, cache, version="v", progress=False)   # rows with items also serve plain runs
    assert len(calls) == 3
    loaded = sweep.RowCache(cache).load()
    assert all("items" in r for r in loaded.values()) and len(loaded) == 2
    assert sweep.pending(configs, cache, version="v", items=True).todo == []


@pytest.fixture(scope="module")
def tiny_loader():
    from pathlib import Path

    from transformers import AutoTokenizer

    from conftest import tiny_model

    pair = (tiny_model("mamba2", layers=4, vocab=8192),
            AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parent.parent / "data" / "tokenizer")))
    return lambda name: pair


def test_evaluate_config_items(tiny_loader):
    kw = dict(tasks=("cloze", "ppl"), limit=2, batch_size=2, model_loader=tiny_loader)
    plain = sweep.evaluate_config("tiny", "utrc", 0.2, **kw)
    rich = sweep.evaluate_config("tiny", "utrc", 0.2, items=True, **kw)
    items = rich.pop("items")
    assert "items" not in plain
    assert {k: v for k, v in rich.items() if k in plain and "seconds" not in k} == \
        {k: v for k, v in plain.items() if "seconds" not in k}
    assert set(items) == {"cloze", "ppl"} and len(items["cloze"]["correct"]) == 2
    assert 0 <= rich["ppl/top1_agreement"] <= 1 and rich["ppl/kl_per_token"] > 0
    outcome = sweep.compute(sweep.evaluate_config, {"model": "tiny", "method": "none", "cut": 0.0,
                                                   "tasks": ["cloze"], "limit": 2, "batch_size": 2}, items=True,
                            model_loader=tiny_loader)
    assert outcome["status"] == "ok" and outcome["items"]["cloze"]["kl"] == [0.0, 0.0]
    assert "items" not in outcome["result"]

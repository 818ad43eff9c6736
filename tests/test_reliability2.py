"""Issue 24 ("Reliability, round two"): no silent wrong number from the evaluator, the caches, the
data or the CLIs. One test (or a few) per item; each failed before the fix."""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import utrc_lib

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="module")
def tiny():
    return utrc_lib.load_model("tiny-mamba2")


# -- item 1: an already-patched model is refused by every scoring entry point -------------------------
def test_item1_evaluate_refuses_a_patched_model(tiny):
    from utrc_study.eval import scorer
    from utrc_study.experiments import sweep

    model, tok = tiny
    cfg = utrc_lib.ReductionConfig("utrc", flops_reduction=0.3)
    with utrc_lib.apply(model, cfg):
        with pytest.raises(RuntimeError, match=r"handle\.remove\(\)"):
            scorer.evaluate(model, tok, tasks=("cloze",), limit=2, progress=False)
        with pytest.raises(RuntimeError, match="patched"):
            scorer.score_tokens(model, [([1, 2, 3], [4])])
        with pytest.raises(RuntimeError, match="patched"):
            sweep.evaluate_config("tiny-mamba2", "none", 0.0, tasks=("cloze",), limit=2,
                                  model_loader=lambda name: (model, tok))
    handle = utrc_lib.apply(model, cfg)   # a handle left open
    try:
        with pytest.raises(RuntimeError, match="patched"):
            scorer.evaluate(model, tok, tasks=("cloze",), limit=2, progress=False)
    finally:
        handle.remove()
    res = scorer.evaluate(model, tok, tasks=("cloze",), limit=2, progress=False)   # closed: scores
    assert res["cloze"]["n"] == 2


def test_item1_lm_eval_adapter_refuses_a_patched_model(tiny):
    pytest.importorskip("lm_eval")
    from utrc_lib.integrations.lm_eval import UTRCLM

    model, tok = tiny
    with utrc_lib.apply(model, utrc_lib.ReductionConfig("utrc", flops_reduction=0.3)):
        with pytest.raises(RuntimeError, match="patched"):
            UTRCLM(pretrained=model, tokenizer=tok)


# -- items 3 and 4: the suite loaders are keyed by file content; items are validated on load ----------
def _copy_suite(dst: Path) -> Path:
    bench = dst / "benchmarks"
    bench.mkdir(parents=True)
    for name in ("cloze", "choice4", "choice2", "ppl"):
        lines = (ROOT / "data" / "benchmarks" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:3]
        (bench / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return bench


def _rewrite(path: Path, edit) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    items = [json.loads(l) for l in lines]
    edit(items)
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")


def test_item3_changed_files_and_data_dir_are_read_again(tmp_path, monkeypatch, tiny):
    from utrc_study.eval import scorer, suite

    _, tok = tiny
    a, b = _copy_suite(tmp_path / "a"), _copy_suite(tmp_path / "b")
    _rewrite(b / "cloze.jsonl", lambda its: its[0].update(context="Another context entirely."))
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path / "a"))
    first = suite.load_task("cloze")[0]["context"]
    toks_a, _ = scorer._task_requests(tok, "cloze", None)
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path / "b"))   # another data directory
    assert suite.load_task("cloze")[0]["context"] == "Another context entirely."
    assert scorer._task_requests(tok, "cloze", None)[0][0] != toks_a[0]
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path / "a"))
    assert suite.load_task("cloze")[0]["context"] == first
    # the same file edited in place (same size: only the content differs)
    _rewrite(a / "cloze.jsonl", lambda its: its[0].update(context=its[0]["context"][::-1]))
    assert suite.load_task("cloze")[0]["context"] == first[::-1]
    assert scorer._task_requests(tok, "cloze", None)[0][0] != toks_a[0]


@pytest.mark.parametrize("task, edit, field", [
    ("choice4", lambda its: its[1].update(label=7), "label"),
    ("choice2", lambda its: its[1].update(label="1"), "label"),
    ("choice4", lambda its: its[1]["endings"].__setitem__(2, ""), "endings[2]"),
    ("cloze", lambda its: its[1].update(target=""), "target"),
    ("ppl", lambda its: its[1].update(context=None), "context"),
    ("choice2", lambda its: its[1].update(options=["only one"]), "options"),
])
def test_item4_bad_items_fail_on_load_naming_file_line_field(tmp_path, monkeypatch, task, edit, field):
    from utrc_study.eval import suite

    bench = _copy_suite(tmp_path)
    _rewrite(bench / f"{task}.jsonl", edit)
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path))
    with pytest.raises(suite.BenchmarkItemError) as exc:
        suite.load_task(task)
    msg = str(exc.value)
    assert f"{task}.jsonl:2" in msg and repr(field) in msg and "expected" in msg


def test_item4_malformed_json_names_file_and_line(tmp_path, monkeypatch, tiny):
    from utrc_study.eval import scorer, suite

    bench = _copy_suite(tmp_path)
    with (bench / "choice2.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "x", "context": "broken\n')
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path))
    with pytest.raises(suite.BenchmarkItemError, match=r"choice2\.jsonl:4: not valid JSON"):
        suite.load_task("choice2")
    model, tok = tiny
    calls = []
    monkeypatch.setattr(scorer, "score_tokens", lambda *a, **k: calls.append(1))
    with pytest.raises(suite.BenchmarkItemError):   # before any task is scored, even the good ones first
        scorer.evaluate(model, tok, tasks=("cloze", "choice2"), progress=False)
    assert calls == []


def test_item4_committed_suites_validate():
    from utrc_study.eval import suite

    for task in suite.available_tasks("all"):
        assert suite.load_task(task, limit=5)


# -- item 2: sweep rows are keyed by what they depend on ------------------------------------------------
def test_item2_sweep_rows_recompute_when_their_data_changes(tmp_path, monkeypatch):
    from utrc_study.experiments import sweep

    calls = []

    def fn(model, tasks, **kw):   # stands for evaluate_config: counts the computations
        calls.append(tasks)
        return {"x": len(calls)}

    a, b = _copy_suite(tmp_path / "a"), _copy_suite(tmp_path / "b")
    _rewrite(b / "cloze.jsonl", lambda its: its[0].update(target=" other"))
    cache = tmp_path / "rows.jsonl"
    configs = [{"model": "tiny-mamba2", "tasks": ["cloze"]}]
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path / "a"))
    assert sweep.run(fn, configs, cache, version="v", progress=False).computed == 1
    assert sweep.run(fn, configs, cache, version="v", progress=False).computed == 0      # fresh: served
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path / "b"))                           # other data
    assert sweep.run(fn, configs, cache, version="v", progress=False).computed == 1
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path / "a"))
    assert sweep.run(fn, configs, cache, version="v", progress=False).computed == 1    # a's rows again
    _rewrite(a / "cloze.jsonl", lambda its: its[1].update(context=its[1]["context"] + " Edited."))
    res = sweep.run(fn, configs, cache, version="v", progress=False)                   # edited JSONL
    assert res.computed == 1 and res.rows[0]["result"]["x"] == len(calls) == 4
    # v1 -> v2 suite: other task files enter the key of a row that names them
    assert sweep.dependencies({"model": "tiny-mamba2", "tasks": ["cloze"]})["data"] != \
        sweep.dependencies({"model": "tiny-mamba2", "tasks": ["cloze_v2"]})["data"]
    # a row cached without deps (written before them) is not served
    row = json.loads(cache.read_text().splitlines()[-1])
    row.pop("deps")
    cache.write_text(json.dumps(row) + "\n")
    assert sweep.run(fn, configs, cache, version="v", progress=False).computed == 1


def test_item2_model_weights_and_tokenizer_enter_the_key(tmp_path):
    from utrc_study.experiments import sweep

    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights-1")
    (ckpt / "tokenizer.json").write_text("{}")
    k1 = sweep.dependency_key({"model": str(ckpt), "tasks": ["cloze"]})
    time.sleep(0.01)
    (ckpt / "model.safetensors").write_bytes(b"weights-2")
    k2 = sweep.dependency_key({"model": str(ckpt), "tasks": ["cloze"]})
    (ckpt / "tokenizer.json").write_text('{"v": 2}')
    k3 = sweep.dependency_key({"model": str(ckpt), "tasks": ["cloze"]})
    assert len({k1, k2, k3}) == 3


# -- item 5: full-length logits: a row is the model's own prediction there, or NaN --------------------
@torch.no_grad()
def test_item5_full_length_rows_are_own_or_nan(tiny):
    model, tok = tiny
    ids = tok("The quick brown fox jumps over the lazy dog. " * 16, return_tensors="pt").input_ids
    with utrc_lib.apply(model, utrc_lib.ReductionConfig("utrc", flops_reduction=0.3)) as h:
        full = model(ids).logits
        mask, pos = h.kept_mask, h.kept_positions
        with h.options(kept_only=True):
            kept = model(ids).logits
    assert mask.shape == ids.shape and 0 < int(mask.sum()) < ids.shape[1]
    assert torch.equal(mask[0].nonzero()[:, 0], pos[0])
    assert bool(torch.isnan(full[~mask]).all()) and bool(torch.isfinite(full[mask]).all())
    assert torch.equal(full[0, pos[0]], kept[0])          # the kept rows are the model's own rows
    # no row is a copy of another position's row
    rows = full[0][mask[0]]
    assert len({tuple(r[:8].tolist()) for r in rows}) == rows.shape[0]


def test_item5_training_mode_inside_apply_warns_once(tiny):
    from utrc_lib.hosts.handle import ReductionDisabled

    model, tok = tiny
    ids = tok("a b c d e f g h i j k l m n o p", return_tensors="pt").input_ids
    with utrc_lib.apply(model, utrc_lib.ReductionConfig("utrc", keep_ratio=0.5)):
        model.train()
        try:
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                with torch.no_grad():
                    model(ids)
                    model(ids)
        finally:
            model.eval()
    hits = [w for w in got if issubclass(w.category, ReductionDisabled)]
    assert len(hits) == 1 and "model.eval()" in str(hits[0].message)


# -- item 6: an unreachable cut warns once; rows carry the achieved cut beside the requested one -----
@torch.no_grad()
def test_item6_unreachable_cut_warns_once_per_configuration(tiny):
    from utrc_lib.core.methods import ReductionShortfall

    model, tok = tiny
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids  # ~40 tokens
    cfg = utrc_lib.ReductionConfig("utrc", flops_reduction=0.2, align=64, seed=11)   # align > kept tokens
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with utrc_lib.apply(model, cfg) as h:
            model(ids)
            model(ids)
            achieved = float(h.last_reducer.achieved_cut()[0])
    hits = [w for w in got if issubclass(w.category, ReductionShortfall)]
    assert achieved < 0.19 and len(hits) == 1
    assert "below the requested 0.200" in str(hits[0].message)
    # a reachable configuration does not warn
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with utrc_lib.apply(model, utrc_lib.ReductionConfig("utrc", flops_reduction=0.2, seed=12)):
            model(ids)
    assert not [w for w in got if issubclass(w.category, ReductionShortfall)]


def test_item6_rows_carry_the_achieved_cut(tiny):
    from utrc_study.experiments import sweep

    model, tok = tiny
    row = sweep.evaluate_config("tiny-mamba2", "utrc", 0.3, tasks=("choice2",), limit=3,
                                model_loader=lambda name: (model, tok))
    assert row["token_layer_cut"] == pytest.approx(0.3, abs=1e-6)
    assert 0 < row["achieved_token_layer_cut"] <= 0.3
    dense = sweep.evaluate_config("tiny-mamba2", "none", 0.0, tasks=("choice2",), limit=2,
                                  model_loader=lambda name: (model, tok))
    assert dense["achieved_token_layer_cut"] == 0.0 and dense["token_layer_cut"] == 0.0
    pytest.importorskip("lm_eval")
    from utrc_study.eval import scorer
    from utrc_lib.integrations.lm_eval import UTRCLM

    lm = UTRCLM(pretrained=model, tokenizer=tok, method="utrc", flops_reduction="0.3")
    lm._score([scorer.encode_pair(tok, "The quick brown fox jumps over the lazy dog. " * 6, " again")], True, "t")
    meta = lm.reduction_metadata
    assert meta["flops_reduction_token_layer"] == pytest.approx(0.3, abs=1e-6)
    assert 0 < meta["achieved_token_layer_cut"] < 0.3


def test_item6_depth_dependent_checks_raise_in_apply(tiny):
    model, _ = tiny
    cfg = utrc_lib.ReductionConfig("utrc", flops_reduction=0.999)   # fine without a model
    with pytest.raises(ValueError, match="flops_reduction=0.999 is not reachable"):
        utrc_lib.apply(model, cfg)
    with pytest.raises(ValueError, match="out of range for a 12-layer model"):
        utrc_lib.apply(model, utrc_lib.ReductionConfig("utrc", keep_ratio=0.5, layers=(40,)))
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert "every invalid config field raises at construction" not in api
    assert "raise in `utrc_lib.apply`" in api


# -- item 7: lm-eval as installed: entry point, `python -m utrc_lib.integrations.lm_eval_cli`, device auto ---------
def test_item7_entry_point_declared():
    import importlib
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    target = meta["entry-points"]["lm_eval.models"]["utrc"]
    assert meta["scripts"]["utrc-lm-eval"] == "utrc_lib.integrations.lm_eval_cli:main"
    pytest.importorskip("lm_eval")
    module, attr = target.split(":")
    from utrc_lib.integrations.lm_eval import UTRCLM

    assert getattr(importlib.import_module(module), attr) is UTRCLM


@pytest.mark.heavy
def test_item7_lm_eval_cli_offline_on_a_local_task(tmp_path):
    pytest.importorskip("lm_eval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [PY, "-m", "utrc_lib.integrations.lm_eval_cli", "--model", "utrc",
           "--model_args", "pretrained=tiny-mamba2,method=utrc,flops_reduction=0.2",
           "--tasks", "utrc_choice2", "--include_path", str(ROOT / "utrc_study/eval/lm_eval_tasks"),
           "--limit", "1", "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]   # no --device: lm-eval's cuda:0 default works on CPU
    (out,) = list((tmp_path / "out").rglob("results_*.json"))
    assert "acc,none" in json.loads(out.read_text())["results"]["utrc_choice2"]


def test_item7_adapter_device_defaults_to_auto():
    pytest.importorskip("lm_eval")
    from utrc_lib.integrations.lm_eval import resolve_lm_device

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_lm_device(None) == resolve_lm_device("auto") == here
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="using cpu"):
            assert resolve_lm_device("cuda:0") == "cpu"
        with pytest.raises(ValueError, match="--device auto"):
            resolve_lm_device("cuda:1")


# -- item 8: dead flags and misleading messages -------------------------------------------------------
def test_item8_no_progress_reaches_the_scorer(tiny, monkeypatch):
    pytest.importorskip("lm_eval")
    from utrc_study.eval import __main__ as cli
    from utrc_lib import scoring as scorer   # what the adapter scores with
    from utrc_lib.integrations.lm_eval import UTRCLM

    assert cli.model_args_from(cli.parse_args(["--no-progress"]))["progress"] is False
    model, tok = tiny
    seen = []
    real = scorer.score_tokens
    monkeypatch.setattr(scorer, "score_tokens", lambda *a, **k: seen.append(k["progress"]) or real(*a, **k))
    lm = UTRCLM(pretrained=model, tokenizer=tok, progress=False)
    lm._score([([1, 2, 3], [4])], False, "t")   # lm-eval asks for bars; --no-progress wins
    assert seen == [False]


def test_item8_eval_help_lists_every_model_and_the_v2_tasks():
    from utrc_study.eval import __main__ as cli

    text = cli.build_parser().format_help()
    for name in ("small-mamba2", "small-mamba", "tiny-mamba", "utrc_v2_cloze", "utrc_v2_passkey_2048"):
        assert name in text


def test_item8_state_batch_and_architecture_messages(tiny):
    model, tok = tiny
    ctx = torch.tensor([tok("one two three four five six").input_ids[:5], tok("seven eight nine ten eleven").input_ids[:5]])
    state = utrc_lib.prefill(model, ctx)
    q = tok(" who", return_tensors="pt", add_special_tokens=False).input_ids
    with pytest.raises(ValueError) as exc:
        utrc_lib.generate_from(model, state, q, max_new_tokens=2)
    assert "serves 1 or 2" not in str(exc.value) and "exactly 2 question rows" in str(exc.value)
    m1, _ = utrc_lib.load_model("tiny-mamba")
    with pytest.raises(ValueError, match="comes from a Mamba-2 model.*is a Mamba-1 one"):
        utrc_lib.generate_from(m1, utrc_lib.prefill(model, ctx[:1]), q, max_new_tokens=2)


def test_item8_missing_tokenizer_and_corrupt_weights_are_named(tmp_path):
    import shutil

    from utrc_lib.hosts.models import ModelLoadError

    src = ROOT / "data" / "models" / "tiny-mamba2"
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    (ck / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError) as exc:
        utrc_lib.load_model(str(ck))
    assert "sentencepiece" not in str(exc.value) and "tokenizer.json" in str(exc.value) \
        and "save_pretrained" in str(exc.value)
    shutil.copy(src / "tokenizer.json", ck / "tokenizer.json")
    w = next(ck.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])   # truncated copy
    with pytest.raises(ModelLoadError) as exc:
        utrc_lib.load_model(str(ck))
    assert str(w) in str(exc.value)


def test_item8_numpy_ratios_are_accepted():
    np = pytest.importorskip("numpy")
    cfg = utrc_lib.ReductionConfig("utrc", keep_ratio=np.float32(0.5))
    assert cfg.keep_ratio == 0.5 and type(cfg.keep_ratio) is float
    assert utrc_lib.ReductionConfig("utrc", flops_reduction=np.float32(0.25)).flops_reduction == 0.25
    assert utrc_lib.ReductionConfig("utrc", keep_ratio=0.5, q=np.float16(0.5)).q == 0.5


# -- item 9: validate before the expensive part ---------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch-size"),
    (["--method", "utrc", "--flops-reduction", "0.95"], "not reachable"),
    (["--method", "utrc", "--keep-ratio", "0.5", "--layers", "30"], "out of range"),
    (["--model-name", "small-mamab2"], "Did you mean 'small-mamba2'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda")]))
def test_item9_eval_cli_fails_before_loading(argv, needle, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from utrc_study.eval import __main__ as cli
    from utrc_lib.integrations import lm_eval as lm_eval_adapter
    from utrc_lib.hosts import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **k):
        raise AssertionError("loaded a model although the arguments are invalid")

    monkeypatch.setattr(lm_eval_adapter.UTRCLM, "__init__", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    t = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and time.perf_counter() - t < 1.0
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1]


def test_item9_unknown_model_fails_at_once_offline_and_says_hub_online(monkeypatch, capsys):
    from transformers import AutoConfig

    from utrc_lib.hosts.models import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Did you mean 'small-mamba2'"):
        utrc_lib.load_model("small-mamab2")
    assert time.perf_counter() - t < 1.0
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(OSError("no network"))))
    with pytest.raises(ModelLoadError):
        utrc_lib.load_model("someorg/some-model")
    assert "reaching the Hugging Face hub" in capsys.readouterr().err


# -- item 10: Ctrl-C keeps the finished tasks; the same command resumes ---------------------------------
def test_item10_eval_cli_keeps_finished_tasks_and_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import lm_eval

    from utrc_study.eval import __main__ as cli
    from utrc_lib.integrations import lm_eval as lm_eval_adapter

    class FakeLM:
        def __init__(self, **kw):
            pass

        reduction_metadata = {"method": "utrc", "achieved_token_layer_cut": 0.1}

    ran = []

    def fake_simple_evaluate(model, tasks, **kw):
        (task,) = tasks
        if task == "utrc_ppl" and stop["on"]:
            raise KeyboardInterrupt
        ran.append(task)
        return {"results": {task: {"acc,none": 0.5}}, "versions": {task: 1}, "config": {}}

    stop = {"on": True}
    monkeypatch.setattr(lm_eval_adapter, "UTRCLM", FakeLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    out = tmp_path / "res.json"
    argv = ["--method", "utrc", "--flops-reduction", "0.2", "--output", str(out),
            "--tasks", "utrc_cloze,utrc_choice2,utrc_ppl"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "kept 2 of 3 task(s)" in err and "same command" in err
    assert not out.exists() and ran == ["utrc_cloze", "utrc_choice2"]
    stop["on"] = False
    assert cli.main(argv) == 0
    assert ran == ["utrc_cloze", "utrc_choice2", "utrc_ppl"]     # only the missing task ran again
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"utrc_cloze", "utrc_choice2", "utrc_ppl"}
    assert not Path(str(out) + ".partial.json").exists()
    # another configuration does not reuse the kept tasks
    stop["on"] = True
    assert cli.main(argv[:3] + ["0.3"] + argv[4:]) == 130
    assert ran[3:] == ["utrc_cloze", "utrc_choice2"]


def test_item10_bench_checks_the_device_first(capsys, tmp_path, monkeypatch):
    from utrc_study.experiments import bench

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-machine path")
    monkeypatch.setattr(bench, "run_bench", lambda **kw: pytest.fail("ran configurations"))
    t = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--out", str(tmp_path / "b.json")])   # default backend mamba_ssm on a CPU machine
    assert exc.value.code == 2 and time.perf_counter() - t < 2
    assert "--backend hf" in capsys.readouterr().err


def test_item10_bench_ctrl_c_exits_130_saying_what_was_kept(capsys, tmp_path, monkeypatch):
    from utrc_study.experiments import bench

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", interrupted)
    out = tmp_path / "b.json"
    out.write_text(json.dumps([{"kind": "prefill"}]))
    assert bench.main(["--backend", "hf", "--device", "cpu", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err


# -- docs/api.md: the sentence under the first snippet agrees with what the snippet prints -----------------
@pytest.mark.heavy
def test_readme_analytic_cut_sentence_matches_the_first_snippet(capsys):
    import re

    from test_readme import API, snippets

    text = API.read_text(encoding="utf-8")
    assert "the second is far smaller than the first" not in text
    exec(compile(snippets(API)[0], "docs/api.md snippet 1", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    token, analytic = map(float, re.search(r"token-layer cut: ([0-9.]+) analytic FLOPs cut: ([0-9.]+)", out).groups())
    assert f"the analytic cut ({analytic:.3f}) comes out slightly\nabove the token-layer cut ({token:.3f})" in text
    assert analytic > token
    model, tok = utrc_lib.load_model("tiny-mamba2")
    cfg = utrc_lib.ReductionConfig("utrc", flops_reduction=0.2, protect_last=1)
    for n in (128, 512):
        rep = utrc_lib.flops(model, n, cfg)
        assert f"{rep.analytic_cut:.3f} against {rep.token_layer_cut:.3f} at {n} tokens" in text

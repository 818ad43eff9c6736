"""Benchmark suite v2 (data/benchmarks_v2): files, item constraints, held-out documents, scoring."""
import collections
import hashlib
import json
import math
import re
from pathlib import Path

import pytest

from utrc_study.eval import suite

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "data" / "benchmarks_v2"
CORPUS = ROOT / "data" / "corpus" / "work_v2"
TOKENIZER = ROOT / "data" / "tokenizer_v2" / "tokenizer.json"
LONG = [t for t in suite.TASKS_V2 if t.rsplit("_", 1)[-1].isdigit()]
SHORT = ["cloze_v2", "choice4_v2", "choice2_v2"]

pytestmark = pytest.mark.skipif(not (BENCH / "manifest.json").is_file(), reason="suite v2 not built")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((BENCH / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER))


def ntok(tok, text):
    return len(tok.encode(text).ids)


def test_registry_keeps_v1():
    assert suite.available_tasks() == ["cloze", "choice4", "choice2", "ppl"]
    assert suite.available_tasks("all")[:4] == ["cloze", "choice4", "choice2", "ppl"]
    assert set(suite.available_tasks("v2")) == set(SHORT) | set(LONG)
    assert {suite.task_kind(t) for t in suite.available_tasks("v2")} <= set(suite.TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        suite.task_kind("nope")
    with pytest.raises(ValueError, match="unknown suite"):
        suite.available_tasks("v3")


def test_manifest_files_and_size(manifest):
    total = 0
    for name in SHORT + LONG:
        e = manifest["tasks"][name]
        p = BENCH / e["file"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"], name
        assert e["count"] >= (1000 if name in SHORT else 500), name
        total += p.stat().st_size
    docs = BENCH / manifest["docs"]["file"]
    assert hashlib.sha256(docs.read_bytes()).hexdigest() == manifest["docs"]["sha256"]
    total += docs.stat().st_size
    assert total < 12_500_000
    assert manifest["tokenizer_sha256"] == hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", SHORT + LONG)
def test_items_load(name, manifest):
    items = suite.load_task(name)
    assert len(items) == manifest["tasks"][name]["count"]
    assert len({it["id"] for it in items}) == len(items)
    assert suite.load_task(name, limit=3) == items[:3]
    for it in items[:50]:
        assert "context_parts" not in it and it["context"]


@pytest.mark.parametrize("L", [512, 1024, 2048])
def test_lr_cloze_constraints(L, tok):
    items = suite.load_task(f"lr_cloze_{L}")
    tol = L // 64
    for it in items[:: max(1, len(items) // 40)]:   # ~40 items checked exactly
        ctx, word = it["context"], it["target"][1:]
        assert it["target"] == " " + word and re.fullmatch(r"[A-Za-z]{4,}", word)
        assert L - tol <= ntok(tok, ctx) <= L, it["id"]
        back = [ntok(tok, ctx[m.start():]) for m in re.finditer(r"\b" + word + r"\b", ctx)]
        assert back and max(back) >= 256, it["id"]           # occurs >= 256 tokens before the blank
        near = [ntok(tok, ctx[m.start():]) for m in re.finditer(r"(?i)\b" + word + r"\b", ctx)]
        assert min(near) > 64, it["id"]                       # nowhere in the last 64 tokens
        assert not re.search(r"(?i)\b" + word + r"\b", tok.decode(tok.encode(ctx).ids[-64:]))


@pytest.mark.parametrize("L", [512, 1024, 2048])
def test_passkey_constraints(L, tok):
    items = suite.load_task(f"passkey_{L}")
    depths = collections.Counter(it["depth"] for it in items)
    assert set(depths) == {0.1, 0.3, 0.5, 0.7, 0.9} and min(depths.values()) >= 100
    assert {it["depth"] for it in items[:10]} == set(depths)   # interleaved: any prefix covers the depths
    for it in items[:: max(1, len(items) // 40)]:
        key = it["target"].strip()
        assert re.fullmatch(r"\d{5}", key) and it["target"] == " " + key
        ctx = it["context"]
        assert len(set(it["endings"])) == 4 and it["endings"][it["label"]] == key
        assert all(re.fullmatch(r"\d{5}", e) and e not in ctx for e in it["endings"] if e != key)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        assert ctx.count(needle) == 1 and ctx.count(key) == 2    # the key appears only in the needle
        assert ctx.endswith("\n\nWhat is the pass key? The pass key is")
        n = ntok(tok, ctx)
        assert L - L // 64 <= n <= L
        depth = ntok(tok, ctx[:ctx.index(needle)]) / n
        assert abs(depth - it["depth"]) <= 0.05, (it["id"], depth)
        assert abs(depth - it["depth_measured"]) < 1e-3


@pytest.mark.parametrize("L", [1024, 2048])
def test_longppl_split(L, tok):
    items = suite.load_task(f"longppl_{L}")
    for it in items[:: max(1, len(items) // 30)]:
        ids = tok.encode(it["context"]).ids
        assert len(ids) == L
        assert tok.encode(it["context"] + it["continuation"]).ids[:L] == ids
        assert ntok(tok, it["context"] + it["continuation"]) == L + 64


def test_short_tasks(manifest):
    for name in SHORT:
        items = suite.load_task(name)
        assert {it["level"] for it in items} == {manifest["levels"][name]}
    for it in suite.load_task("choice4_v2"):
        assert len(it["endings"]) == 4 and 0 <= it["label"] < 4 and len(set(it["endings"])) == 4
    for it in suite.load_task("choice2_v2"):
        assert it["options"][it["label"]].startswith(it["word"]) and it["word"] != it["substitute"]
    for it in suite.load_task("cloze_v2")[:200]:
        assert it["target"].startswith(" ") and len(it["target"]) >= 5


def test_held_out_documents(manifest):
    """Every item's document is a v2 TEST document, never train / validation, never Debian fortunes;
    docs.jsonl holds them verbatim."""
    docs = {d["id"]: d for d in map(json.loads, (BENCH / "docs.jsonl").read_text().splitlines())}
    used = {it["doc_id"] for name in SHORT + LONG for it in suite.load_task(name)}
    assert not any(d["source"].startswith("fortune") for d in docs.values())
    if not (CORPUS / "test.jsonl").is_file():
        pytest.skip("corpus v2 not built here (data/corpus/work_v2): split membership not checked")
    split = {}
    for s in ("train", "validation", "test"):
        for line in (CORPUS / f"{s}.jsonl").open(encoding="utf-8"):
            d = json.loads(line)
            split.setdefault(d["id"], set()).add(s)
            if s == "test" and d["id"] in docs:
                assert docs[d["id"]]["text"] == d["text"], d["id"]
    assert used <= {i for i, s in split.items() if s == {"test"}}
    assert set(docs) <= used
    assert hashlib.sha256((CORPUS / "test.jsonl").read_bytes()).hexdigest() == manifest["corpus_sha256"]


@pytest.fixture(scope="module")
def tiny():
    from utrc_lib.hosts.models import ModelLoadError, load_model

    try:
        return load_model("tiny-mamba2")
    except ModelLoadError as e:  # pragma: no cover
        pytest.skip(f"tiny-mamba2 not available: {e}")


@pytest.mark.heavy
def test_evaluator_scores_v2_tasks(tiny):
    from utrc_study.eval.scorer import evaluate

    model, tk = tiny
    tasks = SHORT + ["lr_cloze_512", "passkey_512", "longppl_1024"]
    res = evaluate(model, tk, tasks=tasks, limit=5, batch_size=5, progress=False, max_length=4096)
    for t in tasks:
        assert res[t]["n"] == 5
    for t in ("cloze_v2", "lr_cloze_512"):
        assert 0.0 <= res[t]["acc"] <= 1.0 and res[t]["ppl"] > 1.0
    assert 0.0 <= res["passkey_512"]["acc"] <= 1.0
    assert set(res["passkey_512"]["acc_by_depth"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
    assert 0.0 <= res["choice4_v2"]["acc_norm"] <= 1.0
    assert 0.3 < res["longppl_1024"]["bits_per_byte"] < 8.0 and math.isfinite(res["longppl_1024"]["ppl"])
    # the long-context guard: a context longer than max_length is an error, not a silent cut
    with pytest.raises(ValueError, match="max_length"):
        evaluate(model, tk, tasks=["longppl_1024"], limit=1, progress=False, max_length=512)


def test_reduced_scoring_runs_on_long_task(tiny):
    from utrc_lib import ReductionConfig
    from utrc_study.eval.scorer import evaluate

    model, tk = tiny
    cfg = ReductionConfig(method="utrc", keep_ratio=0.8)
    res = evaluate(model, tk, tasks=["passkey_512"], config=cfg, limit=2, batch_size=2, progress=False,
                   max_length=4096)
    assert res["passkey_512"]["n"] == 2 and res["passkey_512"]["achieved_token_layer_cut"] > 0


def test_calibration_rule():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bv2", BENCH / "build_benchmarks_v2.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    lv = lambda n, *a: {"items": n, "accuracy": {f"m{i}": x for i, x in enumerate(a)}}
    assert b.choose_level({"easy": lv(1000, 0.9, 0.8), "mid": lv(1000, 0.6, 0.4), "hard": lv(1000, 0.3, 0.2)}) == ("mid", True)
    assert b.choose_level({"a": lv(1000, 0.31, 0.84), "b": lv(1000, 0.5, 0.7)}) == ("b", True)
    assert b.choose_level({"a": lv(1000, 0.95), "b": lv(1000, 0.9)}) == ("b", False)
    assert b.choose_level({"a": lv(999, 0.55), "b": lv(1000, 0.2)}) == ("b", False)   # too few items
    with pytest.raises(ValueError, match="no level"):
        b.choose_level({"a": lv(10, 0.5)})


def _builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bv2", BENCH / "build_benchmarks_v2.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    return b


def test_calibration_interval_rule():
    b = _builder()
    lo, hi = b.wilson(35, 100)
    assert 0.26 < lo < 0.27 and 0.44 < hi < 0.45
    iv = lambda n, **m: {"items": n, "accuracy": {k: v[0] for k, v in m.items()},
                         "interval95": {k: list(v[1:]) for k, v in m.items()}}
    # estimate in range but the interval reaches below 0.30: not in range; a level whose interval is inside wins
    assert b.choose_level({"a": iv(1000, m=(0.35, 0.26, 0.45)), "b": iv(1000, m=(0.40, 0.37, 0.43))}) == ("b", True)
    assert b.choose_level({"a": iv(1000, m=(0.35, 0.26, 0.45))}) == ("a", False)
    assert b.step_direction(iv(1000, m=(0.35, 0.26, 0.45))) == -1
    assert b.step_direction(iv(1000, m=(0.80, 0.77, 0.86), m2=(0.5, 0.45, 0.55))) == 1
    assert b.step_direction(iv(1000, m=(0.50, 0.45, 0.55))) == 0


def test_calibration_scores_the_file_prefix(monkeypatch):
    """calibrate() scores the first `sample` items of each level's build (what the evaluator reads with
    limit=sample), steps to easier levels until the 95% interval clears 0.30, and picks that level."""
    b = _builder()
    # per level: accuracy of the first 300 items, of the rest (a random sample would see mostly the rest)
    acc = {"repeat_bigram": (0.45, 0.6), "repeat2_recent": (0.32, 0.6), "repeat2_short": (0.22, 0.6)}
    scored = []

    def build_short(name, docs, tok, level, seed):
        head, rest = acc.get(level, (0.1, 0.1))
        return [{"id": i, "ok": int(i < 300 and i % 100 < head * 100 or i >= 300 and i % 100 < rest * 100)}
                for i in range(1000)]

    def short_correct(model, tokenizer, name, items, batch_size=16):
        scored.append([it["id"] for it in items])
        return [it["ok"] for it in items]

    monkeypatch.setattr(b, "build_short", build_short)
    monkeypatch.setattr(b, "short_correct", short_correct)
    monkeypatch.setattr("utrc_lib.hosts.models.load_model", lambda m: (None, None))
    out = b.calibrate(["m1", "m2"], [], None, 1234, 300, {"cloze_v2": "repeat2_short"}, tasks=["cloze_v2"])
    assert list(out) == ["cloze_v2"]
    assert all(ids == list(range(300)) for ids in scored)
    lv = out["cloze_v2"]["levels"]
    assert list(lv) == ["repeat2_short", "repeat2_recent", "repeat_bigram"]
    assert lv["repeat2_recent"]["accuracy"]["m1"] == pytest.approx(0.32)
    assert lv["repeat2_recent"]["interval95"]["m1"][0] < 0.30           # in range by estimate, not by interval
    assert out["cloze_v2"]["chosen"] == "repeat_bigram" and out["cloze_v2"]["in_range"]
    # a record of the same subset / models / sample is reused; an old random-sample record is not
    scored.clear()
    again = b.calibrate(["m1", "m2"], [], None, 1234, 300, {"cloze_v2": "repeat2_short"}, tasks=["cloze_v2"],
                        known={"cloze_v2": out["cloze_v2"]})
    assert scored == [] and again["cloze_v2"]["chosen"] == "repeat_bigram"
    old = {"cloze_v2": {"levels": {"repeat2_short": {"items": None, "sample": 300, "accuracy": {"m1": 0.5, "m2": 0.5}}}}}
    b.calibrate(["m1", "m2"], [], None, 1234, 300, {"cloze_v2": "repeat2_short"}, tasks=["cloze_v2"], known=old)
    assert scored and scored[0] == list(range(300))


def test_calibration_scores_as_the_evaluator(tiny):
    """The builder's short_correct and the evaluator agree item by item on the built short files
    (cloze greedy match, choice4 acc_norm, choice2 acc)."""
    from utrc_study.eval.scorer import evaluate
    from utrc_study.eval.suite import load_task

    b = _builder()
    model, tk = tiny
    res = evaluate(model, tk, tasks=SHORT, limit=6, batch_size=6, progress=False, items=True)
    for t in SHORT:
        field = "correct_norm" if t == "choice4_v2" else "correct"
        assert b.short_correct(model, tk, t, load_task(t, 6)) == [int(x) for x in res["items"][t][field]], t

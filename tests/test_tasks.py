"""The offline benchmark suite: files, fields, counts, manifest, loader."""
import hashlib
import json
import re
from pathlib import Path

import pytest

from utrc_study.eval import suite as tasks

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "data" / "benchmarks"
MIN_ITEMS = {"cloze": 500, "choice4": 500, "choice2": 500, "ppl": 200}


def test_available_and_unknown():
    assert tasks.available_tasks() == ["cloze", "choice4", "choice2", "ppl"]
    with pytest.raises(ValueError, match="unknown task 'nope'.*cloze"):
        tasks.load_task("nope")


@pytest.mark.parametrize("name", ["cloze", "choice4", "choice2", "ppl"])
def test_files_counts_ids(name):
    path = BENCH / f"{name}.jsonl"
    assert path.stat().st_size < 2_000_000
    items = tasks.load_task(name)
    assert len(items) >= MIN_ITEMS[name]
    assert len({it["id"] for it in items}) == len(items)
    assert tasks.load_task(name, limit=7) == items[:7]


def test_manifest_matches_files():
    manifest = json.loads((BENCH / "manifest.json").read_text())
    for name, entry in manifest["tasks"].items():
        data = (BENCH / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert data.count(b"\n") == entry["count"]


def test_item_fields():
    for it in tasks.load_task("cloze"):
        word = it["target"][1:]
        assert it["target"].startswith(" ") and word.isalpha() and len(word) >= 4
        assert re.search(r"\b" + word + r"\b", it["context"])
        assert not it["context"][-1].isspace()
    for it in tasks.load_task("choice4"):
        assert len(it["endings"]) == 4 and len(set(it["endings"])) == 4 and 0 <= it["label"] < 4
        true = len(it["endings"][it["label"]])
        assert all(0.8 * true - 1 <= len(e) <= 1.2 * true + 1 for e in it["endings"])
    for it in tasks.load_task("choice2"):
        assert len(it["options"]) == 2 and it["label"] in (0, 1)
        assert it["options"][it["label"]].startswith(it["word"])
        assert it["options"][1 - it["label"]].startswith(it["substitute"])


def test_ppl_split_survives_tokenisation():
    from transformers import AutoTokenizer

    from utrc_study.eval.scorer import encode_pair

    tok = AutoTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer"))
    for it in tasks.load_task("ppl", limit=25):
        ctx, cont = encode_pair(tok, it["context"], it["continuation"])
        assert (len(ctx), len(cont)) == (192, 64)


def test_data_dir_env(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "cloze.jsonl").write_text(
        json.dumps({"id": "x", "context": "a b c", "target": " d"}) + "\n")
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path))
    assert tasks.load_task("cloze") == [{"id": "x", "context": "a b c", "target": " d"}]
    with pytest.raises(FileNotFoundError, match="choice4"):
        tasks.load_task("choice4")


def test_builder_deterministic_on_a_subset():
    import importlib.util

    from tokenizers import Tokenizer

    spec = importlib.util.spec_from_file_location("build_benchmarks", BENCH / "build_benchmarks.py")
    bb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bb)
    corpus = ROOT / "data" / "corpus" / "work" / "test.jsonl"
    if not corpus.is_file():
        pytest.skip("corpus test split not built (data/corpus/build_corpus.py)")
    docs = bb.load_docs(corpus)[:12]
    tok = Tokenizer.from_file(str(ROOT / "data" / "tokenizer" / "tokenizer.json"))
    a = bb.build_cloze(docs, tok, 1234, n=20), bb.build_choice4(docs, 1234, n=20), bb.build_choice2(docs, 1234, n=20)
    b = bb.build_cloze(docs, tok, 1234, n=20), bb.build_choice4(docs, 1234, n=20), bb.build_choice2(docs, 1234, n=20)
    assert a == b and all(len(x) == 20 for x in a)

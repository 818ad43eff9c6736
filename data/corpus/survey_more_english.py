#!/usr/bin/env python3
"""How much more English the registries hold beyond corpus v2: a word count of the candidates found.

Not part of the corpus: it answers whether growing corpus v2 could reach the unique-token count the
data-repetition probe asks for (figures/train_repetition). Fetches each candidate with
build_corpus_v2's own fetch / extract (apt-get download, unpacked, nothing installed) and counts
whitespace-separated words of its English text, markup removed:
  * sword-comm-*: SWORD commentary modules (zCom / zCom4: zlib blocks listed by the .bzs / .czs index of
    12-byte records: offset, size, uncompressed size), OSIS/ThML tags removed;
  * Debian documentation: HTML / text / info files under usr/share, translations skipped.
Writes data/corpus/survey_more_english.json: per package its registry, version, sha256, licence (the
module's DistributionLicense or the first License: field of the Debian copyright file), kind, files
read, words; and the totals by kind.

Usage: .venv/bin/python data/corpus/survey_more_english.py     (apt-get update once, as root)
"""
from __future__ import annotations

import gzip
import json
import re
import struct
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_corpus_v2 as b2  # noqa: E402

OUT = HERE / "survey_more_english.json"
# name -> (Debian version seen with apt-cache, kind)
CANDIDATES = {
    "sword-comm-tdavid": ("2.1-1", "prose"),
    "sword-comm-mhcc": ("2.0-1", "prose"),
    "sword-comm-scofield": ("2.1-1", "prose"),
    "debian-reference-en": ("2.100", "technical"),
    "developers-reference": ("12.18", "technical"),
    "harden-doc": ("3.19+nmu1", "technical"),
    "gnu-standards": ("2022.03.23-0.1", "technical"),
}
TAG = re.compile(r"<[^>]+>")
DOC_FILE = re.compile(r"(\.html?|\.txt|\.info|\.info-\d+|\.page)(\.gz)?$")
TRANSLATION = re.compile(r"/(es|fr|de|it|ja|zh|pt|ru)[_/.]")


def sword_words(root: Path) -> tuple[int, int]:
    words = files = 0
    for idx_path in sorted(root.glob("usr/share/sword/modules/comments/zcom/*/*.[bc]zs")):
        idx, data = idx_path.read_bytes(), idx_path.with_suffix(idx_path.suffix[:-1] + "z").read_bytes()
        files += 1
        for i in range(0, len(idx) - len(idx) % 12, 12):
            off, size, _ = struct.unpack("<III", idx[i: i + 12])
            words += len(TAG.sub(" ", zlib.decompress(data[off: off + size]).decode("utf-8", "replace")).split())
    return words, files


def doc_words(root: Path) -> tuple[int, int]:
    words = files = 0
    for f in sorted(root.glob("usr/share/**/*")):
        if not f.is_file() or not DOC_FILE.search(f.name) or TRANSLATION.search(str(f)):
            continue
        b = f.read_bytes()
        words += len(TAG.sub(" ", (gzip.decompress(b) if f.suffix == ".gz" else b).decode("utf-8", "replace")).split())
        files += 1
    return words, files


def licence(name: str, root: Path) -> str:
    for conf in root.glob("usr/share/sword/mods.d/*.conf"):
        m = re.search(r"^DistributionLicense=(.+)$", conf.read_text(errors="replace"), re.M)
        if m:
            return m.group(1).strip()
    cp = root / "usr/share/doc" / name / "copyright"
    m = re.search(r"^License:\s*(.+)$", cp.read_text(errors="replace"), re.M) if cp.exists() else None
    return m.group(1).strip() if m else "see usr/share/doc/<package>/copyright"


def main() -> dict:
    rows = {}
    for name, (version, kind) in CANDIDATES.items():
        b2.PACKAGES.setdefault(name, ("debian", version, ""))   # this process only: fetch() reads the table
        archive, got = b2.fetch(name, unpinned=False)
        root = b2.extract(name, archive)
        words, files = (sword_words if name.startswith("sword-") else doc_words)(root)
        rows[name] = {"registry": "debian", "version": got, "file": archive.name, "sha256": b2.sha256(archive),
                      "licence": licence(name, root), "kind": kind, "files_read": files, "words": words}
        print(f"{name:22s} {got:16s} {kind:9s} {files:5d} files {words / 1e6:6.2f}M words", flush=True)
    by_kind = {k: sum(r["words"] for r in rows.values() if r["kind"] == k) for k in ("prose", "technical")}
    result = {"what": __doc__.split("\n")[0], "packages": rows, "words_by_kind": by_kind,
              "words_total": sum(by_kind.values()),
              "note": "words, not v2 tokens (corpus v2 averages 3.56 characters per token); "
                      "fortunes* are reserved and not surveyed"}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"total {result['words_total'] / 1e6:.2f}M words {by_kind} -> {OUT}")
    return result


if __name__ == "__main__":
    main()

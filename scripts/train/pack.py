#!/usr/bin/env python3
"""Tokenize the v2 corpus splits for the GPU machine: compressed uint16 parts + a manifest.

Reads  data/corpus/work_v2/{train,validation,test}.jsonl (build_corpus_v2.py build) and a tokenizer
       directory (default data/tokenizer_v2).
Writes .train/tokens/ (gitignored):
         {split}.tokens.xz.NN   one xz stream per split (uint16 little-endian, documents in file order,
                                each preceded by <|endoftext|>, the stream closed by one), cut into
                                parts of at most --part-mib MiB
         sources.npz            per split: doc_start (int64 token offsets), doc_source (uint8 index)
         manifest.json          sha256 and size of every part, per split and per source: documents,
                                tokens, UTF-8 bytes of the text; the tokenizer's sha256
       (the tokenizer itself is not copied: data/tokenizer_v2 is committed and travels with the tree;
       its sha256 is recorded and train_small.py checks it)

Usage: .venv/bin/python scripts/train/pack.py [--splits train validation test] [--out .train]
       [--tokenizer data/tokenizer_v2] [--work data/corpus/work_v2] [--part-mib 15]
The GPU side reads it back with ``load_packed`` (scripts/train/packing.py), which checks every sha256.
"""
from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from packing import EOT, file_sha256, write_parts  # noqa: E402


def read_docs(work: Path, split: str) -> list[dict]:
    p = work / f"{split}.jsonl"
    if not p.exists():
        sys.exit(f"pack: {p} is missing: run `data/corpus/build_corpus_v2.py build` first")
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", nargs="+", default=["train", "validation", "test"])
    ap.add_argument("--out", default=str(REPO / ".train"))
    ap.add_argument("--tokenizer", default=str(REPO / "data/tokenizer_v2"))
    ap.add_argument("--work", default=str(REPO / "data/corpus/work_v2"))
    ap.add_argument("--part-mib", type=float, default=15.0)
    ap.add_argument("--xz-preset", type=int, default=9)
    ap.add_argument("--max-docs", type=int, default=0, help="first N documents per split (tests)")
    a = ap.parse_args(argv)

    from tokenizers import Tokenizer
    t0 = time.time()
    tok_dir, out = Path(a.tokenizer), Path(a.out)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    if eot is None:
        sys.exit(f"pack: {tok_dir} has no {EOT}")
    if tok.get_vocab_size() > 65535:
        sys.exit("pack: vocabulary does not fit uint16")
    tdir = out / "tokens"
    if tdir.exists():
        shutil.rmtree(tdir)
    tdir.mkdir(parents=True)

    sources: list[str] = []
    man: dict = {"format": "uint16 little-endian token ids, xz (preset %d) stream cut into parts" % a.xz_preset,
                 "eot": EOT, "eot_id": eot, "vocab": tok.get_vocab_size(),
                 "tokenizer_sha256": {f: file_sha256(tok_dir / f)
                                      for f in ("tokenizer.json", "tokenizer_config.json")},
                 "splits": {}}
    meta = {}
    for split in a.splits:
        docs = read_docs(Path(a.work), split)
        if a.max_docs:
            docs = docs[: a.max_docs]
        enc = tok.encode_batch([d["text"] for d in docs], add_special_tokens=False)
        arrs, starts, srcs, pos = [], [], [], 0
        per_src: dict[str, dict] = {}
        for d, e in zip(docs, enc):
            ids = np.asarray([eot] + e.ids, dtype=np.uint16)
            if d["source"] not in sources:
                sources.append(d["source"])
            starts.append(pos)
            srcs.append(sources.index(d["source"]))
            arrs.append(ids)
            pos += ids.size
            s = per_src.setdefault(d["source"], {"documents": 0, "tokens": 0, "bytes": 0})
            s["documents"] += 1
            s["tokens"] += ids.size
            s["bytes"] += len(d["text"].encode("utf-8"))
        arrs.append(np.asarray([eot], dtype=np.uint16))
        arr = np.concatenate(arrs)
        raw = arr.astype("<u2").tobytes()
        blob = lzma.compress(raw, preset=a.xz_preset)
        parts = write_parts(blob, tdir, f"{split}.tokens.xz", int(a.part_mib * 2**20))
        meta[f"{split}_doc_start"] = np.asarray(starts, dtype=np.int64)
        meta[f"{split}_doc_source"] = np.asarray(srcs, dtype=np.uint8)
        man["splits"][split] = {"tokens": int(arr.size), "documents": len(docs),
                                "bytes": sum(s["bytes"] for s in per_src.values()),
                                "xz_bytes": len(blob), "raw_sha256": _sha(raw), "parts": parts,
                                "sources": per_src}
        print(f"{split:10s} docs {len(docs):6d}  tokens {arr.size:11,d}  xz {len(blob) / 2**20:6.2f} MiB "
              f"({len(blob) / arr.size:.3f} B/token) in {len(parts)} part(s)  [{time.time() - t0:.0f}s]", flush=True)
    man["sources"] = sources
    np.savez_compressed(tdir / "sources.npz", sources=np.asarray(sources), **meta)
    man["sources_npz_sha256"] = file_sha256(tdir / "sources.npz")
    (tdir / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"total under {out}: {total / 2**20:.2f} MiB ({total:,d} bytes)")
    man["total_bytes"] = total
    return man


def _sha(b: bytes) -> str:
    import hashlib
    return hashlib.sha256(b).hexdigest()


if __name__ == "__main__":
    main()

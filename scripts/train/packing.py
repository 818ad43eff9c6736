"""Shared helpers of the training package: parts with sha256, the packed token format.

Only the standard library and numpy, so it runs on the GPU machine and here alike.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parts(blob: bytes, folder: Path, name: str, part_bytes: int) -> list[dict]:
    """Write ``blob`` as ``name.00``, ``name.01``, ... of at most ``part_bytes``; return their records."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(0, max(len(blob), 1), part_bytes):
        piece = blob[i: i + part_bytes]
        p = folder / f"{name}.{i // part_bytes:02d}"
        p.write_bytes(piece)
        out.append({"file": p.name, "bytes": len(piece), "sha256": hashlib.sha256(piece).hexdigest()})
    return out


def join_parts(folder: Path, parts: list[dict], whole_sha256: str | None = None) -> bytes:
    """Read and check the parts written by ``write_parts``; optionally check the sha256 of the whole."""
    chunks = []
    for rec in parts:
        p = Path(folder) / rec["file"]
        if not p.exists():
            raise FileNotFoundError(f"part {p} is missing")
        b = p.read_bytes()
        if len(b) != rec["bytes"] or hashlib.sha256(b).hexdigest() != rec["sha256"]:
            raise ValueError(f"part {p} is damaged (size or sha256 differs from the manifest)")
        chunks.append(b)
    blob = b"".join(chunks)
    if whole_sha256 is not None and hashlib.sha256(blob).hexdigest() != whole_sha256:
        raise ValueError(f"joined {parts[0]['file'].rsplit('.', 1)[0]}: sha256 differs from the manifest")
    return blob


def load_packed(folder: Path | str, splits=("train", "validation", "test")) -> dict:
    """Read ``.train/tokens`` (pack.py): {'manifest', 'sources', split: {'tokens', 'doc_start', 'doc_source'}}."""
    folder = Path(folder)
    man = json.loads((folder / "manifest.json").read_text())
    if file_sha256(folder / "sources.npz") != man["sources_npz_sha256"]:
        raise ValueError("sources.npz: sha256 differs from the manifest")
    meta = np.load(folder / "sources.npz")
    out: dict = {"manifest": man, "sources": [str(s) for s in meta["sources"]]}
    for split in splits:
        if split not in man["splits"]:
            continue
        rec = man["splits"][split]
        raw = lzma.decompress(join_parts(folder, rec["parts"]))
        if hashlib.sha256(raw).hexdigest() != rec["raw_sha256"]:
            raise ValueError(f"{split}: decompressed tokens differ from the manifest's sha256")
        toks = np.frombuffer(raw, dtype="<u2")
        if toks.size != rec["tokens"]:
            raise ValueError(f"{split}: {toks.size} tokens, manifest says {rec['tokens']}")
        out[split] = {"tokens": toks, "doc_start": meta[f"{split}_doc_start"],
                      "doc_source": meta[f"{split}_doc_source"]}
    return out


def source_streams(split: dict, sources: list[str]) -> dict[str, np.ndarray]:
    """Per source, its documents' tokens joined in file order (each doc led by <|endoftext|>, one closing it)."""
    toks, starts, srcs = split["tokens"], split["doc_start"], split["doc_source"]
    ends = np.append(starts[1:], toks.size - 1)
    eot = toks[-1:]
    out = {}
    for i, name in enumerate(sources):
        idx = np.nonzero(srcs == i)[0]
        if idx.size:
            out[name] = np.concatenate([toks[starts[j]: ends[j]] for j in idx] + [eot])
    return out


def doc_subset(split: dict, frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The documents of ``split`` kept at fraction ``frac`` and their token stream.

    Document j is kept when u_j < frac, u_j drawn uniform in [0, 1) per document from ``seed``, so the
    subsets are nested (a smaller fraction keeps a subset of a larger one's documents) and every source
    keeps about ``frac`` of its documents. Returns (kept document indices, tokens: each kept document
    with its leading <|endoftext|>, in file order, the stream closed by one <|endoftext|>).
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"doc_subset: frac must be in (0, 1], got {frac}")
    toks, starts = split["tokens"], split["doc_start"]
    keep = np.nonzero(np.random.default_rng(seed).random(starts.size) < frac)[0]
    if keep.size == 0:
        raise ValueError(f"doc_subset: frac {frac} keeps none of the {starts.size} documents")
    ends = np.append(starts[1:], toks.size - 1)
    return keep, np.concatenate([toks[starts[j]: ends[j]] for j in keep] + [toks[-1:]])


STAGE_KEYS = ("steps", "tokens_seen", "train_seconds", "tokens_per_second", "kernel_warmup_seconds", "hardware",
              "best_step", "best_val_loss_in_training")


def stages_of(log: dict) -> list[dict]:
    """The training stages of a train_small.py log: its "stages", or for a log written before stages
    existed (one call from random init) that call's record built from the log's top level."""
    if log.get("stages"):
        return log["stages"]
    if not log:
        return []
    return [{**{k: log.get(k) for k in STAGE_KEYS}, "lr": log["args"]["lr"], "warmup": log["args"]["warmup"],
             "min_lr_frac": log["args"]["min_lr_frac"], "init_from": None}]

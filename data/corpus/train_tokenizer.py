#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer (8192 entries) and tokenize the corpus splits.

Reads  data/corpus/work/{train,validation,test}.jsonl  (made by build_corpus.py)
Writes data/tokenizer/                       transformers PreTrainedTokenizerFast (save_pretrained)
       data/corpus/tokens/{split}.bin        uint16, documents joined by <|endoftext|>
       data/corpus/tokens/tokens.npz         np.savez_compressed(train=, validation=, test=)

Each split array starts with <|endoftext|> and every document is followed by it,
so a document is always preceded by the token the model sees as "start of text".

Usage: .venv/bin/python data/corpus/train_tokenizer.py [--vocab 8192]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from corpus_common import EOT, SPLITS, read_split, save_tokenizer, train_bpe  # noqa: E402

WORK = HERE / "work"
TOKENS = HERE / "tokens"
TOKENIZER_DIR = REPO / "data" / "tokenizer"


def read_docs(split: str) -> list[str]:
    def missing(path):
        sys.exit(f"train_tokenizer: {path} is missing: run data/corpus/build_corpus.py first")
    return [d["text"] for d in read_split(WORK, split, missing)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()

    docs = {s: read_docs(s) for s in SPLITS}
    tok = train_bpe(docs["train"], args.vocab)
    fast = save_tokenizer(tok, TOKENIZER_DIR)
    eot_id = tok.token_to_id(EOT)
    print(f"tokenizer: {len(fast)} entries, {EOT} = {eot_id}, saved to {TOKENIZER_DIR.relative_to(REPO)}")
    assert len(fast) <= 65535

    TOKENS.mkdir(parents=True, exist_ok=True)
    arrays = {}
    n_chars = {}
    for split in SPLITS:
        enc = tok.encode_batch(docs[split], add_special_tokens=False)
        parts = [np.array([eot_id], dtype=np.uint16)]
        for e in enc:
            parts.append(np.asarray(e.ids, dtype=np.uint16))
            parts.append(np.array([eot_id], dtype=np.uint16))
        arr = np.concatenate(parts)
        arr.tofile(TOKENS / f"{split}.bin")
        arrays[split] = arr
        n_chars[split] = sum(len(t) for t in docs[split])
        print(f"{split:10s} docs {len(docs[split]):6d}  chars {n_chars[split]:11,d}  tokens {arr.size:11,d}"
              f"  ({n_chars[split] / max(arr.size, 1):.2f} chars/token)")
    npz = TOKENS / "tokens.npz"
    np.savez_compressed(npz, **arrays)
    size = npz.stat().st_size
    print(f"total tokens {sum(a.size for a in arrays.values()):,d}; {npz.relative_to(REPO)} = "
          f"{size / 2**20:.2f} MiB")
    if size >= 20 * 10**6:
        sys.exit(f"train_tokenizer: tokens.npz is {size} bytes, over the 20 MB limit")


if __name__ == "__main__":
    main()

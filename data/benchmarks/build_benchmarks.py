#!/usr/bin/env python
"""Build the offline benchmark suite (cloze, choice4, choice2, ppl) from the corpus test split.

Deterministic: documents are read in id order, every random choice comes from `random.Random`
seeded with a fixed string per task, and the output is byte-identical across runs. Items are text;
tokenisation happens at evaluation time (the tokenizer is used here only to measure lengths and,
for `ppl`, to place the 192 / 64 token split so that it survives re-tokenisation).

Usage:
    .venv/bin/python data/benchmarks/build_benchmarks.py [--corpus data/corpus/work/test.jsonl]
        [--tokenizer data/tokenizer/tokenizer.json] [--out data/benchmarks] [--seed 1234]

See README.md in this folder for what each task measures. The text helpers, the short tasks' item
makers and the file / manifest writing are data/benchmarks_common.py's, shared with suite v2; this
file is suite v1's config (sizes, seeds, rules) and its `ppl` task.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "data"))
from benchmarks_common import (WordTables, add_suite_args, choice2_items, choice4_items, cloze_items,  # noqa: E402
                               load_docs, numbered, repo_path, round_robin, same_source_distractors, sha256_file,
                               write_task)

VERSION = "utrc-benchmarks-v1"

N_CLOZE = 1000
N_CHOICE4 = 1000
N_CHOICE2 = 1000
N_PPL = 200
PPL_WINDOW, PPL_SCORED = 256, 64
CLOZE_MIN_TOK, CLOZE_MAX_TOK = 60, 150


# -- tasks (the item makers are benchmarks_common's, shared with suite v2) ---------------------------------
def build_cloze(docs, tok, seed: int, n: int = N_CLOZE, cap: int = 20) -> list[dict]:
    """LAMBADA style: passage of 60-150 tokens whose final word (the target) occurs earlier in it."""
    out = cloze_items(docs, tok, random.Random(f"{seed}-cloze"), n, tokens=(CLOZE_MIN_TOK, CLOZE_MAX_TOK),
                      chars=(150, 1200), accept=lambda context, word: bool(re.search(r"\b" + word + r"\b", context)),
                      cap=cap)
    return numbered(out, "cloze")


def build_choice4(docs, seed: int, n: int = N_CHOICE4, cap: int = 20) -> list[dict]:
    """HellaSwag style: 1-3 sentences, true next sentence vs 3 length-matched ones from other documents."""
    return numbered(choice4_items(docs, random.Random(f"{seed}-choice4"), n, same_source_distractors, cap), "choice4")


def build_choice2(docs, seed: int, n: int = N_CHOICE2, cap: int = 20) -> list[dict]:
    """Two options: a sentence continued with its original word vs a frequency-matched substitute
    of the same suffix class; both options carry the same rest of the sentence."""
    rng = random.Random(f"{seed}-choice2")
    tables = WordTables(docs)

    def substitute(word: str, avoid: str, doc_words: list):
        return tables.frequency_matched(
            word, lambda w: w != word and not re.search(r"\b" + w + r"\b", avoid.lower()), rng)

    return numbered(choice2_items(docs, rng, n, tables, substitute, cap=cap), "choice2")


def build_ppl(docs, tok, seed: int, n: int = N_PPL, window: int = PPL_WINDOW, scored: int = PPL_SCORED,
              cap: int = 8) -> list[dict]:
    """Windows of 256 tokens: context = first 192 tokens, continuation (scored) = last 64, as text
    whose re-tokenisation reproduces the split exactly (checked here)."""
    rng = random.Random(f"{seed}-ppl")
    nctx = window - scored
    per_doc = []
    for d in docs:
        ids = tok.encode(d["text"]).ids
        slots = list(range(0, len(ids) - window - 16, window))
        rng.shuffle(slots)
        items = []
        for s0 in slots:
            if len(items) >= cap:
                break
            for s in range(s0, s0 + 16):
                ctx = tok.decode(ids[s:s + nctx])
                cont = tok.decode(ids[s + nctx:s + window])
                if not ctx or ctx[-1].isspace() or ctx[0].isspace() or "\ufffd" in ctx + cont:
                    continue
                if tok.encode(ctx).ids != ids[s:s + nctx] or tok.encode(ctx + cont).ids != ids[s:s + window]:
                    continue
                items.append({"context": ctx, "continuation": cont, "n_context_tokens": nctx,
                              "n_continuation_tokens": scored, "source": d["source"], "doc_id": d["id"]})
                break
        per_doc.append(items)
    out = round_robin(per_doc, n, rng)
    return numbered(out, "ppl")


# -- main --------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_args(ap, "data/corpus/work/test.jsonl", "data/tokenizer/tokenizer.json", HERE)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.tokenizer))
    docs = load_docs(args.corpus)
    tasks = {
        "cloze": build_cloze(docs, tok, args.seed),
        "choice4": build_choice4(docs, args.seed),
        "choice2": build_choice2(docs, args.seed),
        "ppl": build_ppl(docs, tok, args.seed),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"version": VERSION, "seed": args.seed, "corpus": repo_path(args.corpus),
                "corpus_sha256": sha256_file(args.corpus), "tokenizer_sha256": sha256_file(args.tokenizer),
                "tasks": {}}
    for name, items in tasks.items():
        manifest["tasks"][name] = write_task(args.out, name, items, compact=False)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

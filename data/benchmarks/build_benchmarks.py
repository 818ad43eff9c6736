#!/usr/bin/env python
"""Build the offline benchmark suite (cloze, choice4, choice2, ppl) from the corpus test split.

Deterministic: documents are read in id order, every random choice comes from `random.Random`
seeded with a fixed string per task, and the output is byte-identical across runs. Items are text;
tokenisation happens at evaluation time (the tokenizer is used here only to measure lengths and,
for `ppl`, to place the 192 / 64 token split so that it survives re-tokenisation).

Usage:
    .venv/bin/python data/benchmarks/build_benchmarks.py [--corpus data/corpus/work/test.jsonl]
        [--tokenizer data/tokenizer/tokenizer.json] [--out data/benchmarks] [--seed 1234]

See README.md in this folder for what each task measures.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import hashlib
import json
import math
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VERSION = "utrc-benchmarks-v1"

N_CLOZE = 1000
N_CHOICE4 = 1000
N_CHOICE2 = 1000
N_PPL = 200
PPL_WINDOW, PPL_SCORED = 256, 64
CLOZE_MIN_TOK, CLOZE_MAX_TOK = 60, 150

STOPWORDS = frozenset("""
a about above after again against all also although always am among an and another any anyone
anything are around as at be became because become been before being below between both but by
can cannot could did do does doing done down during each either else enough even ever every few
for from further had has have having he her here hers herself him himself his how however i if in
into is it its itself just least less like made make many may me might mine more most much must my
myself neither never no nor not now of off often on once one only onto or other others otherwise
our ours ourselves out over own per perhaps rather same shall she should since so some such than
that the their theirs them themselves then there therefore these they this those though through
thus to too toward towards under unless until up upon us used using very via was we were what
whatever when whenever where whereas wherever whether which while who whom whose why will with
within without would yet you your yours yourself yourselves unto thee thou thy thine hath doth
shalt said says also each into well still thing things first last next
""".split())

SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z])")
WORD = re.compile(r"[A-Za-z]+")


# -- helpers ---------------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(docs, key=lambda d: d["id"])


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENT_SPLIT.split(paragraph) if s.strip()]


def sentence_spans(text: str) -> list[int]:
    """Character offsets where a paragraph or a sentence starts."""
    starts = []
    for m in re.finditer(r"[^\n](?:.|\n(?!\n))*", text):
        starts.append(m.start())
        for s in SENT_SPLIT.finditer(m.group(0)):
            starts.append(m.start() + s.end())
    return sorted(set(starts))


def good_sentence(s: str, lo: int, hi: int) -> bool:
    return (lo <= len(s) <= hi and "\n" not in s and s[0].isupper() and s[-1] in ".!?"
            and len(WORD.findall(s)) >= 4)


def round_robin(per_doc: list[list[dict]], n: int, rng: random.Random) -> list[dict]:
    """Take one item per document in turn (document order shuffled) until n items."""
    order = list(range(len(per_doc)))
    rng.shuffle(order)
    out, depth = [], 0
    while len(out) < n:
        added = False
        for i in order:
            if depth < len(per_doc[i]):
                out.append(per_doc[i][depth])
                added = True
                if len(out) == n:
                    break
        if not added:
            break
        depth += 1
    return out


def suffix_class(word: str) -> str:
    for suf in ("ing", "ed", "ly", "tion", "ness", "ment", "able", "ous", "ful", "er", "est", "s"):
        if word.endswith(suf):
            return suf
    return "-"


# -- tasks -------------------------------------------------------------------------------------------
def build_cloze(docs, tok, seed: int, n: int = N_CLOZE, cap: int = 20) -> list[dict]:
    """LAMBADA style: passage of 60-150 tokens whose final word (the target) occurs earlier in it."""
    rng = random.Random(f"{seed}-cloze")
    per_doc = []
    for d in docs:
        text = d["text"]
        starts = sentence_spans(text)
        cands = [m for m in re.finditer(r"(?<= )([A-Za-z]{4,})(?=[.,;:!?])", text)]
        rng.shuffle(cands)
        items, used = [], []
        for m in cands:
            if len(items) >= cap:
                break
            word, p = m.group(1), m.start()  # context ends just before the space preceding the word
            if word.lower() in STOPWORDS:
                continue
            # candidate passage starts: sentence starts 200..1200 chars before the target
            opts = [s for s in starts if 150 <= p - s <= 1200]
            if not opts:
                continue
            rng.shuffle(opts)
            for s in opts[:4]:
                context = text[s:p - 1]
                if not re.search(r"\b" + word + r"\b", context):
                    continue
                ntok = len(tok.encode(context).ids)
                if not CLOZE_MIN_TOK <= ntok <= CLOZE_MAX_TOK:
                    continue
                if any(s < e and p > b for b, e in used):  # disjoint passages within a document
                    break
                used.append((s, p))
                items.append({"context": context, "target": " " + word, "n_context_tokens": ntok,
                              "source": d["source"], "doc_id": d["id"]})
                break
        per_doc.append(items)
    out = round_robin(per_doc, n, rng)
    for i, it in enumerate(out):
        it["id"] = f"cloze-{i:04d}"
    return [{"id": it.pop("id"), **it} for it in out]


def build_choice4(docs, seed: int, n: int = N_CHOICE4, cap: int = 20) -> list[dict]:
    """HellaSwag style: 1-3 sentences, true next sentence vs 3 length-matched ones from other documents."""
    rng = random.Random(f"{seed}-choice4")
    pool = []  # (len, sentence, source, doc index)
    doc_sents = []
    for di, d in enumerate(docs):
        paras = [sentences(p) for p in d["text"].split("\n\n")]
        doc_sents.append(paras)
        for ss in paras:
            for s in ss:
                if good_sentence(s, 25, 320):
                    pool.append((len(s), s, d["source"], di))
    pool.sort()
    lengths = [p[0] for p in pool]
    per_doc = []
    for di, d in enumerate(docs):
        cands = [(pi, i) for pi, ss in enumerate(doc_sents[di]) for i in range(1, len(ss))]
        rng.shuffle(cands)
        items, used = [], set()
        for pi, i in cands:
            if len(items) >= cap:
                break
            ss = doc_sents[di][pi]
            ending = ss[i]
            if not good_sentence(ending, 30, 250) or (pi, i) in used:
                continue
            k = rng.randint(1, min(3, i))
            while k < min(3, i) and len(" ".join(ss[i - k:i])) < 100:
                k += 1
            context = " ".join(ss[i - k:i])
            if not 100 <= len(context) <= 700 or "\n" in context:
                continue
            L = len(ending)
            lo = bisect.bisect_left(lengths, math.ceil(0.8 * L))
            hi = bisect.bisect_right(lengths, math.floor(1.2 * L))
            window = [p for p in pool[lo:hi] if p[3] != di and p[1] != ending and p[1] not in context]
            same = [p for p in window if p[2] == d["source"]]
            src = same if len({p[1] for p in same}) >= 3 else window
            texts = sorted({p[1] for p in src})
            if len(texts) < 3:
                continue
            distractors = rng.sample(texts, 3)
            endings = distractors + [ending]
            rng.shuffle(endings)
            used.update((pi, j) for j in range(i - k, i + 1))
            items.append({"context": context, "endings": endings, "label": endings.index(ending),
                          "source": d["source"], "doc_id": d["id"]})
        per_doc.append(items)
    out = round_robin(per_doc, n, rng)
    return [{"id": f"choice4-{i:04d}", **it} for i, it in enumerate(out)]


def build_choice2(docs, seed: int, n: int = N_CHOICE2, cap: int = 20) -> list[dict]:
    """Two options: a sentence continued with its original word vs a frequency-matched substitute
    of the same suffix class; both options carry the same rest of the sentence."""
    rng = random.Random(f"{seed}-choice2")
    freq = collections.Counter(w.lower() for d in docs for w in WORD.findall(d["text"]))
    by_class = collections.defaultdict(list)
    for w, c in freq.items():
        if len(w) >= 4 and c >= 3 and w not in STOPWORDS:
            by_class[suffix_class(w)].append((c, w))
    for v in by_class.values():
        v.sort()

    def substitute(word: str, avoid: str):
        cls = by_class[suffix_class(word)]
        f = freq[word]
        counts = [c for c, _ in cls]
        for factor in (2.0, 4.0, 8.0):
            lo = bisect.bisect_left(counts, f / factor)
            hi = bisect.bisect_right(counts, f * factor)
            opts = [w for _, w in cls[lo:hi] if w != word and not re.search(r"\b" + w + r"\b", avoid.lower())]
            if len(opts) >= 5:
                return rng.choice(sorted(opts))
        return None

    per_doc = []
    for d in docs:
        text = d["text"]
        starts = sentence_spans(text)
        ends = starts[1:] + [len(text)]
        cands = [j for j in range(len(starts)) if good_sentence(text[starts[j]:ends[j]].rstrip(), 40, 260)]
        rng.shuffle(cands)
        items, seen = [], set()
        for j in cands:
            if len(items) >= cap:
                break
            s0 = starts[j]
            s = text[s0:ends[j]].rstrip()
            if s in seen:
                continue
            words = list(re.finditer(r"(?<= )([a-z]{4,})(?= )", s))
            words = [m for m in words if m.group(1) not in STOPWORDS and freq[m.group(1)] >= 3
                     and len(WORD.findall(s[:m.start()])) >= 3 and len(WORD.findall(s[m.end():])) >= 2]
            opts = [st for st in starts[:j] if 100 <= s0 - st <= 600]
            if not words or not opts:
                continue
            m = rng.choice(words)
            word = m.group(1)
            prefix = text[rng.choice(opts):s0 + m.start() - 1]
            rest = s[m.end():]
            sub = substitute(word, prefix + " " + s)
            if sub is None:
                continue
            options = [word + rest, sub + rest]
            order = [0, 1]
            rng.shuffle(order)
            seen.add(s)
            items.append({"context": prefix, "options": [options[o] for o in order], "label": order.index(0),
                          "word": word, "substitute": sub, "source": d["source"], "doc_id": d["id"]})
        per_doc.append(items)
    out = round_robin(per_doc, n, rng)
    return [{"id": f"choice2-{i:04d}", **it} for i, it in enumerate(out)]


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
    return [{"id": f"ppl-{i:04d}", **it} for i, it in enumerate(out)]


# -- main --------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, items: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False, sort_keys=False) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "data/corpus/work/test.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "data/tokenizer/tokenizer.json")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--seed", type=int, default=1234)
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
    manifest = {"version": VERSION, "seed": args.seed, "corpus": str(args.corpus.relative_to(ROOT))
                if args.corpus.is_relative_to(ROOT) else str(args.corpus),
                "corpus_sha256": sha256_file(args.corpus), "tokenizer_sha256": sha256_file(args.tokenizer),
                "tasks": {}}
    for name, items in tasks.items():
        path = args.out / f"{name}.jsonl"
        write_jsonl(path, items)
        manifest["tasks"][name] = {
            "file": path.name, "count": len(items), "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "sources": dict(sorted(collections.Counter(it["source"] for it in items).items())),
            "documents": len({it["doc_id"] for it in items}),
        }
        print(f"{name}: {len(items)} items, {path.stat().st_size / 1e6:.2f} MB")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

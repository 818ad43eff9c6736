"""The benchmark pipeline shared by suite v1 (benchmarks/build_benchmarks.py) and v2
(benchmarks_v2/build_benchmarks_v2.py).

Both read a corpus test split in document-id order, draw every random choice from a `random.Random`
seeded with a fixed string per task, pick items round-robin over the documents (at most `cap` a
document), and write one JSONL file a task plus a manifest with the sha256 of every file. The short
tasks of both suites come from the same item makers, which take what a suite or a difficulty level
changes as arguments: `cloze_items` (the passage window and the repetition test), `choice4_items`
(where the distractors come from) and `choice2_items` (the substitute word and the options' form).
A suite script is its family config (version, paths, task list, levels) and its own tasks (v1's
`ppl`, v2's long tasks and calibration).
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
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

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
CLOZE_TARGET = re.compile(r"(?<= )([A-Za-z]{4,})(?=[.,;:!?])")


# -- text helpers ------------------------------------------------------------------------------------
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


def numbered(items: list[dict], prefix: str, **extra) -> list[dict]:
    """Items with ids ``prefix-0000``, ``prefix-0001``, ... first (and ``extra`` keys last)."""
    return [{"id": f"{prefix}-{i:04d}", **it, **extra} for i, it in enumerate(items)]


# -- short tasks ---------------------------------------------------------------------------------------
def cloze_items(docs, tok, rng: random.Random, n: int, *, tokens: tuple[int, int], chars: tuple[float, float],
                accept: Callable[[str, str], bool], cap: int = 20) -> list[dict]:
    """LAMBADA style: a passage starting at a sentence start ``chars`` characters before a target word
    (alphabetic, >= 4 letters, before punctuation, not a stopword) and of ``tokens`` tokens, the context
    stopping before the space that precedes the word; ``accept(context, word)`` is the suite's or level's
    repetition test. Passages are disjoint within a document."""
    lo_tok, hi_tok = tokens
    per_doc = []
    for d in docs:
        text = d["text"]
        starts = sentence_spans(text)
        cands = list(CLOZE_TARGET.finditer(text))
        rng.shuffle(cands)
        items, used = [], []
        for m in cands:
            if len(items) >= cap:
                break
            word, p = m.group(1), m.start()  # context ends just before the space preceding the word
            if word.lower() in STOPWORDS:
                continue
            opts = [s for s in starts if chars[0] <= p - s <= chars[1]]
            if not opts:
                continue
            rng.shuffle(opts)
            for s in opts[:4]:
                context = text[s:p - 1]
                if not accept(context, word):
                    continue
                ntok = len(tok.encode(context).ids)
                if not lo_tok <= ntok <= hi_tok:
                    continue
                if any(s < e and p > b for b, e in used):  # disjoint passages within a document
                    break
                used.append((s, p))
                items.append({"context": context, "target": " " + word, "n_context_tokens": ntok,
                              "source": d["source"], "doc_id": d["id"]})
                break
        per_doc.append(items)
    return round_robin(per_doc, n, rng)


# a distractor pool entry: (length, sentence, source, document index, sentence index in the document)
Pool = tuple[int, str, str, int, int]


def choice4_items(docs, rng: random.Random, n: int, distractors: Callable[[list, dict, int, int], list],
                  cap: int = 20) -> list[dict]:
    """HellaSwag style: 1-3 sentences of a paragraph and the sentence that follows, against 3 sentences
    of length +-20 %; ``distractors(window, doc, doc index, sentence index)`` narrows the pool entries of
    that length (none equal to the ending or inside the context) to where the suite or level takes them."""
    pool: list[Pool] = []
    doc_sents = []
    for di, d in enumerate(docs):
        paras = [sentences(p) for p in d["text"].split("\n\n")]
        doc_sents.append(paras)
        k = 0
        for ss in paras:
            for s in ss:
                if good_sentence(s, 25, 320):
                    pool.append((len(s), s, d["source"], di, k))
                k += 1
    pool.sort()
    lengths = [p[0] for p in pool]
    per_doc = []
    for di, d in enumerate(docs):
        flat = {}
        k = 0
        for pi, ss in enumerate(doc_sents[di]):
            for i in range(len(ss)):
                flat[(pi, i)] = k
                k += 1
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
            window = [p for p in pool[lo:hi] if p[1] != ending and p[1] not in context]
            texts = sorted({p[1] for p in distractors(window, d, di, flat[(pi, i)])})
            if len(texts) < 3:
                continue
            endings = rng.sample(texts, 3) + [ending]
            rng.shuffle(endings)
            used.update((pi, j) for j in range(i - k, i + 1))
            items.append({"context": context, "endings": endings, "label": endings.index(ending),
                          "source": d["source"], "doc_id": d["id"]})
        per_doc.append(items)
    return round_robin(per_doc, n, rng)


def same_source_distractors(window: list, d: dict, di: int, here: int) -> list:
    """Sentences of other documents, of the same source when it offers at least 3 (suite v1's rule)."""
    window = [p for p in window if p[3] != di]
    same = [p for p in window if p[2] == d["source"]]
    return same if len({p[1] for p in same}) >= 3 else window


class WordTables:
    """Word frequencies of a test split and its frequent content words by suffix class."""

    def __init__(self, docs):
        self.freq = collections.Counter(w.lower() for d in docs for w in WORD.findall(d["text"]))
        self.by_class = collections.defaultdict(list)
        for w, c in self.freq.items():
            if len(w) >= 4 and c >= 3 and w not in STOPWORDS and w.isascii():
                self.by_class[suffix_class(w)].append((c, w))
        for v in self.by_class.values():
            v.sort()

    def frequency_matched(self, word: str, ok: Callable[[str], bool], rng: random.Random):
        """A word of ``word``'s suffix class with a test-split frequency within x2 (x4, x8 when fewer than
        5 qualify) for which ``ok`` holds; None when there is none."""
        cls = self.by_class[suffix_class(word)]
        f = self.freq[word]
        counts = [c for c, _ in cls]
        for factor in (2.0, 4.0, 8.0):
            lo = bisect.bisect_left(counts, f / factor)
            hi = bisect.bisect_right(counts, f * factor)
            opts = [w for _, w in cls[lo:hi] if ok(w)]
            if len(opts) >= 5:
                return rng.choice(sorted(opts))
        return None


def choice2_items(docs, rng: random.Random, n: int, tables: WordTables,
                  substitute: Callable[[str, str, list], str | None], *, word_only: bool = False,
                  context_only: bool = False, cap: int = 20) -> list[dict]:
    """Two options: a sentence continued with its original word vs a substitute, both carrying the same
    rest of the sentence (``word_only``: the two words alone). ``substitute(word, avoid, doc_words)``
    picks it; ``avoid`` is the item's text (``context_only``: the context alone) and ``doc_words`` the
    document's frequent content words."""
    freq = tables.freq
    per_doc = []
    for d in docs:
        text = d["text"]
        doc_words = sorted({w for w in re.findall(r"\b[a-z]{4,}\b", text) if w not in STOPWORDS and freq[w] >= 3})
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
            words = [m for m in re.finditer(r"(?<= )([a-z]{4,})(?= )", s)
                     if m.group(1) not in STOPWORDS and freq[m.group(1)] >= 3
                     and len(WORD.findall(s[:m.start()])) >= 3 and len(WORD.findall(s[m.end():])) >= 2]
            opts = [st for st in starts[:j] if 100 <= s0 - st <= 600]
            if not words or not opts:
                continue
            m = rng.choice(words)
            word = m.group(1)
            prefix = text[rng.choice(opts):s0 + m.start() - 1]
            rest = "" if word_only else s[m.end():]
            sub = substitute(word, prefix if context_only else prefix + " " + s, doc_words)
            if sub is None:
                continue
            options = [word + rest, sub + rest]
            order = [0, 1]
            rng.shuffle(order)
            seen.add(s)
            items.append({"context": prefix, "options": [options[o] for o in order], "label": order.index(0),
                          "word": word, "substitute": sub, "source": d["source"], "doc_id": d["id"]})
        per_doc.append(items)
    return round_robin(per_doc, n, rng)


# -- files and manifest ----------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, items: list[dict], compact: bool = False) -> None:
    """One JSON object a line (``compact``: no spaces after separators, suite v2's form)."""
    seps = (",", ":") if compact else None
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False, separators=seps) + "\n")


def task_entry(path: Path, items: list[dict], **extra) -> dict:
    return {"file": path.name, "count": len(items), "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "sources": dict(sorted(collections.Counter(it["source"] for it in items).items())),
            "documents": len({it["doc_id"] for it in items}), **extra}


def write_task(out: Path, name: str, items: list[dict], *, compact: bool, label: str | None = None,
               **extra) -> dict:
    """Write ``out``/NAME.jsonl, print its size, return its manifest entry (``extra`` keys last)."""
    path = out / f"{name}.jsonl"
    write_jsonl(path, items, compact)
    print(f"{label or name}: {len(items)} items, {path.stat().st_size / 1e6:.2f} MB", flush=True)
    return task_entry(path, items, **extra)


def repo_path(p: Path) -> str:
    """``p`` relative to the repository when it lies inside it (as the manifests record paths)."""
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def add_suite_args(ap: argparse.ArgumentParser, corpus: str, tokenizer: str, out: Path) -> None:
    """The options every suite takes: its corpus test split, tokenizer, output folder and seed."""
    ap.add_argument("--corpus", type=Path, default=ROOT / corpus)
    ap.add_argument("--tokenizer", type=Path, default=ROOT / tokenizer)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--seed", type=int, default=1234)

#!/usr/bin/env python
"""Build benchmark suite v2 from the corpus v2 TEST split (short calibrated tasks + long-context tasks).

Deterministic: documents in id order, every random choice from `random.Random` seeded with a fixed
string per task (and level), byte-identical output across runs. Items are text; lengths are
measured with the v2 tokenizer (`data/tokenizer_v2`), whose sha256 the manifest records. A model
with another tokenizer (the tiny v1 models) scores the same text; its token counts differ.

Tasks (README.md in this folder):
    cloze_v2, choice4_v2, choice2_v2     short, in v1's formats, with a difficulty level each;
                                         `--calibrate MODEL [MODEL ...]` picks the level whose dense
                                         accuracy on the file's first `--sample` items (default: all
                                         1000) is in [0.30, 0.85] with its 95% interval
    lr_cloze_{512,1024,2048}             long-range cloze (target >= 256 tokens back, not in the last 64)
    passkey_{512,1024,2048}              pass key at depth 10/30/50/70/90 % of natural text, 4 candidate keys
    longppl_{1024,2048}                  64 scored tokens after 1024 / 2048 tokens of context

Long items do not repeat the text: `context_parts` / `continuation_parts` list literal strings and
[doc_id, start, end] character spans of `docs.jsonl` (the test documents used, verbatim);
`utrc_study.eval.suite.load_task` joins them into `context` / `continuation`.

The text helpers, the short tasks' item makers (the v1 rules are one level each) and the file /
manifest writing are data/benchmarks_common.py's, shared with suite v1.

Usage:
    .venv/bin/python data/benchmarks_v2/build_benchmarks_v2.py                 # build (default levels)
    .venv/bin/python data/benchmarks_v2/build_benchmarks_v2.py --calibrate data/models/small-mamba2 \
        data/models/small-mamba [--tasks cloze_v2] [--sample 1000] [--dry-run]
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import math
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VERSION = "utrc-benchmarks-v2"

sys.path.insert(0, str(ROOT / "data"))
from benchmarks_common import (CLOZE_TARGET, STOPWORDS, WordTables, add_suite_args, choice2_items,  # noqa: E402
                               choice4_items, cloze_items, load_docs, numbered, repo_path, round_robin,
                               same_source_distractors, sha256_file, suffix_class, write_jsonl,
                               write_task)

N_SHORT = 1000
N_LONG = 500
LENGTHS = (512, 1024, 2048)
PPL_LENGTHS = (1024, 2048)
PPL_SCORED = 64
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
LR_MIN_BACK, LR_CLEAR_LAST = 256, 64      # lr_cloze: an occurrence >= 256 tokens back, none in the last 64
ACC_RANGE = (0.30, 0.85)
ACC_TARGET = 0.55                         # calibration picks the in-range level closest to this
CAL_Z = 1.96                              # a level is in range when each model's 95% Wilson interval is
                                          # inside ACC_RANGE (not only the point estimate)
SUBSET = "first"                          # what calibration scores: the first --sample items of the file


def length_tolerance(L: int) -> int:
    """Long items have L - tol <= tokens <= L (v2 tokenizer); tol = L / 64 (8, 16, 32)."""
    return L // 64


# -- short tasks: one builder per task, parameterised by a difficulty level ---------------------------
# Levels are listed easiest first (by design; calibration measures them, it does not assume the order).
LEVELS = {
    "cloze_v2": {
        "repeat_bigram": "the word before the blank followed by the target occurs earlier in a 60-150 token passage",
        "repeat2_recent": "target occurs >= 2 times earlier in a 60-150 token passage, once in its last 200 characters",
        "repeat2_short": "target occurs >= 2 times earlier in a 60-150 token passage",
        "repeat_short": "target occurs earlier in a 60-150 token passage (v1 rule)",
        "any_short": "any content word before punctuation, 60-150 token passage (no repetition required)",
        "repeat_long": "target occurs earlier in a 150-300 token passage",
    },
    "choice4_v2": {
        "other_source": "distractors: sentences of other sources (length +-20 %)",
        "same_source": "distractors: sentences of other documents of the same source (v1 rule)",
        "same_doc": "distractors: other sentences of the same document, >= 5 sentences away",
    },
    "choice2_v2": {
        "any_word": "substitute: a random frequent content word of another suffix class",
        "suffix_freq": "substitute: same suffix class, test-split frequency within x2 (v1 rule)",
        "suffix_doc": "substitute: same suffix class, a word of the same document",
        "word_only_context": "options are the words alone; substitute: same suffix class, a word of the context",
        "word_only_doc": "as suffix_doc, but the options are the two words alone (rest of the sentence dropped)",
    },
}
DEFAULT_LEVEL = {"cloze_v2": "repeat_short", "choice4_v2": "same_source", "choice2_v2": "suffix_freq"}


def build_cloze_v2(docs, tok, level: str, seed: int, n: int = N_SHORT, cap: int = 20) -> list[dict]:
    need = {"repeat_bigram": 1, "repeat2_recent": 2, "repeat2_short": 2, "repeat_short": 1, "repeat_long": 1, "any_short": 0}[level]

    def accept(context: str, word: str) -> bool:
        if len(re.findall(r"\b" + word + r"\b", context)) < need:
            return False
        if level == "repeat2_recent" and not re.search(r"\b" + word + r"\b", context[-200:]):
            return False
        if level == "repeat_bigram":
            prev = re.search(r"(\S+)$", context)
            if not prev or not re.search(r"(?<!\S)" + re.escape(prev.group(1)) + r" " + word + r"\b",
                                         context[:prev.start()]):
                return False
        return True

    lo_tok, hi_tok = (150, 300) if level == "repeat_long" else (60, 150)
    out = cloze_items(docs, tok, random.Random(f"{seed}-cloze_v2-{level}"), n, tokens=(lo_tok, hi_tok),
                      chars=(lo_tok * 2.5, hi_tok * 6), accept=accept, cap=cap)
    return numbered(out, "cloze_v2", level=level)


def build_choice4_v2(docs, level: str, seed: int, n: int = N_SHORT, cap: int = 20) -> list[dict]:
    def distractors(window: list, d: dict, di: int, here: int) -> list:
        if level == "other_source":
            return [p for p in window if p[2] != d["source"]]
        if level == "same_source":
            return same_source_distractors(window, d, di, here)
        return [p for p in window if p[3] == di and abs(p[4] - here) >= 5]   # same_doc

    out = choice4_items(docs, random.Random(f"{seed}-choice4_v2-{level}"), n, distractors, cap)
    return numbered(out, "choice4_v2", level=level)


def build_choice2_v2(docs, level: str, seed: int, n: int = N_SHORT, cap: int = 20) -> list[dict]:
    rng = random.Random(f"{seed}-choice2_v2-{level}")
    tables = WordTables(docs)
    freq = tables.freq
    frequent = sorted(w for w, c in freq.items() if c >= 20 and len(w) >= 4 and w not in STOPWORDS and w.isascii())
    other_class = {k: [w for w in frequent if suffix_class(w) != k] for k in {suffix_class(w) for w in freq}}

    def substitute(word: str, avoid: str, doc_words: list):
        present = set(re.findall(r"[a-z]+", avoid.lower()))   # the substitute must not occur in the item
        ok = lambda w: w != word and w not in present
        if level == "any_word":
            opts = other_class[suffix_class(word)]
            for _ in range(50):
                w = rng.choice(opts)
                if ok(w):
                    return w
            return None
        if level in ("suffix_doc", "word_only_doc"):
            opts = [w for w in doc_words if suffix_class(w) == suffix_class(word) and ok(w)]
            return rng.choice(opts) if len(opts) >= 3 else None
        if level == "word_only_context":   # a word the context itself uses (so copying does not decide)
            opts = sorted({w for w in re.findall(r"\b[a-z]{4,}\b", avoid) if w != word and w not in STOPWORDS
                           and suffix_class(w) == suffix_class(word)})
            return rng.choice(opts) if opts else None
        return tables.frequency_matched(word, ok, rng)

    out = choice2_items(docs, rng, n, tables, substitute, word_only=level.startswith("word_only"),
                        context_only=level == "word_only_context", cap=cap)
    return numbered(out, "choice2_v2", level=level)


def build_short(name: str, docs, tok, level: str, seed: int) -> list[dict]:
    if level not in LEVELS[name]:
        raise ValueError(f"unknown level {level!r} for {name}; valid: {', '.join(LEVELS[name])}")
    if name == "cloze_v2":
        return build_cloze_v2(docs, tok, level, seed)
    if name == "choice4_v2":
        return build_choice4_v2(docs, level, seed)
    return build_choice2_v2(docs, level, seed)


# -- long tasks -------------------------------------------------------------------------------------------
class TokDoc:
    """A test document with its v2 token offsets (token index <-> character offset)."""

    def __init__(self, doc: dict, enc):
        self.id, self.source, self.text = doc["id"], doc["source"], doc["text"]
        self.ids = enc.ids
        self.starts = [o[0] for o in enc.offsets]

    def tok_at(self, char: int) -> int:
        """Index of the first token starting at or after `char`."""
        return bisect.bisect_left(self.starts, char)

    def word_start_at_or_after(self, char: int) -> int:
        """First character >= char that begins a word (follows whitespace), else char."""
        m = re.compile(r"(?<=\s)\S").search(self.text, char)
        return m.start() if m else char


def ntok(tok, text: str) -> int:
    return len(tok.encode(text).ids)


def span_back(tok, doc: TokDoc, end: int, L: int, reserve: int = 0):
    """Character start s such that text[s:end] has L - reserve - tol .. L - reserve tokens, starting at a
    word start; (s, tokens) or None."""
    budget = L - reserve
    t_end = doc.tok_at(end)
    t0 = t_end - budget
    if t0 < 0:
        return None
    s = doc.word_start_at_or_after(doc.starts[t0] if t0 < len(doc.starts) else end)
    for _ in range(3):
        n = ntok(tok, doc.text[s:end])
        if budget - length_tolerance(L) <= n <= budget:
            return s, n
        if n > budget:  # tokenisation of the substring is longer: move on by a word
            s = doc.word_start_at_or_after(s + 1)
        else:
            return None
    return None


def build_lr_cloze(tdocs, tok, L: int, seed: int, n: int = N_LONG, cap: int = 20) -> list[dict]:
    """Long-range cloze: a context of ~L tokens ending before a word; the word occurs (same case, whole
    word) >= 256 tokens before the blank and nowhere (any case) in the last 64 tokens."""
    rng = random.Random(f"{seed}-lr_cloze-{L}")
    per_doc = []
    for d in tdocs:
        if len(d.ids) < L + 8:
            per_doc.append([])
            continue
        text = d.text
        cands = [m for m in CLOZE_TARGET.finditer(text)
                 if m.group(1).lower() not in STOPWORDS and d.tok_at(m.start()) >= L]
        rng.shuffle(cands)
        items, blanks = [], []
        for m in cands:
            if len(items) >= cap:
                break
            word, p = m.group(1), m.start() - 1        # the context stops before the space
            tb = d.tok_at(p)
            if any(abs(tb - b) < 256 for b in blanks):
                continue
            # quick filter on document tokens before the exact check on the context
            occ = [o.start() for o in re.finditer(r"\b" + re.escape(word) + r"\b", text[:p])]
            if not occ or tb - d.tok_at(occ[0]) < LR_MIN_BACK + 8:
                continue
            if any(tb - d.tok_at(o.start()) <= LR_CLEAR_LAST + 8
                   for o in re.finditer(r"(?i)\b" + re.escape(word) + r"\b", text[:p])):
                continue
            sp = span_back(tok, d, p, L)
            if sp is None:
                continue
            s, nt = sp
            context = text[s:p]
            back = lr_distances(tok, context, word)
            if not back or max(back["same_case"]) < LR_MIN_BACK or min(back["any_case"]) <= LR_CLEAR_LAST:
                continue
            blanks.append(tb)
            items.append({"context_parts": [[d.id, s, p]], "target": " " + word, "n_context_tokens": nt,
                          "target_back_tokens": max(back["same_case"]), "target_nearest_tokens": min(back["any_case"]),
                          "source": d.source, "doc_id": d.id})
        per_doc.append(items)
    out = round_robin(per_doc, n, rng)
    return numbered(out, f"lr_cloze_{L}")


def lr_distances(tok, context: str, word: str) -> dict:
    """Tokens from each occurrence of `word` to the end of `context` (v2 tokenizer, exact):
    {"same_case": [...], "any_case": [...]}; tests use the same definition."""
    out = {}
    for key, flags in (("same_case", 0), ("any_case", re.IGNORECASE)):
        out[key] = [ntok(tok, context[m.start():]) for m in re.finditer(r"\b" + re.escape(word) + r"\b", context, flags)]
    return out if out["same_case"] else {}


SENT_END = re.compile(r"[.!?](?=\s)")
NEEDLE = "The pass key is {k}. Remember it. {k} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def build_passkey(tdocs, tok, L: int, seed: int, n: int = N_LONG, cap: int = 20) -> list[dict]:
    """Pass key retrieval: ~L tokens = natural text (one test document span) with the needle sentence
    inserted at a sentence start nearest depth d (fraction of the context's tokens before the needle),
    then the question. Scored as a 4-way choice: `endings` = the key and 3 random 5-digit keys absent
    from the haystack, `label` = the key's index (chance 0.25); `target` = " " + key is kept for greedy
    (generation-style) scoring. n / len(DEPTHS) per depth, depths interleaved."""
    rng = random.Random(f"{seed}-passkey-{L}")
    reserve = ntok(tok, NEEDLE.format(k=12345)) + ntok(tok, QUESTION) + 2
    per_depth = n // len(DEPTHS)
    groups = []
    for depth in DEPTHS:
        slots = []
        for d in tdocs:
            T = len(d.ids)
            if T < L:
                continue
            stride = max(L // 2, (T - L) // max(1, cap))
            for t_end in range(L, T + 1, stride):
                slots.append((d, t_end))
        rng.shuffle(slots)
        # round robin over documents for source balance
        by_doc = collections.defaultdict(list)
        for d, t in slots:
            by_doc[d.id].append((d, t))
        order = sorted(by_doc)
        rng.shuffle(order)
        got, depth_i = [], 0
        while len(got) < per_depth and any(depth_i < len(by_doc[k]) for k in order):
            for k in order:
                if depth_i >= len(by_doc[k]) or len(got) >= per_depth:
                    continue
                d, t_end = by_doc[k][depth_i]
                it = make_passkey(tok, d, t_end, L, depth, reserve, rng)
                if it is not None:
                    got.append(it)
            depth_i += 1
        groups.append(got)
    # interleave the depths, so that any prefix of the file (limit=) covers all of them
    items = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    return numbered(items, f"passkey_{L}")


def make_passkey(tok, d: TokDoc, t_end: int, L: int, depth: float, reserve: int, rng):
    pos = d.starts[t_end - 1] if t_end < len(d.starts) else len(d.text)
    m = None
    for m in SENT_END.finditer(d.text, max(0, pos - 400), pos):
        pass
    end = m.end() if m else d.text.rfind(" ", 0, pos)
    if end <= 0:
        return None
    sp = span_back(tok, d, end, L, reserve)
    if sp is None:
        return None
    s, nh = sp
    hay = d.text[s:end]
    # sentence / paragraph starts inside the haystack (not the very start)
    bounds = [m.end() for m in re.finditer(r"(?<=[.!?])\s+(?=[A-Z\"'(])|\n\n+", hay)]
    if not bounds:
        return None
    t_s = d.tok_at(s)
    tb = [d.tok_at(s + b) - t_s for b in bounds]          # document-token estimate; exact check below
    j = min(range(len(bounds)), key=lambda i: abs(tb[i] / nh - depth))
    if abs(tb[j] / nh - depth) > 0.04:
        return None
    while True:
        k = str(rng.randint(10000, 99999))
        if k not in hay:
            break
    b = bounds[j]
    needle = NEEDLE.format(k=k)
    parts = [[d.id, s, s + b], needle, [d.id, s + b, end], QUESTION]
    context = hay[:b] + needle + hay[b:] + QUESTION
    nt = ntok(tok, context)
    if not L - length_tolerance(L) <= nt <= L:
        return None
    measured = ntok(tok, hay[:b]) / nt
    if abs(measured - depth) > 0.05:
        return None
    keys = [k]
    while len(keys) < 4:   # 3 distractor keys, absent from the haystack
        x = str(rng.randint(10000, 99999))
        if x not in keys and x not in hay:
            keys.append(x)
    rng.shuffle(keys)
    return {"context_parts": parts, "endings": keys, "label": keys.index(k), "target": " " + k,
            "depth": depth, "depth_measured": round(measured, 4),
            "n_context_tokens": nt, "source": d.source, "doc_id": d.id}


def build_longppl(tdocs, tok, L: int, seed: int, n: int = N_LONG, scored: int = PPL_SCORED, cap: int = 20) -> list[dict]:
    """Windows of L + 64 tokens of one document: context = first L tokens, continuation (scored, protected)
    = last 64, split so that re-tokenising context and context + continuation reproduces L and L + 64
    tokens exactly. Tails do not overlap (window ends >= 256 tokens apart)."""
    rng = random.Random(f"{seed}-longppl-{L}")
    W = L + scored
    per_doc = []
    for d in tdocs:
        T = len(d.ids)
        if T < W + 16:
            per_doc.append([])
            continue
        stride = max(256, (T - W - 16) // cap)
        slots = list(range(0, T - W - 16, stride))
        rng.shuffle(slots)
        items = []
        for s0 in slots[:cap]:
            for s in range(s0, s0 + 16):
                a, b, c = d.starts[s], d.starts[s + L], d.starts[s + W] if s + W < T else len(d.text)
                ctx, cont = d.text[a:b], d.text[b:c]
                if not ctx or ctx[0].isspace() or ctx[-1].isspace() or "\ufffd" in ctx + cont:
                    continue
                if tok.encode(ctx).ids != d.ids[s:s + L] or tok.encode(ctx + cont).ids != d.ids[s:s + W]:
                    continue
                items.append({"context_parts": [[d.id, a, b]], "continuation_parts": [[d.id, b, c]],
                              "n_context_tokens": L, "n_continuation_tokens": scored,
                              "source": d.source, "doc_id": d.id})
                break
        per_doc.append(items)
    out = round_robin(per_doc, n, rng)
    return numbered(out, f"longppl_{L}")


# -- io ------------------------------------------------------------------------------------------------------
def load_test_docs(corpus: Path) -> list[dict]:
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus} not found: build corpus v2 first (`make corpus-v2`, data/corpus/README.md)")
    if corpus.name != "test.jsonl":
        raise ValueError(f"the v2 suite is built from the TEST split only; got {corpus}")
    docs = load_docs(corpus)
    bad = sorted({d["source"] for d in docs if d["source"].startswith("fortune")})
    if bad:
        raise ValueError(f"Debian fortunes are reserved and must not be used: {bad}")
    return docs


def chance(name: str) -> float:
    return {"choice4_v2": 0.25, "choice2_v2": 0.5}.get(name, 0.0)


# -- calibration ---------------------------------------------------------------------------------------------
def short_correct(model, tokenizer, name: str, items: list[dict], batch_size: int = 16) -> list[int]:
    """Per item 0/1: dense correctness of one short task's items, with requests built as
    `utrc_study.eval.scorer._task_requests` builds them and scored by `utrc_lib.scoring.loglikelihood`
    (max_length 1024): cloze greedy match of all target tokens; choice4 acc_norm, the accuracy the paired
    analysis uses; choice2 acc. tests/test_benchmarks_v2.py checks it against `evaluate` item by item."""
    from utrc_lib.scoring import loglikelihood

    if name == "cloze_v2":
        res = loglikelihood(model, tokenizer, [(it["context"], it["target"]) for it in items], batch_size=batch_size)
        return [int(g) for _, g in res]
    key = "endings" if name == "choice4_v2" else "options"
    reqs = [(it["context"], " " + e) for it in items for e in it[key]]
    res = loglikelihood(model, tokenizer, reqs, batch_size=batch_size)
    correct, j = [], 0
    for it in items:
        k = len(it[key])
        lls = [res[j + c][0] / (len(it[key][c]) if name == "choice4_v2" else 1) for c in range(k)]
        j += k
        correct.append(int(max(range(k), key=lambda c: lls[c]) == it["label"]))
    return correct


def short_accuracy(model, tokenizer, name: str, items: list[dict], batch_size: int = 16) -> float:
    """Mean of `short_correct`."""
    c = short_correct(model, tokenizer, name, items, batch_size)
    return sum(c) / len(c)


def wilson(k: int, n: int, z: float = CAL_Z) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _bounds(entry: dict) -> list[tuple[float, float]]:
    """Per model (lo, hi): the 95% interval when recorded, else the point estimate (old records)."""
    iv = entry.get("interval95")
    if iv:
        return [tuple(iv[m]) for m in entry["accuracy"]]
    return [(x, x) for x in entry["accuracy"].values()]


def choose_level(per_level: dict) -> tuple[str, bool]:
    """(level, in range) from {level: {"items": n, "accuracy": {model: acc}, "interval95": {model:
    [lo, hi]}}}: among levels with at least N_SHORT items, those where every model's interval (the
    point estimate when no interval is recorded) lies inside ACC_RANGE come first, ordered by the
    largest |acc - ACC_TARGET|; otherwise the level whose intervals stick out of the range least."""
    def badness(level):
        a = list(per_level[level]["accuracy"].values())
        out_of = sum(max(0.0, ACC_RANGE[0] - lo, hi - ACC_RANGE[1]) for lo, hi in _bounds(per_level[level]))
        return (out_of > 0, out_of, max(abs(x - ACC_TARGET) for x in a))
    # items None: a level reused from a record that did not count them (the rebuild checks the count)
    ok = [lv for lv in per_level if (per_level[lv]["items"] if per_level[lv]["items"] is not None else N_SHORT) >= N_SHORT]
    if not ok:
        raise ValueError(f"no level has {N_SHORT} items: {sorted(per_level)}")
    best = min(ok, key=badness)
    return best, not badness(best)[0]


def step_direction(entry: dict) -> int:
    """+1: try the next harder level (some model's interval reaches above ACC_RANGE, none below it);
    -1: the next easier level (the mirror case); 0: stay."""
    b = _bounds(entry)
    above = any(hi > ACC_RANGE[1] for _, hi in b)
    below = any(lo < ACC_RANGE[0] for lo, _ in b)
    return 1 if above and not below else -1 if below and not above else 0


def calibrate(models: list[str], docs, tok, seed: int, sample: int, start: dict, all_levels: bool = False,
              known: dict | None = None, tasks: list[str] | None = None) -> dict:
    """For each short task (`tasks`, default all), measure the dense accuracy of every model on the
    first `sample` items of a level's build (exactly the items, in the order, that the level's file
    will hold: what the evaluator reads with `limit=sample`; `sample` >= N_SHORT scores the whole
    file), scored with the evaluator's scorer (`short_correct`), and pick a level with
    `choose_level`, which asks each model's 95% Wilson interval, not only its estimate, to be inside
    ACC_RANGE. Levels are listed easiest first: the search starts at `start` (the current level) and
    steps to the next harder (easier) level while `step_direction` says so, so usually 1-3 levels are
    scored; `all_levels` scores every level. `known`: a previous record's "tasks" ({task: {"levels":
    {level: {...}}}}, e.g. of a --dry-run): a level measured there on the same models, the same
    subset ("subset": "first") and the same sample is reused, not scored again (the items are
    deterministic in the seed)."""
    from utrc_lib.hosts.models import load_model

    cache: list = []

    def loaded():   # the models, loaded on first use (not at all when every level is reused)
        if not cache:
            cache.extend((m, *load_model(m)) for m in models)
        return cache

    out = {}
    for name, descriptions in LEVELS.items():
        if tasks is not None and name not in tasks:
            continue
        order = list(descriptions)
        per_level = {}
        todo = list(order) if all_levels else [start[name]]
        while todo:
            level = todo.pop(0)
            prev = ((known or {}).get(name) or {}).get("levels", {}).get(level)
            if (prev and prev.get("subset") == SUBSET and prev.get("sample") == min(sample, prev.get("items") or 0)
                    and set(prev.get("accuracy", {})) == set(models)):
                per_level[level] = {**prev, "reused": True}
                print(f"calibrate {name} {level:18s} reused: " +
                      ", ".join(f"{m} {a:.3f}" for m, a in prev["accuracy"].items()), flush=True)
            else:
                t0 = time.perf_counter()
                items = build_short(name, docs, tok, level, seed)
                sub = items[:sample]          # the file's first `sample` items (load_task(name, limit=sample))
                print(f"calibrate {name} {level:18s} built {len(items)} items ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                accs, ks, ivs = {}, {}, {}
                for mname, model, mtok in loaded():
                    t0 = time.perf_counter()
                    c = short_correct(model, mtok, name, sub)
                    ks[mname], accs[mname] = sum(c), sum(c) / len(c)
                    ivs[mname] = [round(x, 4) for x in wilson(ks[mname], len(c))]
                    print(f"calibrate {name} {level:18s} {mname}: acc {accs[mname]:.3f} "
                          f"[{ivs[mname][0]:.3f}, {ivs[mname][1]:.3f}] ({len(sub)} items, "
                          f"{time.perf_counter() - t0:.0f} s)", flush=True)
                per_level[level] = {"items": len(items), "subset": SUBSET, "sample": len(sub), "correct": ks,
                                    "accuracy": accs, "interval95": ivs}
            if all_levels:
                continue
            step = step_direction(per_level[level])
            k = order.index(level)
            if step and 0 <= k + step < len(order) and order[k + step] not in per_level:
                todo.append(order[k + step])
        best, in_range = choose_level(per_level)
        out[name] = {"levels": per_level, "chosen": best, "in_range": in_range}
        print(f"calibrate {name}: chosen {best} (in range: {in_range})", flush=True)
    return out


def model_fingerprint(path: str) -> dict:
    p = Path(path).resolve()
    st = p / "model.safetensors"
    return {"path": repo_path(p),
            "model_safetensors_sha256": sha256_file(st) if st.is_file() else None}


# -- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_args(ap, "data/corpus/work_v2/test.jsonl", "data/tokenizer_v2/tokenizer.json", HERE)
    ap.add_argument("--only", choices=("short", "long"), help="rebuild only these tasks (others kept)")
    ap.add_argument("--level", action="append", default=[], metavar="TASK=LEVEL",
                    help="difficulty level of a short task (default: " +
                         ", ".join(f"{k}={v}" for k, v in DEFAULT_LEVEL.items()) + ")")
    ap.add_argument("--calibrate", nargs="+", metavar="MODEL",
                    help="models (paths or embedded names) whose dense accuracy picks the short tasks' levels")
    ap.add_argument("--sample", type=int, default=N_SHORT,
                    help=f"with --calibrate: score the first SAMPLE items of each level's file, the items the "
                         f"evaluator reads with limit=SAMPLE (default {N_SHORT}: the whole file)")
    ap.add_argument("--tasks", nargs="+", choices=list(LEVELS), metavar="TASK",
                    help="short tasks to calibrate / rebuild (default: all three; the others' files, levels and "
                         "calibration records are kept); implies --only short unless --only is given")
    ap.add_argument("--dry-run", action="store_true", help="with --calibrate: print and save the estimates only")
    ap.add_argument("--all-levels", action="store_true", help="with --calibrate: score every level (slower)")
    ap.add_argument("--estimates", type=Path, metavar="JSON",
                    help="with --calibrate: reuse the levels measured in this record (a --dry-run's "
                         "calibration_dry_run.json) on the same models and sample instead of scoring them again")
    args = ap.parse_args(argv)
    if args.sample < 1:
        ap.error("--sample must be >= 1")
    short_tasks = [t for t in LEVELS if args.tasks is None or t in args.tasks]
    if args.tasks is not None and args.only is None:
        args.only = "short"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.tokenizer))
    docs = load_test_docs(args.corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    mpath = args.out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    manifest.update({
        "version": VERSION, "seed": args.seed,
        "corpus": repo_path(args.corpus),
        "corpus_sha256": sha256_file(args.corpus),
        "tokenizer": repo_path(args.tokenizer),
        "tokenizer_sha256": sha256_file(args.tokenizer),
        "lengths_note": "n_*_tokens and task lengths are v2-tokenizer tokens of the item text; items are text, "
                        "so a model with another tokenizer scores the same text at its own token count",
    })
    manifest.setdefault("tasks", {})

    levels = dict(DEFAULT_LEVEL)
    levels.update({k: v for k, v in (manifest.get("levels") or {}).items() if k in LEVELS})
    for spec in args.level:
        k, _, v = spec.partition("=")
        if k not in LEVELS or v not in LEVELS[k]:
            raise SystemExit(f"bad --level {spec!r}; valid: " +
                             "; ".join(f"{t}={'|'.join(lv)}" for t, lv in LEVELS.items()))
        levels[k] = v
    if args.calibrate:
        known = json.loads(args.estimates.read_text())["tasks"] if args.estimates else None
        if known is not None:   # keyed by the model names as given in that record
            names = [m.get("path") or m.get("name") for m in json.loads(args.estimates.read_text())["models"]]
            if sorted(names) != sorted(args.calibrate):
                raise SystemExit(f"--estimates {args.estimates} was measured on {names}, not {args.calibrate}")
        cal = calibrate(args.calibrate, docs, tok, args.seed, args.sample, levels, args.all_levels, known,
                        short_tasks)
        record = {"models": [model_fingerprint(m) if Path(m).exists() else {"name": m} for m in args.calibrate],
                  "sample": args.sample, "subset": SUBSET,
                  "subset_note": "each level is scored on the first `sample` items of the file it builds (what "
                                 "the evaluator reads with limit=sample), with the evaluator's scorer; a level "
                                 "is in range when every model's 95% Wilson interval is inside `range`",
                  "range": list(ACC_RANGE), "target": ACC_TARGET, "interval_z": CAL_Z, "tasks": cal,
                  "estimates_reused_from": str(args.estimates.name) if args.estimates else None,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        old = manifest.get("calibration") or {}
        kept = {t: {**v, "record": {**{k: old.get(k) for k in ("models", "sample", "range", "date")},
                                     "subset": old.get("subset", "random")}}
                for t, v in (old.get("tasks") or {}).items() if t not in cal}
        kept.update({t: v for t, v in (old.get("kept_from_previous") or {}).items() if t not in cal})
        if kept:   # tasks not calibrated in this run keep their earlier record (and level, and file)
            record["kept_from_previous"] = dict(sorted(kept.items()))
        if args.dry_run:
            (args.out / "calibration_dry_run.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"dry run: estimates in {args.out / 'calibration_dry_run.json'}; nothing rebuilt")
            return 0
        manifest["calibration"] = record
        levels.update({k: v["chosen"] for k, v in cal.items()})
        args.only = "short"
    manifest["levels"] = levels
    manifest["level_descriptions"] = LEVELS
    manifest.setdefault("calibration", None)

    if args.only in (None, "short"):
        for name in short_tasks:
            items = build_short(name, docs, tok, levels[name], args.seed)
            if len(items) < N_SHORT:
                raise SystemExit(f"{name} at level {levels[name]}: only {len(items)} items (< {N_SHORT})")
            manifest["tasks"][name] = write_task(args.out, name, items, compact=True, label=f"{name} [{levels[name]}]",
                                                 kind={"cloze_v2": "cloze"}.get(name, name[:-3]),
                                                 level=levels[name], chance=chance(name),
                                                 calibrated=manifest["calibration"] is not None)
    if args.only in (None, "long"):
        t0 = time.perf_counter()
        encs = tok.encode_batch([d["text"] for d in docs])
        tdocs = [TokDoc(d, e) for d, e in zip(docs, encs)]
        used_docs = set()
        long_tasks = {}
        for L in LENGTHS:
            long_tasks[f"lr_cloze_{L}"] = ("cloze", build_lr_cloze(tdocs, tok, L, args.seed))
            print(f"lr_cloze_{L} built ({time.perf_counter() - t0:.0f} s)", flush=True)
            long_tasks[f"passkey_{L}"] = ("choice4", build_passkey(tdocs, tok, L, args.seed))
            print(f"passkey_{L} built ({time.perf_counter() - t0:.0f} s)", flush=True)
        for L in PPL_LENGTHS:
            long_tasks[f"longppl_{L}"] = ("ppl", build_longppl(tdocs, tok, L, args.seed))
        for name, (kind, items) in long_tasks.items():
            if len(items) < N_LONG:
                raise SystemExit(f"{name}: only {len(items)} items (< {N_LONG})")
            used_docs.update(it["doc_id"] for it in items)
            extra = {"kind": kind, "length": int(name.rsplit("_", 1)[1]), "chance": 0.25 if kind == "choice4" else 0.0,
                     "length_tolerance": length_tolerance(int(name.rsplit("_", 1)[1]))}
            if name.startswith("passkey"):
                extra["depths"] = dict(sorted(collections.Counter(str(it["depth"]) for it in items).items()))
            manifest["tasks"][name] = write_task(args.out, name, items, compact=True, **extra)
        dpath = args.out / "docs.jsonl"
        write_jsonl(dpath, compact=True, items=[{"id": d["id"], "source": d["source"], "text": d["text"]} for d in docs if d["id"] in used_docs])
        manifest["docs"] = {"file": dpath.name, "documents": len(used_docs), "bytes": dpath.stat().st_size,
                            "sha256": sha256_file(dpath),
                            "note": "test documents referenced by the long tasks' [doc_id, start, end] spans, verbatim"}
        print(f"long tasks: {time.perf_counter() - t0:.0f} s; docs.jsonl {dpath.stat().st_size / 1e6:.2f} MB")
    manifest["tasks"] = dict(sorted(manifest["tasks"].items()))
    mpath.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if args.calibrate:
        missed = [k for k, v in manifest["calibration"]["tasks"].items() if not v["in_range"]]
        if missed:
            print(f"WARNING: no level puts every model in {ACC_RANGE} for {missed}; the closest was kept")
            return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

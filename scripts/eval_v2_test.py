#!/usr/bin/env python
"""Bits per byte and token perplexity of a model on the corpus v2 test split, overall and per source (CPU).

The text scored is chosen by characters, not tokens, so every model (whatever its tokenizer) scores
the same text and bits per byte compare across tokenizers (the tiny v1 models vs the small v2 ones):
per source, documents in id order are taken until `--max-chars-per-source` characters (the last one
cut at a whitespace), at most `--max-docs` documents per source. Each selected document is scored on
its own: <|endoftext|> + its tokens, in non-overlapping windows of `--seq` tokens (a window's first
token sees only that window), every token of the text scored once.

    bits_per_byte = sum NLL (nats) / ln 2 / UTF-8 bytes of the scored text
    token_ppl     = exp(sum NLL / tokens)        (the model's own tokenizer; not comparable across tokenizers)

Usage:
    .venv/bin/python scripts/eval_v2_test.py MODEL [--out data/benchmarks_v2/v2_test_bpb_NAME.json]
        [--max-chars-per-source 20000] [--max-docs 50] [--max-tokens N] [--seq 1024] [--batch-size 4]
MODEL: an embedded name (tiny-mamba2, ...) or a checkpoint folder.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def select_text(docs: list[dict], max_chars: int, max_docs: int) -> list[dict]:
    """Per source (documents in id order): up to max_docs documents and max_chars characters."""
    by = collections.defaultdict(list)
    for d in sorted(docs, key=lambda d: d["id"]):
        by[d["source"]].append(d)
    out = []
    for src in sorted(by):
        left = max_chars
        for d in by[src][:max_docs]:
            if left <= 0:
                break
            text = d["text"]
            if len(text) > left:
                cut = text.rfind(" ", 0, left)
                text = text[:cut if cut > 0 else left].rstrip()
            if text:
                out.append({"id": d["id"], "source": src, "text": text})
                left -= len(text)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--split", type=Path, default=ROOT / "data/corpus/work_v2/test.jsonl")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--max-chars-per-source", type=int, default=20000)
    ap.add_argument("--max-docs", type=int, default=50, help="documents per source at most")
    ap.add_argument("--max-tokens", type=int, default=None, help="stop after this many scored tokens in all")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if not args.split.is_file():
        raise SystemExit(f"{args.split} not found: build corpus v2 first (make corpus-v2)")
    if args.seq < 2 or args.max_chars_per_source < 1 or args.max_docs < 1 or args.batch_size < 1:
        raise SystemExit("--seq >= 2, --max-chars-per-source >= 1, --max-docs >= 1, --batch-size >= 1")
    import torch
    from tqdm import tqdm

    from utrc_lib.scoring import encode, eos_id
    from utrc_lib.hosts.models import load_model
    from utrc_lib.hosts.speed import fast_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    docs = [json.loads(line) for line in args.split.read_text(encoding="utf-8").splitlines() if line.strip()]
    sel = select_text(docs, args.max_chars_per_source, args.max_docs)
    eos = eos_id(tok)
    # windows: (source, token ids of the window incl. its first conditioning token, scored count)
    windows, total_tok = [], 0
    for d in sel:
        ids = [eos] + encode(tok, d["text"])
        if args.max_tokens is not None:
            room = args.max_tokens - total_tok
            if room <= 0:
                break
            ids = ids[:room + 1]
            d["truncated_to_tokens"] = len(ids) - 1
        for a in range(0, len(ids) - 1, args.seq):
            w = ids[a:a + args.seq + 1]
            windows.append((d["source"], w))
        total_tok += len(ids) - 1
    if args.max_tokens is not None:   # bytes of what was actually scored (decoded tokens of a cut document)
        for d in sel:
            if "truncated_to_tokens" in d:
                ids = encode(tok, d["text"])[:d["truncated_to_tokens"]]
                d["text"] = tok.decode(ids)
    scored = {d["id"]: d for d in sel if "truncated_to_tokens" not in d or d["truncated_to_tokens"] > 0}
    nll = collections.defaultdict(float)
    ntok = collections.Counter()
    windows.sort(key=lambda w: -len(w[1]))
    t0 = time.perf_counter()
    model.eval()
    with torch.inference_mode(), fast_inference(model):
        for b in tqdm(range(0, len(windows), args.batch_size), desc=f"v2 test {args.model}", unit="batch"):
            batch = windows[b:b + args.batch_size]
            T = max(len(w) for _, w in batch) - 1
            ids = torch.full((len(batch), T), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for i, (_, w) in enumerate(batch):   # left padding, as the scorer does
                ids[i, T - (len(w) - 1):] = torch.tensor(w[:-1])
                mask[i, T - (len(w) - 1):] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
            for i, (src, w) in enumerate(batch):
                n = len(w) - 1
                tgt = torch.tensor(w[1:])
                ll = logp[i, T - n:].gather(-1, tgt[:, None]).sum().item()
                nll[src] -= ll
                ntok[src] += n
    seconds = time.perf_counter() - t0
    nbytes = collections.Counter()
    ndocs = collections.Counter()
    for d in scored.values():
        nbytes[d["source"]] += len(d["text"].encode("utf-8"))
        ndocs[d["source"]] += 1
    per = {s: {"documents": ndocs[s], "bytes": nbytes[s], "tokens": ntok[s], "nll_nats": nll[s],
               "bits_per_byte": nll[s] / math.log(2) / nbytes[s], "token_ppl": math.exp(nll[s] / ntok[s])}
           for s in sorted(ntok)}
    tb, tt, tn = sum(nbytes[s] for s in per), sum(ntok.values()), sum(nll.values())
    result = {
        "model": args.model, "split": str(args.split.relative_to(ROOT)) if args.split.resolve().is_relative_to(ROOT) else str(args.split),
        "split_sha256": hashlib.sha256(args.split.read_bytes()).hexdigest(),
        "selection": {"max_chars_per_source": args.max_chars_per_source, "max_docs": args.max_docs,
                      "max_tokens": args.max_tokens, "seq": args.seq,
                      "text_sha256": hashlib.sha256("\n\n".join(d["text"] for d in scored.values()).encode()).hexdigest()},
        "overall": {"documents": len(scored), "bytes": tb, "tokens": tt, "bits_per_byte": tn / math.log(2) / tb,
                    "token_ppl": math.exp(tn / tt), "bytes_per_token": tb / tt,
                    "macro_bits_per_byte": sum(p["bits_per_byte"] for p in per.values()) / len(per)},
        "per_source": per, "seconds": seconds, "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    o = result["overall"]
    print(f"{args.model}: bits/byte {o['bits_per_byte']:.4f}, token ppl {o['token_ppl']:.2f} "
          f"({tt} tokens, {tb} bytes, {seconds:.0f} s)")
    for s, p in per.items():
        print(f"  {s:20s} bpb {p['bits_per_byte']:.4f}  ppl {p['token_ppl']:8.2f}  ({p['tokens']} tokens)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dataset loaders for the utrc_* lm-eval tasks (referenced by `custom_dataset: !function`)."""
from __future__ import annotations

import sys
from pathlib import Path


def _load(name: str):
    import datasets

    try:
        from utrc_study.eval.suite import load_task
    except ImportError:  # lm-eval loads this file by path; make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
        from utrc_study.eval.suite import load_task
    items = load_task(name)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def load_cloze(**kwargs):
    return _load("cloze")


def load_choice4(**kwargs):
    return _load("choice4")


def load_choice2(**kwargs):
    return _load("choice2")


def load_ppl(**kwargs):
    return _load("ppl")


def ppl_results(doc, results):
    """Per window: (log-likelihood of the 64-token continuation, its size) for the corpus-level metrics
    (suite v1 and v2: `utrc_data_v2.py` uses these too).

    Token counts are those of the project tokenizer (`n_continuation_tokens`, stored with the data):
    token_perplexity is comparable across methods of one model, and equals utrc_study.eval.scorer's `ppl`
    for the embedded models; bits_per_byte does not depend on the tokenizer.
    """
    ll, _ = results[0]
    return {"token_perplexity": (ll, int(doc["n_continuation_tokens"])),
            "bits_per_byte": (ll, len(doc["continuation"].encode("utf-8")))}


def token_perplexity(items):
    """exp(-sum log-likelihood / sum tokens) over all windows."""
    import math

    return math.exp(-sum(ll for ll, _ in items) / sum(n for _, n in items))


def bits_per_byte(items):
    """-sum log-likelihood / (ln 2 * sum bytes) over all windows."""
    import math

    return -sum(ll for ll, _ in items) / (math.log(2) * sum(n for _, n in items))

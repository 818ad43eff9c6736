"""Dataset loaders and metrics for the utrc_v2_* lm-eval tasks (suite v2, data/benchmarks_v2).

`utrc_study.eval.suite.load_task` joins the long items' text spans, so lm-eval sees plain `context` /
`target` / `continuation` fields, as in v1 (`utrc_data.py`).
"""
from __future__ import annotations

import sys
from pathlib import Path

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


try:   # lm-eval loads this file by path: make the repository importable, then share v1's helpers
    from utrc_study.eval.lm_eval_tasks.utrc_data import _load, bits_per_byte, ppl_results, token_perplexity  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from utrc_study.eval.lm_eval_tasks.utrc_data import _load, bits_per_byte, ppl_results, token_perplexity  # noqa: F401


def _loader(name: str):
    def load(**kwargs):
        return _load(name)
    load.__name__ = f"load_{name}"
    return load


load_cloze_v2 = _loader("cloze_v2")
load_choice4_v2 = _loader("choice4_v2")
load_choice2_v2 = _loader("choice2_v2")
load_lr_cloze_512, load_lr_cloze_1024, load_lr_cloze_2048 = (_loader(f"lr_cloze_{n}") for n in (512, 1024, 2048))
load_passkey_512, load_passkey_1024, load_passkey_2048 = (_loader(f"passkey_{n}") for n in (512, 1024, 2048))
load_longppl_1024, load_longppl_2048 = (_loader(f"longppl_{n}") for n in (1024, 2048))


def passkey_results(doc, results):
    """4 candidate keys: acc (argmax log-likelihood is the key) and, per needle depth, (is this item at
    that depth, correct)."""
    lls = [ll for ll, _ in results]
    correct = float(max(range(len(lls)), key=lambda c: lls[c]) == doc["label"])
    out = {"acc": correct}
    for d in DEPTHS:
        out[f"acc_depth_{round(d * 100)}"] = (doc["depth"] == d, correct)
    return out


def depth_mean(items):
    """Mean of greedy over the items at the metric's depth (NaN when none)."""
    sel = [g for at, g in items if at]
    return sum(sel) / len(sel) if sel else float("nan")

"""Issue 24 ("Reliability, round two"): no silent wrong number from the evaluator, the caches, the
data or the CLIs. One test (or a few) per item; each failed before the fix."""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import utrc_lib

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="module")
def tiny():
    return utrc_lib.load_model("tiny-mamba2")


# -- item 1: an already-patched model is refused by every scoring entry point -------------------------
def test_item1_evaluate_refuses_a_patched_model(tiny):
    from utrc_lib.eval import scorer
    from utrc_lib.experiments import sweep

    model, tok = tiny
    cfg = utrc_lib.ReductionConfig("utrc", flops_reduction=0.3)
    with utrc_lib.apply(model, cfg):
        with pytest.raises(RuntimeError, match=r"handle\.remove\(\)"):
            scorer.evaluate(model, tok, tasks=("cloze",), limit=2, progress=False)
        with pytest.raises(RuntimeError, match="patched"):
            scorer.score_tokens(model, [([1, 2, 3], [4])])
        with pytest.raises(RuntimeError, match="patched"):
            sweep.evaluate_config("tiny-mamba2", "none", 0.0, tasks=("cloze",), limit=2,
                                  model_loader=lambda name: (model, tok))
    handle = utrc_lib.apply(model, cfg)   # a handle left open
    try:
        with pytest.raises(RuntimeError, match="patched"):
            scorer.evaluate(model, tok, tasks=("cloze",), limit=2, progress=False)
    finally:
        handle.remove()
    res = scorer.evaluate(model, tok, tasks=("cloze",), limit=2, progress=False)   # closed: scores
    assert res["cloze"]["n"] == 2


def test_item1_lm_eval_adapter_refuses_a_patched_model(tiny):
    pytest.importorskip("lm_eval")
    from utrc_lib.eval.lm_eval_adapter import UTRCLM

    model, tok = tiny
    with utrc_lib.apply(model, utrc_lib.ReductionConfig("utrc", flops_reduction=0.3)):
        with pytest.raises(RuntimeError, match="patched"):
            UTRCLM(pretrained=model, tokenizer=tok)

"""The 24-layer embedded models (issue 13): they load, are trained (far below a random init's perplexity
on held-out text), and a reduction runs through them."""
import math

import pytest
import torch

import utrc_lib
from utrc_study.eval import scorer

SMALL = ["small-mamba2", "small-mamba"]


def _ppl(model, tok, windows):
    toks = [scorer.encode_pair(tok, w["context"], w["continuation"]) for w in windows]
    res = scorer.score_tokens(model, toks, None, 4, pad_token_id=scorer.pad_id(tok))
    return math.exp(-sum(r[0] for r in res.results) / sum(len(c) for _, c in toks))


@pytest.mark.heavy
@pytest.mark.parametrize("name", SMALL)
def test_small_model_is_trained_and_reducible(name):
    from utrc_study.eval.suite import load_task

    if not utrc_lib.available_models()[name]["present"]:
        pytest.skip(f"{name} is not in data/models")
    model, tok = utrc_lib.load_model(name)
    assert model.config.num_hidden_layers == 24
    n = sum(p.numel() for p in model.parameters())
    assert 15e6 <= n <= 30e6, n
    windows = load_task("ppl", 4)                      # held-out v1 test windows (in the v2 test split too)
    trained = _ppl(model, tok, windows)
    torch.manual_seed(0)
    random_init = type(model)(model.config).eval()     # same shape, untrained
    untrained = _ppl(random_init, tok, windows)
    assert trained < 200 and untrained > 10 * trained, (trained, untrained)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids
    with utrc_lib.apply(model, utrc_lib.ReductionConfig("utrc", flops_reduction=0.2)) as h, torch.inference_mode():
        logits = model(ids).logits
        assert logits.shape[1] == ids.shape[1]
        kept = h.kept_mask[0]                                   # the model's own rows; NaN where removed
        assert torch.isfinite(logits[0, kept]).all() and torch.isnan(logits[0, ~kept]).all() and not kept.all()
        assert float(h.last_reducer.achieved_cut()[0]) > 0.1

"""GPU tier: the evaluator on CUDA (float32, transformers path) reproduces the CPU numbers on a few items.

Run on a CUDA machine: `python -m pytest -q -m gpu tests/test_gpu_eval.py` (mamba-ssm not needed; when it is
installed, transformers uses its kernels for CUDA tensors and the tolerance below still holds for float32).
This is what lets a CPU run of the full-run command reproduce the committed GPU figures on a subset.
"""
import pytest
import torch

import utrc_lib
from utrc_study.eval import scorer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["tiny-mamba2", "tiny-mamba"])
@pytest.mark.parametrize("method", [None, "utrc", "evit"])
def test_cuda_float32_matches_cpu(name, method):
    cpu, tok = utrc_lib.load_model(name, device="cpu")
    gpu, _ = utrc_lib.load_model(name, device="cuda")
    cfg = None if method is None else utrc_lib.ReductionConfig(method, flops_reduction=0.2)
    for task in ("cloze", "choice4", "choice2", "ppl"):
        toks, _ = scorer._task_requests(tok, task, 6)
        a = scorer.score_tokens(cpu, toks, cfg, 8, pad_token_id=scorer.pad_id(tok))
        b = scorer.score_tokens(gpu, toks, cfg, 8, pad_token_id=scorer.pad_id(tok))
        assert a.achieved_cut == pytest.approx(b.achieved_cut, abs=1e-6), task   # same tokens kept
        for (la, ga), (lb, gb) in zip(a.results, b.results):
            assert la == pytest.approx(lb, rel=2e-4, abs=2e-3), (task, la, lb)
        agree = sum(ga == gb for (_, ga), (_, gb) in zip(a.results, b.results))
        assert agree >= len(a.results) - 1, task   # a greedy tie may flip at most one request


def test_auto_device_is_cuda():
    from utrc_study.experiments import sweep

    model, _ = sweep.get_model("tiny-mamba2")
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32

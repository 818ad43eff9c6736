"""Fast inference settings (hosts.speed) and the batched scorer: same numbers, model left as it was."""
import pytest
import torch

import utrc_lib
from utrc_study.eval import scorer
from utrc_lib.hosts import speed
from utrc_lib import scoring  # noqa: E402


@pytest.fixture(scope="module", params=["tiny-mamba2", "tiny-mamba"])
def loaded(request):
    model, tok = utrc_lib.load_model(request.param)
    return request.param, model, tok


def test_chunk_size_rule():
    assert speed.chunk_size_for(1) == 16
    assert speed.chunk_size_for(128) == 16 or speed.chunk_size_for(128) == 32
    assert speed.chunk_size_for(2048) == 64
    assert speed.chunk_size_for(10 ** 6) == 256
    assert speed.chunk_size_for(10 ** 6, default=128) == 128
    sizes = [speed.chunk_size_for(n) for n in range(1, 5000, 37)]
    assert sizes == sorted(sizes) and set(sizes) <= set(speed.CHUNK_SIZES)
    with pytest.raises(ValueError, match="length"):
        speed.chunk_size_for(0)


def _settings(model):
    from transformers.models.mamba import modeling_mamba

    out = [modeling_mamba.mamba_selective_scan]
    for block in model.backbone.layers:
        m = block.mixer
        out.append((getattr(m, "chunk_size", None), getattr(m, "use_mambapy", None),
                    len(m._forward_pre_hooks), len(m._forward_hooks)))
    return out


@pytest.mark.heavy
@pytest.mark.parametrize("n", [3, 77, 260])
def test_fast_inference_same_logits_and_restores(loaded, n):
    name, model, _ = loaded
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, model.config.vocab_size, (2, n), generator=g)
    before = _settings(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        plain = model(ids, use_cache=False).logits
        with speed.fast_inference(model) as info:
            if name == "tiny-mamba2":
                assert info["mamba2_chunk"]
            else:
                assert info["mamba1_scan"]
                from transformers.models.mamba import modeling_mamba
                assert modeling_mamba.mamba_selective_scan is speed._dispatch_scan
            with speed.fast_inference(model) as inner:   # nested: a no-op
                assert inner == {"nested": True}
            fast = model(ids, use_cache=False).logits
            fast2 = model(ids, use_cache=False).logits
        again = model(ids, use_cache=False).logits
    assert _settings(model) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(plain, again)               # unpatched: bit-identical to before
    assert torch.equal(fast, fast2)                # deterministic
    scale = plain.abs().max()
    assert (fast - plain).abs().max() <= 1e-4 * scale, float((fast - plain).abs().max())


def test_fast_inference_restores_after_error(loaded):
    _, model, _ = loaded
    before = _settings(model)
    with pytest.raises(RuntimeError, match="boom"):
        with speed.fast_inference(model):
            raise RuntimeError("boom")
    assert _settings(model) == before
    with speed.fast_inference(model) as info:     # usable again (not stuck as "nested")
        assert "nested" not in info


@pytest.mark.heavy
def test_fast_scoring_matches_plain_reduced(loaded):
    _, model, tok = loaded
    toks, _ = scorer._task_requests(tok, "choice2", 6)
    cfg = utrc_lib.ReductionConfig("utrc", flops_reduction=0.2)
    for config in (None, cfg):
        a = scorer.score_tokens(model, toks, config, 4, pad_token_id=scorer.pad_id(tok), fast=True)
        b = scorer.score_tokens(model, toks, config, 4, pad_token_id=scorer.pad_id(tok), fast=False)
        for (la, ga), (lb, gb) in zip(a.results, b.results):
            assert la == pytest.approx(lb, rel=1e-4, abs=1e-3)
        assert a.achieved_cut == b.achieved_cut


def _random_batch(g, B, V, T):
    batch, ref = [], {}
    for i in range(B):
        n = int(torch.randint(1, min(T, 6) + 1, (1,), generator=g))
        cont = torch.randint(0, V, (n,), generator=g).tolist()
        batch.append((i, [0] * (T - n), cont))
        ref[i] = torch.log_softmax(torch.randn(n, V, generator=g) * 3, -1)
    ref[0][0, 0] = -float("inf")   # a dense probability that underflows: contributes 0
    return batch, ref


@pytest.mark.parametrize("seed", range(6))
def test_batched_scoring_equals_row_by_row_twin(seed):
    g = torch.Generator().manual_seed(seed)
    B, V, T = 5, 37, 9
    batch, ref = _random_batch(g, B, V, T)
    logits = torch.randn(B, T, V, generator=g) * 2
    if seed == 0:   # a row whose continuation is the greedy decode
        n = len(batch[1][2])
        logits[1, -n:] = -10.0
        for j, t in enumerate(batch[1][2]):
            logits[1, T - n + j, t] = 10.0
    rows, kept = scoring._score_logits(logits, batch, ref, keep=True)
    twin = scoring._score_rows_simple(logits, batch, ref)
    for (ll, greedy, kl, top1), (ll2, greedy2, kl2, top12), p, k in zip(rows, twin, batch, kept):
        assert ll == pytest.approx(ll2, rel=1e-5, abs=1e-5)
        assert greedy == greedy2
        assert kl == pytest.approx(kl2, rel=1e-4, abs=1e-5)
        assert top1 == top12
        assert k.shape == (len(p[2]), V)
    if seed == 0:
        assert rows[1][1] is True
    rows_noref, none = scoring._score_logits(logits, batch)
    assert none is None and all(r[2] is None and r[3] is None for r in rows_noref)
    assert [r[:2] for r in rows_noref] == [r[:2] for r in rows]


def test_resolve_device():
    assert speed.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert speed.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            speed.resolve_device("cuda")


@pytest.mark.parametrize("seed", range(4))
def test_selective_scan_equals_transformers_twin(seed):
    from transformers.models.mamba import modeling_mamba

    g = torch.Generator().manual_seed(seed)
    b, di, n, s = 1 + seed % 3, 8 + 4 * seed, 1 + 7 * seed, 4 + 2 * seed
    u, dt, z = (torch.randn(b, di, n, generator=g) for _ in range(3))
    A = -torch.rand(di, s, generator=g) * 4
    B, C = torch.randn(b, s, n, generator=g), torch.randn(b, s, n, generator=g)
    D, bias = torch.randn(di, generator=g), torch.randn(di, generator=g) * 0.2
    for kw in (dict(D=D, z=z, delta_bias=bias, delta_softplus=True), dict()):
        ref = modeling_mamba.mamba_selective_scan(u, dt.abs(), A, B, C, return_last_state=True, **kw)
        got = speed.selective_scan(u, dt.abs(), A, B, C, return_last_state=True, **kw)
        for r, o in zip(ref, got):
            assert r.shape == o.shape and r.dtype == o.dtype
            assert torch.allclose(r, o, rtol=1e-4, atol=1e-4 * (1 + float(r.abs().max())))

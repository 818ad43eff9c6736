"""Tiled best match (issue 28): no N x N similarity buffer, the same matches and tie rule as the dense path.

The torch twin (methods.row_best_torch) and the fused Triton kernel (methods.row_best_triton, run by
Triton's CPU interpreter here, compiled in the gpu tier) against the float64 dense rule; the dense and
the tiled matching give the same plans for every method that matches (forced with UTRC_TILE_MATCH);
duplicated tokens tie exactly and the first B token wins; windowed matching against the loop twin.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utrc_lib as u
from utrc_lib.core import methods
from utrc_lib.core.methods import HostSizes, bipartite_match, has_partner

import kernel_checks as kc

SHAPES = [(2, 37, 53, 24), (1, 130, 70, 16), (3, 5, 9, 3)]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles far smaller than the inputs, odd sizes: many tiles per row, ragged last tiles."""
    monkeypatch.setattr(methods, "ROW_TILE", 7)
    monkeypatch.setattr(methods, "COL_TILE", 11)


@pytest.mark.heavy
def test_row_best_torch_twin_equals_dense(small_tiles):
    g = torch.Generator().manual_seed(0)
    kc.check_row_best(g, "cpu", SHAPES, (torch.float32,), methods.row_best_torch, near_tol=1e-5,
                      windows=(None, 1, 4, 1000))


def test_row_best_ties_first_column(small_tiles):
    """Exact ties across tiles: every column equal -> column 0; a later duplicate never replaces the first."""
    fa = torch.ones(1, 5, 4)
    fb_t = torch.ones(1, 4, 30)
    g_, j = methods.row_best_torch(fa, fb_t)
    assert torch.equal(j, torch.zeros(1, 5, dtype=torch.long)) and torch.equal(g_, torch.full((1, 5), 4.0))
    fb_t[0, :, 12] = 2.0  # best in tile 2 (columns 11..21) ...
    fb_t[0, :, 25] = 2.0  # ... and its duplicate in tile 3
    _, j = methods.row_best_torch(fa, fb_t)
    assert torch.equal(j, torch.full((1, 5), 12))
    b_ok = torch.ones(1, 30, dtype=torch.bool)
    b_ok[0, 12] = False  # the first copy is padding: the duplicate wins
    _, j = methods.row_best_torch(fa, fb_t, b_ok=b_ok)
    assert torch.equal(j, torch.full((1, 5), 25))


def test_row_best_no_column(small_tiles):
    """No valid column (padding / window): -inf and index 0, as torch.max over an all -inf row."""
    fa, fb_t = torch.randn(2, 6, 3), torch.randn(2, 3, 13)
    g_, j = methods.row_best_torch(fa, fb_t, b_ok=torch.zeros(2, 13, dtype=torch.bool))
    assert bool(torch.isneginf(g_).all()) and not bool(j.any())
    g_, j = methods.row_best_torch(fa, fb_t[..., :0])
    assert g_.shape == (2, 6) and bool(torch.isneginf(g_).all())


def _forced(monkeypatch, mode, fn):
    monkeypatch.setenv("UTRC_TILE_MATCH", mode)
    try:
        return fn()
    finally:
        monkeypatch.delenv("UTRC_TILE_MATCH")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("static", [False, True])
def test_bipartite_match_tiled_equals_dense(monkeypatch, small_tiles, seed, static):
    g = torch.Generator().manual_seed(seed)
    B, N, C = 3, 41, 12
    feats = torch.randn(B, N, C, generator=g)
    feats[1, 3] = 0  # a zero row: cosine 0 with everything
    feats[:, 30] = feats[:, 5]  # duplicated tokens: exact ties
    feats[:, 33] = feats[:, 5]
    rel = torch.arange(N).expand(B, N)
    is_a, is_b = rel % 2 == 0, rel % 2 == 1
    r = torch.full((B,), 9)
    _, inv = methods.feature_stats_torch("clip", feats)
    sizes = (9, int(is_a[0].sum()), int(is_b[0].sum())) if static else None
    dense = _forced(monkeypatch, "0", lambda: bipartite_match(feats, is_a, is_b, r, sizes, inv))
    tiled = _forced(monkeypatch, "1", lambda: bipartite_match(feats, is_a, is_b, r, sizes, inv))
    assert torch.equal(dense[0], tiled[0]) and torch.equal(dense[1], tiled[1])


REDUCE_METHODS = ["utrc", "tome", "pumer", "merge_only", "prune_only", "mtr_style", "utrc_reference"]


@pytest.mark.parametrize("method", REDUCE_METHODS)
@pytest.mark.parametrize("padded", [False, True])
def test_every_matching_method_tiled_equals_dense(monkeypatch, small_tiles, method, padded):
    """Every method whose plan comes from a best match builds the identical plan and outputs tiled."""
    g = torch.Generator().manual_seed(5)
    B, N, D = 3, 48, 10
    hidden = torch.randn(B, N, D, generator=g)
    residual = torch.randn(B, N, D, generator=g)
    hidden[:, 40] = hidden[:, 9]  # duplicates: tie rule exercised
    lengths = [48, 37, 30] if padded else None
    causal = method != "utrc_reference"
    cfg = u.ReductionConfig(method, keep_ratio=0.6, protect_last=0 if method == "utrc_reference" else 2,
                            causal=causal)
    delta = torch.rand(B, N, 4, generator=g)  # mtr_style scores with Delta
    run = lambda: u.reduce_tokens(hidden, residual, config=cfg, n_keep=25, lengths=lengths, delta=delta)
    a, b = _forced(monkeypatch, "0", run), _forced(monkeypatch, "1", run)
    for name in ("hidden", "residual", "positions", "sizes", "valid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_tiled_threshold():
    assert not methods.tile_matching(2048, 2048)  # every committed configuration (N <= 4096) stays dense
    assert methods.tile_matching(4096, 4096)
    assert methods.tile_matching(3, 3, window=2)


_INTERPRETED = r"""
import torch
from utrc_lib.core import methods
import kernel_checks as kc
assert methods.HAVE_TRITON and methods.row_best_kernel_available(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
g = torch.Generator().manual_seed(2)
tri = lambda *a, **k: methods.row_best_triton(*a, block_m=16, block_n=16, block_c=16, **k)
kc.check_row_best(g, "cpu", [(2, 37, 53, 24), (1, 20, 70, 40)], (torch.float32, torch.float16), tri,
                  near_tol=1e-4, windows=(None, 3))
# the kernel equals the torch twin on random inputs (matches and values)
methods.ROW_TILE, methods.COL_TILE = 9, 13
for seed in range(2):
    fa, fb_t, ia, ib, ok, pa, pb = kc.random_match_inputs(g, "cpu", 2, 33, 45, 20, torch.float32, padded=True)
    for w in (None, 5):
        g1, j1 = tri(fa, fb_t, ia, ib, ok, pos_a=pa, pos_b=pb, window=w)
        g0, j0 = methods.row_best_torch(fa, fb_t, ia, ib, ok, pos_a=pa, pos_b=pb, window=w)
        assert torch.equal(j1, j0), (seed, w)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.heavy
def test_row_best_kernel_interpreted():
    """The fused Triton kernel, run by Triton's CPU interpreter, against the dense rule and the torch twin."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# -- windowed matching (ReductionConfig.match_window) ---------------------------------------------------

def test_match_window_validation():
    assert u.ReductionConfig("utrc", keep_ratio=0.7).match_window is None
    assert u.ReductionConfig("tome", keep_ratio=0.7, match_window=8).match_window == 8
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="match_window"):
            u.ReductionConfig("utrc", keep_ratio=0.7, match_window=bad)
    with pytest.raises(ValueError, match="no bipartite matching"):
        u.ReductionConfig("evit", keep_ratio=0.7, match_window=4)
    from utrc_lib.core.config import config_from_args
    assert config_from_args("utrc", keep_ratio="0.7", match_window="16").match_window == 16


def test_has_partner():
    pa = torch.tensor([[0, 2, 9, 20]])
    pb = torch.tensor([[1, 5, 6, 30]])
    assert has_partner(pa, pb, None, 1).tolist() == [[True, True, False, False]]
    assert has_partner(pa, pb, None, 0).tolist() == [[False, False, False, False]]
    assert has_partner(pa, pb, None, 3).tolist() == [[True, True, True, False]]
    ok = torch.tensor([[True, True, True, False]])  # padding (last) is not a partner
    assert has_partner(pa, pb, ok, 10).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("method", ["utrc", "tome", "pumer", "merge_only"])
@pytest.mark.parametrize("window", [1, 3, 100])
def test_windowed_matching_equals_loop_twin(method, window):
    """One windowed matching round (plan_reduction) equals the loop twin (twins._match with the same window),
    per sample; A tokens without a partner in the window are not removed (the round may fall short)."""
    from utrc_lib.core.plan import TokenState
    from utrc_lib.core.methods import plan_reduction
    from utrc_lib.core.twins import loop_reduce

    g = torch.Generator().manual_seed(window)
    B, N, D = 2, 26, 6
    hidden = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    residual = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    cfg = u.ReductionConfig(method, keep_ratio=0.7, match_window=window, metric_source="mixer")
    state = TokenState.initial(torch.ones(B, N, dtype=torch.bool))
    r = torch.full((B,), 8)
    for static in (None, HostSizes(n=N, n_red=N, r=8)):
        plan = plan_reduction(cfg, state, r, hidden=hidden, residual=residual, static=static)
        out_h = plan.apply(hidden, "hidden", state.sizes)
        out_r = plan.apply(residual, "residual", state.sizes)
        nxt = plan.next_state(state)
        for b in range(B):
            want = loop_reduce(method, hidden[b], residual[b], r=8, rules=cfg.branch_rules(), causal=True,
                               window=window)
            keep = nxt.valid[b]
            assert int(keep.sum()) == len(want), (b, int(keep.sum()), len(want))
            assert nxt.positions[b][keep].tolist() == [p for p, *_ in want]
            torch.testing.assert_close(out_h[b][keep], torch.stack([h for _, h, _, _ in want]))
            torch.testing.assert_close(out_r[b][keep], torch.stack([x for _, _, x, _ in want]))


def test_window_off_is_global(monkeypatch):
    """A window wider than the sequence gives the global matching's plan."""
    g = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 8, generator=g)
    a = u.reduce_tokens(hidden, residual, config=u.ReductionConfig("utrc", keep_ratio=0.7), n_keep=20)
    b = u.reduce_tokens(hidden, residual, config=u.ReductionConfig("utrc", keep_ratio=0.7, match_window=64), n_keep=20)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.positions, b.positions)


# -- gpu tier: the compiled kernel at real sizes -------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_best_kernel_gpu_real_sizes():
    """Compiled kernel vs the float64 rule (near-ties within half-precision rounding may swap), and its
    memory: no (M, K) buffer at 32k x 32k (the dense float32 similarity would need 4 GiB)."""
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    kc.check_row_best(g, "cuda", [(1, 2048, 2048, 2560), (2, 1000, 1500, 5120)], (torch.float16, torch.bfloat16,
                      torch.float32), methods.row_best_triton, near_tol=2e-3, windows=(None, 64))
    M = K = 32768
    fa = torch.randn(1, M, 2560, device="cuda", dtype=torch.float16)
    fb_t = torch.randn(1, K, 2560, device="cuda", dtype=torch.float16).transpose(1, 2)
    inv = torch.rand(1, M, device="cuda") + 0.5
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    g_, j = methods.row_best(fa, fb_t, inv, inv)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * M, extra  # outputs (12 bytes a row) and the window-free launch: linear in M
    # against the torch twin (cuBLAS tiles) on a slice
    g0, j0 = methods.row_best_torch(fa[:, :512], fb_t, inv[:, :512], inv)
    agree = (j[:, :512] == j0).float().mean().item()
    assert agree > 0.99, agree
    torch.testing.assert_close(g_[:, :512], g0, rtol=2e-3, atol=2e-3)

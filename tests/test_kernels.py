"""The step's fast building blocks against simple references: feature statistics (torch twin and the
Triton kernel, in Triton's interpreter when triton is installed), the sort-free partition, the
one-gather / scaled-similarity matching (row-major and channel-major features), plan application."""
import os

import pytest
import torch

import utrc_lib as u
from utrc_lib import kernels
from utrc_lib.methods import _inverse_perm, bipartite_match, stable_partition
from utrc_lib.metrics import importance


@pytest.mark.parametrize("metric", ["clip", "sum", "l1", "l2", "random"])
def test_feature_stats_torch_twin(metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 7, generator=g)
    x[1, 4] = 0  # a zero row: norm 0, inverse norm 0
    scores, inv = kernels.feature_stats_torch(metric, x, valid=torch.ones(3, 11, dtype=torch.bool))
    torch.testing.assert_close(scores, importance(metric, x, valid=torch.ones(3, 11, dtype=torch.bool)))
    for b in range(3):
        for n in range(11):
            if (b, n) != (1, 4):
                assert abs(float(inv[b, n]) - sum(float(v) ** 2 for v in x[b, n]) ** -0.5) < 1e-5
    assert float(inv[1, 4]) == 0.0 and bool(torch.isfinite(inv).all())


_INTERPRETED = r"""
import torch
from utrc_lib import kernels
assert kernels.HAVE_TRITON
g = torch.Generator().manual_seed(1)
for layout in ("row_major", "channel_major"):
    x = torch.randn(2, 37, 300, generator=g)  # N, C not multiples of the tiles
    if layout == "channel_major":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, C) view of (B, C, N)
        assert x.stride(-1) != 1
    for metric in ("clip", "sum", "l1", "l2"):
        assert kernels.kernel_available(metric, x)
        s, q = kernels.feature_stats_triton(metric, x)
        s0, q0 = kernels.feature_stats_torch(metric, x)
        torch.testing.assert_close(s, s0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q, q0, rtol=1e-5, atol=1e-6)
# scaled row max vs torch (ties: first index)
sim = torch.randn(2, 19, 300, generator=g)
sim[0, 3, 10] = sim[0, 3, 200] = 50.0  # a tie
scale = torch.rand(2, 300, generator=g) + 0.5
scale[0, 10] = scale[0, 200] = 1.0
gm, jm = kernels.scaled_row_max(sim, scale)
g0, j0 = (sim * scale[:, None, :]).max(-1)
torch.testing.assert_close(gm, g0)
assert torch.equal(jm, j0) and int(jm[0, 3]) == 10
wide = torch.randn(2, 19, 320, generator=g)  # a column slice of a padded buffer
gm, jm = kernels.scaled_row_max(wide[..., :300], scale)
g0, j0 = (wide[..., :300] * scale[:, None, :]).max(-1)
torch.testing.assert_close(gm, g0)
assert torch.equal(jm, j0)
# merge kernel vs the torch twin, on random plans (several sources per slot, pruned entries)
from utrc_lib.plan import Plan, build_plan
for seed in range(3):
    g = torch.Generator().manual_seed(seed)
    B, N, D = 3, 40, 70
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(B, N, D, generator=g).to(dtype)
        sizes = torch.randint(1, 4, (B, N), generator=g).float()
        valid = torch.ones(B, N, dtype=torch.bool)
        is_src = torch.rand(B, N, generator=g) < 0.35
        dst = torch.randint(0, N, (B, N), generator=g)
        dst = torch.where(is_src[torch.arange(B)[:, None], dst], torch.zeros_like(dst), dst)  # to kept tokens
        is_src[:, 0] = False
        merged = {"hidden": is_src & (torch.rand(B, N, generator=g) < 0.6), "residual": is_src.clone()}
        for causal in (True, False):
            plan = build_plan(valid, is_src, dst, merged, causal, counts=(int(is_src.sum(1).max()), {"hidden": True, "residual": True}) if bool((is_src.sum(1) == is_src.sum(1)[0]).all()) else None)
            for branch in ("hidden", "residual"):
                assert kernels.merge_kernel_available(x, x)
                got = plan.apply(x, branch, sizes)
                lay = plan._merge_layout()
                want = x.reshape(B * N, D).index_select(0, (plan.base + torch.arange(B)[:, None] * N).reshape(-1)).view(B, -1, D)
                w_e = plan.src_weight[branch].gather(1, lay["order"]) * sizes.gather(1, lay["src"])
                Plan._merge_torch(want, x, lay, w_e, sizes.gather(1, plan.base))
                want = want * plan.slot_valid[..., None].to(dtype)
                tol = 1e-6 if dtype == torch.float32 else 1e-3
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
print("ok")
"""


def test_triton_kernels_interpreted():
    """The Triton kernels (feature stats, scaled row max, merge), run by Triton's CPU interpreter (needs triton; the GPU tier runs it compiled)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before triton is imported
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("seed", range(5))
def test_stable_partition_equals_stable_argsort(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 4, 29
    u_ = torch.rand(B, N, generator=g)
    first = u_ < 0.3
    second = (u_ >= 0.3) & (u_ < 0.7)
    key = torch.where(first, 0, torch.where(second, 1, 2))
    want = torch.argsort(key, dim=1, stable=True)
    assert torch.equal(stable_partition(first, second), want)
    assert torch.equal(stable_partition(first), torch.argsort((~first).to(torch.int8), dim=1, stable=True))


def _match_reference(feats, is_a, is_b, r):
    """Loop reference: cosine in float64, best B per A (first on ties), top r edges (ties by position)."""
    B, N, _ = feats.shape
    f = feats.double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    is_src = torch.zeros(B, N, dtype=torch.bool)
    dst = torch.arange(N).expand(B, N).clone()
    for b in range(B):
        A = [i for i in range(N) if is_a[b, i]]
        Bs = [j for j in range(N) if is_b[b, j]]
        best = {}
        for i in A:
            sims = [(float(f[b, i] @ f[b, j]), j) for j in Bs]
            top = max(s for s, _ in sims)
            best[i] = (top, next(j for s, j in sims if s == top))
        ranked = sorted(A, key=lambda i: -best[i][0])
        for i in ranked[:min(int(r[b]), len(A), len(Bs))]:
            is_src[b, i] = True
            dst[b, i] = best[i][1]
    return is_src, dst


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layout", ["row_major", "channel_major"])
@pytest.mark.parametrize("static", [False, True])
def test_bipartite_match_scaled_similarity(seed, layout, static):
    g = torch.Generator().manual_seed(seed)
    B, N, C = 3, 24, 10
    feats = torch.randn(B, N, C, generator=g) * torch.rand(B, N, 1, generator=g) * 5
    if layout == "channel_major":
        feats = feats.transpose(1, 2).contiguous().transpose(1, 2)
    n_red = N - 2  # two protected tokens
    red = torch.zeros(B, N, dtype=torch.bool)
    red[:, :n_red] = True
    scores = torch.rand(B, N, generator=g)
    is_a = red & (_inverse_perm(torch.argsort(scores.masked_fill(~red, 2.0), dim=1, stable=True)) < n_red // 2)
    is_b = red & ~is_a
    r = torch.full((B,), 5)
    _, inv = kernels.feature_stats_torch("clip", feats)
    sizes = (5, n_red // 2, n_red - n_red // 2) if static else None
    is_src, dst = bipartite_match(feats, is_a, is_b, r, sizes, inv)
    want_src, want_dst = _match_reference(feats, is_a, is_b, r)
    assert torch.equal(is_src, want_src)
    assert torch.equal(torch.where(is_src, dst, -1), torch.where(want_src, want_dst, -1))
    # pre-normalised features without inverse norms: the same edges
    fn = feats / feats.norm(dim=-1, keepdim=True)
    is_src2, dst2 = bipartite_match(fn, is_a, is_b, r, sizes)
    assert torch.equal(is_src2, is_src) and torch.equal(torch.where(is_src, dst2, -1), torch.where(is_src, dst, -1))


def test_bipartite_match_padded_samples():
    """Samples with fewer A / B tokens than the batch's most (padding) match like when run alone."""
    g = torch.Generator().manual_seed(7)
    B, N, C = 3, 20, 6
    feats = torch.randn(B, N, C, generator=g)
    lengths = [20, 13, 8]
    red = torch.stack([torch.arange(N) >= N - n for n in lengths])
    rel = red.long().cumsum(1) - 1
    is_a, is_b = red & (rel % 2 == 0), red & (rel % 2 == 1)
    r = torch.tensor([6, 4, 9])
    _, inv = kernels.feature_stats_torch("l2", feats)
    is_src, dst = bipartite_match(feats, is_a, is_b, r, None, inv)
    want_src, want_dst = _match_reference(feats, is_a, is_b, r)
    assert torch.equal(is_src, want_src)
    assert torch.equal(torch.where(is_src, dst, -1), torch.where(want_src, want_dst, -1))


@pytest.mark.parametrize("method", ["utrc", "tome", "pumer", "merge_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_static_sizes_plan_equals_general_plan(method, dtype):
    """The sync-free path for equal-length batches (host sizes) builds the same plan as the general one."""
    from utrc_lib.engine import plan_reduction
    from utrc_lib.plan import TokenState

    g = torch.Generator().manual_seed(3)
    B, N, D = 4, 33, 8
    hidden = torch.randn(B, N, D, generator=g, dtype=dtype)
    residual = torch.randn(B, N, D, generator=g, dtype=dtype)
    cfg = u.ReductionConfig(method, keep_ratio=0.7, protect_last=3)
    valid = torch.ones(B, N, dtype=torch.bool)
    state = TokenState.initial(valid, protect_last=3)
    r_host = N - 24
    r = torch.full((B,), r_host)
    general = plan_reduction(cfg, state, r, hidden=hidden, residual=residual)
    static = plan_reduction(cfg, state, r, hidden=hidden, residual=residual,
                            static={"n": N, "n_red": N - 3, "r": r_host})
    for name in ("base", "pos_index", "slot_valid", "src", "src_slot"):
        assert torch.equal(getattr(general, name), getattr(static, name)), name
    for branch in ("hidden", "residual"):
        a = general.apply(hidden if branch == "hidden" else residual, branch, state.sizes)
        b = static.apply(hidden if branch == "hidden" else residual, branch, state.sizes)
        assert torch.equal(a, b)


def test_apply_merges_against_naive_loop():
    """Plan.apply (grouped row ops) equals a per-slot loop of the size-weighted average."""
    from utrc_lib.plan import build_plan

    g = torch.Generator().manual_seed(11)
    B, N, D = 2, 15, 5
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 4, (B, N), generator=g).double()
    valid = torch.ones(B, N, dtype=torch.bool)
    is_src = torch.zeros(B, N, dtype=torch.bool)
    is_src[:, [1, 2, 6, 9, 13]] = True
    dst = torch.tensor([[0, 4, 4, 3, 4, 5, 8, 7, 8, 14, 10, 11, 12, 0, 14]] * B)
    dst[1] = torch.tensor([0, 0, 3, 3, 4, 5, 5, 7, 8, 10, 10, 11, 12, 12, 14])
    merged = {"hidden": is_src.clone(), "residual": is_src.clone()}
    merged["hidden"][:, 6] = False  # pruned in the hidden branch
    plan = build_plan(valid, is_src, dst, merged, causal=False)
    for branch in ("hidden", "residual"):
        out = plan.apply(x, branch, sizes)
        for b in range(B):
            kept = [t for t in range(N) if not is_src[b, t]]
            for k, t in enumerate(kept):
                members = [t] + [s for s in range(N) if merged[branch][b, s] and int(dst[b, s]) == t]
                w = sizes[b, members]
                want = (x[b, members] * w[:, None]).sum(0) / w.sum()
                torch.testing.assert_close(out[b, k], want)

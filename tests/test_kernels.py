"""The step's fast building blocks against simple references: feature statistics (torch twin and the
Triton kernel, in Triton's interpreter when triton is installed), the sort-free partition, the
one-gather / scaled-similarity matching (row-major and channel-major features), plan application."""
import os

import pytest
import torch

import utrc_lib as u
from utrc_lib.core import methods
from utrc_lib.core.methods import HostSizes, _inverse_perm, bipartite_match, importance, stable_partition


@pytest.mark.parametrize("metric", ["clip", "sum", "l1", "l2", "random"])
def test_feature_stats_torch_twin(metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 7, generator=g)
    x[1, 4] = 0  # a zero row: norm 0, inverse norm 0
    scores, inv = methods.feature_stats_torch(metric, x, valid=torch.ones(3, 11, dtype=torch.bool))
    torch.testing.assert_close(scores, importance(metric, x, valid=torch.ones(3, 11, dtype=torch.bool)))
    for b in range(3):
        for n in range(11):
            if (b, n) != (1, 4):
                assert abs(float(inv[b, n]) - sum(float(v) ** 2 for v in x[b, n]) ** -0.5) < 1e-5
    assert float(inv[1, 4]) == 0.0 and bool(torch.isfinite(inv).all())


_INTERPRETED = r"""
import torch
from utrc_lib.core import methods
import kernel_checks as kc
assert methods.HAVE_TRITON
g = torch.Generator().manual_seed(1)
x = torch.randn(2, 37, 300, generator=g)  # N, C not multiples of the tiles
kc.check_feature_stats(x, rtol=1e-5, atol_scores=1e-5, atol_inv=1e-6)
kc.check_feature_stats(kc.channel_major(x), rtol=1e-5, atol_scores=1e-5, atol_inv=1e-6)
kc.check_scaled_row_max(g, "cpu")
for seed in range(3):
    g = torch.Generator().manual_seed(seed)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
        x = torch.randn(3, 40, 70, generator=g).to(dtype)
        sizes = torch.randint(1, 4, (3, 40), generator=g).float()
        kc.check_merge(kc.random_plan(3, 40, g, "cpu", 0.35, 0.6, counts=True), x, sizes, tol)
print("ok")
"""


@pytest.mark.heavy
def test_triton_kernels_interpreted():
    """The Triton kernels (feature stats, scaled row max, merge), run by Triton's CPU interpreter (needs triton; the GPU tier runs it compiled)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before triton is imported
    here = Path(__file__).resolve().parent  # tests/ (kernel_checks) and the repository root
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
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
    """Per sample, the loop twin's matching (cosine in float64, first B on ties, top r edges by position)."""
    from utrc_lib.core.twins import _match

    B, N, _ = feats.shape
    is_src = torch.zeros(B, N, dtype=torch.bool)
    dst = torch.arange(N).expand(B, N).clone()
    for b in range(B):
        edges = _match(feats[b], [i for i in range(N) if is_a[b, i]], [j for j in range(N) if is_b[b, j]], int(r[b]))
        for i, j in edges.items():
            is_src[b, i], dst[b, i] = True, j
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
    _, inv = methods.feature_stats_torch("clip", feats)
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
    _, inv = methods.feature_stats_torch("l2", feats)
    is_src, dst = bipartite_match(feats, is_a, is_b, r, None, inv)
    want_src, want_dst = _match_reference(feats, is_a, is_b, r)
    assert torch.equal(is_src, want_src)
    assert torch.equal(torch.where(is_src, dst, -1), torch.where(want_src, want_dst, -1))


@pytest.mark.parametrize("method", ["utrc", "tome", "pumer", "merge_only", "prune_only", "evit", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_static_sizes_plan_equals_general_plan(method, dtype):
    """The sync-free path for equal-length batches (host sizes) builds the same plan as the general one."""
    from utrc_lib.core.methods import plan_reduction
    from utrc_lib.core.plan import TokenState

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
                            static=HostSizes(n=N, n_red=N - 3, r=r_host))
    for name in ("base", "pos_index", "slot_valid", "src", "src_slot"):
        assert torch.equal(getattr(general, name), getattr(static, name)), name
    assert general.has_merge == static.has_merge and general.all_valid == static.all_valid
    for branch in ("hidden", "residual"):
        a = general.apply(hidden if branch == "hidden" else residual, branch, state.sizes)
        b = static.apply(hidden if branch == "hidden" else residual, branch, state.sizes)
        assert torch.equal(a, b)


def test_apply_merges_against_naive_loop():
    """Plan.apply (grouped row ops) equals a per-slot loop of the size-weighted average."""
    from utrc_lib.core.plan import build_plan

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


@pytest.mark.parametrize("method", ["utrc", "tome", "merge_only", "prune_only", "pumer", "evit", "random"])
def test_static_anchor_reads_nothing_back(method, monkeypatch):
    """No fixed per-anchor host sync (issue 28): on an equal-length batch the reduction step never reads
    a device value back to the host (no bool / int / item / tolist / nonzero of a tensor), at any anchor.
    docs/prefill_speed.md lists the syncs removed and those that remain."""
    from utrc_lib.hosts.handle import ForwardReducer

    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, (lambda o, n: lambda self, *a, **k: (reads.append(n), o(self, *a, **k))[1])(orig, name))
    cfg = u.ReductionConfig(method, keep_ratio=0.7)
    sched = cfg.resolve(10)
    g = torch.Generator().manual_seed(0)
    h, r = torch.randn(2, 64, 16, generator=g), torch.randn(2, 64, 16, generator=g)
    red = ForwardReducer(cfg, sched, torch.ones(2, 64, dtype=torch.bool), uniform=True)
    for layer in range(10):
        h, r = red.step(layer, h, r, features=h)
    monkeypatch.undo()
    assert red.n_current < 64 and reads == [], reads

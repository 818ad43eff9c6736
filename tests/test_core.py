"""Vectorised reductions vs their loop twins, plan invariants, the reference mode, schedules."""
import math

import pytest
import torch

import utrc_lib as u
from utrc_lib.core.reference import reference_reduce_loop
from utrc_lib.core.twins import loop_reduce

TWIN_METHODS = ["utrc", "tome", "pumer", "evit", "prune_only", "merge_only", "utrc_alternate", "random", "none"]


def scan_inputs(B, N, seed=0, kind="mamba2", dtype=torch.float64):
    """Random Delta and ScanParams for methods that score with the timescale or the hidden attention
    (passed to every method: the others ignore them)."""
    from utrc_lib.core.hattn import ScanParams

    g = torch.Generator().manual_seed(1000 + seed)
    Ch, G, S = (4, 2, 3) if kind == "mamba2" else (6, 1, 3)
    delta = torch.nn.functional.softplus(torch.randn(B, N, Ch, generator=g, dtype=dtype))
    A = -torch.rand(Ch, 1 if kind == "mamba2" else S, generator=g, dtype=dtype).expand(Ch, S) - 0.1
    scan = ScanParams(delta, torch.randn(B, N, G, S, generator=g, dtype=dtype),
                      torch.randn(B, N, G, S, generator=g, dtype=dtype), A.contiguous(), kind == "mamba2")
    return {"delta": delta, "scan": scan}


def slice_inputs(inputs, b):
    """The scan_inputs of sample b alone (batch of one)."""
    from utrc_lib.core.hattn import ScanParams

    sc = inputs["scan"]
    return {"delta": inputs["delta"][b:b + 1],
            "scan": ScanParams(sc.delta[b:b + 1], sc.Bm[b:b + 1], sc.Cm[b:b + 1], sc.A, sc.scalar_a)}


def _case(seed, B=3, N=17, D=6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    residual = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([N, N - 4, N - 7])[:B]
    return hidden, residual, lengths


@pytest.mark.parametrize("method", TWIN_METHODS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop_twin(method, causal, seed):
    hidden, residual, lengths = _case(seed)
    B, N, _ = hidden.shape
    protect = seed % 3  # 0, 1, 2 protected tail tokens
    rules = {"hidden": ("hybrid", 0.5), "residual": ("merge", 0.0)}
    cfg = u.ReductionConfig(method, keep_ratio=0.6, causal=causal, protect_last=protect, seed=seed,
                            metric=["clip", "l2", "random"][seed])
    n_keep = torch.ceil(lengths.double() * 0.6).long()
    out = u.reduce_tokens(hidden, residual, config=cfg, n_keep=n_keep, lengths=lengths)
    rules = cfg.branch_rules()
    for b in range(B):
        n = int(lengths[b])
        start = N - n
        want = loop_reduce(method, hidden[b, start:], residual[b, start:], r=n - int(n_keep[b]), rules=rules,
                           causal=causal, protect=protect, metric=cfg.metric, seed=seed)
        valid = out.valid[b]
        assert int(valid.sum()) == len(want)
        pos = (out.positions[b][valid] - start).tolist()
        assert pos == [w[0] for w in want]
        torch.testing.assert_close(out.hidden[b][valid], torch.stack([w[1] for w in want]).to(hidden.dtype))
        torch.testing.assert_close(out.residual[b][valid], torch.stack([w[2] for w in want]).to(hidden.dtype))
        torch.testing.assert_close(out.sizes[b][valid].double(), torch.tensor([w[3] for w in want], dtype=torch.float64))
        # padding slots are zero and come first
        assert not bool(out.hidden[b][~valid].abs().sum())
        assert bool((valid.long().diff() >= 0).all())


@pytest.mark.parametrize("method", [m for m in u.available_methods() if m != "none"])
def test_order_preserved_and_count(method):
    hidden, residual, lengths = _case(5, N=40)
    cfg = u.ReductionConfig(method, keep_ratio=0.7, causal=method != "utrc_reference")
    out = u.reduce_tokens(hidden, residual, config=cfg, n_keep=torch.ceil(lengths * 0.7).long(), lengths=lengths,
                          **scan_inputs(*hidden.shape[:2]))
    for b in range(hidden.shape[0]):
        pos = out.positions[b][out.valid[b]]
        assert bool((pos.diff() > 0).all()), "kept tokens must stay in ascending original order"
        assert len(pos) == math.ceil(int(lengths[b]) * 0.7)


def test_mass_conservation_of_merges():
    hidden, residual, lengths = _case(7, N=30)
    sizes = (torch.rand(hidden.shape[:2], generator=torch.Generator().manual_seed(0)) + 0.5).double()  # fp32 values: sizes are fp32
    valid = torch.arange(30)[None] >= (30 - lengths)[:, None]
    sizes = sizes * valid
    for method in ["merge_only", "tome", "utrc"]:
        cfg = u.ReductionConfig(method, keep_ratio=0.5)
        out = u.reduce_tokens(hidden, residual, config=cfg, n_keep=torch.ceil(lengths * 0.5).long(),
                              lengths=lengths, sizes=sizes)
        # residual branch merges every edge: total size and size-weighted sum are conserved
        torch.testing.assert_close(out.sizes.double().sum(1), sizes.sum(1))
        torch.testing.assert_close((out.residual * out.sizes[..., None]).sum(1), (residual * sizes[..., None]).sum(1),
                                   rtol=1e-5, atol=1e-5)  # carried sizes are fp32
    # prune on both branches loses exactly the pruned tokens' mass
    cfg = u.ReductionConfig("prune_only", keep_ratio=0.5)
    out = u.reduce_tokens(hidden, residual, config=cfg, n_keep=torch.ceil(lengths * 0.5).long(),
                          lengths=lengths, sizes=sizes)
    assert bool((out.sizes.double().sum(1) < sizes.sum(1)).all())


def test_keep_ratio_one_is_identity():
    hidden, residual, lengths = _case(3)
    for method in u.available_methods():
        cfg = u.ReductionConfig(method, keep_ratio=1.0, causal=method != "utrc_reference")
        out = u.reduce_tokens(hidden, residual, config=cfg, n_keep=lengths, lengths=lengths,
                              **scan_inputs(*hidden.shape[:2]))
        valid = out.valid
        ref_valid = torch.arange(hidden.shape[1])[None] >= (hidden.shape[1] - lengths)[:, None]
        assert torch.equal(valid, ref_valid)
        assert torch.equal(out.hidden[valid], hidden[ref_valid])
        assert torch.equal(out.residual[valid], residual[ref_valid])


def test_zero_vectors_never_nan():
    h = torch.zeros(2, 12, 4)
    h[0, 3] = 1.0
    for method in u.available_methods():
        cfg = u.ReductionConfig(method, keep_ratio=0.5, causal=method != "utrc_reference")
        out = u.reduce_tokens(h, h.clone(), config=cfg, n_keep=6, **scan_inputs(2, 12, dtype=torch.float32))
        assert not torch.isnan(out.hidden).any() and not torch.isnan(out.residual).any(), method


# -- the authors' released behaviour (docs/method.md §2) ------------------------------------------------

def test_reference_folds_into_position_one():
    g = torch.Generator().manual_seed(0)
    N, D, rho = 16, 8, 0.75
    x = torch.rand(1, N, D, generator=g, dtype=torch.float64) + 0.01  # clipped values all > 0: no ties
    res = torch.randn(1, N, D, generator=g, dtype=torch.float64)
    cfg = u.ReductionConfig("utrc_reference", keep_ratio=rho, causal=False)
    r = N - math.ceil(N * rho)
    out = u.reduce_tokens(x, res, config=cfg, n_keep=N - r)
    removed = sorted(set(range(N)) - set(out.positions[0].tolist()))
    assert removed == list(range(0, 2 * r, 2)), "sources are the first r even positions"
    # residual branch: position 1 is the plain mean of itself and the r sources
    slot1 = out.positions[0].tolist().index(1)
    want = (res[0, 1] + res[0, list(range(0, 2 * r, 2))].sum(0)) / (r + 1)
    torch.testing.assert_close(out.residual[0, slot1], want)
    # hidden branch: per channel, the top floor(r/2) source values are added, divisor 1 + floor(r/2)
    k = r // 2
    srcs = x[0, list(range(0, 2 * r, 2))]
    want_h = (x[0, 1] + srcs.topk(k, dim=0).values.sum(0)) / (1 + k)
    torch.testing.assert_close(out.hidden[0, slot1], want_h)
    # every other token is untouched
    others = [i for i, p in enumerate(out.positions[0].tolist()) if p != 1]
    torch.testing.assert_close(out.hidden[0, others], x[0, out.positions[0, others]])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("N", [15, 16])
def test_reference_equals_loop_twin(seed, N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N, 5, generator=g, dtype=torch.float64)  # mixed signs: clipped zeros, ties
    res = torch.randn(2, N, 5, generator=g, dtype=torch.float64)
    cfg = u.ReductionConfig("utrc_reference", keep_ratio=0.6, causal=False)
    r = N - math.ceil(N * 0.6)
    out = u.reduce_tokens(x, res, config=cfg, n_keep=N - r)
    for b in range(2):
        want_h = reference_reduce_loop(x[b], r, rule="hybrid")
        want_r = reference_reduce_loop(res[b], r, rule="merge", metric_input=x[b])
        torch.testing.assert_close(out.hidden[b], want_h)
        torch.testing.assert_close(out.residual[b], want_r)


# -- schedules -----------------------------------------------------------------------------------

def test_flops_solver_reproduces_method_table():
    t64 = u.flops_table(64)
    t48 = u.flops_table(48)
    for got, want in zip(t64.values(), [0.9729, 0.9415, 0.905]):
        assert abs(got - want) < 1e-3  # the spec rounds 0.9043 to 0.905
    for got, want in zip(t48.values(), [0.9651, 0.9248, 0.8768]):
        assert abs(got - want) < 1e-4
    for cut, rho in t64.items():
        assert abs(1 - u.token_layer_fraction(64, u.default_layers(64), rho) - cut) < 1e-8


def test_default_layers():
    assert u.default_layers(64) == (12, 17, 22, 27, 32, 37, 42)
    assert u.default_layers(48) == (10, 15, 20, 25, 30, 35)
    for L in range(2, 80):
        layers = u.default_layers(L)
        assert layers and all(0 <= l < L - 1 for l in layers)


def test_align_rounds_kept_counts_everywhere(flops_mamba2_config):
    """align: kept counts are multiples of it in the engine (host and per-sample paths), in the FLOPs
    accounting and in the schedule's token counts; align=1 is the plain ceil(n * rho)."""
    from utrc_lib.core.config import kept_tokens, tokens_per_layer, tokens_to_remove
    from utrc_lib.hosts.handle import ForwardReducer

    assert kept_tokens(2048, 0.9043) == 1853 and kept_tokens(2048, 0.9043, 16) == 1856
    assert kept_tokens(1853, 0.9043, 16) == 1680 and kept_tokens(10, 0.5, 16) == 10
    for n in range(1, 300, 7):
        for rho in (0.3, 0.71, 0.9043):
            for align in (1, 8, 16):
                k = kept_tokens(n, rho, align)
                r = tokens_to_remove(torch.ones(1, n, dtype=torch.bool), rho, align)
                assert int(r) == n - k and 1 <= k <= n
                assert align == 1 or k == n or k % align == 0
    cfg = u.ReductionConfig("utrc", keep_ratio=0.8, layers=(1, 3), align=8)
    g = torch.Generator().manual_seed(0)
    h, res = torch.randn(2, 100, 8, generator=g), torch.randn(2, 100, 8, generator=g)
    red = ForwardReducer(cfg, cfg.resolve(6), torch.ones(2, 100, dtype=torch.bool))
    for layer in range(6):
        h, res = red.step(layer, h, res, features=h)
    assert [e["tokens_after"] for e in red.history] == [80, 64]
    assert tokens_per_layer(100, 6, (1, 3), 0.8, align=8) == [100, 100, 80, 80, 64, 64]
    from utrc_lib.core.flops import flops

    rep = flops(flops_mamba2_config, 100, cfg.replace(method="utrc"))
    assert rep.tokens_per_layer == [100, 100, 80, 80, 64, 64]
    with pytest.raises(ValueError, match="align"):
        u.ReductionConfig("utrc", keep_ratio=0.8, align=0)


def test_reference_edges_break_ties_lowest_index_first():
    """Tied edge scores (rank-level rows of clipped values repeat; zero rows are common) are taken lowest
    index first: a loop twin of the edge choice, on inputs built to tie, and the same order for every
    batch layout (an unstable argsort gave a different edge set on the GPU than on the CPU)."""
    from utrc_lib.core.reference import reference_edges

    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        n, d = int(torch.randint(8, 60, (1,), generator=g)), 4
        h = (torch.randint(-1, 3, (3, n, d), generator=g)).float()      # few distinct values: many ties
        r = int(torch.randint(1, n // 2 + 1, (1,), generator=g))
        src, dst = reference_edges(h, r)
        for b in range(3):
            m = h[b].clamp(min=0)
            nrm = m.norm(dim=-1, keepdim=True)
            m = torch.where(nrm > 0, m / nrm.where(nrm > 0, torch.ones_like(nrm)), torch.zeros_like(m))
            srt = m.sort(dim=0, descending=True).values
            a, bb = srt[n // 2:], srt[: n // 2]
            best = [max(range(bb.shape[0]), key=lambda j: (float(a[i] @ bb[j]), -j)) for i in range(a.shape[0])]
            score = [float(a[i] @ bb[best[i]]) for i in range(a.shape[0])]
            order = sorted(range(a.shape[0]), key=lambda i: (-score[i], i))[:r]     # lowest index first on ties
            assert src[b].tolist() == sorted(order)
            assert sorted(zip(src[b].tolist(), dst[b].tolist())) == sorted((i, best[i]) for i in order)
            s1, d1 = reference_edges(h[b:b + 1], r)                              # alone = in the batch
            assert torch.equal(s1[0], src[b]) and torch.equal(d1[0], dst[b])

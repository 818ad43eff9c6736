"""Kernel-vs-twin checks shared by the default tier (Triton's CPU interpreter, in a subprocess) and the
gpu tier (compiled kernels): one implementation of each comparison, sizes and tolerances per caller."""
import torch

from utrc_lib.core import methods
from utrc_lib.core.plan import Plan, build_plan, merge_kernel_available

METRICS = ("clip", "sum", "l1", "l2")


def channel_major(x):
    """(B, N, C) view of a contiguous (B, C, N) copy of x: the layout Mamba-1 hands over."""
    y = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert y.stride(-1) != 1
    return y


def check_feature_stats(x, rtol, atol_scores, atol_inv):
    """The stats kernel on `x` (any layout) equals the torch twin for every kernel metric."""
    for metric in METRICS:
        assert methods.kernel_available(metric, x)
        s, q = methods.feature_stats_triton(metric, x)
        s0, q0 = methods.feature_stats_torch(metric, x)
        torch.testing.assert_close(s, s0, rtol=rtol, atol=atol_scores)
        torch.testing.assert_close(q, q0, rtol=rtol, atol=atol_inv)


def random_plan(B, N, g, device, p_src, p_hidden, counts=False):
    """A plan with several sources per slot and some sources pruned in the hidden branch."""
    is_src = torch.rand(B, N, generator=g, device=device) < p_src
    is_src[:, 0] = False
    dst = torch.randint(0, N, (B, N), generator=g, device=device)
    dst = torch.where(is_src.gather(1, dst), torch.zeros_like(dst), dst)  # join kept tokens only
    merged = {"hidden": is_src & (torch.rand(B, N, generator=g, device=device) < p_hidden), "residual": is_src}
    n_src = is_src.sum(1)
    host_counts = None
    if counts and bool((n_src == n_src[0]).all()):
        host_counts = (int(n_src.max()), {"hidden": True, "residual": True})
    return build_plan(torch.ones(B, N, dtype=torch.bool, device=device), is_src, dst, merged, True,
                      counts=host_counts)


def check_merge(plan, x, sizes, tol):
    """Plan.apply (the kernel path) equals the torch twin on both branches."""
    B, N, D = x.shape
    for branch in ("hidden", "residual"):
        assert merge_kernel_available(x, x)
        got = plan.apply(x, branch, sizes)
        lay = plan._merge_layout()
        want = x.reshape(B * N, D).index_select(
            0, (plan.base + torch.arange(B, device=x.device)[:, None] * N).reshape(-1)).view(B, -1, D)
        w_e = plan.src_weight[branch].gather(1, lay["order"]) * sizes.gather(1, lay["src"])
        Plan._merge_torch(want, x, lay, w_e, sizes.gather(1, plan.base))
        want = want * plan.slot_valid[..., None].to(x.dtype)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def check_scaled_row_max(g, device):
    """scaled_row_max equals torch (first index on ties), also on a column slice of a wider buffer."""
    sim = torch.randn(2, 19, 300, generator=g, device=device)
    sim[0, 3, 10] = sim[0, 3, 200] = 50.0  # a tie
    scale = torch.rand(2, 300, generator=g, device=device) + 0.5
    scale[0, 10] = scale[0, 200] = 1.0
    gm, jm = methods.scaled_row_max(sim, scale)
    g0, j0 = (sim * scale[:, None, :]).max(-1)
    torch.testing.assert_close(gm, g0)
    assert torch.equal(jm, j0) and int(jm[0, 3]) == 10
    wide = torch.randn(2, 19, 320, generator=g, device=device)
    gm, jm = methods.scaled_row_max(wide[..., :300], scale)
    g0, j0 = (wide[..., :300] * scale[:, None, :]).max(-1)
    torch.testing.assert_close(gm, g0)
    assert torch.equal(jm, j0)


# -- tiled best match (methods.row_best_*) -----------------------------------------------------------

def _row_best_dense(fa, fb_t, inv_a, inv_b, b_ok, pos_a=None, pos_b=None, window=None):
    """The dense rule in float64: (B, M, K) similarity, scaled, masked, first argmax."""
    s = torch.bmm(fa.double(), fb_t.double())
    if inv_b is not None:
        s = s * inv_b.double()[:, None, :]
    keep = torch.ones_like(s, dtype=torch.bool)
    if b_ok is not None:
        keep &= b_ok[:, None, :]
    if window is not None:
        keep &= (pos_a[:, :, None] - pos_b[:, None, :]).abs() <= window
    s = s.masked_fill(~keep, float("-inf"))
    g, j = s.max(-1)
    return (g if inv_a is None else g * inv_a.double()), j, s


def random_match_inputs(g, device, B, M, K, C, dtype, *, channel_major=False, padded=False, dup=False):
    """Random A / B rows (fb_t (B, C, K), any layout), inverse norms, padded B entries, sorted positions;
    dup: copies of some B columns placed later (exact ties: integer features, exact products)."""
    if dup:
        fa = torch.randint(-3, 4, (B, M, C), generator=g, device=device).to(dtype)
        fb = torch.randint(-3, 4, (B, K, C), generator=g, device=device).to(dtype)
        src = torch.randint(0, K // 2, (K // 3,), generator=g, device=device)
        dst = K // 2 + torch.randperm(K - K // 2, generator=g, device=device)[:K // 3]
        fb[:, dst] = fb[:, src]
    else:
        fa = torch.randn(B, M, C, generator=g, device=device).to(dtype)
        fb = torch.randn(B, K, C, generator=g, device=device).to(dtype)
    fb_t = fb.transpose(1, 2)
    if channel_major:  # (B, C, K) contiguous: unit stride along tokens
        fb_t = fb_t.contiguous()
        fa = fa.transpose(1, 2).contiguous().transpose(1, 2)
    sq = lambda x: x.float().pow(2).sum(-1)
    inv_a, inv_b = methods.inverse_norm(sq(fa)), methods.inverse_norm(sq(fb))
    if dup:  # powers of two: every scaled product stays exact, so duplicated columns tie exactly
        inv_a = 2.0 ** torch.randint(-2, 3, (B, M), generator=g, device=device).float()
        inv_b = 2.0 ** torch.randint(-2, 3, (B, K), generator=g, device=device).float()
        inv_b[:, dst] = inv_b[:, src]
    b_ok = None
    if padded:
        n_ok = torch.randint(K // 2, K + 1, (B,), generator=g, device=device)
        b_ok = torch.arange(K, device=device)[None, :] < n_ok[:, None]
    steps = torch.randint(1, 4, (B, M + K), generator=g, device=device).cumsum(1)
    perm = torch.rand(B, M + K, generator=g, device=device).argsort(1)
    is_a = perm < M
    pos_a = torch.stack([steps[b][is_a[b]] for b in range(B)])
    pos_b = torch.stack([steps[b][~is_a[b]] for b in range(B)])
    return fa, fb_t, inv_a, inv_b, b_ok, pos_a, pos_b


def check_row_best(g, device, shapes, dtypes, fn, *, near_tol=0.0, windows=(None,), tiles=None):
    """`fn` (methods.row_best_triton or row_best_torch) against the float64 dense rule.

    Matches must be equal wherever the best and the chosen column differ by more than `near_tol`
    (relative, in float64: the rounding of a float32 / half-precision product); exact ties (dup) must
    pick the first column. Poisoned outputs would show as mismatches.
    """
    for (B, M, K, C) in shapes:
        for dtype in dtypes:
            for opts in (dict(), dict(channel_major=True), dict(padded=True), dict(dup=True),
                         dict(dup=True, padded=True)):
                for scaled in (True, False):
                    for window in windows:
                        fa, fb_t, ia, ib, ok, pa, pb = random_match_inputs(g, device, B, M, K, C, dtype, **opts)
                        if not scaled:
                            ia = ib = None
                        kw = dict(pos_a=pa, pos_b=pb, window=window)
                        if tiles:
                            kw.update(tiles)
                        got_g, got_j = fn(fa, fb_t, ia, ib, ok, **kw)
                        want_g, want_j, s = _row_best_dense(fa, fb_t, ia, ib, ok, pa, pb, window)
                        fin = torch.isfinite(want_g)
                        assert torch.equal(torch.isfinite(got_g), fin), (B, M, K, C, dtype, opts, window)
                        assert torch.equal(got_j[~fin], torch.zeros_like(got_j[~fin]))
                        diff = got_j != want_j
                        if opts.get("dup") or near_tol == 0.0:
                            assert not bool(diff.any()), (B, M, K, C, dtype, opts, scaled, window, int(diff.sum()))
                        elif bool(diff.any()):  # only near-ties may swap: the chosen column is as good
                            chosen = s.gather(2, got_j[..., None])[..., 0]
                            best = s.gather(2, want_j[..., None])[..., 0]
                            gap = (best - chosen).abs()[diff]
                            assert bool((gap <= near_tol * best.abs()[diff].clamp_min(1e-6)).all()), (B, M, K, C, dtype, opts)
                        rtol = 1e-5 if dtype == torch.float32 else 2e-3
                        torch.testing.assert_close(got_g[fin].double(), want_g[fin], rtol=rtol, atol=rtol)

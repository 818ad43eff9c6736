"""Kernel-vs-twin checks shared by the default tier (Triton's CPU interpreter, in a subprocess) and the
gpu tier (compiled kernels): one implementation of each comparison, sizes and tolerances per caller."""
import torch

from utrc_lib.core import kernels
from utrc_lib.core.plan import Plan, build_plan

METRICS = ("clip", "sum", "l1", "l2")


def channel_major(x):
    """(B, N, C) view of a contiguous (B, C, N) copy of x: the layout Mamba-1 hands over."""
    y = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert y.stride(-1) != 1
    return y


def check_feature_stats(x, rtol, atol_scores, atol_inv):
    """The stats kernel on `x` (any layout) equals the torch twin for every kernel metric."""
    for metric in METRICS:
        assert kernels.kernel_available(metric, x)
        s, q = kernels.feature_stats_triton(metric, x)
        s0, q0 = kernels.feature_stats_torch(metric, x)
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
        assert kernels.merge_kernel_available(x, x)
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
    gm, jm = kernels.scaled_row_max(sim, scale)
    g0, j0 = (sim * scale[:, None, :]).max(-1)
    torch.testing.assert_close(gm, g0)
    assert torch.equal(jm, j0) and int(jm[0, 3]) == 10
    wide = torch.randn(2, 19, 320, generator=g, device=device)
    gm, jm = kernels.scaled_row_max(wide[..., :300], scale)
    g0, j0 = (wide[..., :300] * scale[:, None, :]).max(-1)
    torch.testing.assert_close(gm, g0)
    assert torch.equal(jm, j0)

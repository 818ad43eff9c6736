"""Time the reduction step's Triton kernels against their torch twins at the 2.7B / 2.8B anchor shapes.

    PYTHONPATH=$PWD python3 scripts/gpu_kernel_microbench.py [--out kernels.json]

Feature statistics over (16, 2048, 5120) fp16 features, row-major (Mamba-2) and channel-major
(Mamba-1), for a few tile shapes; the channel-major token gather; the merge of 196 sources per
sample into (16, 1852, 2560) rows (fp16 hidden, fp32 residual). Median of 20 CUDA-event timings.
"""
import argparse
import json
import statistics

import torch
import triton

from utrc_lib.core import methods as kernels  # the feature-statistics and matching kernels
from utrc_lib.core.plan import Plan, build_plan, merge_rows


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    B, N, C, D = 16, 2048, 5120, 2560
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    y = torch.randn(B, N, C, device="cuda").half()
    ycm = torch.randn(B, C, N, device="cuda").half().transpose(1, 2)
    for name, f in (("row_major", y), ("channel_major", ycm)):
        res[f"stats_torch_{name}"] = timed(lambda: kernels.feature_stats_torch("clip", f))
        for bn, bc, nw in ((16, 256, 4), (8, 512, 4), (32, 128, 4), (64, 64, 4), (32, 64, 4), (128, 32, 4),
                           (64, 32, 2), (16, 128, 4)):
            sc = torch.empty(B, N, device="cuda"); iv = torch.empty(B, N, device="cuda")
            grid = (B, triton.cdiv(N, bn))
            res[f"stats_triton_{name}_{bn}x{bc}_w{nw}"] = timed(lambda: kernels._stats_kernel[grid](
                f, sc, iv, N, C, f.stride(0), f.stride(1), f.stride(2), MODE=0, BLOCK_N=bn, BLOCK_C=bc, num_warps=nw))
        res[f"stats_default_{name}"] = timed(lambda: kernels.feature_stats("clip", f))
    idx = torch.sort(torch.stack([torch.randperm(N, device="cuda")[:N - 2] for _ in range(B)]), dim=1)[0]
    res["gather_cm_torch"] = timed(lambda: torch.gather(ycm.transpose(1, 2), 2, idx[:, None, :].expand(B, C, N - 2)))
    res["gather_rm_index_select"] = timed(lambda: y.reshape(B * N, C).index_select(
        0, (idx + torch.arange(B, device="cuda")[:, None] * N).reshape(-1)))
    # merges: 196 sources per sample, every other one into a distinct slot
    r = 196
    is_src = torch.zeros(B, N, dtype=torch.bool, device="cuda")
    for b in range(B):
        is_src[b, torch.randperm(N // 2, device="cuda")[:r] * 2 + 1] = True
    dst = torch.arange(N, device="cuda").expand(B, N) - 1
    plan = build_plan(torch.ones(B, N, dtype=torch.bool, device="cuda"), is_src, dst.clamp_min(0),
                      {"hidden": is_src, "residual": is_src}, True)
    sizes = torch.ones(B, N, device="cuda")
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(B, N, D, device="cuda").to(dtype)
        res[f"merge_apply_{dtype}"] = timed(lambda: plan.apply(x, "residual", sizes))
        lay = plan._merge_layout()
        w_e = plan.src_weight["residual"].gather(1, lay["order"]) * sizes.gather(1, lay["src"])
        out = plan.apply(x, "residual", sizes)
        res[f"merge_triton_only_{dtype}"] = timed(lambda: merge_rows(out, x, lay["slot"], lay["src"], w_e,
                                                                       lay["count"], sizes.gather(1, plan.base)))
        res[f"merge_torch_only_{dtype}"] = timed(lambda: Plan._merge_torch(out, x, lay, w_e, sizes.gather(1, plan.base)))
        res[f"base_gather_{dtype}"] = timed(lambda: x.reshape(B * N, D).index_select(
            0, (plan.base + torch.arange(B, device="cuda")[:, None] * N).reshape(-1)))
    # the matching's bmm + scaled row max at every anchor's size (Mamba-2-2.7B, 30%: tokens in per anchor)
    for n in (2048, 1853, 1676, 1516, 1371, 1240, 1122):
        ra, rb = n // 2, n - n // 2
        f = torch.randn(B, n, C, device="cuda").half()
        fa, fbt = f[:, :ra], f[:, ra:].transpose(1, 2)
        inv = torch.rand(B, rb, device="cuda")
        res[f"anchor_n{n}_bmm"] = timed(lambda: torch.bmm(fa, fbt, out_dtype=torch.float32))
        sim = torch.bmm(fa, fbt, out_dtype=torch.float32)
        res[f"anchor_n{n}_rowmax"] = timed(lambda: kernels.scaled_row_max(sim, inv))
        res[f"anchor_n{n}_gather_rows"] = timed(lambda: f.reshape(-1, C).index_select(0, torch.arange(B * n, device="cuda")))
    for k, v in res.items():
        print(f"{k:45s} {v:.4f}" if isinstance(v, float) else f"{k:45s} {v}")
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()

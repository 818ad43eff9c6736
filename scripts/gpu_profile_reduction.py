"""Profile one anchor of the reduction on the GPU: which kernels it spends its time in.

    PYTHONPATH=$PWD python3 scripts/gpu_profile_reduction.py [--shape mamba2-2.7b] [--cut 0.3]

Captures the first anchor's inputs from a real reduced prefill, then profiles the reducer step alone
(torch.profiler) and times it with CUDA events against a dense forward.
"""
import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import utrc_lib
from utrc_study.experiments import bench
from utrc_lib.hosts.handle import ForwardReducer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mamba2-2.7b")
    ap.add_argument("--cut", type=float, default=0.3)
    ap.add_argument("--method", default="utrc")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--anchor", type=int, default=0, help="which anchor's inputs to capture (0 = first)")
    a = ap.parse_args()
    model = bench.build_model(a.shape, "mamba_ssm", "cuda", torch.float16)
    L = len(model.backbone.layers)
    cfg = utrc_lib.config_from_args(a.method, flops_reduction=a.cut)   # causal: the method's own default
    ids = torch.randint(0, 50000, (a.batch, a.seq_len), device="cuda")
    saved = {}
    seen = []

    class Capture(ForwardReducer):   # swapped in on the handle for one forward (no class patching)
        def step(self, layer, hidden, residual, features=None, delta=None):
            if self.wants(layer):
                if len(seen) == a.anchor and not saved:  # clone keeps the strides (channel-major stays so)
                    saved.update(layer=layer, state=self.state, n=self.n_current,
                                 args=(hidden.clone(), residual.clone(),
                                       None if features is None else features.clone()))
                seen.append(layer)
            return super().step(layer, hidden, residual, features, delta)

    with torch.no_grad(), utrc_lib.apply(model, cfg) as handle, handle.options(reducer=Capture):
        model(ids, num_last_tokens=1)
    hidden, residual, feats = saved["args"]
    valid = torch.ones(a.batch, a.seq_len, dtype=torch.bool, device="cuda")
    print(f"anchor {a.anchor}: layer {saved['layer']}, {saved['n']} tokens in, features strides "
          f"{None if feats is None else feats.stride()}")

    def one():
        red = ForwardReducer(cfg, cfg.resolve(L), valid, uniform=True)
        red.state, red.n_current = saved["state"], saved["n"]  # the captured anchor's token state
        return red.step(saved["layer"], hidden, residual, feats)

    with torch.no_grad():
        for _ in range(5):
            one()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); one(); e.record(); torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        dense = []
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); model(ids, num_last_tokens=1); e.record(); torch.cuda.synchronize()
            dense.append(s.elapsed_time(e))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                one()
            torch.cuda.synchronize()
    print(f"{a.shape} {a.method} cut {a.cut}: one anchor {statistics.median(times):.2f} ms "
          f"(min {min(times):.2f}); dense forward {statistics.median(dense):.1f} ms; "
          f"{len(cfg.resolve_layers(L))} anchors")
    print("(5 steps profiled: divide 'Self CUDA time total' by 5 for one step)")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=35, max_name_column_width=70))


if __name__ == "__main__":
    main()

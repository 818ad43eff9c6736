"""GPU tier: the mamba-ssm backend against the transformers backend on the same random weights.

Run on a CUDA machine with mamba-ssm: `python -m pytest -q -m gpu tests/test_gpu.py`.
Tiny shapes (4 layers, d_model 64, 64 tokens); weights converted with utrc_lib.convert.
"""
import copy

import pytest
import torch

import utrc_lib as u

import kernel_checks
from conftest import ssm_config

try:
    import mamba_ssm  # noqa: F401
    HAVE_MAMBA_SSM = True
except Exception:  # ImportError, or a kernel library that fails to load
    HAVE_MAMBA_SSM = False

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_MAMBA_SSM), reason="needs CUDA and mamba-ssm")]

# flat tiny configs (mamba-ssm MambaConfig fields); one per mixer generation
CONFIGS = {arch: ssm_config(arch, layers=4) for arch in ("mamba", "mamba2")}
LAYERS = (1,)  # one anchor after layer 1 (of 4)
N = 64


def build_pair(arch, dtype=torch.float32, seed=0):
    """(mamba-ssm model, transformers model) on CUDA with identical weights (scaled so choices matter)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    from utrc_lib.hosts.convert import convert_mamba_ssm_state_dict

    cfg = copy.deepcopy(CONFIGS[arch])
    run_cfg = copy.deepcopy(cfg)
    if arch == "mamba2":
        run_cfg["ssm_cfg"]["use_mem_eff_path"] = False  # no causal-conv1d
    torch.manual_seed(seed)
    ssm = MambaLMHeadModel(MambaConfig(**run_cfg), device="cuda", dtype=torch.float32)
    with torch.no_grad():
        for name, p in ssm.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    hf_cfg, hf_sd = convert_mamba_ssm_state_dict(ssm.state_dict(), arch, cfg)
    hf = (MambaForCausalLM if arch == "mamba" else Mamba2ForCausalLM)(hf_cfg)
    hf.load_state_dict(hf_sd, strict=False)
    hf.tie_weights()
    return ssm.to(dtype).eval(), hf.to("cuda", dtype).eval()


def ids_for(B=2, n=N, vocab=128, seed=0):
    return torch.randint(0, vocab, (B, n), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def pair(request):
    return (request.param, *build_pair(request.param))


def close(a, b, tol):
    scale = max(1.0, float(b.abs().max()))
    return float((a.float() - b.float()).abs().max()) <= tol * scale


@torch.no_grad()
def test_dense_matches_transformers(pair):
    arch, ssm, hf = pair
    ids = ids_for()
    a, b = ssm(ids).logits, hf(ids, use_cache=False).logits
    assert a.shape == b.shape
    assert close(a, b, 2e-3), float((a - b).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("method,metric", [("utrc", "clip"), ("utrc", "delta"), ("evit", "clip"),
                                           ("utrc_reference", "clip")])
def test_reduced_matches_transformers(pair, method, metric):
    arch, ssm, hf = pair
    ids = ids_for()
    cfg = u.ReductionConfig(method, keep_ratio=0.7, layers=LAYERS, metric=metric, causal=method != "utrc_reference")
    with u.apply(hf, cfg) as h_hf:
        b = hf(ids, use_cache=False).logits
        b_last = hf(ids, use_cache=False, logits_to_keep=1).logits
        pos_hf = h_hf.last_reducer.state.positions
    with u.apply(ssm, cfg) as h_ssm:
        a = ssm(ids).logits
        a_last = ssm(ids, num_last_tokens=1).logits
        pos_ssm = h_ssm.last_reducer.state.positions
    assert pos_ssm.shape[1] == 45  # ceil(64 * 0.7)
    assert torch.equal(pos_ssm, pos_hf), "the two backends kept different tokens"
    assert a.shape == b.shape and a_last.shape == (2, 1, a.shape[-1])
    assert close(a, b, 2e-3), float((a - b).abs().max())
    assert close(a_last, b_last, 2e-3)
    assert close(a_last, a[:, -1:], 1e-4)  # last-token mode = last row of the expanded logits


@torch.no_grad()
def test_patch_remove_bit_identical_and_rho_one(pair):
    arch, ssm, hf = pair
    ids = ids_for(seed=1)
    dense = ssm(ids).logits
    dense_last = ssm(ids, num_last_tokens=1).logits
    assert torch.equal(ssm(ids).logits, dense), "dense forward is not deterministic on this GPU"
    state = {k: v.clone() for k, v in ssm.state_dict().items()}
    flags = {i: dict(m.__dict__) for i, m in enumerate(ssm.modules())}
    for method in ("utrc", "evit", "utrc_reference", "tome"):
        handle = u.apply(ssm, u.ReductionConfig(method, keep_ratio=0.6, layers=LAYERS, causal=method != "utrc_reference"))
        reduced = ssm(ids).logits
        assert not torch.equal(reduced, dense), method
        handle.remove()
        assert torch.equal(ssm(ids).logits, dense), method
        assert "forward" not in ssm.__dict__ and "forward" not in ssm.backbone.__dict__
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in ssm.modules())
    for i, m in enumerate(ssm.modules()):
        assert {k: v for k, v in m.__dict__.items() if not k.startswith("_")} == \
               {k: v for k, v in flags[i].items() if not k.startswith("_")}
    for k, v in ssm.state_dict().items():
        assert torch.equal(v, state[k])
    with u.apply(ssm, u.ReductionConfig("utrc", keep_ratio=1.0)):
        assert torch.equal(ssm(ids).logits, dense)
        # last-token mode runs the head on a (B, 1, D) slice: compare with the unpatched last-token path
        assert torch.equal(ssm(ids, num_last_tokens=1).logits, dense_last)


@torch.no_grad()
def test_fp16_reduced_forward_and_generation(pair):
    arch, _, _ = pair
    ssm, _ = build_pair(arch, dtype=torch.float16, seed=2)
    ids = ids_for(seed=3)
    dense_gen = ssm.generate(ids, max_length=N + 5)
    cfg = u.ReductionConfig("utrc", keep_ratio=0.7, layers=LAYERS)
    with u.apply(ssm, cfg):
        full = ssm(ids).logits
        last = ssm(ids, num_last_tokens=1).logits
        gen = ssm.generate(ids, max_length=N + 5)  # prefill reduced, decoding untouched
    assert torch.isfinite(full).all() and full.shape[:2] == ids.shape
    assert close(last, full[:, -1:], 1e-2)
    assert gen.shape == dense_gen.shape and torch.equal(gen[:, :N], ids)
    with u.apply(ssm, u.ReductionConfig("utrc", keep_ratio=1.0)):
        assert torch.equal(ssm.generate(ids, max_length=N + 5), dense_gen)


@torch.no_grad()
def test_engine_on_cuda_matches_cpu():
    """fp32 plans are device independent; half-precision features give the same plan on clear inputs."""
    torch.manual_seed(0)
    h = torch.randn(3, 40, 32)
    res = torch.randn(3, 40, 32)
    cfg = u.ReductionConfig("utrc", keep_ratio=0.6)
    cpu = u.reduce_tokens(h, res, config=cfg, n_keep=24)
    gpu = u.reduce_tokens(h.cuda(), res.cuda(), config=cfg, n_keep=24)
    assert torch.equal(gpu.positions.cpu(), cpu.positions)
    assert torch.allclose(gpu.hidden.cpu(), cpu.hidden, atol=1e-5) and torch.allclose(gpu.residual.cpu(), cpu.residual, atol=1e-5)
    half = u.reduce_tokens(h.cuda().half(), res.cuda(), config=cfg, n_keep=24)
    assert half.hidden.dtype == torch.float16 and half.hidden.shape == cpu.hidden.shape
    assert torch.isfinite(half.hidden).all()


@torch.no_grad()
@pytest.mark.parametrize("layout", ["row_major", "channel_major"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_feature_stats_kernel_compiled(layout, dtype):
    """The Triton kernel (compiled) against the torch twin, on the layouts the backends hand over."""
    from utrc_lib.core import methods

    if not methods.HAVE_TRITON:
        pytest.skip("triton not importable")
    torch.manual_seed(0)
    x = torch.randn(3, 333, 1000, device="cuda").to(dtype)
    kernel_checks.check_feature_stats(x if layout == "row_major" else kernel_checks.channel_major(x),
                                      rtol=1e-4, atol_scores=1e-5, atol_inv=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["row_major", "channel_major"])
@pytest.mark.parametrize("N", [512, 509])  # 509: |A| = 255, |B| = 254, padded to 256 on CUDA
def test_half_precision_matching_agrees_with_float32(layout, N):
    """fp16 features on CUDA (fp32-output bmm, scaled by inverse norms) pick the edges float32 picks."""
    from utrc_lib.core import methods
    from utrc_lib.core.methods import bipartite_match

    torch.manual_seed(1)
    B, C = 4, 768
    f = torch.randn(B, N, C, device="cuda") * torch.rand(B, N, 1, device="cuda") * 20  # raw dots overflow fp16
    f16 = f.half()
    if layout == "channel_major":
        f16 = f16.transpose(1, 2).contiguous().transpose(1, 2)
    red = torch.ones(B, N, dtype=torch.bool, device="cuda")
    is_a = red & (torch.arange(N, device="cuda") % 2 == 0)
    is_b = red & ~is_a
    r = torch.full((B,), 100, device="cuda")
    got = bipartite_match(f16, is_a, is_b, r, (100, N - N // 2, N // 2), methods.feature_stats("clip", f16)[1])
    f32 = f16.float().contiguous()
    want = bipartite_match(f32, is_a, is_b, r, None, methods.feature_stats_torch("clip", f32)[1])
    same_src = (got[0] == want[0]).float().mean()
    assert float(same_src) > 0.99
    both = got[0] & want[0]
    assert float((got[1][both] == want[1][both]).float().mean()) > 0.99


@torch.no_grad()
def test_merge_kernel_compiled():
    """Triton merge kernel (compiled) against its torch twin; scaled row max likewise."""
    from utrc_lib.core import methods

    if not methods.HAVE_TRITON:
        pytest.skip("triton not importable")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, D = 4, 300, 520
    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-5)):
        x = torch.randn(B, N, D, device="cuda", generator=g).to(dtype)
        sizes = torch.randint(1, 4, (B, N), device="cuda", generator=g).float()
        kernel_checks.check_merge(kernel_checks.random_plan(B, N, g, "cuda", 0.3, 0.5), x, sizes, tol)
    kernel_checks.check_scaled_row_max(g, "cuda")


@torch.no_grad()
def test_mamba_ssm_kept_only_logits(pair):
    arch, ssm, hf = pair
    ids = ids_for()
    with u.apply(ssm, u.ReductionConfig("utrc", keep_ratio=0.6, layers=LAYERS, protect_last=2)) as h:
        full = ssm(ids).logits
        with h.options(kept_only=True):
            kept = ssm(ids).logits
            pos = h.output_positions
    assert kept.shape[1] == pos.shape[1] < ids.shape[1]
    assert torch.equal(kept, full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1])))

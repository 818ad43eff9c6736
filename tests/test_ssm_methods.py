"""SSM-native methods (issue 31): hidden attention vs its full-matrix twin and a reference scan, each
method vs its loop twin, budgets, parameters, the ToP-ViM preset, hosts (causality, batch = single)."""
import math

import pytest
import torch

import utrc_lib as u
from conftest import tiny_model
from test_core import scan_inputs
from utrc_lib.core import hattn
from utrc_lib.core.ssm_methods import SSM_METHODS, decimamba_kept
from utrc_lib.core.ssm_twins import loop_ssm_reduce

NEW_METHODS = [m.name for m in SSM_METHODS]
VARIANTS = ["window", "last", "colsum", "nodecay"]


def _padded_reducible(B, N, lengths, protect):
    valid = torch.arange(N)[None] >= (N - torch.as_tensor(lengths))[:, None]
    tail = torch.arange(N)[None] >= N - protect
    return valid & ~tail


# -- hidden attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_hidden_attention_matrix_reproduces_the_scan(kind):
    """y_i = sum_j alpha[i, j] x_j: the full matrix (loops over i, j) against a token-by-token scan."""
    B, N, P = 2, 9, 3
    scan = scan_inputs(B, N, seed=1, kind="mamba2" if kind == "mamba2" else "mamba1")["scan"]
    Ch = scan.delta.shape[-1]
    x = torch.randn(B, N, Ch, P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = hattn.selective_scan_loop(x, scan)
    alpha = hattn.hidden_attention_matrix(scan)  # (B, Ch, N, N)
    assert torch.equal(alpha.triu(1), torch.zeros_like(alpha)), "alpha is lower-triangular (causal)"
    torch.testing.assert_close(torch.einsum("bcij,bjcp->bicp", alpha, x), y)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hattn_scores_equal_loop_twin(kind, variant, seed):
    B, N = 3, 13
    scan = scan_inputs(B, N, seed=seed, kind="mamba2" if kind == "mamba2" else "mamba1")["scan"]
    red = _padded_reducible(B, N, [N, N - 3, N - 6], protect=seed)
    want = hattn.scores_loop(variant, scan, red, window=4)
    for chunk in (hattn.CHUNK_ELEMENTS, 7):  # one chunk, and chunks of one or two tokens
        if variant == "colsum":
            got = hattn.colsum_scores(scan, red)
        else:
            w = 1 if variant == "last" else 4
            got = hattn.window_scores(scan, red, w, decay=variant != "nodecay", chunk_elements=chunk)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_hattn_queries_never_from_the_tail():
    """Scores of context tokens do not depend on the protected tail's B, C or Delta."""
    B, N, protect = 2, 12, 3
    inp = scan_inputs(B, N, seed=4)
    scan = inp["scan"]
    red = _padded_reducible(B, N, [N, N - 2], protect)
    changed = hattn.ScanParams(scan.delta.clone(), scan.Bm.clone(), scan.Cm.clone(), scan.A, scan.scalar_a)
    changed.delta[:, -protect:] *= 3
    changed.Bm[:, -protect:] += 1
    changed.Cm[:, -protect:] -= 2
    for v in VARIANTS:
        torch.testing.assert_close(hattn.hattn_scores(v, scan, red, 4), hattn.hattn_scores(v, changed, red, 4))


def test_hattn_batch_equals_single():
    B, N = 3, 14
    scan = scan_inputs(B, N, seed=5)["scan"]
    lengths = [14, 10, 6]
    red = _padded_reducible(B, N, lengths, 2)
    for v in VARIANTS:
        full = hattn.hattn_scores(v, scan, red, 4)
        for b, n in enumerate(lengths):
            one = hattn.ScanParams(scan.delta[b:b + 1, N - n:], scan.Bm[b:b + 1, N - n:], scan.Cm[b:b + 1, N - n:],
                                   scan.A, scan.scalar_a)
            single = hattn.hattn_scores(v, one, red[b:b + 1, N - n:], 4)
            torch.testing.assert_close(full[b:b + 1, N - n:], single)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_scan_reader_matches_the_mixer(kind):
    """The host readers' Delta, B, C, A reproduce the transformers mixer's own scan output."""
    from utrc_lib.hosts import handle

    model = tiny_model(kind)
    mixer = model.backbone.layers[1].mixer
    got = {}
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    if kind == "mamba2":
        hooks = [mixer.in_proj.register_forward_hook(lambda m, a, o: got.__setitem__("zx", o)),
                 mixer.norm.register_forward_pre_hook(lambda m, a: got.__setitem__("y", a[0]))]
    else:
        hooks = [mixer.x_proj.register_forward_hook(lambda m, a, o: got.update(x=a[0], xd=o)),
                 mixer.out_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("y", a[0])),
                 mixer.in_proj.register_forward_hook(lambda m, a, o: got.__setitem__("zx", o))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    B, N = ids.shape
    if kind == "mamba2":
        scan = handle.scan_mamba2(got["zx"], mixer, heads=mixer.num_heads, groups=mixer.n_groups,
                                  state=mixer.ssm_state_size, limit=mixer.time_step_limit)
        xbc = got["zx"][..., mixer.intermediate_size:mixer.intermediate_size + mixer.conv_dim].transpose(1, 2)
        x = torch.nn.functional.silu(mixer.conv1d(xbc)[..., :N]).transpose(1, 2)[..., :mixer.intermediate_size]
        xh = x.reshape(B, N, mixer.num_heads, mixer.head_dim)
        want = hattn.selective_scan_loop(xh, scan) + mixer.D.double()[None, None, :, None] * xh.double()
        torch.testing.assert_close(want.reshape(B, N, -1).float(), got["y"].float(), rtol=1e-4, atol=1e-5)
    else:
        scan = handle.scan_mamba1(got["xd"], mixer, mixer.time_step_rank)
        x = got["x"]  # (B, N, Di) post-conv input of the scan
        gate = got["zx"].transpose(1, 2)[..., mixer.intermediate_size:] if got["zx"].shape[1] != N else \
            got["zx"][..., mixer.intermediate_size:]
        y = hattn.selective_scan_loop(x[..., None], scan)[..., 0] + mixer.D.double() * x.double()
        want = y * torch.nn.functional.silu(gate.double())
        torch.testing.assert_close(want.float(), got["y"].float(), rtol=1e-4, atol=1e-5)


# -- methods vs twins ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,metric,params", [
    ("decimamba", "clip", {}),
    ("hattn_prune", "hattn_window", {"window": 3}),
    ("hattn_prune", "hattn_last", {}),
    ("hattn_prune", "hattn_colsum", {}),
    ("hattn_prune", "hattn_nodecay", {"window": 2}),
    ("mtr_style", "clip", {}),
    ("mtr_style", "clip", {"keep_fraction": 0.0}),
    ("mtr_style", "clip", {"keep_fraction": 0.8}),
    ("adjacent_merge", "clip", {}),
    ("adjacent_merge", "l2", {"pair_score": "importance"}),
])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssm_methods_equal_loop_twin(method, metric, params, causal, seed):
    g = torch.Generator().manual_seed(seed)
    B, N, D = 3, 17, 6
    hidden = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    residual = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([N, N - 4, N - 7])
    protect = seed % 3
    extra = scan_inputs(B, N, seed=seed, kind="mamba2" if seed % 2 else "mamba1")
    cfg = u.ReductionConfig(method, keep_ratio=0.6, causal=causal, protect_last=protect, metric=metric,
                            params=params)
    n_keep = torch.ceil(lengths.double() * 0.6).long()
    out = u.reduce_tokens(hidden, residual, config=cfg, n_keep=n_keep, lengths=lengths, **extra)
    for b in range(B):
        n = int(lengths[b])
        s = N - n
        scan = extra["scan"]
        one = hattn.ScanParams(scan.delta[b:b + 1, s:], scan.Bm[b:b + 1, s:], scan.Cm[b:b + 1, s:], scan.A,
                               scan.scalar_a)
        want = loop_ssm_reduce(method, hidden[b, s:], residual[b, s:], r=n - int(n_keep[b]), rules=cfg.branch_rules(),
                               causal=causal, protect=protect, metric=cfg.scoring_metric, params=cfg.resolved_params,
                               delta=extra["delta"][b, s:], scan=one)
        valid = out.valid[b]
        assert int(valid.sum()) == len(want)
        assert (out.positions[b][valid] - s).tolist() == [w[0] for w in want]
        torch.testing.assert_close(out.hidden[b][valid], torch.stack([w[1] for w in want]).to(hidden.dtype))
        torch.testing.assert_close(out.residual[b][valid], torch.stack([w[2] for w in want]).to(hidden.dtype))
        torch.testing.assert_close(out.sizes[b][valid].double(), torch.tensor([w[3] for w in want], dtype=torch.float64))


def test_decimamba_scores_with_the_l2_norm_of_delta():
    """The tokens decimamba drops are the lowest L2 norms of Delta (not the mean: a token with one
    large head and a small mean is kept)."""
    N = 6
    delta = torch.ones(1, N, 4)
    delta[0, 2] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # mean 0.75 (< 1), L2 norm 3 (> 2)
    h = torch.randn(1, N, 5)
    out = u.reduce_tokens(h, h.clone(), config=u.ReductionConfig("decimamba", keep_ratio=0.5), n_keep=3, delta=delta)
    assert 2 in out.positions[0].tolist()
    out = u.reduce_tokens(h, h.clone(), config=u.ReductionConfig("hattn_prune", keep_ratio=0.5, metric="hattn_last"),
                          n_keep=3, scan=scan_inputs(1, N)["scan"])
    assert bool((out.positions[0].diff() > 0).all())


def test_adjacent_merge_pairs_are_adjacent_and_disjoint():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 30, 8, generator=g, dtype=torch.float64)
    cfg = u.ReductionConfig("adjacent_merge", keep_ratio=0.8, protect_last=4)
    out = u.reduce_tokens(h, h.clone(), config=cfg, n_keep=24)
    plan = out.plans[0]
    for b in range(2):
        kept = set(plan.base[b].tolist())
        srcs = plan.src[b][plan.src_weight["residual"][b] > 0].tolist()
        for s_ in srcs:
            assert s_ + 1 in kept and s_ + 1 < 26, "each source joins its right neighbour, outside the tail"
        assert len(set(srcs) & {x + 1 for x in srcs}) == 0, "pairs do not overlap"


def test_mtr_style_keep_group_is_never_a_destination():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 20, 6, generator=g, dtype=torch.float64)
    delta = torch.rand(1, 20, 3, generator=g, dtype=torch.float64)
    cfg = u.ReductionConfig("mtr_style", keep_ratio=0.7)
    out = u.reduce_tokens(h, h.clone(), config=cfg, n_keep=14, delta=delta)
    score = delta[0].mean(-1)
    order = sorted(range(20), key=lambda i: (score[i].item(), i))
    sources, rest = order[:6], order[6:]
    keep = sorted(rest, key=lambda i: (-score[i].item(), i))[:7]  # ceil(0.5 * 14)
    plan = out.plans[0]
    dst_tokens = {int(plan.base[0, s]) for s in plan.src_slot[0].tolist()}
    assert sorted(plan.src[0].tolist()) == sorted(sources)
    assert not dst_tokens & set(keep)


# -- budgets and parameters ------------------------------------------------------------------------------

def test_decimamba_absolute_budget():
    p = {"L_base": 2000, "beta": 0.5, "min_seq_len": 20}
    assert decimamba_kept(5000, 0, p) == 2000 and decimamba_kept(5000, 1, p) == 1000
    assert decimamba_kept(1500, 0, p) == 1500  # shorter than L_base: nothing removed
    assert decimamba_kept(5000, 9, p) == 20  # never below min_seq_len
    assert decimamba_kept(10, 3, p) == 10  # n < min_seq_len: keep all
    t = decimamba_kept(torch.tensor([5000, 1500, 10]), 1, p)
    assert t.tolist() == [1000, 1000, 10]
    # through the reducer: absolute counts per anchor, the tail on top (uniform and padded paths)
    cfg = u.ReductionConfig("decimamba", layers=(0, 2), protect_last=2,
                            params={"L_base": 12, "beta": 0.5, "min_seq_len": 3})
    assert cfg.absolute_budget and cfg.scoring_metric == "delta_l2" and cfg.form == "anchor"
    from utrc_lib.hosts.handle import ForwardReducer

    for valid in (torch.ones(2, 30, dtype=torch.bool), torch.arange(30)[None] >= torch.tensor([[0], [10]])):
        red = ForwardReducer(cfg, cfg.resolve(5), valid)
        g = torch.Generator().manual_seed(0)
        h, res = torch.randn(2, 30, 4, generator=g), torch.randn(2, 30, 4, generator=g)
        for layer in range(5):
            h, res = red.step(layer, h, res, delta=torch.rand(2, h.shape[1], 3, generator=g))
        assert red.state.valid.sum(1).tolist() == [6 + 2, 6 + 2]  # 12 -> 6 of the context, + the tail
    # with a ratio, the ratio form
    cfg = u.ReductionConfig("decimamba", keep_ratio=0.5)
    assert not cfg.absolute_budget


@pytest.mark.parametrize("method,params,name", [
    ("decimamba", {"beta": 0.0}, "beta"), ("decimamba", {"beta": 1.5}, "beta"), ("decimamba", {"L_base": 0}, "L_base"),
    ("decimamba", {"min_seq_len": 2.5}, "min_seq_len"), ("decimamba", {"beta": "x"}, "beta"),
    ("mtr_style", {"keep_fraction": 1.0}, "keep_fraction"), ("mtr_style", {"keep_fraction": -0.1}, "keep_fraction"),
    ("adjacent_merge", {"pair_score": "nearest"}, "pair_score"), ("hattn_prune", {"window": 0}, "window"),
    ("utrc", {"beta": 0.5}, "beta"), ("decimamba", {"keep_fraction": 0.5}, "keep_fraction"),
])
def test_bad_parameters_raise_naming_them(method, params, name):
    with pytest.raises(ValueError, match=name):
        u.ReductionConfig(method, keep_ratio=0.8, params=params)


def test_method_metric_mismatch_and_parsing():
    with pytest.raises(ValueError, match="delta_l2"):
        u.ReductionConfig("decimamba", keep_ratio=0.8, metric="l2")
    with pytest.raises(ValueError, match="hattn"):
        u.ReductionConfig("hattn_prune", keep_ratio=0.8, metric="delta")
    cfg = u.config_from_args("decimamba", params="beta=0.25;L_base=100")
    assert cfg.resolved_params == {"L_base": 100, "beta": 0.25, "min_seq_len": 20} and cfg.absolute_budget
    assert u.ReductionConfig("utrc", keep_ratio=0.5, metric="hattn_window", params={"window": 3}).resolved_params == {"window": 3}
    assert hash(cfg) == hash(u.ReductionConfig("decimamba", params={"L_base": 100, "beta": 0.25}))
    # existing behaviour unchanged: "delta" is still the channel mean, and utrc scores with the config's metric
    d = torch.rand(2, 5, 3)
    from utrc_lib.core.methods import importance
    torch.testing.assert_close(importance("delta", None, delta=d), d.mean(-1))
    torch.testing.assert_close(importance("delta_l2", None, delta=d), d.norm(dim=-1))
    assert u.ReductionConfig("utrc", keep_ratio=0.5, metric="delta").scoring_metric == "delta"
    assert u.ReductionConfig("utrc", keep_ratio=0.5).needs_ssm_output


# -- ToP-ViM preset --------------------------------------------------------------------------------------

def test_topvim_preset():
    from utrc_lib.core.presets import preset_config, topvim_layers

    assert topvim_layers(24) == (5, 10, 15)
    cfg = preset_config("topvim", 24)
    assert (cfg.method, cfg.metric, cfg.keep_ratio, cfg.layers) == ("prune_only", "clip", 0.8, (5, 10, 15))
    cut = preset_config("topvim", 48, flops_reduction=0.2)
    assert cut.keep_ratio is None and cut.flops_reduction == 0.2 and cut.layers == topvim_layers(48)
    with pytest.raises(ValueError, match="preset"):
        preset_config("tovim", 24)


@pytest.mark.parametrize("seed", range(4))
def test_alignment_equals_dropping_in_a_causal_scan(seed):
    """ToP-ViM's alignment in 1-D: pruned positions that pass the state unchanged (Delta = 0) give the
    kept tokens exactly the outputs of scanning the gathered (shortened) sequence."""
    B, N, P = 2, 12, 2
    for kind in ("mamba1", "mamba2"):
        scan = scan_inputs(B, N, seed=seed, kind=kind)["scan"]
        Ch = scan.delta.shape[-1]
        x = torch.randn(B, N, Ch, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        keep = torch.rand(N, generator=torch.Generator().manual_seed(50 + seed)) < 0.6
        keep[-1] = True
        idx = keep.nonzero()[:, 0]
        aligned = hattn.ScanParams(scan.delta * keep[None, :, None], scan.Bm, scan.Cm, scan.A, scan.scalar_a)
        y_aligned = hattn.selective_scan_loop(x, aligned)[:, idx]
        gathered = hattn.ScanParams(scan.delta[:, idx], scan.Bm[:, idx], scan.Cm[:, idx], scan.A, scan.scalar_a)
        y_dropped = hattn.selective_scan_loop(x[:, idx], gathered)
        torch.testing.assert_close(y_aligned, y_dropped, rtol=0, atol=1e-12)


# -- hosts: the hidden-attention metrics through UTRC / EViT / prune-only and the new methods ------------------

def _cfg(method, **kw):
    kw.setdefault("keep_ratio", 0.6)
    return u.ReductionConfig(method, **kw)


@torch.no_grad()
@pytest.mark.parametrize("method,metric", [("utrc", "hattn_window"), ("evit", "hattn_colsum"),
                                           ("prune_only", "hattn_nodecay"), ("hattn_prune", "hattn_last"),
                                           ("utrc", "delta_l2")])
def test_metrics_in_hosts_batched_equals_single_and_causal(model, method, metric):
    lengths = [24, 17, 11]
    seqs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    N = max(lengths)
    batch = torch.zeros(3, N, dtype=torch.long)
    mask = torch.zeros(3, N, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, N - len(s):], mask[i, N - len(s):] = s, 1
    with u.apply(model, _cfg(method, metric=metric, protect_last=3)):
        out = model(batch, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i, N - len(s):], model(s[None]).logits[0], rtol=1e-4, atol=1e-4, equal_nan=True)
    P = 20
    ids = torch.randint(0, 64, (2, 28), generator=torch.Generator().manual_seed(3))
    with u.apply(model, _cfg(method, metric=metric, protect_last=28 - P)):
        base = model(ids).logits
        changed = ids.clone()
        changed[:, P + 2:] = (changed[:, P + 2:] + 5) % 64
        torch.testing.assert_close(model(changed).logits[:, :P + 2], base[:, :P + 2], rtol=0, atol=1e-6, equal_nan=True)
    dense = model(ids).logits
    with u.apply(model, _cfg(method, metric=metric, keep_ratio=1.0)):
        assert torch.equal(model(ids).logits, dense)


@torch.no_grad()
def test_decimamba_absolute_budget_in_a_host(model):
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    dense = model(ids).logits
    with u.apply(model, u.ReductionConfig("decimamba", protect_last=4)):  # L_base 2000: nothing to cut
        assert torch.equal(model(ids).logits, dense)
    cfg = u.ReductionConfig("decimamba", protect_last=4, params={"L_base": 16, "beta": 0.5, "min_seq_len": 4})
    with u.apply(model, cfg) as h:
        model(ids)
        hist = h.last_reducer.history
    assert [e["tokens_after"] for e in hist] == [16 + 4, 8 + 4][:len(hist)] and hist[0]["form"] == "anchor"


def test_flops_count_new_methods(flops_mamba2_config):
    from utrc_lib.core.flops import flops

    mcfg = flops_mamba2_config
    base = flops(mcfg, 100, u.ReductionConfig("random", keep_ratio=0.8, layers=(1, 3)))
    for m in NEW_METHODS:
        rep = flops(mcfg, 100, u.ReductionConfig(m, keep_ratio=0.8, layers=(1, 3)))
        assert rep.tokens_per_layer == base.tokens_per_layer and rep.reduction_overhead > 0, m
    rep = flops(mcfg, 100, u.ReductionConfig("utrc", keep_ratio=0.8, layers=(1, 3), metric="hattn_window"))
    assert rep.breakdown["reduced"]["reduction_importance"] > 0
    rep = flops(mcfg, 100, u.ReductionConfig("decimamba", layers=(1, 3), protect_last=4,
                                             params={"L_base": 40, "beta": 0.5, "min_seq_len": 4}))
    assert rep.tokens_per_layer == [100, 100, 44, 44, 24, 24]

"""Analytic FLOPs (utrc_lib.flops): exact against FlopCounterMode on the torch path, and properties."""
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import utrc_lib
from conftest import hf_config, hf_model
from utrc_lib import ReductionConfig
from utrc_lib.core.flops import (MATMUL_COMPONENTS, count, flops, flops_table_markdown, flops_table_rows,
                            model_shape)


def _mamba1_config(layers=2):
    return hf_config("mamba", layers=layers, hidden=32, vocab=100, conv_kernel=4)


def _mamba2_config(layers=2, n_groups=2):   # 8 heads of 16
    return hf_config("mamba2", layers=layers, hidden=64, vocab=100, n_groups=n_groups, chunk_size=16, conv_kernel=4)


def _model(kind, layers=2):
    torch.manual_seed(0)
    return hf_model(_mamba1_config(layers) if kind == "mamba" else _mamba2_config(layers)).eval()


def _counted(model, seq_len, batch=1):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, use_cache=False)
    return counter


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def tiny(request):
    return _model(request.param, layers=2)


@pytest.mark.parametrize("seq_len,batch", [(16, 1), (37, 1), (40, 2)])  # 37, 40: not multiples of chunk 16
def test_dense_matmuls_match_flop_counter(tiny, seq_len, batch):
    counter = _counted(tiny, seq_len, batch)
    rep = flops(tiny, seq_len, batch=batch)
    assert rep.matmul_only == counter.get_total_flops()
    # per module: lm_head and each mixer
    by_module = counter.get_flop_counts()
    name = type(tiny).__name__
    assert sum(by_module[f"{name}.lm_head"].values()) == rep.breakdown["dense"]["lm_head"]
    mixer = sum(by_module[f"{name}.backbone.layers.0.mixer"].values())
    per_layer = sum(rep.breakdown["dense"][k] for k in MATMUL_COMPONENTS if k != "lm_head") // tiny.config.num_hidden_layers
    assert mixer == per_layer
    assert rep.dense > rep.matmul_only  # element-wise work on top
    assert rep.flops_cut == 0.0 and rep.reduced == rep.dense


def test_mamba2_single_group_and_config_input():
    torch.manual_seed(0)
    cfg = _mamba2_config(layers=2, n_groups=1)
    model = hf_model(cfg).eval()
    for n in (16, 50):
        assert flops(cfg, n).matmul_only == _counted(model, n).get_total_flops()


@pytest.mark.parametrize("method", ["random", "utrc"])
def test_reduced_matmuls_match_flop_counter(tiny, method):
    """Patched model: model matmuls on the shortened sequences + the similarity matmul of the reduction."""
    rc = ReductionConfig(method=method, layers=(0,), keep_ratio=0.6)
    ids = torch.randint(0, 100, (1, 37))
    with utrc_lib.apply(tiny, rc), FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny(ids, use_cache=False)
    rep = flops(tiny, 37, rc)
    assert rep.tokens_per_layer == [37, 23]
    assert counter.get_total_flops() == rep.matmul_only_reduced + rep.reduction_matmul
    assert (rep.reduction_matmul > 0) == (method == "utrc")


def test_logits_last():
    cfg = _mamba1_config()
    all_, last = flops(cfg, 32), flops(cfg, 32, logits="last")
    assert all_.breakdown["dense"]["lm_head"] == 32 * last.breakdown["dense"]["lm_head"]
    assert all_.breakdown["dense"]["embedding"] == 0


def test_dense_and_keep_one_give_no_cut():
    cfg = _mamba2_config(layers=4)
    dense = flops(cfg, 64)
    assert dense.flops_cut == 0.0 and dense.token_layer_fraction == 1.0 and dense.reduction_overhead == 0
    keep_all = flops(cfg, 64, ReductionConfig(method="utrc", keep_ratio=1.0))
    assert keep_all.flops_cut == 0.0 and keep_all.reduced == dense.dense
    assert keep_all.tokens_per_layer == [64] * 4
    none = flops(cfg, 64, ReductionConfig(method="none"))
    assert none.flops_cut == 0.0


def _wide_64_layer_config(hidden=32):
    return hf_config("mamba2", layers=64, hidden=hidden, vocab=100, chunk_size=16)


def test_token_layer_fraction_at_20pct():
    rep = flops(_wide_64_layer_config(), 2048, ReductionConfig(method="utrc", flops_reduction=0.2))
    assert rep.layers == (12, 17, 22, 27, 32, 37, 42)
    assert rep.token_layer_fraction == pytest.approx(0.8, abs=2e-3)
    assert len(rep.tokens_per_layer) == 64 and rep.tokens_per_layer[12] == 2048
    assert rep.tokens_per_layer[13] == 1929  # ceil(2048 * 0.9415)
    assert rep.flops_cut > 0.1


def test_cut_grows_as_keep_ratio_falls():
    cfg = _wide_64_layer_config()
    cuts = [flops(cfg, 512, ReductionConfig(method="utrc", keep_ratio=k)).flops_cut
            for k in (1.0, 0.95, 0.9, 0.8, 0.6, 0.4)]
    assert all(b > a for a, b in zip(cuts, cuts[1:])), cuts


def test_overhead_small_for_2_7b_shape():
    shape = types.SimpleNamespace(d_model=2560, n_layer=64, vocab_size=50280, pad_vocab_size_multiple=8,
                                  d_intermediate=0,
                                  ssm_cfg=dict(layer="Mamba2", d_state=128, headdim=64, expand=2, ngroups=1))
    rep = flops(shape, 2048, ReductionConfig(method="utrc", flops_reduction=0.2))
    assert 0 < rep.reduction_overhead < 0.01 * rep.dense
    assert rep.reduction_comparisons > 0
    assert 0.15 < rep.flops_cut < 0.2
    d = rep.to_dict()
    import json

    assert json.loads(json.dumps(d))["reduced"] == rep.reduced
    assert set(d["breakdown"]) == {"dense", "reduced"}


def test_mamba_ssm_like_config_matches_transformers_config():
    hf2 = hf_config("mamba2", layers=3, hidden=64, vocab=128, chunk_size=256)
    ssm2 = dict(d_model=64, n_layer=3, vocab_size=128, ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16))
    assert model_shape(hf2) == model_shape(types.SimpleNamespace(**ssm2))
    hf1 = hf_config("mamba", layers=3, hidden=64, vocab=128, state_size=16)
    ssm1 = types.SimpleNamespace(d_model=64, n_layer=3, vocab_size=128, ssm_cfg={})
    assert model_shape(hf1) == model_shape(ssm1)


def test_bad_inputs_raise():
    cfg = _mamba1_config()
    with pytest.raises(ValueError, match="supported"):
        flops(object(), 16)
    with pytest.raises(ValueError, match="supported"):
        flops({"hidden_size": 3}, 16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            flops(cfg, bad)
    with pytest.raises(ValueError, match="batch"):
        flops(cfg, 16, batch=0)
    with pytest.raises(ValueError, match="logits"):
        flops(cfg, 16, logits="first")
    with pytest.raises(ValueError, match="ReductionConfig"):
        flops(cfg, 16, {"keep_ratio": 0.5})
    with pytest.raises(ValueError, match="out of range"):
        flops(cfg, 16, ReductionConfig(method="utrc", layers=(5,), keep_ratio=0.5))
    with pytest.raises(ValueError, match="keep_ratio"):
        count(model_shape(cfg), 16, (0,), 1.5)
    with pytest.raises(ValueError, match="Mamba1"):
        model_shape(types.SimpleNamespace(d_model=8, n_layer=2, vocab_size=10, ssm_cfg={"layer": "Mamba3"}))


def test_table():
    rows = flops_table_rows(seq_len=2048)
    assert len(rows) == 6
    for r in rows:
        assert r["token_layer_fraction"] == pytest.approx(1 - r["cut"], abs=2e-3)  # ceil rounding
        assert 0 < r["analytic_cut"] < r["cut"]  # head, final norm and overhead are not reduced
    text = flops_table_markdown(seq_len=512)
    assert "Mamba-2-2.7B" in text and "Mamba-2-1.3B" in text and text.count("\n|") >= 7


def test_one_shape_table_read_by_one_parser():
    """The paper's models are one table (core.shapes.SHAPES); PAPER_SHAPES is a view of it, and the
    FLOPs shape of every entry equals that of its transformers config (hosts.convert reads the same
    mamba-ssm config through the same parser)."""
    from utrc_lib.core import flops as F
    from utrc_lib.core import shapes
    from utrc_lib.hosts.convert import mamba_ssm_to_hf_config

    assert set(F.PAPER_SHAPES) == {"Mamba-2-2.7B", "Mamba-2-1.3B", "Mamba-2.8B", "Mamba-1.4B"}
    for paper, name in shapes.PAPER_NAMES.items():
        assert F.PAPER_SHAPES[paper] == shapes.shape_config(name)[1]
    for name in shapes.SHAPES:
        arch, cfg = shapes.shape_config(name)
        assert model_shape(cfg) == model_shape(mamba_ssm_to_hf_config(arch, cfg)), name
    big = model_shape(F.PAPER_SHAPES["Mamba-2-2.7B"])
    assert (big.vocab_size, big.n_heads, big.d_inner, big.chunk_size) == (50280, 80, 5120, 256)
    with pytest.raises(ValueError, match="d_model"):
        model_shape(dict(n_layer=2, vocab_size=10, d_model=None, ssm_cfg={}))

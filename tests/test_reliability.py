"""Defects found by a bad-input probe (each test failed before its fix), and a property-based suite
(hypothesis) that keeps the engine's guarantees on random valid and invalid inputs."""
import copy
import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utrc_lib as u
from conftest import tiny_model
from utrc_lib.core.methods import ReductionShortfall

BIPARTITE = ["utrc", "tome", "prune_only", "merge_only", "pumer"]
CAUSAL_METHODS = [m for m in u.available_methods() if m != "utrc_reference"]


def ids_for(B=2, N=24, vocab=64, seed=0):
    return torch.randint(0, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


def cfg_for(method, **kw):
    kw.setdefault("keep_ratio", 0.7)
    return u.ReductionConfig(method, causal=method != "utrc_reference", **kw)


# -- 1. threads -------------------------------------------------------------------------------------
@torch.no_grad()
def test_two_threads_on_one_patched_model_equal_sequential(model):
    """Per-forward state lives in the forward: concurrent forwards give the sequential logits."""
    xs = [ids_for(1, 80, seed=1), ids_for(2, 50, seed=2)]
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.7)) as h:
        expected = [model(x).logits for x in xs]
        bad = [0, 0]
        start = threading.Barrier(2)

        def work(i):
            start.wait()
            for _ in range(15):
                out = model(xs[i]).logits
                if not torch.equal(out.nan_to_num(), expected[i].nan_to_num()):   # removed rows: NaN
                    bad[i] += 1
                # this thread's last reducer is this thread's own forward
                assert h.last_reducer.num_input == xs[i].shape[1]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert bad == [0, 0]


@torch.no_grad()
def test_options_hold_for_the_calling_thread_only(model):
    ids = ids_for(2, 30)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5, protect_last=2)) as h:
        full = model(ids).logits
        seen = {}

        def other():
            seen["other"] = model(ids).logits.shape[1]

        with h.options(kept_only=True):
            kept = model(ids).logits
            t = threading.Thread(target=other)
            t.start()
            t.join()
        assert kept.shape[1] < 30 and seen["other"] == 30 == full.shape[1]


# -- 2. requested cuts are reached, and the achieved cut is reported -------------------------------
def test_reduce_tokens_reaches_n_keep_for_every_method():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 10, 4, generator=g)
    for method in CAUSAL_METHODS:
        if method == "none":
            continue
        from test_core import scan_inputs  # Delta / scan inputs for the methods that score with them

        res = u.reduce_tokens(h, h.clone(), config=u.ReductionConfig(method, keep_ratio=0.5), n_keep=4,
                              **scan_inputs(1, 10, dtype=torch.float32))
        assert res.hidden.shape[1] == 4 and int(res.removed) == int(res.requested) == 6, method


@torch.no_grad()
@pytest.mark.parametrize("method", ["utrc", "tome", "pumer", "evit"])
def test_high_cut_reaches_the_nominal_token_layer_cut(method):
    model = tiny_model("mamba2", layers=12, hidden=32, vocab=64)
    cfg = u.ReductionConfig(method, flops_reduction=0.7)
    ids = ids_for(1, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReductionShortfall)
        with u.apply(model, cfg) as h:
            model(ids)
            achieved = float(h.last_reducer.achieved_cut()[0])
    nominal = 1 - u.token_layer_fraction(12, u.default_layers(12), h.schedule.keep_ratio, seq_len=128)
    assert achieved == pytest.approx(nominal, abs=1e-9) and achieved > 0.69


def test_reference_mode_cap_is_reported_and_warned():
    h = torch.rand(1, 10, 4)
    cfg = u.ReductionConfig("utrc_reference", keep_ratio=0.3, causal=False)
    with pytest.warns(ReductionShortfall):
        res = u.reduce_tokens(h, h.clone(), config=cfg, n_keep=3)
    assert int(res.requested) == 7 and int(res.removed) == 5 and res.hidden.shape[1] == 5


# -- 6. deepcopy, 7. hooks on layers -------------------------------------------------------------
@torch.no_grad()
def test_deepcopy_of_a_patched_model_is_refused_and_works_after_remove(model):
    ids = ids_for()
    h = u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.6))
    with pytest.raises(RuntimeError, match="deep-copy"):
        copy.deepcopy(model)
    h.remove()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
    assert not torch.equal(twin(ids).logits, model(ids).logits)
    assert "__deepcopy__" not in model.__dict__ and "__deepcopy__" not in model.backbone.__dict__


@torch.no_grad()
def test_hooks_on_layers_fire_while_patched(model):
    ids = ids_for(2, 30)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: calls.append((i, out.shape[1])))
             for i, layer in enumerate(model.backbone.layers)]
    try:
        dense = model(ids).logits
        calls.clear()
        with u.apply(model, u.ReductionConfig("utrc", keep_ratio=1.0)):
            assert torch.equal(model(ids).logits, dense)
        assert [i for i, _ in calls] == list(range(len(model.backbone.layers)))
        calls.clear()
        with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5, layers=(1,))):
            model(ids)
        assert [n for _, n in calls] == [30, 15] + [15] * (len(model.backbone.layers) - 2)
    finally:
        for hk in hooks:
            hk.remove()
    for layer in model.backbone.layers:
        assert "forward" not in layer.__dict__


# -- 8. non-finite values in pruned or merged tokens ------------------------------------------------
def _plan_sources(cfg, h, metric):
    res = u.reduce_tokens(h, h.clone(), config=cfg, n_keep=6, metric=metric)
    plan = res.plan
    src = plan.src[0]
    return [int(s) for s, w in zip(src, plan.src_weight["hidden"][0]) if w == 0], \
           [int(s) for s, w in zip(src, plan.src_weight["residual"][0]) if w > 0]


def test_a_pruned_nan_contributes_nothing_and_a_merged_inf_stays_inf():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 12, 4, generator=g)
    metric = torch.randn(1, 12, 4, generator=g)
    for method in ("utrc", "pumer"):
        cfg = u.ReductionConfig(method, keep_ratio=0.5)
        pruned, merged = _plan_sources(cfg, h, metric)
        assert pruned and merged, method
        bad = h.clone()
        bad[0, pruned] = float("nan")
        res = u.reduce_tokens(bad, h.clone(), config=cfg, n_keep=6, metric=metric)
        assert torch.isfinite(res.hidden).all(), method  # pruned means no contribution at all
        inf = h.clone()
        inf[0, merged[0]] = float("inf")
        res = u.reduce_tokens(h.clone(), inf, config=cfg, n_keep=6, metric=metric)
        assert not torch.isnan(res.residual).any() and torch.isinf(res.residual).any(), method


# -- 10. config validation --------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(q="0.5"), "q"), (dict(seed="x"), "seed"), (dict(seed=None), "seed"), (dict(seed=2 ** 70), "seed"),
    (dict(seed=1.5), "seed"), (dict(causal="no"), "causal"), (dict(protect_last=True), "protect_last"),
    (dict(layers=[]), "layers"), (dict(hidden_rule="hybrid(1.2.3)"), "hidden_rule"), (dict(layers=5), "layers"),
    (dict(align=True), "align"), (dict(protect_from=-1), "protect_from"),
])
def test_invalid_config_fields_raise_at_construction_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        u.ReductionConfig("utrc", keep_ratio=0.5, **kw)


@torch.no_grad()
def test_bad_forward_inputs_give_clear_errors(model):
    ids = ids_for(2, 20)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5)):
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=torch.ones(2, 12, dtype=torch.long))
        with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
            model.backbone()


def test_config_builder_parses_strictly():
    c = u.config_from_args("utrc", flops_reduction="0.2", layers="2,4", causal="false", seed="3")
    assert c.layers == (2, 4) and c.causal is False and c.seed == 3 and c.flops_reduction == 0.2
    assert u.config_from_args("utrc_reference", keep_ratio=0.5).causal is False
    assert u.config_from_args(None) is None and u.config_from_args("utrc", flops_reduction=0) is None
    for kw, field in ((dict(flops_reduction="x"), "flops_reduction"), (dict(causal="maybe"), "causal"),
                      (dict(seed="1.5"), "seed"), (dict(bogus=1), "bogus")):
        with pytest.raises(ValueError, match=field):
            u.config_from_args("utrc", **kw)
    with pytest.raises(ValueError, match="without a method"):
        u.config_from_args(None, flops_reduction=0.2)


# -- property-based suite ---------------------------------------------------------------------------
FIELDS = st.fixed_dictionaries({}, optional={
    "q": st.one_of(st.floats(-1, 2, allow_nan=False), st.text(max_size=3), st.none()),
    "seed": st.one_of(st.integers(-5, 2 ** 40), st.floats(0, 10), st.text(max_size=2)),
    "causal": st.one_of(st.booleans(), st.text(max_size=3), st.integers(0, 1)),
    "protect_last": st.one_of(st.integers(-3, 20), st.booleans()),
    "align": st.one_of(st.integers(-2, 32), st.booleans()),
    "layers": st.one_of(st.none(), st.lists(st.integers(-2, 8), max_size=4), st.integers(0, 3)),
    "hidden_rule": st.sampled_from([None, "prune", "merge", "hybrid", "hybrid(0.3)", "hybrid(1.5)", "hybrid(x)",
                                    "split"]),
    "metric_source": st.sampled_from(["ssm", "mixer", "y"]),
})
RATIOS = st.one_of(st.floats(-0.5, 1.5, allow_nan=False), st.just(1.0))


def _field_ok(name, v, kw):
    if name == "q":
        return isinstance(v, float) and 0 <= v <= 1
    if name == "seed":
        return isinstance(v, int) and 0 <= v < 2 ** 32
    if name == "causal":
        return isinstance(v, bool)
    if name == "protect_last":
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if name == "align":
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if name == "layers":
        return v is None or (isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v) and min(v) >= 0)
    if name == "hidden_rule":
        return v is None or v in ("prune", "merge", "hybrid", "hybrid(0.3)")
    return v in ("ssm", "mixer")


@settings(max_examples=300, deadline=None)
@given(fields=FIELDS, ratio=RATIOS)
def test_random_configs_are_accepted_exactly_when_valid(fields, ratio):
    kw = dict(fields)
    kw.setdefault("causal", True)
    ok = 0 < ratio <= 1 and all(_field_ok(k, v, kw) for k, v in kw.items())
    if ok:
        cfg = u.ReductionConfig("utrc", keep_ratio=ratio, **kw)
        assert cfg.spec.name == "utrc" and set(cfg.branch_rules()) == {"hidden", "residual"}
    else:
        with pytest.raises(ValueError):
            u.ReductionConfig("utrc", keep_ratio=ratio, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from([m for m in CAUSAL_METHODS if m != "none"]),
       B=st.integers(1, 3), N=st.integers(2, 24), D=st.integers(1, 6), keep=st.floats(0.05, 1.0),
       pads=st.lists(st.integers(0, 6), min_size=3, max_size=3), protect=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16))
def test_reduce_tokens_properties(method, B, N, D, keep, pads, protect, seed):
    """Shapes, ascending positions, finite outputs, honest counts, batch = single, for every method."""
    g = torch.Generator().manual_seed(seed)
    hidden, residual = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    lengths = torch.tensor([max(2, N - p) for p in pads[:B]])
    n_keep = torch.clamp(torch.ceil(lengths * keep).long(), min=1)
    cfg = u.ReductionConfig(method, keep_ratio=1.0, protect_last=min(protect, 1), seed=seed)
    from test_core import scan_inputs, slice_inputs  # Delta / scan inputs for the methods that score with them

    extra = scan_inputs(B, N, seed, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReductionShortfall)
        try:
            res = u.reduce_tokens(hidden, residual, config=cfg, n_keep=n_keep, lengths=lengths, **extra)
        except ValueError as e:
            assert "too short" in str(e)
            return
        assert res.hidden.shape == res.residual.shape and res.hidden.shape[0] == B
        assert torch.isfinite(res.hidden).all() and torch.isfinite(res.residual).all()
        kept = res.valid.sum(1)
        assert torch.equal(kept, lengths - res.removed)
        assert bool((res.removed <= res.requested).all())
        for b in range(B):
            pos = res.positions[b][res.valid[b]]
            assert bool((pos[1:] > pos[:-1]).all())  # ascending original order
            one = u.reduce_tokens(hidden[b:b + 1], residual[b:b + 1], config=cfg, n_keep=n_keep[b:b + 1],
                                  lengths=lengths[b:b + 1], **slice_inputs(extra, b))
            k = int(kept[b])
            torch.testing.assert_close(res.hidden[b, -k:], one.hidden[0, -k:], rtol=1e-5, atol=1e-5)
            assert torch.equal(res.positions[b, -k:], one.positions[0, -k:])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(ops=st.lists(st.sampled_from(["apply", "remove", "forward", "deepcopy", "hook", "unhook", "options"]),
                    min_size=1, max_size=12))
def test_patched_model_under_random_operation_sequences(ops):
    """apply / remove / deepcopy / hooks / options in any order: errors only where documented, and the
    model is bit-identical to the original once everything is removed."""
    model = _SEQ_MODEL
    ids = ids_for(2, 16)
    with torch.no_grad():
        dense = model(ids).logits
    handle, hooks, fired = None, [], []
    try:
        for op in ops:
            if op == "apply":
                if handle is None:
                    handle = u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.6))
                else:
                    with pytest.raises(RuntimeError, match="already patched"):
                        u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.6))
            elif op == "remove" and handle is not None:
                handle.remove()
                handle = None
            elif op == "forward":
                with torch.no_grad():
                    out = model(ids).logits
                assert out.shape == dense.shape
                if handle is None:
                    assert torch.equal(out, dense)
            elif op == "deepcopy":
                if handle is None:
                    copy.deepcopy(model)
                else:
                    with pytest.raises(RuntimeError):
                        copy.deepcopy(model)
            elif op == "hook":
                hooks.append(model.backbone.layers[0].register_forward_hook(lambda *a: fired.append(1)))
            elif op == "unhook" and hooks:
                hooks.pop().remove()
            elif op == "options" and handle is not None:
                with handle.options(kept_only=True), torch.no_grad():
                    assert model(ids).logits.shape[1] <= 16
    finally:
        if handle is not None:
            handle.remove()
        for hk in hooks:
            hk.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert not any(k in model.__dict__ for k in ("forward", "__deepcopy__", "_utrc_handle"))


_SEQ_MODEL = tiny_model("mamba2", layers=4, hidden=32, vocab=64)

"""Patched transformers models: dense equivalence, reversibility, batching, causality, generation, errors."""
import pytest
import torch

import utrc_lib as u
from conftest import tiny_model

CAUSAL_METHODS = [m for m in u.available_methods() if m != "utrc_reference"]


def cfg_for(method, **kw):
    kw.setdefault("keep_ratio", 0.7)
    return u.ReductionConfig(method, causal=method != "utrc_reference", **kw)


def ids_for(B=2, N=24, vocab=64, seed=0):
    return torch.randint(0, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.heavy
@torch.no_grad()
def test_keep_ratio_one_equals_dense_exactly(model):
    ids = ids_for()
    dense = model(ids).logits
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    greedy = model.generate(ids, **gen)
    for method in u.available_methods():
        with u.apply(model, cfg_for(method, keep_ratio=1.0)):
            assert torch.equal(model(ids).logits, dense), method
            if method in ("utrc", "utrc_reference", "none"):  # generation is slow on the torch path
                assert torch.equal(model.generate(ids, **gen), greedy), method
    with u.apply(model, u.ReductionConfig("utrc", flops_reduction=0.0)):
        assert torch.equal(model(ids).logits, dense)


@torch.no_grad()
def test_patch_then_remove_is_bit_identical(model):
    ids = ids_for()
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in u.available_methods():
        handle = u.apply(model, cfg_for(method, keep_ratio=0.6, metric="delta" if method == "utrc" else "clip"))
        reduced = model(ids).logits
        assert reduced.shape == before.shape
        if method != "none":
            assert not torch.equal(reduced, before), f"{method} changed nothing"
        handle.remove()
        handle.remove()  # idempotent
        assert torch.equal(model(ids).logits, before)
        assert not hasattr(model, "_utrc_handle")
        assert "forward" not in model.__dict__ and "forward" not in model.backbone.__dict__
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@torch.no_grad()
@pytest.mark.parametrize("method", u.available_methods())
def test_batched_equals_single(model, method):
    lengths = [24, 17, 11]
    seqs = [ids_for(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    N = max(lengths)
    batch = torch.zeros(len(seqs), N, dtype=torch.long)
    mask = torch.zeros(len(seqs), N, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding
        batch[i, N - len(s):] = s
        mask[i, N - len(s):] = 1
    cfg = cfg_for(method, keep_ratio=0.6, protect_last=3, metric="l2" if method == "tome" else "clip")
    with u.apply(model, cfg):
        out = model(batch, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            single = model(s[None]).logits[0]
            # removed positions are NaN rows in both (equal_nan: the same positions are absent)
            torch.testing.assert_close(out[i, N - len(s):], single, rtol=1e-4, atol=1e-4, equal_nan=True)


@torch.no_grad()
@pytest.mark.parametrize("method", u.available_methods())
@pytest.mark.parametrize("protect", ["last", "from"])
def test_causality_after_protected_boundary(model, method, protect):
    """Changing tokens after position c >= P never changes logits at positions < c."""
    N, P = 28, 20
    ids = ids_for(2, N, seed=3)
    kw = {"protect_last": N - P} if protect == "last" else {"protect_from": P}
    with u.apply(model, cfg_for(method, keep_ratio=0.6, **kw)):
        base = model(ids).logits
        for c in (P, P + 3, N - 1):
            changed = ids.clone()
            changed[:, c:] = (changed[:, c:] + 1 + torch.arange(N - c)) % 64
            out = model(changed).logits
            torch.testing.assert_close(out[:, :c], base[:, :c], rtol=0, atol=1e-6, equal_nan=True)
            assert not torch.allclose(out[:, c:], base[:, c:])  # the change is visible after c


@torch.no_grad()
def test_leak_without_protection_is_detected():
    """Negative control: non-causal merges without protection let later tokens change earlier logits."""
    model = tiny_model("mamba2")
    N = 28
    ids = ids_for(4, N, seed=4)
    leaked = False
    with u.apply(model, u.ReductionConfig("utrc_reference", keep_ratio=0.6, causal=False)):
        base = model(ids).logits
        changed = ids.clone()
        changed[:, 20:] = (changed[:, 20:] + 7) % 64
        leaked = not torch.allclose(model(changed).logits[:, :20], base[:, :20], atol=1e-6, equal_nan=True)
    assert leaked


@torch.no_grad()
def test_logits_aligned_and_last_token_mode(model):
    ids = ids_for(2, 30)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5, protect_last=1)) as h:
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        assert last.shape[1] == 1
        torch.testing.assert_close(last[:, 0], full[:, -1])
        red = h.last_reducer
        assert red.reduced and red.state.positions.shape[1] < 30
        # a kept position has its own row, a removed one is NaN (never a neighbour's row)
        kept = red.state.positions[0].tolist()
        for t in range(30):
            assert bool(torch.isnan(full[0, t]).all()) == (t not in kept)
        assert torch.equal(h.kept_mask, ~torch.isnan(full).all(-1))


def test_forward_with_autograd(model):
    """Outside no_grad (parameters require grad) a reduced forward runs and backpropagates."""
    ids = ids_for(2, 30)
    model.zero_grad()
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5, protect_last=2)):
        logits = model(ids).logits
    assert logits.requires_grad
    logits[:, -2:].float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    model.zero_grad()


@torch.no_grad()
def test_kept_only_logits_are_the_kept_rows(model):
    """kept_only: (B, N', V) logits, the full-length logits at `output_positions`, and nothing else changes."""
    ids = ids_for(2, 30)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5, protect_last=2)) as h:
        full = model(ids).logits
        with h.options(kept_only=True):
            kept = model(ids).logits
            pos = h.output_positions
        assert kept.shape[1] == pos.shape[1] < 30
        assert torch.equal(kept, full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1])))
        torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0, equal_nan=True)
    assert h.output_positions is not None  # the last forward's positions stay readable


@torch.no_grad()
def test_generate_with_reduction(model):
    ids = ids_for(2, 30)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.6, protect_last=1)) as h:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        first = model(ids, logits_to_keep=1).logits[:, -1].argmax(-1)
    assert out.shape == (2, 38)
    assert torch.equal(out[:, 30], first)  # decoding starts from the reduced prefill


def test_errors():
    model = tiny_model("mamba", layers=4)
    with pytest.raises(ValueError, match="unknown method 'nope'.*utrc"):
        u.ReductionConfig("nope", keep_ratio=0.5)
    with pytest.raises(ValueError, match="unknown metric"):
        u.ReductionConfig("utrc", metric="l3", keep_ratio=0.5)
    for bad in (0, 0.0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="keep_ratio"):
            u.ReductionConfig("utrc", keep_ratio=bad)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="flops_reduction"):
            u.ReductionConfig("utrc", flops_reduction=bad)
    with pytest.raises(ValueError, match="not both"):
        u.ReductionConfig("utrc", keep_ratio=0.5, flops_reduction=0.2)
    with pytest.raises(ValueError, match="needs keep_ratio"):
        u.ReductionConfig("utrc")
    with pytest.raises(ValueError, match="causal=False"):
        u.ReductionConfig("utrc_reference", keep_ratio=0.5)
    with pytest.raises(ValueError, match="branch rule"):
        u.ReductionConfig("utrc", keep_ratio=0.5, hidden_rule="squash")
    with pytest.raises(ValueError, match="q must be"):
        u.ReductionConfig("utrc", keep_ratio=0.5, q=1.5)
    with pytest.raises(ValueError, match=r"layer index 5 out of range for a 4-layer model.*\(valid 0..2\)"):
        u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5, layers=[1, 5]))
    with pytest.raises(ValueError, match="unsupported model class Linear; supported: MambaForCausalLM"):
        u.apply(torch.nn.Linear(2, 2), u.ReductionConfig("utrc", keep_ratio=0.5))
    with pytest.raises(ValueError, match="not reachable"):
        u.apply(model, u.ReductionConfig("utrc", flops_reduction=0.9, layers=[2]))
    h = u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5))
    with pytest.raises(RuntimeError, match="already patched"):
        u.apply(model, u.ReductionConfig("evit", keep_ratio=0.5))
    h.remove()
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5, protect_last=2)):
        with pytest.raises(ValueError, match="sequence too short to reduce"):
            model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="sequence too short"):
        u.reduce_tokens(torch.randn(1, 3, 4), config=u.ReductionConfig("utrc", keep_ratio=0.5, protect_last=2), n_keep=2)


@torch.no_grad()
def test_per_sample_protection_equals_per_request_config(model):
    """handle.options(protect_last=...) (one tail length per row) == one config per request."""
    lengths, tails = [24, 19, 15], [1, 4, 2]
    seqs = [ids_for(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    N = max(lengths)
    batch = torch.zeros(3, N, dtype=torch.long)
    mask = torch.zeros(3, N, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, N - len(s):] = s
        mask[i, N - len(s):] = 1
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.6)) as h:
        with h.options(protect_last=tails):
            out = model(batch, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.6, protect_last=tails[i])):
            single = model(s[None]).logits[0]
        torch.testing.assert_close(out[i, N - len(s):], single, rtol=1e-4, atol=1e-4, equal_nan=True)

"""Generation from a reduced prefill (utrc_lib/hosts/generation.py, pipeline.py).

What "equal" means for the handed-over state (module doc of utrc_lib/hosts/generation.py): layers up
to the first anchor hold the dense prefill's state over the N tokens; a layer after anchor a_k holds
the state of running the layers after a_k densely, with a fresh cache, over the stream the anchor
left (kept tokens in order, merged tokens as their merged vectors). CPU, float32, transformers host:
bit-identical. The mamba-ssm / CUDA-graph path is tested at the end (`gpu` marker).
"""
import pytest
import torch

import utrc_lib as u
from utrc_lib.hosts import generation as G

from conftest import ssm_config, tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["tiny-mamba2", "tiny-mamba"])
def trained(request):
    model, tok = u.load_model(request.param)
    return request.param, model, tok


CONTEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun by the river. " * 4
QUESTIONS = [" Question: what did the fox do? Answer:", " Question: where does the dog sleep? Answer:",
             " Question: who jumps? Answer:"]


def ids_of(tok, text):
    return tok(text, return_tensors="pt").input_ids


def states_of(model, ids):
    """(conv, ssm) per layer of an unpatched dense prefill."""
    st = G.prefill(model, ids)
    return st.conv, st.ssm


# -- keep ratio 1: the patched path is the dense path ------------------------------------------------
def test_generate_keep_ratio_one_equals_unpatched(trained):
    name, model, tok = trained
    ids = torch.cat([ids_of(tok, CONTEXT)] * 2)  # batch 2
    ids[1, :5] = ids[1, 5:10]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=1.0, protect_last=1)):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(got, ref), name
    # our own greedy decoding from the state gives transformers' tokens
    mine = G.generate_from(model, G.prefill(model, ids, u.ReductionConfig("utrc", keep_ratio=1.0)), max_new_tokens=12)
    assert torch.equal(mine, ref[:, ids.shape[1]:]), name


def test_state_keep_ratio_one_is_the_dense_state():
    for kind in ("mamba", "mamba2"):
        model = tiny_model(kind)
        ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
        dense = G.prefill(model, ids)
        for method in ("utrc", "tome", "evit"):
            st = G.prefill(model, ids, u.ReductionConfig(method, keep_ratio=1.0))
            assert st.layer_tokens == (40,) * 6 and st.achieved_cut is None
            for a, b in zip(st.conv + st.ssm, dense.conv + dense.ssm):
                assert torch.equal(a, b), (kind, method)
            assert torch.equal(st.logits, dense.logits)


# -- the reduced state: the state of the reduced sequence ---------------------------------------------
def reduced_streams(model, ids, cfg):
    """State of a reduced prefill, and the stream each anchor block hands on (read by hooks)."""
    streams = {}
    handle = u.apply(model, cfg)
    hooks = [model.backbone.layers[a].register_forward_hook(
        lambda mod, args, out, a=a: streams.__setitem__(a, out.detach().clone())) for a in handle.schedule.layers]
    try:
        st = G.prefill(model, ids)
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    return st, streams, tuple(handle.schedule.layers)


def dense_rerun(model, stream, first, last):
    """Run layers first..last (inclusive) of the unpatched model over `stream` with a fresh cache;
    their (conv, ssm) states."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    x = stream
    with torch.inference_mode():
        for i in range(first, last + 1):
            x = model.backbone.layers[i](x, cache)
    return ({i: cache.get_conv_state(i) for i in range(first, last + 1)},
            {i: cache.get_recurrent_state(i) for i in range(first, last + 1)})


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("method", ["utrc", "tome", "pumer", "evit"])
def test_reduced_state_is_the_state_of_the_reduced_sequence(kind, method):
    model = tiny_model(kind, layers=8)
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    cfg = u.ReductionConfig(method, keep_ratio=0.7, layers=(1, 3, 5), protect_last=2)
    st, streams, anchors = reduced_streams(model, ids, cfg)
    dense = G.prefill(model, ids)
    L = 8
    # up to and including the first anchor: the dense prefill's state over all N tokens
    for i in range(anchors[0] + 1):
        assert torch.equal(st.conv[i], dense.conv[i]) and torch.equal(st.ssm[i], dense.ssm[i]), i
        assert st.layer_tokens[i] == 48
    # after anchor a_k: a dense run over the stream a_k left (merged tokens as their merged vectors)
    ends = list(anchors[1:]) + [L - 1]
    for a, end in zip(anchors, ends):
        n_kept = streams[a].shape[1]
        assert n_kept < (48 if a == anchors[0] else streams[anchors[anchors.index(a) - 1]].shape[1])
        conv, ssm = dense_rerun(model, streams[a], a + 1, end)
        for i in range(a + 1, end + 1):
            assert st.layer_tokens[i] == n_kept
            assert torch.equal(st.conv[i], conv[i]), (method, kind, i)
            assert torch.equal(st.ssm[i], ssm[i]), (method, kind, i)
    # and the reduced state is not the dense one
    assert not torch.equal(st.ssm[L - 1], dense.ssm[L - 1])


def test_conv_state_holds_the_last_kept_inputs():
    """The conv state of the layer after an anchor is its conv input (in_proj's x, B, C channels) of
    the last K rows of the reduced stream; with protect_last=K those rows are the context's own last K
    tokens, in order."""
    model = tiny_model("mamba2", layers=6)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    K = model.config.conv_kernel
    cfg = u.ReductionConfig("utrc", keep_ratio=0.6, layers=(1,), protect_last=K)
    st, streams, _ = reduced_streams(model, ids, cfg)
    handle = u.apply(model, cfg)
    with handle.options(kept_only=True):
        G.prefill(model, ids)
        pos = handle.output_positions
    handle.remove()
    assert torch.equal(pos[0, -K:], torch.arange(40 - K, 40))  # the protected tail is kept, in order
    block = model.backbone.layers[2]
    mixer = block.mixer
    with torch.inference_mode():
        proj = mixer.in_proj(block.norm(streams[1][:, -K:]))  # (1, K, d_in_proj)
    xbc = proj[..., mixer.intermediate_size:mixer.intermediate_size + mixer.conv_dim]
    assert st.layer_tokens[2] == 24 and torch.allclose(st.conv[2], xbc.transpose(1, 2), atol=1e-6)


def test_transformers_generate_continues_the_reduced_state(trained):
    """transformers' generate() under apply decodes from the state our prefill hands over."""
    name, model, tok = trained
    ids = ids_of(tok, CONTEXT)
    cfg = u.ReductionConfig("utrc", flops_reduction=0.3, protect_last=4)
    with u.apply(model, cfg):
        ref = model.generate(ids, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:]
    st = G.prefill(model, ids, cfg)
    assert st.achieved_cut is not None and float(st.achieved_cut[0]) > 0.2
    assert torch.equal(G.generate_from(model, st, max_new_tokens=10), ref), name


# -- reduce once, ask many -----------------------------------------------------------------------
def test_ask_many_equals_separate_full_runs_at_keep_ratio_one(trained):
    name, model, tok = trained
    ctx = ids_of(tok, CONTEXT)
    state = G.prefill(model, ctx, u.ReductionConfig("utrc", keep_ratio=1.0))
    dense_state = G.prefill(model, ctx)
    for text in QUESTIONS:
        q = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        full = torch.cat([ctx, q], 1)
        ref = model.generate(full, max_new_tokens=10, do_sample=False)[:, full.shape[1]:]
        assert torch.equal(G.generate_from(model, state, q, max_new_tokens=10), ref), (name, text)
        assert torch.equal(G.generate_from(model, dense_state, q, max_new_tokens=10), ref), (name, text)


def test_one_state_serves_a_batch_of_questions_and_is_not_modified(trained):
    name, model, tok = trained
    ctx = ids_of(tok, CONTEXT)
    state = G.prefill(model, ctx, u.ReductionConfig("utrc", flops_reduction=0.2, protect_last=2))
    before = [t.clone() for t in state.conv + state.ssm]
    qs = [tok(t, return_tensors="pt", add_special_tokens=False).input_ids[:, :8] for t in QUESTIONS]
    one_by_one = torch.cat([G.generate_from(model, state, q, max_new_tokens=8) for q in qs])
    batched = G.generate_from(model, state, torch.cat(qs), max_new_tokens=8)  # a batch-1 state, 3 questions
    assert torch.equal(batched, one_by_one), name
    for a, b in zip(before, state.conv + state.ssm):
        assert torch.equal(a, b)
    assert torch.equal(G.generate_from(model, state, qs[0], max_new_tokens=8), one_by_one[:1])


def test_batched_prefill_equals_single_sequences():
    for kind in ("mamba", "mamba2"):
        model = tiny_model(kind)
        ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(3))
        cfg = u.ReductionConfig("utrc", keep_ratio=0.7, protect_last=2)
        st = G.prefill(model, ids, cfg)
        out = G.generate_from(model, st, ids[:, :4], max_new_tokens=6)
        for b in range(3):
            one = G.prefill(model, ids[b:b + 1], cfg)
            for x, y in zip(one.conv + one.ssm, st.conv + st.ssm):
                assert torch.allclose(x[0], y[b], atol=1e-4, rtol=1e-4), (kind, b)  # batched matmuls round differently
            assert torch.equal(G.generate_from(model, one, ids[b:b + 1, :4], max_new_tokens=6), out[b:b + 1]), kind


def test_continuation_under_a_patch_is_not_reduced(trained):
    """generate_from on a patched model equals it on the unpatched one (questions are never reduced)."""
    name, model, tok = trained
    ctx = ids_of(tok, CONTEXT)
    q = ids_of(tok, QUESTIONS[0] * 3)  # long enough that a reduction would cut it
    cfg = u.ReductionConfig("utrc", keep_ratio=0.5, layers=(1,))
    state = G.prefill(model, ctx, cfg)
    ref = G.generate_from(model, state, q, max_new_tokens=8)
    with u.apply(model, cfg):
        again = G.prefill(model, ctx)  # config=None: the model's own patch
        assert again.layer_tokens == state.layer_tokens
        got = G.generate_from(model, again, q, max_new_tokens=8)
    assert torch.equal(got, ref), name


def test_eos_stops_rows_and_generation():
    model = tiny_model("mamba2")
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(4))
    st = G.prefill(model, ids)
    free = G.generate_from(model, st, max_new_tokens=10)
    eos = int(free[0, 2])
    out = G.generate_from(model, st, max_new_tokens=10, eos_token_id=eos)
    first = (free[0] == eos).nonzero()[0, 0]
    assert torch.equal(out[0, :first + 1], free[0, :first + 1]) and bool((out[0, first:] == eos).all())
    if bool((free[1] == eos).any()):  # both rows end: generation stops after the later one
        assert out.shape[1] == int(max((free[b] == eos).nonzero()[0, 0] for b in range(2))) + 1


def test_bad_inputs_are_refused_clearly():
    model = tiny_model("mamba2")
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(5))
    st = G.prefill(model, ids)
    with pytest.raises(TypeError, match="integer token ids"):
        G.prefill(model, ids.float())
    with pytest.raises(TypeError, match="LongTensor"):
        G.prefill(model, ids.tolist())
    with pytest.raises(ValueError, match=r"\(N,\) or \(B, N\)"):
        G.prefill(model, ids[None])
    with pytest.raises(ValueError, match="empty"):
        G.prefill(model, ids[:, :0])
    with pytest.raises(ValueError, match="outside"):
        G.prefill(model, ids + 1000)
    with pytest.raises(TypeError, match="ReductionConfig"):
        G.prefill(model, ids, "utrc")
    with pytest.raises(ValueError, match="protect_last needs a reduction"):
        G.prefill(model, ids, protect_last=2)
    with pytest.raises(ValueError, match="exactly 2 question rows"):
        G.generate_from(model, st, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.generate_from(model, st, max_new_tokens=0)
    with pytest.raises(TypeError, match="PrefillState"):
        G.generate_from(model, {"conv": ()})
    with pytest.raises(ValueError, match="layers"):
        G.generate_from(tiny_model("mamba2", layers=3), st)
    with pytest.raises(ValueError, match="cg=True"):
        G.generate_from(model, st, cg=True)
    with pytest.raises(ValueError, match="unsupported model class"):
        G.prefill(torch.nn.Linear(2, 2), ids)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=0.5)):
        with pytest.raises(RuntimeError, match="already patched"):
            G.prefill(model, ids, u.ReductionConfig("utrc", keep_ratio=0.5))
    assert "_utrc_handle" not in model.__dict__


def test_package_exports():
    assert u.prefill is G.prefill and u.generate_from is G.generate_from and u.PrefillState is G.PrefillState


# -- the transformers pipeline -------------------------------------------------------------------
def test_pipeline_answers_equal_separate_full_runs_at_keep_ratio_one():
    import sys

    import utrc_lib.hosts.pipeline as P
    from transformers import pipeline  # importing transformers.pipelines registers the task

    assert "transformers.pipelines" in sys.modules
    from transformers.pipelines import PIPELINE_REGISTRY

    assert PIPELINE_REGISTRY.supported_tasks[P.TASK]["impl"] is P.pipeline_class()
    model, tok = u.load_model("tiny-mamba2")
    pipe = pipeline(P.TASK, model=model, tokenizer=tok)
    cfg = u.ReductionConfig("utrc", keep_ratio=1.0)
    got = pipe(CONTEXT, questions=QUESTIONS, config=cfg, max_new_tokens=8)["answers"]
    ctx = tok(CONTEXT, return_tensors="pt").input_ids
    for text, answer in zip(QUESTIONS, got):
        q = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        full = torch.cat([ctx, q], 1)
        ref = model.generate(full, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
        assert answer == tok.decode(ref[0, full.shape[1]:], skip_special_tokens=True)
    single = pipe(CONTEXT, question=QUESTIONS[0], config=cfg, max_new_tokens=8)
    assert single == {"answer": got[0]}
    reduced = pipe(CONTEXT, questions=QUESTIONS[:1], config=u.ReductionConfig("utrc", flops_reduction=0.3),
                   max_new_tokens=8)["answers"]
    assert isinstance(reduced[0], str)
    with pytest.raises(ValueError, match="not both"):
        pipe(CONTEXT, question="a", questions=["b"])
    with pytest.raises(TypeError, match="unknown argument"):
        pipe(CONTEXT, question="a", press=1)
    with pytest.raises(ValueError, match="non-empty string"):
        pipe("", question="a")


def test_import_does_not_load_transformers_pipelines():
    import subprocess
    import sys

    code = ("import sys, utrc_lib; assert 'transformers.pipelines' not in sys.modules; "
            "from transformers import pipeline; from transformers.pipelines import PIPELINE_REGISTRY; "
            "assert 'utrc-text-generation' in PIPELINE_REGISTRY.get_supported_tasks()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# -- GPU: mamba-ssm's CUDA-graph decoding -------------------------------------------------------------
try:
    import mamba_ssm  # noqa: F401
    HAVE_MAMBA_SSM = True
except Exception:
    HAVE_MAMBA_SSM = False

NEEDS_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_MAMBA_SSM), reason="needs CUDA and mamba-ssm")


def gpu_test(fn):
    return pytest.mark.gpu(NEEDS_GPU(fn))


SSM_CONFIGS = {"mamba": ssm_config("mamba", layers=6),
               "mamba2": ssm_config("mamba2", layers=6, use_mem_eff_path=False)}   # no causal-conv1d


def ssm_model(arch, seed=0):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    m = MambaLMHeadModel(MambaConfig(**SSM_CONFIGS[arch]), device="cuda", dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m.eval()


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def ssm(request):
    return request.param, ssm_model(request.param)


def cuda_ids(B, n, seed=0):
    return torch.randint(0, 128, (B, n), generator=torch.Generator().manual_seed(seed)).cuda()


@gpu_test
def test_gpu_cg_generate_keep_ratio_one_equals_unpatched(ssm):
    arch, model = ssm
    ids = cuda_ids(4, 64)
    ref = model.generate(ids, max_length=64 + 12, cg=True)
    assert torch.equal(model.generate(ids, max_length=64 + 12, cg=False), ref)
    with u.apply(model, u.ReductionConfig("utrc", keep_ratio=1.0)):
        assert torch.equal(model.generate(ids, max_length=64 + 12, cg=True), ref), arch
    mine = G.generate(model, ids, 12, cg=True)
    assert torch.equal(mine, ref[:, 64:]), arch


@gpu_test
def test_gpu_cg_decoding_continues_the_reduced_state(ssm):
    arch, model = ssm
    ids = cuda_ids(4, 64, seed=1)
    cfg = u.ReductionConfig("utrc", keep_ratio=0.7, layers=(1, 3), protect_last=4)
    with u.apply(model, cfg):
        ref = model.generate(ids, max_length=64 + 12, cg=True)[:, 64:]  # mamba-ssm's own graph decoding
        loop = model.generate(ids, max_length=64 + 12, cg=False)[:, 64:]
    assert torch.equal(ref, loop), arch
    st = G.prefill(model, ids, cfg)
    assert st.layer_tokens[2] == 45 and st.layer_tokens[5] < 45
    assert torch.equal(G.generate_from(model, st, max_new_tokens=12, cg=True), ref), arch
    assert torch.equal(G.generate(model, ids, 12, cfg, cg=True), ref), arch


@gpu_test
def test_gpu_reduced_state_is_the_state_of_the_reduced_sequence(ssm):
    """As the CPU test: layers after anchor a_k hold the state of a dense run over the reduced stream
    (read by a pre-hook on layer a_k + 1: mamba-ssm's blocks take (hidden, residual))."""
    from mamba_ssm.utils.generation import InferenceParams

    arch, model = ssm
    ids = cuda_ids(2, 64, seed=2)
    anchors = (1, 3)
    cfg = u.ReductionConfig("utrc", keep_ratio=0.7, layers=anchors, protect_last=2)
    inputs = {}
    handle = u.apply(model, cfg)
    hooks = [model.backbone.layers[a + 1].register_forward_pre_hook(
        lambda mod, args, a=a: inputs.__setitem__(a, tuple(t.detach().clone() for t in args[:2])))
        for a in anchors]
    try:
        st = G.prefill(model, ids)
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    dense = G.prefill(model, ids)
    for i in range(anchors[0] + 1):
        assert torch.equal(st.ssm[i], dense.ssm[i]) and torch.equal(st.conv[i], dense.conv[i]), (arch, i)
    L = len(model.backbone.layers)
    for a, end in zip(anchors, (anchors[1], L - 1)):
        hidden, residual = inputs[a]
        assert hidden.shape[1] == st.layer_tokens[a + 1] < 64
        params = InferenceParams(max_seqlen=128, max_batch_size=2)
        with torch.inference_mode():
            for i in range(a + 1, end + 1):
                hidden, residual = model.backbone.layers[i](hidden, residual, inference_params=params)
        for i in range(a + 1, end + 1):
            conv, ssm_state = params.key_value_memory_dict[model.backbone.layers[i].mixer.layer_idx]
            assert torch.allclose(st.conv[i], conv, atol=1e-5, rtol=1e-5), (arch, i)
            assert torch.allclose(st.ssm[i], ssm_state, atol=1e-5, rtol=1e-5), (arch, i)


@gpu_test
def test_gpu_ask_many_equals_separate_full_runs_at_keep_ratio_one(ssm):
    arch, model = ssm
    ctx = cuda_ids(1, 64, seed=3)
    qs = cuda_ids(3, 8, seed=4)
    state = G.prefill(model, ctx, u.ReductionConfig("utrc", keep_ratio=1.0))
    got = G.generate_from(model, state, qs, max_new_tokens=10, cg=True)
    assert torch.equal(G.generate_from(model, state, qs, max_new_tokens=10, cg=False), got)
    full = torch.cat([ctx.expand(3, -1), qs], 1)
    model._decoding_cache = None  # mamba-ssm keeps a larger batch's state tensors for a smaller batch
    ref = model.generate(full, max_length=full.shape[1] + 10, cg=True)[:, full.shape[1]:]
    assert torch.equal(got, ref), arch


# -- CPU: the mamba-ssm host and GraphDecoder against a stand-in of mamba-ssm's interface ------------
@pytest.fixture
def fake(monkeypatch):
    import fake_mamba_ssm

    gen = fake_mamba_ssm.install(monkeypatch)
    monkeypatch.setattr(G.GraphDecoder, "require_cuda", False)
    model = fake_mamba_ssm.MambaLMHeadModel().eval()
    return model, gen


def greedy_no_cache(model, ids, n):
    """Reference: recompute the whole sequence for every new token (no state at all)."""
    seq = ids
    with torch.inference_mode():
        for _ in range(n):
            tok = model(seq, num_last_tokens=1).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, tok], 1)
    return seq[:, ids.shape[1]:]


def test_fake_mamba_ssm_decoding_paths_agree(fake):
    model, gen = fake
    assert G.host_name(model) == "mamba_ssm"
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(6))
    ref = greedy_no_cache(model, ids, 8)
    assert torch.equal(model.generate(ids, max_length=28)[:, 20:], ref)  # the stand-in is consistent
    assert torch.equal(G.generate(model, ids, 8, cg=False), ref)
    assert torch.equal(G.generate(model, ids, 8, cg=True), ref)
    st = G.prefill(model, ids)
    assert st.host == "mamba_ssm" and st.conv[0].shape == (3, 48, 4) and st.ssm[0].shape == (3, 48)
    for cg in (False, True):
        assert torch.equal(G.generate_from(model, st, max_new_tokens=8, cg=cg), ref)
        # the question continues the state token by token = one full run over [context; question]
        q = ids[:, :5]
        assert torch.equal(G.generate_from(model, st, q, max_new_tokens=6, cg=cg),
                           greedy_no_cache(model, torch.cat([ids, q], 1), 6))


def test_fake_graph_cache_is_reused_and_filled_in_place(fake):
    model, gen = fake
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(7))
    st = G.prefill(model, ids, u.ReductionConfig("utrc", keep_ratio=0.6, layers=(1, 3), protect_last=2))
    before = [t.clone() for t in st.conv + st.ssm]
    d1 = G.GraphDecoder(model, 2, 40, cg=True)
    tensors = [t for pair in d1.params.key_value_memory_dict.values() for t in pair]
    d1.load(st, 2)
    assert all(a is b for a, b in zip(tensors, [t for p in d1.params.key_value_memory_dict.values() for t in p]))
    for (conv, ssm), c0, s0 in zip(d1._states(), st.conv, st.ssm):
        assert torch.equal(conv, c0) and torch.equal(ssm, s0)
    assert d1.params.seqlen_offset == 16 and d1.state_bytes() == sum(t.numel() * 4 for t in tensors)
    n = len(gen.captures)
    G.GraphDecoder(model, 2, 30, cg=True)      # same batch, shorter: reused
    assert len(gen.captures) == n
    G.GraphDecoder(model, 1, 30, cg=True)      # another batch: captured anew (mamba-ssm keeps larger states)
    assert len(gen.captures) == n + 1
    out = G.generate_from(model, st, ids[:, :3], max_new_tokens=5, cg=True)
    assert torch.equal(out, G.generate_from(model, st, ids[:, :3], max_new_tokens=5, cg=False))
    for a, b in zip(before, st.conv + st.ssm):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch of 2"):
        d1.load(st, 3)


def test_fake_mamba_ssm_reduced_state_is_the_state_of_the_reduced_sequence(fake):
    """The mamba-ssm host loop hands over the state of the reduced sequence (as on transformers): the
    layers after anchor a_k, rerun densely over the (hidden, residual) pair the anchor left."""
    model, gen = fake
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(8))
    anchors = (1, 3)
    cfg = u.ReductionConfig("utrc", keep_ratio=0.7, layers=anchors, protect_last=2)
    inputs = {}
    handle = u.apply(model, cfg)
    hooks = [model.backbone.layers[a + 1].register_forward_pre_hook(
        lambda mod, args, a=a: inputs.setdefault(a, tuple(t.detach().clone() for t in args[:2])))
        for a in anchors]  # the prefill's call (decoding steps call the layers again)
    try:
        st = G.prefill(model, ids)
        with_patch = G.generate_from(model, st, max_new_tokens=6, cg=True)
        generate_patched = model.generate(ids, max_length=46)[:, 40:]
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    assert torch.equal(with_patch, generate_patched)  # the host's own generate continues the same state
    dense = G.prefill(model, ids)
    for i in range(anchors[0] + 1):
        assert torch.equal(st.ssm[i], dense.ssm[i]) and torch.equal(st.conv[i], dense.conv[i]), i
    for a, end in zip(anchors, (anchors[1], len(model.backbone.layers) - 1)):
        hidden, residual = inputs[a]
        assert hidden.shape[1] == st.layer_tokens[a + 1] < (40 if a == anchors[0] else st.layer_tokens[a])
        params = gen.InferenceParams(max_seqlen=64, max_batch_size=2)
        with torch.inference_mode():
            for i in range(a + 1, end + 1):
                hidden, residual = model.backbone.layers[i](hidden, residual, inference_params=params)
        for i in range(a + 1, end + 1):
            conv, ssm_state = params.key_value_memory_dict[i]
            assert torch.equal(st.conv[i], conv) and torch.equal(st.ssm[i], ssm_state), i
    assert not torch.equal(st.ssm[-1], dense.ssm[-1])


def test_fake_bench_graph_generation_record(fake):
    from utrc_study.experiments import bench

    model, gen = fake
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(9))
    for cg in (True, False):
        rec = bench.measure_graph_generation(model, ids, [3, 6], "cpu", repeats=3, cg=cg, check_tokens=6)
        assert rec["decoding"] == ("cuda_graph" if cg else "python_loop") and rec["tokens_match_mamba_ssm"]
        assert list(rec["checkpoints"]) == ["3", "6"] and len(rec["prefill_ms_all"]) == 3
        assert rec["state_bytes"] == sum(t.numel() * 4 for pair in model.allocate_inference_cache(2, 1).values()
                                         for t in pair)
    with bench.patched(model, "mamba_ssm", "utrc", bench.method_config("utrc", 0.7, (1, 3))):
        rec = bench.measure_graph_generation(model, ids, [4], "cpu", repeats=3, cg=True, check_tokens=4)
    assert rec["tokens_match_mamba_ssm"]   # reduced prefill: our decoding = the host's generate()
    ask = bench.bench_ask_many(model, "mamba_ssm", "dense", None, "cpu", context=ids[:1], questions=ids[:, :3],
                               answer_tokens=4, repeats=3)
    assert ask["answers_agree"] == 1.0 and ask["questions"] == 2

"""CPU smoke test of utrc_study.bench: tiny transformers Mamba, JSON schema, resume, errors recorded."""
import json

import pytest
import torch

from utrc_study.experiments import bench

REQUIRED = ("model_shape", "backend", "device", "dtype", "batch", "seq_len", "method", "flops_cut", "prefill_ms",
            "speedup_vs_dense", "peak_mem_gb_last_token", "peak_mem_gb_full_logits", "reduction_ms_per_anchor",
            "versions", "gpu", "timestamp", "repeats", "keep_ratio", "anchors")
RUN = dict(backend="hf", shapes=["tiny-mamba"], methods=["dense", "slice", "utrc"], cuts=[0.3], batch=2,
           seq_len=64, repeats=1, device="cpu", progress=False, log=lambda s: None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: a busy multi-threaded CPU pool makes the first calls take seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    records = bench.run_bench(out=str(out), **RUN)
    return out, records


def test_schema(bench_file):
    out, records = bench_file
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved] == ["dense", "slice", "utrc"]
    for r in saved:
        assert "error" not in r, r.get("traceback")
        for k in REQUIRED:
            assert k in r, k
        assert r["device"] == "cpu" and r["gpu"] is None and r["peak_mem_gb_last_token"] is None
        assert r["prefill_ms"] > 0 and r["versions"]["torch"] == torch.__version__
    dense, slc, utrc = saved
    assert dense["speedup_vs_dense"] == pytest.approx(1.0) and dense["reduction_ms_per_anchor"] == 0.0
    assert dense["keep_ratio"] == 1.0 and utrc["keep_ratio"] < 1.0
    # the slice bound and utrc shorten the same anchors to the same lengths
    assert slc["tokens_per_anchor"] == utrc["tokens_per_anchor"]
    assert len(utrc["reduction_ms_anchors"]) == len(utrc["anchors"])
    assert all(n_out < n_in for n_in, n_out in utrc["tokens_per_anchor"])
    assert utrc["speedup_fraction_of_slice"] > 0


def test_resume_skips_done_and_retries_errors(bench_file):
    out, records = bench_file
    saved = json.loads(out.read_text())
    stamps = [r["timestamp"] for r in saved]
    again = bench.run_bench(out=str(out), **RUN)
    assert [r["timestamp"] for r in again] == stamps  # nothing re-run
    # an errored record is retried and replaced
    broken = dict(saved[2], error="RuntimeError: boom")
    bench.save_records(str(out), saved[:2] + [broken])
    fixed = bench.run_bench(out=str(out), **RUN)
    assert len(fixed) == 3 and all("error" not in r for r in fixed)


def test_failure_is_recorded(tmp_path):
    out = tmp_path / "b.json"
    records = bench.run_bench(out=str(out), **dict(RUN, methods=["utrc"], cuts=[0.97]))  # unreachable cut
    assert len(records) == 1 and "error" in records[0] and "ValueError" in records[0]["error"]
    assert json.loads(out.read_text())[0]["method"] == "utrc"


def test_unknown_method_and_shape():
    with pytest.raises(ValueError, match="unknown bench method"):
        bench.run_bench(out=None, **dict(RUN, methods=["nope"]))
    with pytest.raises(ValueError, match="unknown shape"):
        bench.ssm_config("nope")


def test_slice_reducer_keeps_the_tail():
    cfg = bench.method_config("slice", 0.5, (0,))
    red = bench.SliceReducer(cfg, cfg.resolve(3), torch.ones(2, 10, dtype=torch.bool))
    h = torch.arange(20.0).reshape(2, 10, 1)
    out_h, out_r = red.step(0, h, h.clone())
    assert torch.equal(out_h, h[:, 5:]) and torch.equal(red.state.positions[0], torch.arange(5, 10))
    assert torch.equal(red.expand(out_h)[:, 5:], h[:, 5:])


def test_derived_fields_do_not_depend_on_run_order():
    from utrc_study.experiments.bench import derive_fields

    base = dict(kind="prefill", model_shape="s", backend="b", device="cuda", dtype="float16", batch=2, seq_len=8)
    dense = dict(base, method="dense", flops_cut=0.0, prefill_ms=100.0, peak_mem_gb_full_logits=10.0,
                 peak_mem_gb_last_token=8.0, peak_mem_gb_kept_logits=10.0)
    utrc = dict(base, method="utrc", flops_cut=0.3, prefill_ms=80.0, reduction_ms_per_anchor=0.5,
                reduction_ms_anchors=[0.5] * 4, peak_mem_gb_full_logits=10.0, peak_mem_gb_last_token=8.0,
                peak_mem_gb_kept_logits=8.5)
    slc = dict(base, method="slice", flops_cut=0.3, prefill_ms=78.0)
    records = [dense, utrc, slc]  # slice measured after utrc
    for r in records:
        derive_fields(records, r)
    assert utrc["speedup_vs_dense"] == pytest.approx(1.25)
    assert utrc["speedup_fraction_of_slice"] == pytest.approx(1.25 / (100 / 78))
    assert utrc["overhead_vs_slice_of_dense"] == pytest.approx(0.02)
    assert utrc["reduction_overhead_vs_dense"] == pytest.approx(0.02)
    assert utrc["peak_mem_reduction_kept_logits"] == pytest.approx(0.15)
    assert "speedup_fraction_of_slice" not in slc and "speedup_fraction_of_slice" not in dense


# -- one config builder, one shape table, one versions() -------------------------------------------
def test_configs_shapes_and_versions_come_from_one_place(monkeypatch):
    from utrc_lib import environment
    from utrc_lib.core import config as core_config
    from utrc_lib.core import shapes

    seen = []
    real = core_config.config_from_args
    monkeypatch.setattr(bench, "config_from_args", lambda m=None, **kw: seen.append(m) or real(m, **kw))
    assert bench.method_config("dense", 1.0, (0,)) is None
    assert bench.method_config("utrc_reference", 0.5, (0,)).causal is False   # the method's own default
    assert bench.method_config("slice", 0.5, (0,), align=8).method == "random"
    assert seen == ["utrc_reference", "random"]
    assert bench.SHAPES is shapes.SHAPES and bench.ssm_config("mamba2-2.7b") == shapes.shape_config("mamba2-2.7b")
    assert bench.versions is environment.versions
    v = environment.versions()
    for k in ("python", "torch", "transformers", "numpy", "mamba_ssm", "triton", "utrc_lib", "utrc_code_version",
              "git_commit", "platform", "torch_threads"):
        assert k in v, k


# -- the command line: checked up front, scratch output by default, exit status -----------------------
CLI = ["--backend", "hf", "--shapes", "tiny-mamba", "--batch", "2", "--seq-len", "64", "--repeats", "1",
       "--device", "cpu", "--no-progress"]


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built before the request was checked")

    monkeypatch.setattr(bench, "build_model", refuse)


@pytest.mark.parametrize("bad", [["--cuts", "-0.1"], ["--cuts", "1.0"], ["--gen-cuts", "-0.2"], ["--batch", "0"],
                                 ["--seq-len", "-5"], ["--repeats", "0"], ["--align", "0"], ["--align", "x"],
                                 ["--shapes", "nope"], ["--methods", "dense,nope"]])
def test_bad_arguments_are_rejected_before_any_model(bad, tmp_path, no_model, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(CLI + ["--out", str(tmp_path / "b.json")] + bad)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_bad_requests_raise_in_the_library_too(no_model):
    for bad in (dict(cuts=[-0.1]), dict(batch=0), dict(seq_len=0), dict(repeats=0), dict(align=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            bench.run_bench(out=None, **dict(RUN, **bad))


def test_default_output_is_scratch_and_unwritable_output_fails_first(tmp_path, no_model, capsys):
    from utrc_lib import environment

    default = bench.parser().parse_args([]).out
    assert default == str(bench.DEFAULT_OUT) and bench.DEFAULT_OUT.is_relative_to(environment.CACHE)
    assert "figures" not in default
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="not writable"):
        bench.run_bench(out=str(blocker / "b.json"), **RUN)
    with pytest.raises(SystemExit) as exc:
        bench.main(CLI + ["--out", str(blocker / "b.json")])
    assert exc.value.code == 2 and "not writable" in capsys.readouterr().err


def test_exit_status_is_nonzero_when_records_fail(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(CLI + ["--methods", "utrc", "--cuts", "0.97", "--out", str(out)]) == 1   # unreachable cut
    assert all("error" in r for r in json.loads(out.read_text()))


# -- warm-up per configuration, suspect speed-ups ------------------------------------------------------
def test_every_configuration_is_warmed_up(tmp_path, monkeypatch):
    """The first calls after a model is built are slow and slow down gradually (first-touch memory);
    one warm-up call left the dense run (measured first) timing the second slow call."""
    import time as _time

    slow = [0.30, 0.15]   # the process's first two prefills; later ones take ~5 ms

    def fake_prefill(model, backend, ids, last_only):
        def run():
            _time.sleep(slow.pop(0) if slow else 0.005)
        return run

    monkeypatch.setattr(bench, "prefill_fn", fake_prefill)
    records = bench.run_bench(out=str(tmp_path / "b.json"), **dict(RUN, methods=["dense", "slice"]))
    dense, slc = records
    assert len(dense["warmup_ms"]) >= 3 and dense["prefill_ms"] < 100, dense["warmup_ms"]
    assert not dense["speedup_suspect"] and not slc["speedup_suspect"]


def test_speedups_beyond_the_physical_bound_are_flagged():
    from utrc_study.experiments.bench import derive_fields

    base = dict(kind="prefill", model_shape="s", backend="hf", device="cpu", dtype="float32", batch=2, seq_len=8)
    dense = dict(base, method="dense", flops_cut=0.0, prefill_ms=7199.9)   # absorbed the warm-up
    slc = dict(base, method="slice", flops_cut=0.3, prefill_ms=208.0, token_layer_fraction=0.7)
    utrc = dict(base, method="utrc", flops_cut=0.3, prefill_ms=6000.0, token_layer_fraction=0.7)
    records = [dense, slc, utrc]
    for r in records:
        derive_fields(records, r)
    assert slc["speedup_suspect"] and slc["speedup_bound"] == pytest.approx(1 / 0.7)
    assert not utrc["speedup_suspect"] and not dense["speedup_suspect"]
    slc.update(elapsed_s=1.0)
    assert "SUSPECT" in bench._summary(slc)


# -- generation as users run it, reduce once / ask many (CPU: the transformers rows) -------------------
GEN = dict(RUN, methods=[], generate=True, gen_methods=["dense", "utrc", "slice"], gen_cuts=[0.3], gen_batch=2,
           gen_prompt=48, new_tokens=[3, 5, 7], short_new_tokens=5, long_methods=["dense", "utrc"], long_cuts=[0.3],
           gen_repeats=3, ask_many=True, ask_methods=["dense", "utrc"], ask_cuts=[0.3], ask_questions=2,
           ask_question_tokens=3, ask_answer_tokens=3, ask_context=40)


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gen.json"
    return out, bench.run_bench(out=str(out), **GEN)


def test_generation_records(gen_file):
    out, records = gen_file
    saved = json.loads(out.read_text())
    # the long runs, then ask-many, then the short runs (most wanted first under a time budget)
    assert [(r["kind"], r["method"], r["new_tokens"]) for r in saved] == [
        ("generate", "dense", 7), ("generate", "utrc", 7), ("ask_many", "dense", 3), ("ask_many", "utrc", 3),
        ("generate", "slice", 5)]
    for r in saved:
        assert "error" not in r, r.get("traceback")
    dense, utrc, slc = saved[0], saved[1], saved[4]
    assert list(dense["checkpoints"]) == ["3", "5", "7"] and list(slc["checkpoints"]) == ["3", "5"]
    for r in (dense, utrc, slc):
        assert r["decoding"] == "transformers_generate" and len(r["prefill_ms_all"]) == 3 and r["warmup_ms"] > 0
        for n, c in r["checkpoints"].items():
            assert len(c["e2e_ms_all"]) == 3
            assert c["e2e_ms_all"] == pytest.approx([p + d for p, d in zip(r["prefill_ms_all"], c["decode_ms_all"])])
            assert c["tokens_per_s"] == pytest.approx(2 * int(n) / (c["e2e_ms"] / 1e3))
        assert r["weight_bytes"] == sum(p.numel() * 4 for p in bench.build_model("tiny-mamba", "hf", "cpu",
                                                                                 torch.float32).parameters())
        assert r["copy_bandwidth_gb_s"] is None and "decode_bound_ms_weights" not in r  # CPU: no bound
    # the comparisons against dense, per checkpoint (slice's dense has every one of its checkpoints)
    for r in (utrc, slc):
        for n, c in r["checkpoints"].items():
            d = dense["checkpoints"][n]
            p = dense["prefill_ms"] / d["e2e_ms"]
            assert c["prefill_share_dense"] == pytest.approx(p)
            assert c["e2e_speedup_vs_dense"] == pytest.approx(d["e2e_ms"] / c["e2e_ms"])
            assert c["amdahl_bound"] == pytest.approx(1 / ((1 - p) + p / bench.speedup_bound(r)))
    assert "e2e_speedup_slice" in utrc["checkpoints"]["5"] and "e2e_speedup_slice" not in utrc["checkpoints"]["7"]
    ask = saved[2]
    assert ask["questions"] == 2 and ask["context_tokens"] == 40 and ask["answer_tokens"] == 3
    assert ask["answers_agree"] == 1.0   # dense: the state's answers are the full runs' answers
    assert ask["once_ms"] == pytest.approx(sorted(ask["once_ms_all"])[1])
    rows = bench.generation_table(saved)
    assert len(rows) == 3 + 3 + 2 and {r["new_tokens"] for r in rows} == {3, 5, 7}


def test_generation_resume(gen_file):
    out, records = gen_file
    stamps = [r["timestamp"] for r in json.loads(out.read_text())]
    assert [r["timestamp"] for r in bench.run_bench(out=str(out), **GEN)] == stamps


def test_amdahl_fields_from_synthetic_records():
    base = dict(kind="generate", model_shape="s", backend="mamba_ssm", device="cuda", dtype="float16", batch=16,
                seq_len=2048, decoding="cuda_graph")
    ck = lambda pre, per_tok, n: {"new_tokens": n, "e2e_ms": pre + per_tok * (n - 1)}  # noqa: E731
    dense = dict(base, method="dense", flops_cut=0.0, prefill_ms=500.0,
                 checkpoints={str(n): ck(500.0, 6.0, n) for n in (100, 2000)})
    utrc = dict(base, method="utrc", flops_cut=0.3, prefill_ms=370.0,
                checkpoints={str(n): ck(370.0, 6.0, n) for n in (100, 2000)})
    records = [utrc, dense]
    for r in records:
        bench.derive_generation(records, r)
    c = utrc["checkpoints"]["100"]
    p = 500 / (500 + 6 * 99)
    assert c["prefill_share_dense"] == pytest.approx(p)
    assert c["amdahl_bound"] == pytest.approx(1 / ((1 - p) + p * 0.7))
    assert c["amdahl_from_prefill"] == pytest.approx(1 / ((1 - p) + p * 370 / 500))
    assert c["e2e_speedup_vs_dense"] == pytest.approx(c["amdahl_from_prefill"])  # decode unchanged
    assert utrc["checkpoints"]["2000"]["e2e_speedup_vs_dense"] < c["e2e_speedup_vs_dense"]  # share falls


@pytest.mark.parametrize("bad", [["--new-tokens", "0"], ["--new-tokens", "10,x"], ["--short-new-tokens", "0"],
                                 ["--ask-questions", "0"], ["--gen-methods", "nope"], ["--long-cuts", "1.5"],
                                 ["--gen-decoding", "fast"]])
def test_bad_generation_arguments_are_rejected_before_any_model(bad, tmp_path, no_model, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(CLI + ["--out", str(tmp_path / "b.json"), "--generate"] + bad)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_transformers_rows_need_the_mamba_ssm_backend(no_model):
    with pytest.raises(ValueError, match="gen_hf_methods"):
        bench.run_bench(out=None, **dict(GEN, gen_hf_methods=["dense"]))


def test_long_prefill_fields(tmp_path):
    """Issue 28 fields: spread of the repeats, no full-logits forwards when asked, batch-1 records keyed
    apart from batch-2 ones in one JSON; the extra-memory fields exist only on CUDA."""
    out = tmp_path / "long.json"
    run = dict(RUN, methods=["dense", "utrc", "evit", "tome"], repeats=2)
    bench.run_bench(out=str(out), full_logits=False, **dict(run, batch=1, seq_len=96))
    recs = bench.run_bench(out=str(out), full_logits=False, **run)
    assert sorted({(r["batch"], r["seq_len"]) for r in recs}) == [(1, 96), (2, 64)]
    for r in recs:
        assert "error" not in r, r.get("traceback")
        assert "peak_mem_gb_full_logits" not in r
        sp = r["prefill_ms_spread"]
        assert sp["min"] <= r["prefill_ms"] <= sp["max"] and sp["rel_half_range"] >= 0
        assert "reduction_extra_mem_gb_max" not in r  # CPU: no allocator statistics
        if r["method"] != "dense":
            assert r["reduction_ms_spread"]["min"] > 0


def test_spread():
    assert bench.spread([]) == {}
    s = bench.spread([1.0, 3.0, 2.0])
    assert s == {"min": 1.0, "max": 3.0, "rel_half_range": 0.5}

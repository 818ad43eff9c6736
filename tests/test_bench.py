"""CPU smoke test of utrc_lib.bench: tiny transformers Mamba, JSON schema, resume, errors recorded."""
import json

import pytest
import torch

from utrc_lib.experiments import bench

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
    from utrc_lib.experiments.bench import derive_fields

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

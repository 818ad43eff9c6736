"""Scale-out on CPU: lm-eval data parallel through `accelerate launch` (2 gloo processes) and the
multi-process sweep runner (2 CPU workers) on a tiny random model saved with the real tokenizer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TASKS = "utrc_cloze,utrc_choice4,utrc_choice2"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_scaleout"))


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# -- lm-eval data parallel -------------------------------------------------------------------------
def test_adapter_single_process_has_no_accelerator(ckpt, monkeypatch):
    pytest.importorskip("lm_eval")
    import torch

    from utrc_lib.integrations.lm_eval import UTRCLM, launched_world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world_size() == 1
    lm = UTRCLM(pretrained=str(ckpt), batch_size=2)
    assert (lm.rank, lm.world_size, lm.accelerator) == (0, 1, None)
    t = torch.tensor(3)
    assert lm.all_gather(t) is t and lm.gather_object({"a": 1}) == [{"a": 1}]
    lm.barrier()
    assert "data_parallel" not in lm.reduction_metadata


@pytest.mark.heavy
def test_accelerate_launch_two_cpu_processes_equal_single(ckpt, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m utrc_study.eval` on a CPU-only machine (the
    adapter asks accelerate for its multi-CPU/gloo state): same numbers as one process on the same
    items. --limit 5 is odd, so lm-eval pads rank 1 (3 + 2 documents)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from utrc_study.eval import __main__ as cli

    args = ["--model-name", str(ckpt), "--method", "utrc", "--flops-reduction", "0.2", "--tasks", TASKS,
            "--limit", "5", "--bootstrap-iters", "0", "--batch-size", "4", "--no-progress"]
    out = tmp_path / "dp.json"
    import socket

    with socket.socket() as s:  # a free port (a fixed one can still be held by an earlier run)
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           port, "-m", "utrc_study.eval", *args, "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="",
                                                      OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    dp = json.loads(out.read_text())
    assert dp, "the output JSON was overwritten by a non-zero rank (utrc_study/eval/__main__.py must skip it)"
    assert dp["utrc"]["data_parallel"]["world_size"] == 2
    single = cli.run(args)
    assert "data_parallel" not in single["utrc"]
    assert dp["n-samples"] == single["n-samples"]
    for task, m in single["results"].items():
        for k, v in m.items():
            if isinstance(v, float):
                # accuracies identical; log-likelihoods to float32 batch-composition noise
                assert dp["results"][task][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (task, k)


# -- sweep runner ----------------------------------------------------------------------------------
@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore:4 configurations")
def test_scaleout_two_workers_resume_errors_and_notebook_cache(ckpt, tmp_path):
    from utrc_study.experiments import scaleout
    from utrc_study.experiments import sweep

    cache = tmp_path / "eval.jsonl"
    common = dict(tasks=["cloze", "choice2"], limit=2, seed=0, batch_size=4)
    # dense + utrc + evit + an injected failing configuration (unknown method)
    configs = scaleout.configurations([str(ckpt)], ["utrc", "evit", "no_such_method"], [0.2])
    assert len(configs) == 4
    res = scaleout.run(configs, cache, devices=["cpu", "cpu"], common=common, progress=False)
    assert res.computed == 4 and res.cached == 0
    rows = sweep.RowCache(cache).load()
    assert len(rows) == 4 and {r["key"] for r in res.rows} == set(rows)
    by_method = {r["params"]["method"]: r for r in res.rows}
    assert by_method["no_such_method"]["status"] == "error"
    assert "no_such_method" in by_method["no_such_method"]["error"] and by_method["no_such_method"]["traceback"]
    assert all(by_method[m]["status"] == "ok" for m in ("none", "utrc", "evit"))
    assert {r["device"] for r in res.rows} == {"cpu"}
    assert abs(by_method["utrc"]["result"]["token_layer_cut"] - 0.2) < 1e-6

    # rerun: nothing computed, no worker started
    again = scaleout.run(configs, cache, devices=["cpu", "cpu"], common=common, progress=False)
    assert again.computed == 0 and again.cached == 4

    # the notebooks' path (sweep.run over the same cache) finds every row: nothing to compute
    def must_not_run(**kw):
        raise AssertionError(f"recomputed {kw}")

    nb = sweep.run(must_not_run, configs, cache, common=common, progress=False)
    assert nb.computed == 0 and [r["key"] for r in nb.rows] == [r["key"] for r in res.rows]

    # a row computed in a worker equals the same configuration computed in this process
    params = dict(by_method["utrc"]["params"])
    here = sweep.evaluate_config(**params)
    got = by_method["utrc"]["result"]
    for k, v in here.items():
        if isinstance(v, float) and "seconds" not in k:
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k


def test_scaleout_cli_defaults():
    from utrc_study.experiments import scaleout

    ns = scaleout.parse_args(["--models", "a,b", "--cuts", "0.1,0.3"])
    assert ns.limit == 30 and ns.batch_size == 16 and ns.seed == 0   # the notebooks' defaults
    devs = scaleout.default_devices(3)
    assert devs == ["cpu"] * 3 or (0 < len(devs) <= 3 and all(d.startswith("cuda:") for d in devs))
    cfgs = scaleout.configurations(["a", "b"], ["utrc"], [0.1, 0.3], fingerprint=False)
    assert len(cfgs) == 2 + 4 and cfgs[0] == {"model": "a", "method": "none", "cut": 0.0}


# -- reliability: devices and the cache are checked first; errors of the machine are not cached -------
def oom_when_flagged(x):
    """Module level (the workers import it): fails like a GPU out of memory while the flag is set."""
    if os.environ.get("UTRC_TEST_SIMULATED_OOM") == str(x):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return {"y": x}


def test_unusable_device_and_cache_fail_before_any_work(tmp_path):
    from utrc_study.experiments import scaleout

    cache = tmp_path / "eval.jsonl"
    configs = [{"x": 1}]
    with pytest.raises(ValueError, match="cuda:99"):
        scaleout.run(configs, cache, devices=["cuda:99"], fn=oom_when_flagged, progress=False)
    assert not cache.exists()   # nothing recorded: a rerun on a working device computes the row
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="not writable"):
        scaleout.run(configs, blocker / "eval.jsonl", devices=["cpu"], fn=oom_when_flagged, progress=False)
    assert scaleout.main(["--models", "m", "--devices", "cuda:99", "--cache", str(cache), "--no-progress"]) == 2


def test_gpu_workers_get_a_model_loader_not_a_patched_module():
    from utrc_study.experiments import scaleout, sweep

    assert scaleout._loader_kwargs(sweep.evaluate_config, "cpu") == {}
    kw = scaleout._loader_kwargs(sweep.evaluate_config, "cuda:1")
    assert kw["model_loader"].func is sweep.get_model and kw["model_loader"].keywords == {"device": "cuda:1"}
    assert scaleout._loader_kwargs(oom_when_flagged, "cuda:1") == {}   # a function without one


@pytest.mark.heavy
def test_machine_errors_in_workers_are_not_cached(tmp_path, monkeypatch):
    from utrc_study.experiments import scaleout, sweep

    cache = tmp_path / "eval.jsonl"
    configs = sweep.grid(x=[1, 2])
    monkeypatch.setenv("UTRC_TEST_SIMULATED_OOM", "2")
    with pytest.warns(UserWarning, match="not cached"):
        res = scaleout.run(configs, cache, devices=["cpu"], fn=oom_when_flagged, version="v", progress=False)
    assert [r["status"] for r in res.rows] == ["ok", "error"] and res.rows[1]["transient"]
    assert [r["params"] for r in sweep.RowCache(cache).load().values()] == [{"x": 1}]
    monkeypatch.delenv("UTRC_TEST_SIMULATED_OOM")
    res = scaleout.run(configs, cache, devices=["cpu"], fn=oom_when_flagged, version="v", progress=False)
    assert (res.computed, res.cached) == (1, 1) and not res.errors

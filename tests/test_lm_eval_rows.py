"""lm-eval task names in sweep rows (issue 26, section 4): a task that is not built-in runs through
lm-eval (the `utrc` adapter, `log_samples=True`) and its per-sample records become the built-in
evaluator's per-item arrays, which the paired statistics consume.

Offline stand-ins for the online run: the local lm-eval YAMLs (utrc_cloze, ... over the local JSONL)
play the paper's lm-eval tasks, and a tiny checkpoint saved in the state-spaces hub format (mamba-ssm
config.json + pytorch_model.bin) plays state-spaces/mamba2-2.7b.
"""
import pytest

lm_eval = pytest.importorskip("lm_eval")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import save_mamba_ssm_checkpoint  # noqa: E402

LOCAL = ["utrc_cloze", "utrc_choice4", "utrc_choice2", "utrc_ppl"]
TWIN = {"utrc_cloze": "cloze", "utrc_choice4": "choice4", "utrc_choice2": "choice2", "utrc_ppl": "ppl"}
N = 8


@pytest.fixture(scope="module")
def hub_ckpt(tmp_path_factory):
    return save_mamba_ssm_checkpoint(tmp_path_factory.mktemp("hub") / "mamba2-tiny")


def test_mamba_ssm_checkpoint_loads(hub_ckpt, tmp_path):
    """A state-spaces style checkpoint (no model_type, pytorch_model.bin) loads as the transformers
    model it was made from, and its files enter the rows' fingerprint."""
    from utrc_lib.hosts.models import ModelLoadError, load_model, model_depth
    from utrc_study.experiments import sweep

    path, reference = hub_ckpt
    model, tok = load_model(str(path))
    assert type(model).__name__ == "Mamba2ForCausalLM" and model.dtype == torch.float32
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference.eval()(ids).logits, atol=1e-5)
    assert model_depth(str(path)) == 3
    fp = sweep.model_fingerprint(str(path))
    (path / "pytorch_model.bin").write_bytes((path / "pytorch_model.bin").read_bytes() + b"\0")
    assert sweep.model_fingerprint(str(path)) != fp   # the weights are in the fingerprint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"lacks pytorch_model.bin \(a mamba-ssm checkpoint\)"):
        load_model(str(broken))


def test_hub_id_of_a_mamba_ssm_repo_loads_from_the_local_cache(tmp_path):
    """A hub id whose repo is a mamba-ssm checkpoint (state-spaces/mamba2-2.7b's layout), from the local
    Hugging Face cache (offline): it loads, and its rows are pinned to the cached commit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import HUB_TEST_SHA, save_hub_cache_checkpoint

    repo = save_hub_cache_checkpoint(tmp_path / "hub")
    code = ("from utrc_lib.hosts.models import load_model; from utrc_study.experiments import sweep; "
            f"m, t = load_model({repo!r}); print(type(m).__name__, sweep.model_fingerprint({repo!r}))")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["Mamba2ForCausalLM", f"hub:{repo}@{HUB_TEST_SHA}"]


@pytest.mark.heavy
def test_sweep_rows_from_lm_eval_task_names(tmp_path):
    """The notebooks' sweep (01: dense + methods at a cut) with lm-eval task names: per-item rows with
    the built-in layout and numbers, consumed by stats / paired, resumable from the cache."""
    from utrc_study.experiments import analysis, paired, stats, sweep

    path, _ = save_mamba_ssm_checkpoint(tmp_path / "ckpt")
    configs = analysis.method_grid([str(path)], ["utrc", "evit"], [0.2])
    common = dict(tasks=LOCAL, limit=N, seed=0, batch_size=4)
    cache = tmp_path / "eval.jsonl"
    res = sweep.run(sweep.evaluate_config, configs, cache, common=common, items=True, progress=False)
    assert not res.errors, res.report()
    for r in res.rows:
        assert set(r["items"]) == set(LOCAL) and r["result"]["meta/evaluator"].startswith("lm-eval")
        for t in LOCAL:
            it = r["items"][t]
            assert len(it["ll"]) == N and all(isinstance(x, float) for x in it["ll"])
            assert all(v is not None for v in it["kl"] + it["top1"] + it["gold_tokens"])
        assert set(r["items"]["utrc_choice4"]) >= {"correct", "correct_norm"} and "correct" not in r["items"]["utrc_ppl"]
        assert r["result"]["utrc_choice2/n"] == N and 0 <= r["result"]["utrc_choice2/acc"] <= 1
        if r["params"]["method"] == "none":
            assert all(k == 0 for k in r["items"]["utrc_ppl"]["kl"])
        else:
            assert r["result"]["utrc_ppl/kl_per_token"] > 0 and r["result"]["achieved_token_layer_cut"] > 0.1

    # the same items and numbers as the built-in evaluator on the JSONL the YAMLs read
    own = sweep.evaluate_config(str(path), "utrc", 0.2, tasks=list(TWIN.values()), limit=N, batch_size=4,
                                items=True)["items"]
    row = next(r for r in res.rows if r["params"]["method"] == "utrc")
    for t, twin in TWIN.items():
        a, b = row["items"][t], own[twin]
        assert [str(x) for x in a["id"]] == [str(x) for x in b["id"]]
        for k in ("correct", "correct_norm", "gold_tokens", "tokens"):
            assert a.get(k) == b.get(k), (t, k)
        for k in ("ll", "kl", "top1"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=f"{t} {k}")

    # paired statistics consume them: one comparison by hand, then the notebook tables
    by = paired.items_by_row(res)
    ut, ev = by[(str(path), "utrc", 0.2)], by[(str(path), "evit", 0.2)]
    pa = stats.paired_accuracy(stats.item_array(ut["utrc_choice2"]), stats.item_array(ev["utrc_choice2"]),
                               resamples=2000)
    assert pa.delta.n == N and pa.delta.low <= pa.delta.estimate <= pa.delta.high and 0 <= pa.mcnemar.p_value <= 1
    kl = stats.paired_bootstrap(ut["utrc_ppl"]["kl_per_token"], ev["utrc_ppl"]["kl_per_token"], resamples=2000)
    assert kl.n == N and kl.low <= kl.estimate <= kl.high
    cmp = paired.comparison_table(res, baselines=["evit"], resamples=2000)
    assert set(cmp["metric"]) == {"avg_acc", "utrc_cloze", "utrc_choice4", "utrc_choice2", "kl:utrc_ppl", "ll:utrc_ppl",
                                  "kl:utrc_cloze", "ll:utrc_cloze", "kl:utrc_choice4", "ll:utrc_choice4",
                                  "kl:utrc_choice2", "ll:utrc_choice2"}
    avg = cmp[cmp["metric"] == "avg_acc"].iloc[0]
    assert avg["n"] == 3 * N and avg["verdict"] in ("beats", "beaten", "unresolved")
    c2 = cmp[cmp["metric"] == "utrc_choice2"].iloc[0]
    assert c2["delta"] == pytest.approx(pa.delta.estimate) and c2["p"] == pytest.approx(pa.mcnemar.p_value)
    acc = paired.accuracy_table(res, resamples=2000)
    assert set(acc["metric"]) == {"utrc_cloze", "utrc_choice4", "utrc_choice2", "avg_acc"}
    c4 = acc[(acc["method"] == "utrc") & (acc["metric"] == "utrc_choice4")].iloc[0]
    assert c4["acc"] == pytest.approx(np.mean(ut["utrc_choice4"]["correct_norm"]))   # the paper's acc_norm
    fid = paired.fidelity_table(res, resamples=2000)
    assert set(fid["task"]) == set(LOCAL)
    df = analysis.with_avg_acc(res.frame())
    assert analysis.acc_metrics(LOCAL) == ["utrc_cloze/acc", "utrc_choice4/acc_norm", "utrc_choice2/acc"]
    np.testing.assert_allclose(df["avg_acc"], df[analysis.acc_metrics(LOCAL)].mean(axis=1))
    assert paired.kl_task(LOCAL) == "utrc_ppl" and paired.kl_task(["lambada_openai", "hellaswag"]) == "lambada_openai"

    again = sweep.run(sweep.evaluate_config, configs, cache, common=common, items=True, progress=False)
    assert again.computed == 0 and again.cached == len(configs)   # keyed and cached like built-in rows


def test_unknown_task_names_fail_before_the_model_loads():
    from utrc_study.experiments import sweep

    assert sweep.check_tasks(["cloze", "utrc_choice2"]) == (["cloze"], ["utrc_choice2"])
    with pytest.raises(ValueError, match=r"'utrc_clozee' \(did you mean 'utrc_cloze'.*neither a task of the built-in"):
        sweep.check_tasks(["cloze", "utrc_clozee"])
    with pytest.raises(ValueError, match="hellaswagg"):   # before loading the (missing) model
        sweep.evaluate_config("no-such-model-dir/x/y", "none", 0.0, tasks=["hellaswagg"])


class _FakeTask:
    """The parts of an lm-eval ConfigurableTask that `items_from_samples` reads."""

    def __init__(self, output_type, target, multiple_input=False, choices=("a", "b", "c")):
        self.task_name, self.output_type, self.target = "fake", output_type, target
        self.multiple_input, self.choices = multiple_input, list(choices)

    def get_config(self, key):
        return {"output_type": self.output_type}[key]

    def doc_to_target(self, doc):
        return doc["t"] if self.target == "doc" else self.target

    def doc_to_text(self, doc):
        return doc["gold"]

    def doc_to_choice(self, doc):
        return self.choices


def test_gold_index_and_item_arrays_from_records():
    from utrc_lib.scoring import RequestDetail
    from utrc_study.eval.lm_eval_rows import gold_index, items_from_samples

    assert gold_index(_FakeTask("multiple_choice", 2), {}, 3) == 2
    assert gold_index(_FakeTask("multiple_choice", "b"), {}, 3) == 1             # an option string
    assert gold_index(_FakeTask("multiple_choice", [5, 1]), {}, 3) == 1          # the first valid gold
    assert gold_index(_FakeTask("multiple_choice", " x", multiple_input=True), {"gold": 0}, 3) == 0   # winogrande
    assert gold_index(_FakeTask("multiple_choice", 7), {}, 3) is None

    task = _FakeTask("multiple_choice", "doc")
    args = [[("ctx", " a"), ("ctx", " b"), ("ctx", " c")], [("ctx2", " a"), ("ctx2", " b"), ("ctx2", " c")]]
    recs = [{"doc_id": i, "doc": {"t": t, **({"id": f"q{i}"} if i else {})}, "arguments": a, "filter": "none",
             "filtered_resps": [(-1.0 - j - i, False) for j in range(3)], "acc": float(t == 0), "acc_norm": 0.0}
            for i, (t, a) in enumerate(zip([0, 2], args))]
    details = {("loglikelihood", tuple(x)): RequestDetail(ll=0.0, tokens=2, greedy=False, kl=0.5, top1=1)
               for a in args for x in a}
    out = items_from_samples(task, list(reversed(recs)), details)   # records in any order: sorted by doc_id
    assert out["id"] == [0, "q1"] and out["doc_id"] == [0, 1]
    assert out["ll"] == [-1.0, -4.0] and out["correct"] == [1, 0] and out["correct_norm"] == [0, 0]
    assert out["tokens"] == [6, 6] and out["gold_tokens"] == [2, 2] and out["kl"] == [1.5, 1.5]
    assert out["top1"] == [0.5, 0.5] and out["ll_per_token"] == [-0.5, -2.0]
    bare = items_from_samples(task, recs, None)   # no adapter details: no token counts, no fidelity
    assert bare["kl"] == [None, None] and bare["ll"] == [-1.0, -4.0]

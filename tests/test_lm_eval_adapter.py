"""lm-eval adapter: `--model utrc` on a tiny random model saved with the real tokenizer."""
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import save_tiny_checkpoint  # noqa: E402

TASKS = "utrc_cloze,utrc_choice4,utrc_choice2,utrc_ppl"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _metrics(res):
    return {t: {k: v for k, v in m.items() if isinstance(v, float) and "stderr" not in k}
            for t, m in res["results"].items()}


@pytest.mark.heavy
def test_adapter_results_and_batch_independence(ckpt, tmp_path, monkeypatch):
    from utrc_study.eval import __main__ as cli

    monkeypatch.chdir(tmp_path)  # the task YAMLs must work from any directory
    common = ["--model-name", str(ckpt), "--method", "utrc", "--flops-reduction", "0.2", "--limit", "8",
              "--bootstrap-iters", "0", "--no-progress"]
    base = common + ["--tasks", TASKS]
    out = tmp_path / "r1.json"
    assert cli.main(base + ["--batch-size", "4", "--output", str(out)]) == 0
    r1 = json.loads(out.read_text())  # batch size 4, all tasks
    r4 = cli.run(common + ["--tasks", "utrc_cloze", "--batch-size", "1"])
    assert set(r1["results"]) == set(TASKS.split(","))
    assert {"acc,none", "perplexity,none"} <= set(r1["results"]["utrc_cloze"])
    assert {"acc,none", "acc_norm,none"} <= set(r1["results"]["utrc_choice4"])
    assert all(n["effective"] == 8 for n in r1["n-samples"].values())
    meta = r1["utrc"]
    assert meta["method"] == "utrc" and meta["config"]["flops_reduction"] == 0.2
    assert abs(meta["flops_reduction_token_layer"] - 0.2) < 1e-6
    m1, m4 = _metrics(r1), _metrics(r4)
    for t in m4:
        for k in m4[t]:
            assert m1[t][k] == pytest.approx(m4[t][k], rel=1e-4, abs=1e-6), (t, k)

    # same numbers as the built-in evaluator (same requests, same scorer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utrc_lib import ReductionConfig
    from utrc_study.eval.scorer import evaluate

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    own = evaluate(model, tok, tasks=("cloze", "ppl"), config=ReductionConfig("utrc", flops_reduction=0.2),
                   limit=8, batch_size=4, progress=False)
    assert own["cloze"]["ppl"] == pytest.approx(m1["utrc_cloze"]["perplexity,none"], rel=1e-4)
    assert own["ppl"]["ppl"] == pytest.approx(m1["utrc_ppl"]["token_perplexity,none"], rel=1e-4)
    assert own["ppl"]["bits_per_byte"] == pytest.approx(m1["utrc_ppl"]["bits_per_byte,none"], rel=1e-4)
    assert own["cloze"]["acc"] == m1["utrc_cloze"]["acc,none"]


def test_model_args_and_registry():
    from lm_eval.api.registry import get_model

    from utrc_study.eval import register
    from utrc_lib.integrations.lm_eval import build_config

    cls = register()
    assert get_model("utrc") is cls
    assert build_config(method="none") is None and build_config() is None
    cfg = build_config(method="utrc", flops_reduction="0.2", layers="1;3", causal="True", metric="clip")
    assert cfg.flops_reduction == 0.2 and cfg.layers == (1, 3) and cfg.causal
    with pytest.raises(ValueError, match="without a method"):
        build_config(flops_reduction=0.2)
    with pytest.raises(ValueError, match="causal"):
        build_config(method="utrc", keep_ratio=0.5, causal="maybe")
    ref = build_config(method="utrc_reference", keep_ratio=0.5)  # the builder's causal default
    assert ref.causal is False


def test_adapter_uses_the_public_scorer_api_only():
    import re

    from utrc_lib import scoring as scorer
    from utrc_lib.integrations import lm_eval as lm_eval_adapter

    source = open(lm_eval_adapter.__file__, encoding="utf-8").read()
    used = set(re.findall(r"\bev\.(\w+)", source))
    assert used and not [n for n in used if n.startswith("_")], used
    assert all(hasattr(scorer, n) for n in used)
    assert "_parse_layers" not in source and "_parse_bool" not in source
    doc = lm_eval_adapter.UTRCLM.__doc__
    assert "HFLM" in doc and "protect_last" in doc and "ORIGINAL position" in doc


def test_adapter_counts_dense_fallback_per_call(ckpt):
    from lm_eval.api.instance import Instance

    from utrc_lib.integrations.lm_eval import UTRCLM

    lm = UTRCLM(pretrained=str(ckpt), batch_size=2, method="utrc", keep_ratio="0.5", layers="0")
    assert lm.config.layers == (0,) and lm.config.keep_ratio == 0.5

    def requests(*pairs):
        return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]

    long_ctx = "The quick brown fox jumps over the lazy dog near the river bank at dawn"
    lm.loglikelihood(requests(("", " hello"), (long_ctx, " again")), disable_tqdm=True)
    assert lm.dense_fallback_last_call == 1  # the empty context (EOS only) cannot be reduced
    lm.loglikelihood(requests((long_ctx, " again")), disable_tqdm=True)
    meta = lm.reduction_metadata
    assert meta["dense_fallback_last_call"] == 0 and meta["dense_fallback"] == 1
    with pytest.raises(ValueError, match="protect"):
        UTRCLM(pretrained=str(ckpt), protect="sometimes")

"""The small-model training package end to end on CPU: pack -> train (smoke) -> parts -> join -> load.

Builds a tiny corpus and tokenizer in a temporary folder (no download, no built corpus needed), runs
scripts/train/pack.py, scripts/train/train_small.py --smoke (transformers torch path), then
scripts/train/join.py, and loads the result with utrc_lib.load_model.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts/train"))
sys.path.insert(0, str(REPO / "data/corpus"))

WORDS = ("the a ship sea captain whale night storm house garden letter friend morning river town road "
         "function value returns list file system error option server table query row column").split()


def _corpus(work: Path, n_docs: int = 40) -> None:
    rng = random.Random(0)
    work.mkdir(parents=True)
    splits = {"train": [], "validation": [], "test": []}
    for i in range(n_docs):
        src = "prose" if i % 2 else "technical"
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(4)]
        split = "validation" if i % 10 in (3, 4) else "test" if i % 10 in (7, 8) else "train"
        splits[split].append({"id": f"{src}/{i}", "source": src, "text": "\n\n".join(paras)})
    for s, docs in splits.items():
        (work / f"{s}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    import corpus_common

    root = tmp_path_factory.mktemp("pipe")
    _corpus(root / "work")
    texts = [json.loads(l)["text"] for l in (root / "work/train.jsonl").read_text().splitlines()]
    corpus_common.save_tokenizer(corpus_common.train_bpe(texts, 400), root / "tok")
    import pack
    man = pack.main(["--work", str(root / "work"), "--out", str(root / ".train"), "--tokenizer", str(root / "tok"),
                     "--part-mib", "0.001"])          # tiny parts: the joining is exercised
    return root, man


def test_pack_roundtrip(packed):
    from packing import load_packed, source_streams
    root, man = packed
    assert len(man["splits"]["train"]["parts"]) > 1
    data = load_packed(root / ".train/tokens")
    tr = data["train"]
    assert tr["tokens"].size == man["splits"]["train"]["tokens"]
    eot = man["eot_id"]
    assert tr["tokens"][0] == eot and tr["tokens"][-1] == eot
    assert all(tr["tokens"][s] == eot for s in tr["doc_start"])
    streams = source_streams(tr, data["sources"])
    assert set(streams) == {"prose", "technical"}
    # every document token is in exactly one source stream (+1 closing EOT per stream)
    assert sum(s.size - 1 for s in streams.values()) == tr["tokens"].size - 1
    # a damaged part is detected
    part = root / ".train/tokens" / man["splits"]["validation"]["parts"][0]["file"]
    orig = part.read_bytes()
    part.write_bytes(orig[:-1] + bytes([orig[-1] ^ 1]))
    with pytest.raises(ValueError):
        load_packed(root / ".train/tokens")
    part.write_bytes(orig)


@pytest.mark.heavy
@pytest.mark.parametrize("arch", ["mamba2", "mamba"])
def test_train_join_load(packed, arch, tmp_path):
    import join
    import train_small
    from utrc_lib.hosts.models import load_model
    root, _ = packed
    out = tmp_path / "out"
    res = train_small.main(["--arch", arch, "--smoke", "--data", str(root / ".train/tokens"),
                            "--tokenizer", str(root / "tok"), "--out", str(out),
                            "--max-steps", "6", "--part-mib", "0.05"])
    files = sorted(p.name for p in out.iterdir())
    assert "training_log.json" in files and len([f for f in files if f.startswith("weights.")]) >= 2
    assert res["steps"] == 6 and len(res["log"]) == 2, res
    assert set(res["eval"]["test"]["per_source"]) == {"prose", "technical"}
    assert res["eval"]["validation"]["overall"]["ppl"] > 1
    dest = tmp_path / "models" / f"small-{arch}"
    j = join.main([str(out), "--name", f"small-{arch}", "--dest", str(dest), "--tokenizer", str(root / "tok"),
                   "--sample-tokens", "5"])
    assert len(j["samples"]) == len(join.PROMPTS) and all(s["text"].startswith(s["prompt"]) for s in j["samples"])
    assert j["verify"]["ok"] and j["verify"]["max_abs_diff"] < 5e-2
    # --quick (device side: no checks) writes the same weights
    jq = join.main([str(out), "--name", f"small-{arch}", "--dest", str(tmp_path / "quick"), "--tokenizer",
                    str(root / "tok"), "--quick"])
    assert jq["model_safetensors_sha256"] == j["model_safetensors_sha256"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training_log.json",
              "training_curve.png"):
        assert (dest / f).exists(), f
    model, tok = load_model(str(dest))
    assert type(model).__name__ == ("Mamba2ForCausalLM" if arch == "mamba2" else "MambaForCausalLM")
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    # a second stage continues from the installed model: same starting loss, counts add up, curve joined
    out2 = tmp_path / "out2"
    res2 = train_small.main(["--arch", arch, "--smoke", "--data", str(root / ".train/tokens"),
                             "--tokenizer", str(root / "tok"), "--out", str(out2), "--init-from", str(dest),
                             "--max-tokens", str(4 * 4 * 64), "--part-mib", "0.05"])
    assert res2["steps"] == 4 and res2["tokens_this_call"] == 4 * 4 * 64
    assert res2["tokens_seen"] == res["tokens_seen"] + res2["tokens_this_call"]
    assert [st["tokens_seen"] for st in res2["stages"]] == [res["tokens_seen"], 4 * 4 * 64]
    assert res2["init"]["weights_sha256"] == j["model_safetensors_sha256"]["model.safetensors"]
    first = res2["log"][len(res["log"])]
    assert first["call_tokens"] == 0 and first["tokens"] == res["tokens_seen"]
    # the stage starts where the joined weights are (fp16 weights, fp32 compute on both sides)
    assert abs(first["val_loss"] - res["log"][-1]["val_loss"]) < 2e-3, (first, res["log"][-1])
    dest2 = tmp_path / "models" / f"small-{arch}-2"
    j2 = join.main([str(out2), "--name", f"small-{arch}", "--dest", str(dest2), "--tokenizer", str(root / "tok"),
                    "--sample-tokens", "5"])
    assert j2["verify"]["ok"]
    card = (dest2 / "README.md").read_text()
    assert "| 2 | stage 1 weights (fresh AdamW) | 4 |" in card, card
    # a damaged weight part makes join fail, and leaves no model behind
    part = out / res["weights"]["parts"][0]["file"]
    part.write_bytes(b"\0" + part.read_bytes()[1:])
    with pytest.raises(SystemExit):
        join.main([str(out), "--name", "x", "--dest", str(tmp_path / "models/x"), "--tokenizer", str(root / "tok")])
    assert not (tmp_path / "models/x").exists()


@pytest.mark.heavy
def test_join_rejects_other_tokenizer(packed, tmp_path):
    import join
    import train_small
    root, _ = packed
    out = tmp_path / "out"
    train_small.main(["--arch", "mamba2", "--smoke", "--data", str(root / ".train/tokens"),
                      "--tokenizer", str(root / "tok"), "--out", str(out), "--max-steps", "6"])
    with pytest.raises(SystemExit):
        join.main([str(out), "--name", "y", "--dest", str(tmp_path / "y"),
                   "--tokenizer", str(REPO / "data/tokenizer")])       # v1 tokenizer: not the one trained with


def test_doc_subset_nested_and_equal_to_simple_twin(packed):
    import numpy as np
    from packing import doc_subset, load_packed
    root, _ = packed
    tr = load_packed(root / ".train/tokens", splits=("train",))["train"]
    toks, starts = tr["tokens"], tr["doc_start"]
    kept = {}
    for frac in (0.3, 0.6, 1.0):
        idx, stream = doc_subset(tr, frac, seed=5)
        kept[frac] = set(idx.tolist())
        # simple twin: walk the documents one by one with the same draw
        u = np.random.default_rng(5).random(starts.size)
        pieces = []
        for j in range(starts.size):
            end = starts[j + 1] if j + 1 < starts.size else toks.size - 1
            if u[j] < frac:
                pieces.extend(toks[starts[j]:end].tolist())
        assert stream.tolist() == pieces + [int(toks[-1])]
    assert kept[0.3] <= kept[0.6] <= kept[1.0] and len(kept[1.0]) == starts.size
    assert 0 < len(kept[0.3]) < len(kept[0.6])
    _, full = doc_subset(tr, 1.0)
    assert full.tolist() == toks.tolist()      # frac 1 is the whole stream
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="frac"):
            doc_subset(tr, bad)


def test_train_docs_frac_and_no_weights(packed, tmp_path):
    import train_small
    root, _ = packed
    out = tmp_path / "probe"
    res = train_small.main(["--arch", "mamba2", "--smoke", "--data", str(root / ".train/tokens"),
                            "--tokenizer", str(root / "tok"), "--out", str(out), "--max-steps", "3",
                            "--train-docs-frac", "0.5", "--no-weights"])
    assert sorted(p.name for p in out.iterdir()) == ["training_log.json"]
    d = res["data"]
    assert d["train_docs_frac"] == 0.5 and 0 < d["train_docs"] < d["train_docs_all"]
    assert res["weights"]["parts"] == [] and res["steps"] == 3
    with pytest.raises(SystemExit):
        train_small.main(["--arch", "mamba2", "--smoke", "--data", str(root / ".train/tokens"),
                          "--out", str(out), "--train-docs-frac", "0"])


@pytest.mark.heavy
def test_repetition_report_from_smoke_runs(packed, tmp_path):
    import repetition_report
    import train_small
    root, _ = packed
    runs = tmp_path / "runs"
    for frac, steps in ((0.5, 3), (1.0, 3), (0.25, 2)):      # the last one "cut short": rejected
        train_small.main(["--arch", "mamba2", "--smoke", "--data", str(root / ".train/tokens"),
                          "--tokenizer", str(root / "tok"), "--out", str(runs / f"f{frac}"),
                          "--max-steps", str(steps), "--train-docs-frac", str(frac), "--no-weights"])
    log = json.loads((runs / "f0.25/training_log.json").read_text())
    log["args"]["max_steps"] = 3                               # asked for 3, trained 2
    (runs / "f0.25/training_log.json").write_text(json.dumps(log))
    out = tmp_path / "report"
    res = repetition_report.main([str(runs), "--out", str(out)])
    assert set(res["runs"]) == {"f0.5", "f1.0"} and [r["run"] for r in res["rejected"]] == ["f0.25"]
    pr = res["pairs"]["f0.5_vs_f1.0"]
    r5, r1 = res["runs"]["f0.5"], res["runs"]["f1.0"]
    assert pr["overall_test_bpb"] == r5["final"]["test"]["bits_per_byte"] - r1["final"]["test"]["bits_per_byte"]
    assert set(pr["per_source"]) == {"prose", "technical"}
    m = pr["mean_over_sources"]
    assert m["lo"] <= m["mean"] <= m["hi"] and m["n"] == 2
    assert r5["unique_train_tokens"] < r1["unique_train_tokens"] and r5["epochs"] > r1["epochs"]
    assert (out / "repetition.png").stat().st_size > 0 and (out / "runs/f0.5/training_log.json").exists()


def test_committed_repetition_figure_is_rendered_from_its_logs(tmp_path):
    import repetition_report
    fig = REPO / "figures/train_repetition"
    committed = json.loads((fig / "repetition.json").read_text())
    res = repetition_report.main([str(fig / "runs"), "--out", str(tmp_path)])
    again = json.loads((tmp_path / "repetition.json").read_text())
    assert again["runs"] == committed["runs"] and again["pairs"] == committed["pairs"]
    assert set(res["runs"]) == {"f0.2", "f0.35", "f0.5", "f1.0", "f1.0_s1"} and not res["rejected"]
    assert {r["steps"] for r in res["runs"].values()} == {640}
    # fewer documents, more passes: the test bits per byte rise in order; the seed pair is far smaller
    bpb = {k: r["final"]["test"]["bits_per_byte"] for k, r in res["runs"].items()}
    assert bpb["f0.2"] > bpb["f0.35"] > bpb["f0.5"] > bpb["f1.0"]
    assert abs(res["pairs"]["f1.0_s1_vs_f1.0"]["overall_test_bpb"]) < 0.1 * res["pairs"]["f0.2_vs_f1.0"]["overall_test_bpb"]


@pytest.mark.heavy
def test_fixed_token_recipe_suspends_and_resumes_exactly(packed, tmp_path):
    """The depth family's recipe (trainer.py --family depth): a run suspended part-way (exit 75, full state
    in --ckpt-dir) and resumed with the same arguments ends with the same weights, curve and evaluation as
    one uninterrupted run."""
    import trainer
    root, _ = packed
    common = ["--arch", "mamba2", "--layers", "2", "--smoke", "--data", str(root / ".train/tokens"), "--tokenizer",
              str(root / "tok"), "--total-tokens", str(9 * 4 * 64)]     # --smoke: evaluation every 5 steps
    whole = trainer.main(common + ["--out", str(tmp_path / "whole")], family="depth")
    assert whole["steps"] == 9 and whole["recipe"] == "fixed-tokens" and whole["weights_kind"] == "final"
    assert [r["step"] for r in whole["log"]] == [5, 9]
    ck = ["--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "split")]
    with pytest.raises(SystemExit) as e:
        trainer.main(common + ck + ["--call-steps", "4"], family="depth")
    assert e.value.code == 75
    sus = json.loads((tmp_path / "split/suspended.json").read_text())
    assert sus["step"] == 4 and sus["of_steps"] == 9 and len(sus["calls"]) == 1
    with pytest.raises(SystemExit):            # another recipe must not resume this state
        trainer.main(common + ["--seed", "1"] + ck, family="depth")
    split = trainer.main(common + ck, family="depth")
    assert split["weights"]["sha256"] == whole["weights"]["sha256"]
    assert [(r["step"], r["val_loss"]) for r in split["log"]] == [(r["step"], r["val_loss"]) for r in whole["log"]]
    assert [c["steps"] for c in split["calls"]] == [4, 5]
    assert split["eval"]["test"]["overall"]["loss"] == whole["eval"]["test"]["overall"]["loss"]
    # per-window NLL is kept for the card's interval and adds up to the source's total
    for name, r in split["eval"]["test"]["per_source"].items():
        assert sum(k for _, k in r["windows"]) == r["tokens_scored"]
        assert abs(sum(v for v, _ in r["windows"]) / r["tokens_scored"] - r["loss"]) < 1e-3
    with pytest.raises(SystemExit):
        trainer.main(common + ["--max-tokens", "100"], family="depth")


def test_weights_file_is_byte_stable():
    """safetensors writes its metadata from a hash map; the trainer's file must not depend on that order."""
    import torch
    import trainer
    from safetensors.torch import load as st_load, save as st_save
    sd = {f"layers.{i}.w": torch.randn(3, 5, dtype=torch.float16) for i in range(4)}
    meta = {"format": "mamba_ssm", "arch": "mamba2", "x": "1", "y": "2"}
    blobs = {trainer.stable_header(st_save(sd, metadata=meta)) for _ in range(20)}
    assert len(blobs) == 1
    back = st_load(blobs.pop())
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_depth_report_rerenders_the_committed_one(tmp_path):
    """figures/depth_family is what scripts/train/depth_report.py makes of the committed training logs."""
    import depth_report
    committed = REPO / "figures/depth_family/depth_family.json"
    if not committed.exists():
        pytest.skip("no committed depth-family report")
    rep = depth_report.main(["--out", str(tmp_path)])
    assert (tmp_path / "depth_family.json").read_text() == committed.read_text()
    # the deepest model is resolved better than the shallowest of its family (the recipe check)
    assert all(p["delta_test_loss"] < 0 for p in rep["pairs"] if p["arch"] == "mamba2")

"""mamba-ssm <-> transformers conversion round trip and the train_lm.py CPU smoke test."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utrc_lib.hosts.convert import (convert_mamba_ssm_state_dict, hf_to_mamba_ssm_config,
                              hf_to_mamba_ssm_state_dict, mamba_ssm_to_hf_config)

REPO = Path(__file__).resolve().parent.parent

SSM_CONFIGS = {
    "mamba": dict(d_model=32, d_intermediate=0, n_layer=2, vocab_size=100,
                  ssm_cfg={"layer": "Mamba1", "d_state": 8}, pad_vocab_size_multiple=8),
    "mamba2": dict(d_model=32, d_intermediate=0, n_layer=2, vocab_size=100,
                   ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16},
                   pad_vocab_size_multiple=8),
}


def _tiny_hf(arch):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(mamba_ssm_to_hf_config(arch, SSM_CONFIGS[arch])).eval()


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_round_trip_exact(arch):
    model = _tiny_hf(arch)
    hf_sd = model.state_dict()
    arch2, ssm_cfg, ssm_sd = hf_to_mamba_ssm_state_dict(hf_sd, model.config)
    assert arch2 == arch
    assert "backbone.embedding.weight" in ssm_sd and "backbone.embeddings.weight" not in ssm_sd
    assert torch.equal(ssm_sd["lm_head.weight"], ssm_sd["backbone.embedding.weight"])
    assert any(k.startswith("backbone.layers.1.mixer.") for k in ssm_sd)
    cfg2, sd2 = convert_mamba_ssm_state_dict(ssm_sd, arch, ssm_cfg)
    assert set(sd2) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(sd2[k], v), k
    d1, d2 = model.config.to_dict(), cfg2.to_dict()
    for d in (d1, d2):
        d.pop("transformers_version", None)
        d.pop("dtype", None)
    assert d1 == d2
    assert hf_to_mamba_ssm_config(cfg2) == (arch, ssm_cfg)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_config_matches_mamba_ssm_defaults(arch):
    cfg = mamba_ssm_to_hf_config(arch, SSM_CONFIGS[arch])
    assert cfg.vocab_size == 104                      # padded to a multiple of 8
    assert cfg.conv_kernel == 4 and cfg.expand == 2 and cfg.tie_word_embeddings
    assert cfg.residual_in_fp32 and cfg.layer_norm_epsilon == 1e-5
    if arch == "mamba":
        assert cfg.time_step_rank == 2                # ceil(32 / 16)
        assert cfg.state_size == 8
    else:
        assert (cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size) == (4, 16, 1, 16)
        assert tuple(cfg.time_step_limit) == (0.0, float("inf"))


def test_convert_rejects_bad_state_dicts():
    model = _tiny_hf("mamba2")
    _, cfg, sd = hf_to_mamba_ssm_state_dict(model.state_dict(), model.config)
    bad = dict(sd)
    bad["backbone.layers.0.mixer.A_log"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        convert_mamba_ssm_state_dict(bad, "mamba2", cfg)
    bad = dict(sd)
    del bad["backbone.norm_f.weight"]
    with pytest.raises(KeyError, match="lacks"):
        convert_mamba_ssm_state_dict(bad, "mamba2", cfg)
    with pytest.raises(ValueError):
        convert_mamba_ssm_state_dict(sd, "mamba", cfg)   # arch / layer mismatch
    fp16 = convert_mamba_ssm_state_dict(sd, "mamba2", cfg, dtype=torch.float16)[1]
    assert fp16["backbone.embeddings.weight"].dtype == torch.float16


@pytest.mark.heavy
def test_train_lm_smoke(tmp_path):
    """A few seconds of --backend hf training on synthetic tokens: checkpoint, log and plot."""
    rng = np.random.default_rng(0)
    toks = tmp_path / "tokens.npz"
    np.savez_compressed(toks, train=rng.integers(0, 300, 20000).astype(np.uint16),
                        validation=rng.integers(0, 300, 600).astype(np.uint16),
                        test=rng.integers(0, 300, 600).astype(np.uint16))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts/train_lm.py"), "--backend", "hf", "--arch", "mamba2",
           "--layers", "2", "--d-model", "32", "--d-state", "16", "--headdim", "16", "--chunk-size", "32",
           "--batch", "2", "--seq", "32", "--seconds", "4", "--eval-every", "3", "--warmup", "2",
           "--tokens", str(toks), "--out", str(out), "--verify"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["log"] and log["best_val_ppl"] > 1 and log["verify"]["ok"]
    assert (out / "training_curve.png").stat().st_size > 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out)
    assert type(m).__name__ == "Mamba2ForCausalLM"
    assert m.config.vocab_size == 8192


def test_config_is_read_once_by_core():
    """hosts.convert reads mamba-ssm configs through core.shapes (kernel choices dropped, unknown
    mixer fields refused, missing fields named)."""
    from utrc_lib.core.shapes import read_mamba_ssm_config

    cfg = dict(SSM_CONFIGS["mamba2"], ssm_cfg=dict(SSM_CONFIGS["mamba2"]["ssm_cfg"], use_mem_eff_path=False))
    assert mamba_ssm_to_hf_config("mamba2", cfg).to_dict() == mamba_ssm_to_hf_config("mamba2",
                                                                                     SSM_CONFIGS["mamba2"]).to_dict()
    m = read_mamba_ssm_config(SSM_CONFIGS["mamba"])
    assert (m.arch, m.padded_vocab, m.dt_rank, m.mixer["d_conv"]) == ("mamba", 104, 2, 4)
    with pytest.raises(ValueError, match="unsupported ssm_cfg fields"):
        mamba_ssm_to_hf_config("mamba", dict(SSM_CONFIGS["mamba"], ssm_cfg={"layer": "Mamba1", "warp": 9}))
    with pytest.raises(ValueError, match="does not match"):
        mamba_ssm_to_hf_config("mamba", SSM_CONFIGS["mamba2"])
    with pytest.raises(ValueError, match="vocab_size"):
        mamba_ssm_to_hf_config("mamba", {k: v for k, v in SSM_CONFIGS["mamba"].items() if k != "vocab_size"})

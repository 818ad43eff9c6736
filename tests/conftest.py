import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


# -- model configs: every test's small model is built here ---------------------------------------------
def hf_config(kind: str, *, layers: int = 6, hidden: int = 32, vocab: int = 64, **overrides):
    """A small transformers MambaConfig (kind "mamba") or Mamba2Config ("mamba2").

    Defaults: Mamba-1 state 8, expand 2; Mamba-2 state 16, expand 2, heads of 16, one group, chunk 8,
    and num_heads = expand * hidden / head_dim unless given. Keyword overrides are config fields
    (state_size=, head_dim=, chunk_size=, tie_word_embeddings=, ...)."""
    from transformers import Mamba2Config, MambaConfig

    if kind == "mamba2":
        kw = {**dict(state_size=16, head_dim=16, n_groups=1, expand=2, chunk_size=8), **overrides}
        kw.setdefault("num_heads", kw["expand"] * hidden // kw["head_dim"])
        return Mamba2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, **kw)
    if kind == "mamba":
        return MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                           **{**dict(state_size=8, expand=2), **overrides})
    raise ValueError(f"kind must be 'mamba' or 'mamba2', not {kind!r}")


def hf_model(config):
    """A random-init transformers causal LM of `config` (Mamba or Mamba-2 by the config's type); the
    caller seeds torch."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaForCausalLM

    return (Mamba2ForCausalLM if isinstance(config, Mamba2Config) else MambaForCausalLM)(config)


def ssm_config(arch: str, *, layers: int = 4, d_model: int = 64, vocab: int = 128, **mixer) -> dict:
    """Flat mamba-ssm MambaConfig fields of the GPU tests: fused add-norm, RMSNorm, tied embeddings;
    mixer d_state 16, expand 2, and for Mamba-2 heads of 16, one group, chunk 16. Keyword overrides
    go to ssm_cfg (e.g. use_mem_eff_path=False)."""
    if arch == "mamba":
        ssm_cfg = {**dict(layer="Mamba1", d_state=16, expand=2), **mixer}
    elif arch == "mamba2":
        ssm_cfg = {**dict(layer="Mamba2", d_state=16, headdim=16, expand=2, ngroups=1, chunk_size=16), **mixer}
    else:
        raise ValueError(f"arch must be 'mamba' or 'mamba2', not {arch!r}")
    return dict(d_model=d_model, n_layer=layers, vocab_size=vocab, d_intermediate=0, rms_norm=True,
                residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True,
                ssm_cfg=ssm_cfg)


def tiny_model(kind: str, layers: int = 6, hidden: int = 32, vocab: int = 64, seed: int = 0):
    """Tiny random transformers Mamba / Mamba-2 LM (CPU, fp32), weights scaled so that token choices matter."""
    torch.manual_seed(seed)
    model = hf_model(hf_config(kind, layers=layers, hidden=hidden, vocab=vocab))
    # random-init weights are near-uniform; scale up so that token choices matter
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="session", params=["mamba", "mamba2"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture
def flops_mamba2_config():
    """The FLOPs tests' Mamba-2 shape: 6 layers, hidden 32, 4 heads of 16, state 8, chunk 256, vocab 64."""
    return hf_config("mamba2", layers=6, hidden=32, vocab=64, state_size=8, chunk_size=256)


def save_tiny_checkpoint(path):
    """A tiny random Mamba-2 LM saved with the project tokenizer (a local checkpoint directory)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parent.parent
    tiny_model("mamba2", layers=3, hidden=32, vocab=8192).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(root / "data" / "tokenizer")).save_pretrained(path)
    return path


def save_mamba_ssm_checkpoint(path, kind: str = "mamba2"):
    """A tiny random Mamba LM saved the way the state-spaces hub repos hold theirs
    (state-spaces/mamba2-2.7b: a mamba-ssm config.json with d_model / n_layer / ssm_cfg and
    pytorch_model.bin, tied embeddings), plus the project tokenizer (the hub repos carry none; the
    loader then takes EleutherAI/gpt-neox-20b from the hub). Returns (path, the transformers model)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from utrc_lib.hosts.convert import hf_to_mamba_ssm_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model(kind, layers=3, hidden=32, vocab=8192)
    model.config.tie_word_embeddings = True
    with torch.no_grad():   # tied, as in mamba-ssm checkpoints
        model.lm_head.weight = model.backbone.embeddings.weight
    _, cfg, sd = hf_to_mamba_ssm_state_dict(model.state_dict(), model.config)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, path / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parent.parent / "data" / "tokenizer")).save_pretrained(path)
    return path, model


HUB_TEST_SHA = "0123456789abcdef0123456789abcdef01234567"


def save_hub_cache_checkpoint(cache_root, repo_id: str = "state-spaces/mamba2-tiny-test"):
    """`save_mamba_ssm_checkpoint` laid out as a Hugging Face hub cache holds a downloaded repo
    (<cache_root>/models--org--name/snapshots/<sha>/ and refs/main), so that with HF_HUB_CACHE=cache_root
    and HF_HUB_OFFLINE=1 the hub id `repo_id` loads as state-spaces/mamba2-2.7b would once downloaded.
    Returns repo_id."""
    from pathlib import Path

    repo = Path(cache_root) / ("models--" + repo_id.replace("/", "--"))
    save_mamba_ssm_checkpoint(repo / "snapshots" / HUB_TEST_SHA)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(HUB_TEST_SHA)
    return repo_id

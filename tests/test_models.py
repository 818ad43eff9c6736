"""utrc_lib.models.load_model: embedded names, local checkpoints and its error messages."""
from pathlib import Path

import pytest
import torch

from conftest import hf_config, hf_model
from utrc_lib.hosts import models
from utrc_lib.hosts.models import ModelLoadError, available_models, load_model

REPO = Path(__file__).resolve().parent.parent


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(REPO / "data/tokenizer")


def _save_tiny(path: Path, kind: str = "mamba2", vocab: int = 8192, tokenizer=True):
    torch.manual_seed(0)
    if kind == "mamba2":   # one layer, hidden 16, 4 heads of 8
        cfg = hf_config("mamba2", layers=1, hidden=16, vocab=vocab, state_size=8, head_dim=8, chunk_size=16,
                        tie_word_embeddings=True)
    else:
        cfg = hf_config("mamba", layers=1, hidden=16, vocab=vocab, state_size=4)
    m = hf_model(cfg)
    m.save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_load_embedded_name_via_data_dir(data_dir, kind):
    name = "tiny-mamba2" if kind == "mamba2" else "tiny-mamba"
    _save_tiny(data_dir / "models" / name, kind)
    assert available_models()[name]["present"]
    model, tok = load_model(name, dtype="float16")
    assert type(model).__name__ == ("Mamba2ForCausalLM" if kind == "mamba2" else "MambaForCausalLM")
    assert next(model.parameters()).dtype == torch.float16 and not model.training
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None
    ids = tok("Hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 8192


def test_load_local_directory(tmp_path):
    model, tok = load_model(str(_save_tiny(tmp_path / "ckpt")))
    assert next(model.parameters()).dtype == torch.float32
    assert len(tok) == 8192


def test_default_data_dir_is_repo_data(monkeypatch):
    monkeypatch.delenv("UTRC_DATA_DIR", raising=False)
    assert models.embedded_path("tiny-mamba2") == REPO / "data" / "models" / "tiny-mamba2"
    avail = available_models()
    assert set(avail) == {"tiny-mamba", "tiny-mamba2", "small-mamba", "small-mamba2",
                          "depth-mamba2-12", "depth-mamba2-24", "depth-mamba2-48", "depth-mamba2-64"}
    # committed weights: every model but the depth family's rebuilt members (git-ignored, made from their card)
    assert {n for n, v in avail.items() if v["present"]} >= {"tiny-mamba", "tiny-mamba2", "small-mamba",
                                                             "small-mamba2", "depth-mamba2-64"}


def test_unknown_embedded_name_lists_valid(data_dir):
    with pytest.raises(ModelLoadError, match="tiny-mamba, tiny-mamba2"):
        load_model("tiny-gpt")


def test_missing_embedded_checkpoint_says_how_to_make_it(data_dir):
    with pytest.raises(ModelLoadError, match=r"make models.*train_lm\.py") as e:
        load_model("tiny-mamba2")
    assert "config.json" in str(e.value) and "model.safetensors" in str(e.value)
    # a checkpoint without its tokenizer is reported as such
    _save_tiny(data_dir / "models" / "tiny-mamba", "mamba", tokenizer=False)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_model("tiny-mamba")


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "ckpt"))


def test_tokenizer_larger_than_model_vocab(tmp_path):
    with pytest.raises(ModelLoadError, match="mismatch"):
        load_model(str(_save_tiny(tmp_path / "small", vocab=256)))


def test_unsupported_model_class(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    m.save_pretrained(tmp_path / "gpt2")
    _tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="only MambaForCausalLM and Mamba2ForCausalLM"):
        load_model(str(tmp_path / "gpt2"))


def test_offline_missing_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model("nonexistent-org/nonexistent-mamba-model-xyz")


def test_depth_member_without_weights_says_how_to_rebuild(tmp_path, monkeypatch):
    """A depth-family member whose weights are not committed (only its card and config) names the command
    that rebuilds it."""
    import shutil
    monkeypatch.setenv("UTRC_DATA_DIR", str(tmp_path))
    src = REPO / "data" / "models" / "depth-mamba2-12"
    (tmp_path / "models").mkdir()
    shutil.copytree(src, tmp_path / "models" / "depth-mamba2-12", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*depth_family\.sh"):
        load_model("depth-mamba2-12")

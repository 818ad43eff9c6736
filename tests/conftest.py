import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


def tiny_model(kind: str, layers: int = 6, hidden: int = 32, vocab: int = 64, seed: int = 0):
    """Tiny random transformers Mamba / Mamba-2 LM (CPU, fp32)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    if kind == "mamba2":
        cfg = Mamba2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=16,
                           head_dim=16, n_groups=1, expand=2, chunk_size=8, num_heads=2 * hidden // 16)
        model = Mamba2ForCausalLM(cfg)
    else:
        cfg = MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=8, expand=2)
        model = MambaForCausalLM(cfg)
    # random-init weights are near-uniform; scale up so that token choices matter
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="session", params=["mamba", "mamba2"])
def model(request):
    return tiny_model(request.param)


def save_tiny_checkpoint(path):
    """A tiny random Mamba-2 LM saved with the project tokenizer (a local checkpoint directory)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parent.parent
    tiny_model("mamba2", layers=3, hidden=32, vocab=8192).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(root / "data" / "tokenizer")).save_pretrained(path)
    return path

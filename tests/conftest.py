"""Shared fixtures: a tiny random Llama (fast unit tests) and the real SmolLM2 (integration).

The tiny model reuses the real SmolLM2 tokenizer and chat template so prompts,
special tokens and eos behave exactly as in production; only the weights are tiny.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(folder: Path, *, seed: int = 0, num_key_value_heads: int = 2, num_attention_heads: int = 4,
                    hidden_size: int = 64, num_hidden_layers: int = 2, tie: bool = True) -> Path:
    """Save a randomly initialised Llama with the SmolLM2 tokenizer into ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from companion.config import load_settings
    from companion.models import fetch_default_model

    real = fetch_default_model(load_settings(), say=lambda _m: None).path
    tok = AutoTokenizer.from_pretrained(str(real))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=2048, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct (fetched once by the test set-up, then cached)."""
    from companion.config import load_settings
    from companion.models import fetch_default_model

    return fetch_default_model(load_settings(), say=lambda _m: None).path

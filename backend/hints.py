"""Hint extraction for hindsight OPD: the directive part of the next message, as an instruction.

Contract:
- ``CPUHintExtractor.extract(next_message, reward) -> str | None``: a hint only
  when the reply was not judged good (reward <= 0) and some sentence of the
  next message says what to do differently (a correction, a redo request, a
  style complaint, a pasted error). Evaluative-only messages ("Useless.",
  sarcasm, thanks) give None. Hints of 10 characters or less are dropped.
- ``LLMHintExtractor`` (any OpenAI-compatible endpoint) uses the paper's
  prompt: the model decides ``\\boxed{1}`` (useful hindsight) or
  ``\\boxed{-1}`` and writes the hint between ``[HINT_START]`` and
  ``[HINT_END]``; among the positive votes with a hint over 10 characters the
  longest wins.

How the CPU extractor works: a logistic regression scores every sentence of
the message for "directive content" (features: word and character TF-IDF plus
the MiniLM embedding of the sentence), trained on the bank's sentences that
contain a row's key words (positives) against every other sentence (including
new requests after thanks, which are not hindsight). Every sentence above
``threshold`` (the best ``max_sentences``, kept in the message's order) is normalised
into an instruction by a few surface rewrites, and they are joined into one hint
(drop leading interjections such as "no," or "thanks, but", turn "can you X?"
into "X.", mark statements and errors as what to fix). The rewrites only
reshape the chosen sentence; they never decide whether there is a hint.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from pathlib import Path

import numpy as np

from backend.judge.data import TRAIN_PATH, files_hash, load_bank
from backend.judge.encoder import split_sentences

HINT_MIN_CHARS = 10   # the paper drops hints of 10 characters or less
HINT_VERSION = "hint-v2"

# Leading interjections and evaluative openers that carry no instruction. A bare "no" is
# an interjection only when punctuation follows ("No, use Python"); otherwise it is the
# instruction's own negation ("No bullet points") and stripping it would invert the hint.
_LEAD = re.compile(
    r"^(?:(?:no+(?=\s*(?:[,.!:;-]|$))|nope|nah|na|ugh|hmm+|ok(?:ay)?|well|sorry|bro|dude|actually|wait|thanks|thank you|thx|ty|"
    r"great|nice|cool|good try|almost|haha|lol|meh|yes|yeah|sure|alright|i appreciate it|looks good|sounds fun|"
    r"nice ideas|sweet of you|that's a good summary|i'm afraid|forgive me|with respect|regrettably)\b[\s,.!:;-]*)+"
    r"(?:but\s+)?", re.I)
_REQUEST = re.compile(r"(?:^|[,;:]\s*)(?:can|could|would|will)\s+(?:you\s+)?(?:please\s+|kindly\s+)?(.+?)[?.!]*$", re.I)
_PLEASE = re.compile(r"^(?:please|pls|plz|kindly)\s+|\s*,?\s*(?:please|pls|plz)[.!?]*$", re.I)
_ERROR = re.compile(r"\b\w*(?:Error|Exception)\b|\berror\b|\bfails?\b|\bcrash(?:es|ed)?\b|\bnot found\b", re.I)
_STATEMENT_START = re.compile(r"^(?:i|i'm|im|i've|my|we|we're|our|the|this|that|it|it's|its|you|your|there|they|he|she)\b", re.I)


def normalise_hint(sentence: str, min_chars: int = HINT_MIN_CHARS) -> str | None:
    """Reshape a directive sentence into an instruction; None if ``min_chars`` long or shorter."""
    s = sentence.strip().strip('"').strip()
    s = _LEAD.sub("", s).strip()
    m = _REQUEST.search(s)
    if m:
        s = m.group(1)
    s = _PLEASE.sub("", s).strip(" ,;")
    if not s:
        return None
    if _ERROR.search(s) and not m:
        s = f"Fix this problem the user hit: {s}"
    elif _STATEMENT_START.match(s) and not m:
        s = f"Take this correction into account: {s}"
    s = s[0].upper() + s[1:]
    if s[-1] not in ".!?":
        s += "."
    return s if len(s) > min_chars else None


def _has_key(sentence: str, keys: list[str]) -> bool:
    low = sentence.lower()
    return any(k.lower() in low for k in keys)


class CPUHintExtractor:
    """Sentence-level directive detector + normaliser (CPU, trained on the shipped bank)."""

    def __init__(self, featurizer=None, cache_dir: str | Path | None = None, threshold: float = 0.5,
                 train_path: str | Path = TRAIN_PATH, hint_when: tuple[int, ...] = (-1, 0),
                 max_sentences: int = 3) -> None:
        from backend.judge.features import Featurizer
        self.featurizer = featurizer or Featurizer()
        self.threshold = threshold
        self.max_sentences = max_sentences  # directive sentences joined into one hint (the LLM prompt asks for 1-3)
        self.hint_when = hint_when
        self.train_path = Path(train_path)
        if cache_dir is None:
            from companion.config import load_settings
            cache_dir = load_settings().cache_dir / "judge"
        self.cache_dir = Path(cache_dir)
        self.model = self._load_or_fit()

    def _load_or_fit(self):
        import sklearn
        encoder = getattr(self.featurizer.encoder, "key", "all-MiniLM-L6-v2")   # the sentence features depend on it
        key = files_hash(self.train_path, extra=json.dumps([HINT_VERSION, sklearn.__version__, encoder]))
        path = self.cache_dir / f"hints-{key}.pkl"
        if path.exists():
            try:
                return pickle.loads(path.read_bytes())
            except Exception:
                pass
        model = self._fit()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{time.time_ns()}")
        tmp.write_bytes(pickle.dumps(model))
        tmp.replace(path)
        return model

    def _fit(self):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        sents, y = [], []
        for row in load_bank(self.train_path):
            keys = row.get("keys") or []
            directive = row["label"] == -1 and bool(keys)
            parts = split_sentences(row["next"])
            marked = [directive and _has_key(s, keys) for s in parts]
            if directive and not any(marked):   # keys paraphrase the directive: every sentence counts
                marked = [True] * len(parts)
            sents += parts
            y += [int(m) for m in marked]
        word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True).fit(sents)
        char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2).fit(sents)
        model = {"word": word, "char": char}
        X = self._X(model, sents)
        model["clf"] = LogisticRegression(C=3.0, max_iter=3000, class_weight="balanced").fit(X, np.array(y))
        return model

    def _X(self, model, sents: list[str]):
        from scipy.sparse import csr_matrix, hstack
        emb = self.featurizer.views(sents)[:, :self.featurizer.encoder.dim]   # [S, 384]: the sentence itself
        return hstack([model["word"].transform(sents), model["char"].transform(sents), csr_matrix(emb)]).tocsr()

    def directive_scores(self, message: str) -> list[tuple[str, float]]:
        """Each sentence of the message with its probability of carrying a directive."""
        sents = split_sentences(message)
        p = self.model["clf"].predict_proba(self._X(self.model, sents))[:, 1]
        return list(zip(sents, p.tolist()))

    def extract(self, next_message: str, reward: int = -1) -> str | None:
        return self.extract_batch([next_message], [reward])[0]

    def extract_batch(self, messages: list[str], rewards: list[int], _X=None) -> list[str | None]:
        out: list[str | None] = [None] * len(messages)
        todo = [i for i, r in enumerate(rewards) if r in self.hint_when and messages[i] and messages[i].strip()]
        if not todo:
            return out
        sents = [(i, k, s) for i in todo for k, s in enumerate(split_sentences(messages[i]))]
        p = self.model["clf"].predict_proba(self._X(self.model, [s for _, _, s in sents]))[:, 1]
        found: dict[int, list[tuple[float, int, str]]] = {}
        for (i, k, s), pi in zip(sents, p):
            if pi >= self.threshold:
                found.setdefault(i, []).append((float(pi), k, s))
        for i, cands in found.items():
            # Every directive sentence, not only the most confident one: a follow-up often
            # names two changes ("Open with praise. Keep it under 90 words.") or pairs the
            # change with a bare redo request, which alone teaches nothing. The best
            # max_sentences by score, kept in the message's order, each normalised.
            keep = sorted(sorted(cands, reverse=True)[: self.max_sentences], key=lambda c: c[1])
            parts = [h for h in (normalise_hint(s, min_chars=0) for _, _, s in keep) if h]
            hint = " ".join(dict.fromkeys(parts))  # a short part ("Shorter.") counts inside a longer hint
            out[i] = hint if len(hint) > HINT_MIN_CHARS else None
        return out


# ---------------------------------------------------------------------------------------------
# LLM hint extraction (OpenAI-compatible endpoint)

HINT_SYSTEM_PROMPT = (
    "You are a process reward model used for hindsight hint extraction.\n"
    "You are given the assistant's response at turn t and the next state at turn t+1 "
    "(the user's next message).\n"
    "Decide whether the next state reveals useful hindsight information that could have "
    "helped improve the assistant's response at turn t: a correction, a redo request, a "
    "preference about style or format, or an error the response caused.\n"
    "Output format rules (strict):\n"
    "- Reason briefly, then end with exactly one final decision: \\boxed{1} or \\boxed{-1}.\n"
    "- If and only if the decision is \\boxed{1}, give a concise, concrete instruction in 1-3 "
    "sentences saying what the response should have done differently, wrapped between "
    "[HINT_START] and [HINT_END].\n"
    "- If the next state is only praise, thanks, a new unrelated request or vague displeasure "
    "with nothing to act on, decide \\boxed{-1} and give no hint block."
)

_HINT_BLOCK = re.compile(r"\[HINT_START\](.*?)\[HINT_END\]", re.S)


def hint_messages(context: list[dict], reply: str, next_message: str) -> list[dict]:
    from backend.judge.llm import turn_prompt

    return turn_prompt(HINT_SYSTEM_PROMPT, context, reply, next_message,
                       "Does the next state contain useful hindsight for improving the response?")


def parse_hint_vote(text: str) -> tuple[int | None, str | None]:
    """-> (decision in {1,-1} or None if unparseable, hint or None)."""
    from backend.judge.llm import parse_boxed
    decision = parse_boxed(text, allowed=(1, -1))
    blocks = _HINT_BLOCK.findall(text or "")
    hint = blocks[-1].strip() if blocks else None
    return decision, hint


def select_hint(votes: list[tuple[int | None, str | None]]) -> str | None:
    """Among positive votes with a hint over 10 characters, the longest wins."""
    good = [h for d, h in votes if d == 1 and h and len(h.strip()) > HINT_MIN_CHARS]
    return max(good, key=len).strip() if good else None


class LLMHintExtractor:
    def __init__(self, client, m: int = 1, temperature: float = 0.6) -> None:
        self.client, self.m, self.temperature = client, m, temperature

    def extract(self, context: list[dict], reply: str, next_message: str) -> str | None:
        texts = self.client.sample(hint_messages(context, reply, next_message), n=self.m, temperature=self.temperature)
        return select_hint([parse_hint_vote(t) for t in texts])

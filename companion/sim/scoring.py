"""Rule-based scoring of replies against a persona's preferences.

Contract
- :func:`meets` decides one preference for one reply (pure, deterministic):
  ``absent``/``present``: the regex (compiled with MULTILINE) is not / is found;
  ``max_words``/``min_words``: whitespace-separated word count <= / >= value;
  ``keywords``: the reply mentions at least one of the task's keywords,
  case-insensitively, starting at a word boundary (so "cells" matches "cell").
- Score of a reply = share of preferences it meets, in [0, 1].
- :func:`fill_correction` fills a correction phrasing's ``{found}`` from the reply it
  answers: for ``absent``, the distinct matched texts (case-insensitively, first three,
  in reply order, quoted: "'crucial' and 'vital'"); for ``max_words``/``min_words``, the
  reply's word count. A phrasing without ``{found}`` is returned unchanged.
- :func:`evaluate` scores greedy replies to the eval tasks: personalization score
  = mean reply score; all-pass rate = share of replies meeting every preference;
  distinct-4 = distinct word 4-grams / all word 4-grams pooled over the replies
  (collapse into loops or one stock answer drives it down).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from companion.sim.persona import Persona, Preference, Task


def word_count(text: str) -> int:
    return len(text.split())


def mentions_keyword(text: str, keywords: tuple[str, ...] | list[str]) -> bool:
    return any(re.search(r"(?<!\w)" + re.escape(k.strip()), text, re.IGNORECASE) for k in keywords if k.strip())


def meets(pref: Preference, reply: str, task: Task | None = None) -> bool:
    if pref.check == "absent":
        return pref.pattern.search(reply) is None
    if pref.check == "present":
        return pref.pattern.search(reply) is not None
    if pref.check == "max_words":
        return word_count(reply) <= pref.value
    if pref.check == "min_words":
        return word_count(reply) >= pref.value
    if pref.check == "keywords":
        # A task without keywords cannot be checked; the validator refuses such files.
        return task is not None and mentions_keyword(reply, task.keywords)
    raise ValueError(f"unknown check {pref.check!r}")


def _quoted_list(items: list[str]) -> str:
    quoted = [f"'{x}'" for x in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def fill_correction(pref: Preference, phrasing: str, reply: str) -> str:
    if "{found}" not in phrasing:
        return phrasing
    if pref.check in ("max_words", "min_words"):
        found = str(word_count(reply))
    elif pref.check == "absent":
        seen: dict[str, str] = {}
        for m in pref.pattern.finditer(reply):
            text = " ".join(m.group(0).split())  # a match over a line break reads as one phrase
            if text and text.lower() not in seen:
                seen[text.lower()] = text
        # The phrasing is only used for a failed preference, so an absent pattern matched;
        # "that" keeps the sentence readable if a caller fills it for a passing reply.
        found = _quoted_list(list(seen.values())[:3]) if seen else "that"
    else:
        raise ValueError(f"{{found}} cannot be filled for a {pref.check!r} preference")
    return phrasing.replace("{found}", found)


@dataclass
class ReplyScore:
    met: dict[str, bool]

    @property
    def score(self) -> float:
        return sum(self.met.values()) / len(self.met) if self.met else 0.0

    @property
    def all_pass(self) -> bool:
        return all(self.met.values())

    @property
    def failed(self) -> list[str]:
        return [pid for pid, ok in self.met.items() if not ok]


def score_reply(persona: Persona, reply: str, task: Task | None) -> ReplyScore:
    return ReplyScore({p.id: meets(p, reply, task) for p in persona.preferences})


def distinct_ngram_ratio(texts: list[str], n: int = 4) -> float:
    """Distinct word n-grams over all n-grams, pooled across texts (0.0 when there are none)."""
    grams = []
    for t in texts:
        words = t.lower().split()
        grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class EvalResult:
    score: float
    all_pass: float
    distinct4: float
    per_pref: dict[str, float]
    replies: list[str] = field(default_factory=list)
    scores: list[ReplyScore] = field(default_factory=list)

    def as_dict(self, with_replies: bool = False) -> dict:
        out = {"score": self.score, "all_pass": self.all_pass, "distinct4": self.distinct4, "per_pref": self.per_pref}
        if with_replies:
            out["replies"] = self.replies
        return out


def evaluate(persona: Persona, replies: list[str]) -> EvalResult:
    """Score one reply per eval task (same order as ``persona.eval_tasks``)."""
    if len(replies) != len(persona.eval_tasks):
        raise ValueError(f"expected {len(persona.eval_tasks)} replies, got {len(replies)}")
    scores = [score_reply(persona, r, t) for r, t in zip(replies, persona.eval_tasks)]
    n = len(scores)
    per_pref = {p.id: sum(s.met[p.id] for s in scores) / n for p in persona.preferences}
    return EvalResult(
        score=sum(s.score for s in scores) / n,
        all_pass=sum(s.all_pass for s in scores) / n,
        distinct4=distinct_ngram_ratio(replies),
        per_pref=per_pref,
        replies=list(replies),
        scores=scores,
    )

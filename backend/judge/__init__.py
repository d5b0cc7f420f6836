"""Judges: (context, reply, next message) -> Judgment(reward, votes, hint, judge_name, latency).

``load_judge("embedding", m=3)`` is the CPU default (MiniLM features + m
learned heads, see embedding.py); ``load_judge("llm", endpoint=..., m=3)``
is the paper's PRM prompt against an OpenAI-compatible server (llm.py). Both
take ``feedback_db=PATH`` to keep explicit thumbs up/down per user
(feedback.py). Reward = majority of the m votes, a tie gives 0 (base.py).
"""

from __future__ import annotations

from backend.judge.base import Judge, Judgment, majority_vote

__all__ = ["Judge", "Judgment", "load_judge", "majority_vote"]

JUDGES = ("embedding", "llm")


def load_judge(name: str = "embedding", m: int = 3, **kw) -> Judge:
    """Build a judge by name; unknown names or missing options raise UserError."""
    from companion.errors import UserError

    if name == "embedding":
        from backend.judge.embedding import EmbeddingJudge, EmbeddingJudgeConfig
        feedback_db = kw.pop("feedback_db", None)
        featurizer = kw.pop("featurizer", None)
        return EmbeddingJudge(EmbeddingJudgeConfig(m=m, **kw), featurizer=featurizer, feedback_db=feedback_db)
    if name == "llm":
        from backend.judge.llm import LLMJudge
        if not kw.get("endpoint"):
            raise UserError("the llm judge needs an endpoint, e.g. http://localhost:30000/v1.")
        return LLMJudge(m=m, **kw)
    raise UserError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}.")

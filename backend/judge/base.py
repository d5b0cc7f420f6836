"""The judge interface: (context, reply, next message) -> Judgment by majority vote.

Invariants:
- every vote is in {-1, 0, +1}; the reward is the strict majority of the votes,
  a tie (no value with more votes than every other) gives 0, no votes give 0;
- ``Judgment.hint`` is None unless the next message says how the reply should
  have been different (a directive); evaluative-only messages never carry one;
- explicit feedback (a thumbs key in the UI) is a Judgment too: it overrides
  the votes for that turn (``judge_name == "explicit"``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

VOTE_VALUES = (-1, 0, 1)


def majority_vote(votes: list[int]) -> int:
    """Strict majority of votes in {-1,0,1}; a tie or no votes gives 0."""
    for v in votes:
        if v not in VOTE_VALUES:
            raise ValueError(f"a vote must be -1, 0 or 1, not {v!r}")
    if not votes:
        return 0
    ranked = Counter(votes).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return 0
    return ranked[0][0]


@dataclass
class Judgment:
    reward: int                      # majority of votes, in {-1, 0, 1}
    votes: list[int]                 # the m individual votes
    hint: str | None = None          # instruction for OPD, or None
    judge_name: str = ""
    latency: float = 0.0             # seconds spent on this judgment
    extra: dict = field(default_factory=dict)  # judge-specific details (probabilities, raw text)

    def __post_init__(self) -> None:
        if self.reward not in VOTE_VALUES:
            raise ValueError(f"reward must be -1, 0 or 1, not {self.reward!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def explicit(cls, label: int, hint: str | None = None) -> "Judgment":
        """The person pressed thumbs up (+1) or down (-1): this overrides any vote."""
        if label not in (-1, 1):
            raise ValueError("explicit feedback is +1 (thumbs up) or -1 (thumbs down)")
        return cls(reward=label, votes=[label], hint=hint, judge_name="explicit", latency=0.0)


Item = tuple[list[dict], str, str]   # (context messages, reply, next message)


class Judge:
    """Base class: subclasses implement ``judge_batch``; ``judge`` is batch of one."""

    name = "base"
    m = 1

    def judge(self, context: list[dict], reply: str, next_message: str, user: str | None = None) -> Judgment:
        return self.judge_batch([(context, reply, next_message)], user=user)[0]

    def judge_batch(self, items: list[Item], user: str | None = None) -> list[Judgment]:
        raise NotImplementedError

    # -- explicit feedback -------------------------------------------------
    feedback = None  # a FeedbackStore when the caller gave a feedback_db path

    def record_feedback(self, user: str, context: list[dict], reply: str, next_message: str | None,
                        label: int, turn_id: str | None = None) -> Judgment:
        """Store a thumbs up/down as a labelled example for ``user``; return the overriding Judgment.

        Without a feedback store (no ``feedback_db`` given) the Judgment is still returned,
        but nothing is kept for later refits.
        """
        from companion.errors import UserError
        if label not in (-1, 1):
            raise UserError("explicit feedback is +1 (thumbs up) or -1 (thumbs down).")
        t0 = time.perf_counter()
        j = Judgment.explicit(label)
        if self.feedback is not None:
            self.feedback.record(user, context, reply, next_message, label, turn_id=turn_id)
        j.latency = time.perf_counter() - t0
        return j

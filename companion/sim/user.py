"""The simulated person: picks the next task and answers each reply like the persona would.

Contract
- Deterministic: a :class:`SimulatedUser` built with the same persona and seed makes
  the same choices for the same replies (one ``random.Random(seed)``, consumed in a
  fixed order per reaction).
- Only training tasks are ever sent (``persona.tasks``, shuffled, cycled); eval tasks
  are never used here.
- :meth:`react` reads the reply with the persona's rules (:mod:`companion.sim.scoring`)
  and returns a :class:`Reaction` with the text sent as the next message and what the
  person *meant* (``intended``: +1 praise, -1 correction or vague complaint, 0 neutral).
  The judge never sees ``intended``; the replay compares the two (judge agreement).
    * with ``neutral_rate``: a neutral message (no evaluation), the session ends;
    * every preference met: praise, the session ends;
    * otherwise, with ``vague_rate`` a vague complaint (evaluative only), else a
      correction naming one or two failed preferences (directive; a phrasing's
      ``{found}`` quotes what broke it, :func:`~companion.sim.scoring.fill_correction`); while rewrites
      are left (``max_rewrites`` per session) and with ``rewrite_rate`` it also asks
      for a rewrite and the session goes on, otherwise the session ends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from companion.sim.persona import Persona, Task
from companion.sim.scoring import ReplyScore, fill_correction, score_reply


@dataclass
class Reaction:
    text: str
    intended: int  # +1 | 0 | -1: what the person meant
    kind: str  # 'praise' | 'correction' | 'vague' | 'neutral'
    score: ReplyScore
    named: list[str] = field(default_factory=list)  # preference ids the correction names
    rewrite: bool = False  # the session continues with a rewrite of the same task


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text[-1:] in ".!?" else text + "."


class SimulatedUser:
    def __init__(self, persona: Persona, seed: int = 0) -> None:
        self.persona = persona
        self.rng = random.Random(seed)
        self._order: list[int] = []
        self._next = 0

    def next_task(self) -> Task:
        """The next training task (a fresh shuffle of all tasks each time they run out)."""
        if self._next >= len(self._order):
            self._order = list(range(len(self.persona.tasks)))
            self.rng.shuffle(self._order)
            self._next = 0
        task = self.persona.tasks[self._order[self._next]]
        self._next += 1
        return task

    def react(self, task: Task, reply: str, rewrites_used: int = 0) -> Reaction:
        fb = self.persona.feedback
        score = score_reply(self.persona, reply, task)
        if fb.neutral and self.rng.random() < fb.neutral_rate:
            return Reaction(self.rng.choice(fb.neutral), 0, "neutral", score)
        if score.all_pass:
            return Reaction(self.rng.choice(fb.praise), 1, "praise", score)
        failed = score.failed
        if fb.vague_complaints and self.rng.random() < fb.vague_rate:
            text, kind, named = self.rng.choice(fb.vague_complaints), "vague", []
        else:
            named = self.rng.sample(failed, k=min(len(failed), self.rng.choice((1, 2))))
            prefs = [self.persona.preference(pid) for pid in named]
            parts = [fill_correction(p, self.rng.choice(p.corrections), reply) for p in prefs]
            text, kind = " ".join(_sentence(p) for p in parts), "correction"
        rewrite = rewrites_used < fb.max_rewrites and self.rng.random() < fb.rewrite_rate
        if rewrite:
            text = f"{_sentence(text)} {self.rng.choice(fb.rewrite_requests)}"
        return Reaction(text, -1, kind, score, named, rewrite)

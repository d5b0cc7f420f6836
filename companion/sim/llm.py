"""Optional LLM roles for replays, against any OpenAI-compatible endpoint (the paper's setup).

- :class:`LLMPersonaUser`: a strong model plays the persona. The rules still decide what
  the person *means* (praise / complaint / neutral, which preferences failed, rewrites),
  so the intended label stays known for judge agreement; the LLM only words the next
  message in the persona's voice from its description and the failed preferences.
- :class:`LLMRater`: rates a reply for the persona on 0-1 in steps of 0.25 (the paper's
  rating); the replay adds the mean rating of the eval replies to each curve point.

Both use :class:`ChatEndpoint` (``POST {endpoint}/chat/completions``, stdlib only).
A failed request raises :class:`~companion.errors.UserError` with one sentence.
Nothing here runs unless ``--llm-endpoint`` is given.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from companion.errors import UserError
from companion.sim.persona import Persona, Task
from companion.sim.user import Reaction, SimulatedUser


class ChatEndpoint:
    def __init__(self, endpoint: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0):
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def complete(self, messages: list[dict], temperature: float = 0.7, max_tokens: int = 200, seed: int | None = None) -> str:
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = seed
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
            return str(data["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as exc:
            raise UserError(f"the LLM endpoint {self.url} failed: {exc}.") from None


def _persona_card(persona: Persona) -> str:
    prefs = "\n".join(f"- {p.id}: {p.description or p.check}" for p in persona.preferences)
    return f"{persona.description}\n\nWhat you care about in a reply:\n{prefs}"


class LLMPersonaUser(SimulatedUser):
    """The rules decide the meaning; the LLM words it as the persona would."""

    def __init__(self, persona: Persona, seed: int, chat: ChatEndpoint) -> None:
        super().__init__(persona, seed)
        self.chat = chat
        self._seed, self._calls = seed, 0  # LLM seeds come from here, never from self.rng (same meaning as the rules)

    def react(self, task: Task, reply: str, rewrites_used: int = 0) -> Reaction:
        base = super().react(task, reply, rewrites_used)
        if base.kind == "neutral":
            return base
        want = {"praise": "Thank the assistant briefly and warmly; the reply was exactly right.",
                "vague": "Say you are unhappy with the reply, without saying what to change.",
                "correction": "Say what to change, in particular: "
                + "; ".join(self.persona.preference(p).description or p for p in base.named)}[base.kind]
        if base.rewrite:
            want += " Ask for a new attempt."
        self._calls += 1
        text = self.chat.complete([
            {"role": "system", "content": f"You play this person in a chat with an AI assistant.\n{_persona_card(self.persona)}\n"
             "Answer with the person's next chat message only: one or two short sentences, in their own voice."},
            {"role": "user", "content": f"You asked:\n{task.prompt}\n\nThe assistant replied:\n{reply}\n\n{want}"},
        ], seed=self._seed * 1000003 + self._calls)
        return Reaction(text or base.text, base.intended, base.kind, base.score, base.named, base.rewrite)


class LLMRater:
    """Rates a reply for the persona on {0, 0.25, 0.5, 0.75, 1}."""

    def __init__(self, chat: ChatEndpoint) -> None:
        self.chat = chat

    def rate(self, persona: Persona, task: Task, reply: str) -> float:
        out = self.chat.complete([
            {"role": "system", "content": f"You rate replies for this person.\n{_persona_card(persona)}\n"
             "Rate how well the reply suits the person on a scale from 0 to 1 in steps of 0.25. "
             "Answer with the number only."},
            {"role": "user", "content": f"Request:\n{task.prompt}\n\nReply:\n{reply}"},
        ], temperature=0.0, max_tokens=8)
        m = re.search(r"[01](?:\.\d+)?|\.\d+", out)
        if not m:
            raise UserError(f"the LLM rater answered {out[:60]!r}, not a number between 0 and 1.")
        return round(min(1.0, max(0.0, float(m.group(0)))) * 4) / 4

    def rate_all(self, persona: Persona, replies: list[str]) -> float:
        return sum(self.rate(persona, t, r) for t, r in zip(persona.eval_tasks, replies)) / len(replies)

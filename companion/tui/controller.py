"""One conversation with the policy, shared by the TUI and the plain console chat.

Contract:
- :meth:`Conversation.begin` takes the person's message. If a previous reply is
  waiting for its next state, this message *is* that next state: the previous
  turn is closed with ``next_message`` set (and handed to the journal, whose
  outbox relays it to the backend). Then it returns the prompt messages for the
  engine (system + history + this message).
- :meth:`Conversation.finish` takes the engine's Reply and builds the turn dict
  of the shared wire shape (turn_id, client_id, session_id, index, messages,
  reply, prompt_ids, token_ids, logprobs, policy_version, next_message=None,
  feedback=None, created_at); the journal stores it at once, before anything
  else happens to it. A cancelled reply is kept: its partial text was seen and
  the next message still judges it.
- :meth:`feedback` marks the last reply +1/-1 (explicit evaluative signal, sent
  with the turn); calling it again with the same value clears it.
- :meth:`end` closes the last turn with ``next_message=None`` (the session ended).
- Learned preferences never enter the prompt: the system prompt is fixed.
- The journal session is created lazily, with the first reply, so opening the
  app does not litter the journal with empty sessions. A journal session that
  has ended cannot take new turns: :meth:`Conversation.resume` continues an old
  conversation as a *new* session whose context is the old messages.
- Without a journal (``store=None``) everything works in memory only.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

CORRECTION_PREFIX = "No, that's not right: "


@dataclass
class Conversation:
    system_prompt: str
    store: Any = None  # companion.journal.Journal or None
    client_id: str = "local"
    session_id: str | None = None
    title: str = "New chat"
    messages: list[dict] = field(default_factory=list)  # user/assistant only, in order
    turns: list[dict] = field(default_factory=list)  # this session's turns, in order
    prompts: list[str] = field(default_factory=list)  # everything the person typed, for up-arrow recall

    def __post_init__(self) -> None:
        if self.store is None and self.session_id is None:
            self.session_id = uuid.uuid4().hex

    # ------------------------------------------------------------ sessions
    @classmethod
    def resume(cls, store, session_id: str, system_prompt: str, client_id: str = "local") -> "Conversation":
        """Continue a journal session's conversation; new turns go to a new session (see contract)."""
        old = store.session(session_id)
        conv = cls(system_prompt=system_prompt, store=store, client_id=client_id,
                   title=(old.get("title") or "Chat"))
        for t in store.turns(session_id=session_id):
            user = t["messages"][-1]["content"] if t.get("messages") else ""
            conv.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": t["reply"]}]
            conv.prompts.append(user)
        return conv

    @property
    def pending(self) -> dict | None:
        """The last turn if it still waits for its next state."""
        if self.turns and self.turns[-1].get("_open"):
            return self.turns[-1]
        return None

    # ------------------------------------------------------------ turns
    def begin(self, text: str) -> list[dict]:
        """Register the person's message; returns the prompt messages for the engine."""
        text = text.strip()
        if not text:
            raise ValueError("empty message")
        self._close(next_message=text)
        self.prompts.append(text)
        self.messages.append({"role": "user", "content": text})
        return self.prompt_messages()

    def prompt_messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}] + [dict(m) for m in self.messages]

    def finish(self, reply) -> dict:
        """Record the engine's Reply as a turn (stored at once; next_message comes later)."""
        self.messages.append({"role": "assistant", "content": reply.text})
        turn = {
            "turn_id": uuid.uuid4().hex,
            "client_id": self.client_id,
            "session_id": self.session_id,
            "index": len(self.turns),
            "messages": [dict(m) for m in reply.messages],
            "reply": reply.text,
            "prompt_ids": list(reply.prompt_ids),
            "token_ids": list(reply.token_ids),
            "logprobs": [float(x) for x in reply.logprobs],
            "policy_version": int(reply.version),
            "next_message": None,
            "feedback": None,
            "created_at": time.time(),
        }
        if self.store:
            if self.session_id is None:
                if self.title == "New chat":  # name the session after its first message, like chat apps do
                    first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
                    self.title = " ".join(first.split())[:40] or self.title
                self.session_id = self.store.new_session(self.title)
                self.client_id = self.store.client_id
            turn["session_id"], turn["client_id"] = self.session_id, self.client_id
            self.store.record_turn(
                self.session_id, turn["messages"], turn["reply"], prompt_ids=turn["prompt_ids"],
                token_ids=turn["token_ids"], logprobs=turn["logprobs"], policy_version=turn["policy_version"],
                finish_reason=getattr(reply, "finish_reason", None), ttft_s=getattr(reply, "ttft_s", None),
                decode_s=getattr(reply, "decode_s", None), turn_id=turn["turn_id"], created_at=turn["created_at"],
            )
        turn["_open"] = True
        self.turns.append(turn)
        return turn

    def abandon(self) -> None:
        """The person's message got no reply (engine failure): forget it, keep history consistent."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def feedback(self, value: int) -> int | None:
        """Thumbs on the last reply: +1 or -1; the same value again clears it. Returns the new value."""
        if value not in (1, -1):
            raise ValueError("feedback is +1 or -1")
        turn = self.pending
        if turn is None:
            return None
        turn["feedback"] = None if turn.get("feedback") == value else value
        if self.store:
            self.store.set_feedback(turn["turn_id"], turn["feedback"])
        return turn["feedback"]

    def correction_prefill(self) -> str:
        """Text that starts a directive correction of the last reply."""
        return CORRECTION_PREFIX if self.pending else ""

    def end(self) -> None:
        """Close the session: the last turn gets no next state."""
        self._close(next_message=None)

    def rename(self, title: str) -> None:
        self.title = title
        if self.store and self.session_id:
            self.store.rename_session(self.session_id, title)

    def _close(self, next_message: str | None) -> None:
        turn = self.pending
        if turn is not None:
            turn.pop("_open", None)
            turn["next_message"] = next_message
        if not self.store or self.session_id is None:
            return
        if next_message is not None and turn is not None:
            self.store.set_next_message(turn["turn_id"], next_message)
        elif next_message is None:
            self.store.end_session(self.session_id)

    @staticmethod
    def wire(turn: dict) -> dict:
        """The turn without UI-private keys (what travels to the backend)."""
        return {k: v for k, v in turn.items() if not k.startswith("_")}

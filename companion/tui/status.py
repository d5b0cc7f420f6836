"""Live learning status: what the footer panel shows, and how link events change it.

Contract:
- :class:`LearningStatus` is a plain snapshot (link state, queued turns, serving
  version, last judgment, whether an update is running, last new-version notice).
- :class:`StatusFeed` is the one thread-safe hand-over point between the link's
  threads and the UI thread: the link (or anything else) calls :meth:`StatusFeed.put`
  from any thread; the app drains it on its own timer with :meth:`StatusFeed.drain`.
  Nothing in here touches Textual, so the plain console chat uses it too.
- :func:`apply_event` is pure: (status, event) -> notice text or None, mutating
  ``status``. Unknown event kinds are ignored (a newer link must not crash an older UI).

Event shapes (dicts, ``kind`` first):
  {"kind": "link", "state": "connected"|"reconnecting"|"offline"|"disabled", "queued": int}
  {"kind": "judgment", "turn_id", "reward": -1|0|1, "votes": [..], "hint": str|None}
  {"kind": "training", "running": bool, "failures": int (updates failed in a row), "error": str|None}
  {"kind": "version", "version": int, "learned_from": {"n_samples": int, "hints": [str], ...}}
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

LINK_STATES = ("connected", "reconnecting", "offline", "disabled", "starting")
FAILURES_TO_SHOW = 2  # one failed update can be a passing fault the backend retries; two in a row are shown


@dataclass
class LearningStatus:
    link: str = "offline"
    queued: int = 0
    version: int = 0
    updating: bool = False
    judgment: dict | None = None  # last judgment received: turn_id, reward, votes, hint
    notice: str | None = None  # last "new version" notice
    train_error: str | None = None  # set while updates keep failing (FAILURES_TO_SHOW in a row)
    judged: dict = field(default_factory=dict)  # turn_id -> judgment, for the message list badges

    def link_text(self) -> str:
        if self.link == "connected":
            return "connected" + (f", {self.queued} queued" if self.queued else "")
        if self.link == "reconnecting":
            return f"reconnecting, {self.queued} turns queued"
        if self.link == "disabled":
            return "learning off"
        if self.link == "starting":
            return "starting backend"
        return f"offline, {self.queued} turns queued"

    def judgment_text(self) -> str:
        j = self.judgment
        if not j:
            return "no judgment yet"
        votes = " ".join(f"{v:+d}" for v in j.get("votes") or [])
        text = f"reward {j.get('reward', 0):+d}" + (f" (votes {votes})" if votes else "")
        if j.get("hint"):
            text += f" hint: {shorten(j['hint'], 60)}"
        return text


def shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def version_notice(version: int, learned_from: dict | None) -> str:
    """One line saying a new policy version serves and what it learned from."""
    info = learned_from or {}
    if info.get("refused"):
        return f"Now serving v{version}: the update was refused and the previous weights kept ({shorten(info['refused'], 60)})"
    parts = []
    if info.get("n_samples"):
        n = info["n_samples"]
        parts.append(f"{n} turn{'s' if n != 1 else ''}")
    hints = [h for h in info.get("hints") or [] if h]
    if hints:
        parts.append("hints: " + "; ".join(shorten(h, 40) for h in hints[:2]) + (" …" if len(hints) > 2 else ""))
    return f"Now serving v{version}" + (f", learned from {', '.join(parts)}" if parts else "")


def apply_event(status: LearningStatus, event: dict) -> str | None:
    """Fold one event into ``status``; returns a notice for the person, or None."""
    kind = event.get("kind")
    if kind == "link":
        state = event.get("state", status.link)
        status.link = state if state in LINK_STATES else status.link
        status.queued = int(event.get("queued", status.queued) or 0)
    elif kind == "judgment":
        j = {k: event.get(k) for k in ("turn_id", "reward", "votes", "hint")}
        j["reward"] = int(j["reward"] or 0)
        j["votes"] = [int(v) for v in j["votes"] or []]
        status.judgment = j
        if j["turn_id"]:
            status.judged[j["turn_id"]] = j
    elif kind == "training":
        status.updating = bool(event.get("running"))
        failing = int(event.get("failures") or 0) >= FAILURES_TO_SHOW
        error = shorten(event.get("error") or "unknown error", 100) if failing else None
        was, status.train_error = status.train_error, error
        if error and not was:
            return f"Learning is failing: updates keep failing ({error}). Chat goes on; see the backend log."
    elif kind == "version":
        version = int(event.get("version", status.version))
        if version <= status.version:
            return None
        status.version = version
        status.updating = False
        status.train_error = None
        status.notice = version_notice(version, event.get("learned_from"))
        return status.notice
    return None


class StatusFeed:
    """Thread-safe queue of status events: ``put`` from any thread, ``drain`` on the UI thread."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[dict] = queue.SimpleQueue()

    def put(self, event: dict) -> None:
        self._q.put(dict(event))

    def drain(self, limit: int = 1000) -> list[dict]:
        out = []
        while len(out) < limit:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                break
        return out

"""One chat message: a role label plus a Markdown body that can stream.

Contract: :meth:`ChatMessage.push` may be called for every token (from the UI
thread); the Markdown is re-rendered at most ``STREAM_HZ`` times a second by a
timer (re-rendering per token would starve the input while a reply streams);
:meth:`ChatMessage.finish` renders the final text once and stops the timer.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown

STREAM_HZ = 20


class ChatMessage(Vertical):
    """A user or assistant message. ``turn_id`` links an assistant reply to its journal turn."""

    def __init__(self, role: str, text: str = "", *, streaming: bool = False, turn_id: str | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.turn_id = turn_id
        self.streaming = streaming
        self.renders = 0  # Markdown updates done; the streaming test checks coalescing
        self._shown = text
        self._timer = None

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role", markup=False)  # badges use brackets
        yield Markdown(self.text, classes="body")

    def _label(self, badge: str = "") -> str:
        name = {"user": "You", "assistant": "Assistant"}.get(self.role, self.role)
        return f"{name}{'  ' + badge if badge else ''}"

    def on_mount(self) -> None:
        if self.streaming:
            self.add_class("streaming")
            self._timer = self.set_interval(1 / STREAM_HZ, self._flush)

    def push(self, piece: str) -> None:
        self.text += piece

    def _flush(self) -> None:
        if self.text != self._shown:
            self._shown = self.text
            self.renders += 1
            self.query_one(".body", Markdown).update(self.text)
            self.parent and self.parent.scroll_end(animate=False)

    def finish(self, text: str, *, turn_id: str | None = None, note: str = "") -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.streaming = False
        self.remove_class("streaming")
        self.text = text
        self.turn_id = turn_id or self.turn_id
        self._shown = text
        self.renders += 1
        self.query_one(".body", Markdown).update(text or "*(empty reply)*")
        if note:
            self.set_badge(note)

    def set_badge(self, badge: str) -> None:
        self.query_one(".role", Label).update(self._label(badge))

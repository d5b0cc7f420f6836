"""One chat message: a role label plus a Markdown body that can stream.

Contract: :meth:`ChatMessage.push` may be called for every token from any
thread (it only appends to a string). A timer hands the new text to the
Markdown at most ``STREAM_HZ`` times a second through Textual's MarkdownStream,
which appends incrementally and merges fragments when rendering falls behind
(re-parsing the whole reply per token froze the input: measured 14 s to type
five keys during a long reply). :meth:`ChatMessage.finish` stops the stream and
renders the final text once, in full. When the event loop lags (each re-layout
of a long reply costs more), the widget backs off: it waits about four times
the observed lag before the next fragment, so keys always get through.
"""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown
from textual.widgets.markdown import MarkdownStream

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
        self._stream: MarkdownStream | None = None
        self._last_tick = 0.0
        self._next_ok = 0.0

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role", markup=False)  # badges use brackets
        yield Markdown(self.text, classes="body")

    def _label(self, badge: str = "") -> str:
        name = {"user": "You", "assistant": "Assistant"}.get(self.role, self.role)
        return f"{name}{'  ' + badge if badge else ''}"

    def on_mount(self) -> None:
        if self.streaming:
            self.add_class("streaming")
            self._stream = Markdown.get_stream(self.query_one(".body", Markdown))
            self._timer = self.set_interval(1 / STREAM_HZ, self._flush)

    def push(self, piece: str) -> None:
        self.text += piece

    async def _flush(self) -> None:
        now = time.monotonic()
        lag = now - self._last_tick - 1 / STREAM_HZ if self._last_tick else 0.0
        self._last_tick = now
        if now < self._next_ok:
            return
        self._next_ok = now + 4 * max(0.0, lag)
        text = self.text  # one read: the decoding thread may append meanwhile
        if self._stream is not None and len(text) > len(self._shown) and text.startswith(self._shown):
            fragment, self._shown = text[len(self._shown):], text
            self.renders += 1
            await self._stream.write(fragment)
            if self.parent is not None:
                self.parent.scroll_end(animate=False)

    async def finish(self, text: str, *, turn_id: str | None = None, note: str = "") -> None:
        # State first (readers see the final reply at once), rendering after.
        self.streaming = False
        self.text = self._shown = text
        self.turn_id = turn_id or self.turn_id
        self.remove_class("streaming")
        if note:
            self.set_badge(note)
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()
        self.renders += 1
        await self.query_one(".body", Markdown).update(text or "*(empty reply)*")

    def on_click(self, event) -> None:
        """Double-click copies this message (any message, not only the last reply)."""
        if getattr(event, "chain", 1) >= 2 and self.text:
            self.app.copy_to_clipboard(self.text)
            self.app.copied = self.text
            self.notify("Message copied")

    def set_badge(self, badge: str) -> None:
        self.query_one(".role", Label).update(self._label(badge))

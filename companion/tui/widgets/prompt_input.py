"""The prompt input: a one-line Input with shell-like recall of earlier prompts.

Contract: up-arrow walks back through ``history`` (oldest last), down-arrow
forward; past the newest entry the draft the person was typing comes back.
The input never gets disabled while a reply streams.
"""

from __future__ import annotations

from textual.widgets import Input

from companion.tui import keymap


class PromptInput(Input):
    BINDINGS = list(keymap.PROMPT)

    def __init__(self, **kw) -> None:
        super().__init__(placeholder="Message (Enter to send, Esc cancels a reply, Ctrl+P for commands)", **kw)
        self.history: list[str] = []
        self._pos: int | None = None  # index into history while recalling
        self._draft = ""

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._pos = None

    def action_history_prev(self) -> None:
        if not self.history:
            return
        if self._pos is None:
            self._draft, self._pos = self.value, len(self.history)
        self._pos = max(0, self._pos - 1)
        self._show(self.history[self._pos])

    def action_history_next(self) -> None:
        if self._pos is None:
            return
        self._pos += 1
        if self._pos >= len(self.history):
            self._pos = None
            self._show(self._draft)
        else:
            self._show(self.history[self._pos])

    def _show(self, text: str) -> None:
        self.value = text
        self.cursor_position = len(text)

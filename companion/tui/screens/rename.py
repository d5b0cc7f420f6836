"""A small modal asking for a session's new title; dismisses with the title or None."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from companion.tui import keymap


class RenameScreen(ModalScreen[str | None]):
    BINDINGS = list(keymap.MODAL)

    def __init__(self, current: str = "") -> None:
        super().__init__(id="rename")
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="rename-box"):
            yield Label("Rename session (Enter to save, Esc to cancel)")
            yield Input(value=self.current, id="rename-input")

    @on(Input.Submitted)
    def save(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)

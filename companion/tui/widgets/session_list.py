"""Sidebar listing past sessions from the journal (newest first).

Contract: :meth:`SessionList.show` replaces the items; each item's ``name`` is
its session id; selecting one posts ``ListView.Selected``; ``r`` and ``d`` ask
the screen to rename / delete the highlighted session via actions.
"""

from __future__ import annotations

from textual.widgets import Label, ListItem, ListView

from companion.tui import keymap
from companion.tui.status import shorten


class SessionList(ListView):
    BINDINGS = list(keymap.SESSIONS)

    def show(self, sessions: list[dict], current: str | None = None) -> None:
        self.clear()
        index = None
        for i, s in enumerate(sessions):
            n = s.get("n_turns", 0)
            label = f"{shorten(s.get('title') or 'Chat', 22)}\n[dim]{n} turn{'s' if n != 1 else ''}[/dim]"
            self.append(ListItem(Label(label, markup=True), name=s["id"]))
            if s["id"] == current:
                index = i
        if index is not None:
            self.index = index

    def highlighted_id(self) -> str | None:
        item = self.highlighted_child
        return item.name if item is not None else None

    async def action_rename(self) -> None:
        await self.screen.run_action("rename_session")

    async def action_delete(self) -> None:
        await self.screen.run_action("delete_session")

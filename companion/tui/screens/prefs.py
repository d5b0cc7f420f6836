"""Learned preferences: the distilled hints grouped by meaning, plus +1 share per version.

Contract: groups come from companion.tui.data.learned_preferences with the app's
embedder (all-MiniLM-L6-v2, loaded lazily); grouping runs in a worker thread so
the model load never freezes the UI; the table shows each group's newest
wording, how often and when it was learned, and the versions that trained on
it. ``g`` regroups. The chart shows the share of +1 judgments per policy version.
"""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label

from companion.tui import keymap
from companion.tui.data import learned_preferences, version_stats
from companion.tui.status import shorten
from companion.tui.widgets.tables import columned
from companion.tui.widgets.version_chart import VersionChart


class PrefsShown(Message):
    """Posted when the preference groups are on screen (tests wait on it)."""

    def __init__(self, n_groups: int) -> None:
        super().__init__()
        self.n_groups = n_groups


class PrefsScreen(Screen):
    BINDINGS = list(keymap.PREFS)

    def __init__(self) -> None:
        super().__init__(id="prefs")
        self.groups: list[dict] | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Label("What the backend learned from your corrections", id="prefs-title")
        yield DataTable(id="prefs-table", cursor_type="row", zebra_stripes=True)
        yield VersionChart(id="chart")
        yield Footer()

    COLUMNS = ("Preference", "Times", "Last learned", "Versions", "Wordings")

    def on_mount(self) -> None:
        columned(self.query_one(DataTable), self.COLUMNS)
        self.reload()

    def on_screen_resume(self) -> None:
        self.reload()

    def action_regroup(self) -> None:
        self.reload()

    def reload(self) -> None:
        journal = self.app.journal
        if journal is None:
            return
        self.query_one(VersionChart).show(version_stats(journal))
        self.query_one("#prefs-title", Label).update("Grouping learned hints…")
        embed = self.app.embedder

        def work() -> None:
            groups = learned_preferences(journal, embed)
            self.app.call_from_thread(self._show, groups)

        self.run_worker(work, thread=True, exclusive=True, group="prefs")

    def _show(self, groups: list[dict]) -> None:
        self.groups = groups
        table = columned(self.query_one(DataTable), self.COLUMNS)
        table.clear()
        for g in groups:
            table.add_row(
                shorten(g["hint"], 48), str(g["count"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(g["last_at"])),
                ", ".join(f"v{v}" for v in g["versions"]) or "-", str(len(g["hints"])),
            )
        n = sum(g["count"] for g in groups)
        self.query_one("#prefs-title", Label).update(
            f"What the backend learned from your corrections: {len(groups)} preference"
            f"{'s' if len(groups) != 1 else ''} from {n} hint{'s' if n != 1 else ''}"
            if groups else "No hints learned yet: correct a reply (Ctrl+R) or just say what you wanted."
        )
        self.post_message(PrefsShown(len(groups)))

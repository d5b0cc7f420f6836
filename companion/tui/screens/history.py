"""History screen: every turn with its reward, votes, hint, policy version and time.

Contract: rows come from companion.tui.data.history_rows (the journal); ``r``
cycles the reward filter (all, +1, 0, -1, not judged), ``s`` cycles the session
filter (all, then each session newest first); Enter opens the turn side by side
(TurnDetailScreen). The table reloads whenever the screen is shown.
"""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label

from companion.tui import keymap
from companion.tui.data import fmt_reward, fmt_votes, history_rows
from companion.tui.screens.turn_detail import TurnDetailScreen
from companion.tui.status import shorten
from companion.tui.widgets.tables import columned

REWARD_FILTERS = (None, 1, 0, -1, "none")
REWARD_NAMES = {None: "all", 1: "+1", 0: "0", -1: "-1", "none": "not judged"}


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


class HistoryScreen(Screen):
    BINDINGS = list(keymap.HISTORY)

    def __init__(self) -> None:
        super().__init__(id="history")
        self.reward_filter: int | str | None = None
        self.session_filter: str | None = None
        self.rows: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Label("", id="history-filters")
        yield DataTable(id="history-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    COLUMNS = ("Time", "Session", "#", "Prompt", "Reward", "Votes", "Hint", "Version", "You")

    def on_mount(self) -> None:
        self.reload()

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self) -> None:
        journal = self.app.journal
        self.rows = history_rows(journal, self.session_filter, self.reward_filter) if journal else []
        table = columned(self.query_one(DataTable), self.COLUMNS)
        table.clear()
        for r in self.rows:
            table.add_row(
                fmt_time(r["created_at"]), shorten(r["session"], 14), str(r["index"]), shorten(r["prompt"], 30),
                fmt_reward(r["reward"]), fmt_votes(r["votes"]), shorten(r["hint"] or "-", 30),
                f"v{r['policy_version']}", {1: "good", -1: "bad"}.get(r["feedback"], ""),
                key=r["turn_id"],
            )
        session = "all"
        if self.session_filter and journal:
            session = journal.session(self.session_filter).get("title") or "Chat"
        self.query_one("#history-filters", Label).update(
            f"Session: {session}   Reward: {REWARD_NAMES[self.reward_filter]}   "
            f"{len(self.rows)} turn{'s' if len(self.rows) != 1 else ''}   (r / s change filters, Enter opens)"
        )

    def action_cycle_reward(self) -> None:
        i = REWARD_FILTERS.index(self.reward_filter)
        self.reward_filter = REWARD_FILTERS[(i + 1) % len(REWARD_FILTERS)]
        self.reload()

    def action_cycle_session(self) -> None:
        ids = [None] + [s["id"] for s in self.app.journal.sessions()] if self.app.journal else [None]
        i = ids.index(self.session_filter) if self.session_filter in ids else 0
        self.session_filter = ids[(i + 1) % len(ids)]
        self.reload()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.open_turn(event.row_key.value)

    def action_open_turn(self) -> None:
        table = self.query_one(DataTable)
        if self.rows and table.cursor_row is not None:
            self.open_turn(self.rows[table.cursor_row]["turn_id"])

    def open_turn(self, turn_id: str) -> None:
        row = next((r for r in self.rows if r["turn_id"] == turn_id), None)
        if row is not None:
            self.app.push_screen(TurnDetailScreen(row))

"""One turn side by side: the prompt, the reply, the next message and the judgment.

Contract: a modal over the history screen built from one history row
(companion.tui.data.history_rows); Esc or q closes it. Texts are shown
verbatim (no markup interpretation: a reply may contain brackets).
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from companion.tui import keymap
from companion.tui.data import fmt_reward, fmt_votes


class TurnDetailScreen(ModalScreen[None]):
    BINDINGS = list(keymap.TURN)

    def __init__(self, row: dict) -> None:
        super().__init__(id="turn-detail")
        self.row = row

    def compose(self) -> ComposeResult:
        r = self.row
        next_msg = r["next_message"] if r["next_message"] is not None else (
            "(session ended: no next message)" if r.get("next_state") == "none" else "(waiting for your next message)")
        judgment = "\n".join([
            f"reward: {fmt_reward(r['reward'])}",
            f"votes: {fmt_votes(r['votes'])}",
            f"hint: {r['hint'] or '-'}",
            f"judge: {r.get('judge') or '-'}",
            f"policy version: v{r['policy_version']}",
            f"your feedback: {({1: 'good', -1: 'bad'}).get(r['feedback'], '-')}",
        ]) if r["judged"] else f"not judged yet\npolicy version: v{r['policy_version']}"
        with Grid(id="turn-grid"):
            for title, body, pane_id in (("Prompt", r["prompt"], "pane-prompt"), ("Reply", r["reply"], "pane-reply"),
                                         ("Next message", next_msg, "pane-next"), ("Judgment", judgment, "pane-judgment")):
                with VerticalScroll(classes="pane", id=pane_id) as pane:
                    pane.border_title = title
                    yield Static(Text(body or ""), classes="pane-body")
        yield Label(f"Turn {r['index']} of session {r['session']}  (Esc closes)", id="turn-caption")

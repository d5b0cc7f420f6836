"""Live learning status: link state, serving version, last judgment, update running.

Contract: :meth:`StatusPanel.show` renders a :class:`LearningStatus` snapshot;
it holds no state of its own, so what it shows is always the app's status.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from companion.tui.status import LearningStatus

LINK_STYLE = {"connected": "green", "reconnecting": "yellow", "offline": "red", "disabled": "dim", "starting": "yellow"}


class StatusPanel(Static):
    def show(self, status: LearningStatus) -> None:
        t = Text()
        t.append("● ", style=LINK_STYLE.get(status.link, ""))
        t.append(status.link_text())
        t.append("  │  ")
        t.append(f"policy v{status.version}", style="bold")
        if status.train_error:
            t.append("  (learning failing)", style="bold red")
        elif status.updating:
            t.append("  (updating…)", style="yellow")
        t.append("  │  ")
        j = status.judgment
        style = {1: "green", -1: "red"}.get(j.get("reward") if j else None, "")
        t.append("last judgment: " + status.judgment_text(), style=style)
        self.update(t)

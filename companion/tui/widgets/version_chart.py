"""Share of +1 judgments per policy version: a Sparkline plus a one-line legend.

Contract: :meth:`VersionChart.show` takes rows ``{"version", "n", "positive_share"}``
ordered by version; with no rows it says there is nothing to chart yet.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline


class VersionChart(Vertical):
    def compose(self) -> ComposeResult:
        yield Label("Share of +1 judgments per policy version", classes="chart-title")
        yield Sparkline([], summary_function=max, id="spark")
        yield Label("", id="legend")

    def show(self, rows: list[dict]) -> None:
        spark = self.query_one("#spark", Sparkline)
        legend = self.query_one("#legend", Label)
        if not rows:
            spark.data = []
            legend.update("no judged turns yet")
            return
        spark.data = [float(r["positive_share"]) for r in rows]
        legend.update("  ".join(f"v{r['version']}: {r['positive_share']:.0%} of {r['n']}" for r in rows[-8:]))

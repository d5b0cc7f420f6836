"""`companion prefs`: what the backend learned, grouped by meaning, and +1 share per version.

Reads the journal only. Hints that say the same thing are grouped with
all-MiniLM-L6-v2 embeddings (``--exact`` groups identical wordings only, no
model load). ``--json`` prints {"preferences": [...], "versions": [...]}.
"""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("prefs", parents=[common], help="print the preferences learned from your corrections",
                       description="The hints the backend distilled from your messages, grouped when they say the "
                                   "same thing, and the share of +1 judgments per policy version.")
    p.add_argument("--exact", action="store_true", help="group identical wordings only (no embedding model)")
    p.add_argument("--threshold", type=float, default=None, help="cosine similarity to group hints (default 0.4)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from companion.commands.history import open_journal
    from companion.errors import UserError
    from companion.tui.data import learned_preferences, to_json, version_stats
    from companion.tui.grouping import DEFAULT_THRESHOLD, MiniLMEmbedder

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if not 0 < threshold <= 1:
        raise UserError("--threshold must be in (0, 1].")
    journal = open_journal(args)
    try:
        prefs = learned_preferences(journal, None if args.exact else MiniLMEmbedder(), threshold)
        versions = version_stats(journal)
    finally:
        journal.close()
    if args.json:
        print(to_json({"preferences": prefs, "versions": versions}))
        return 0
    console = Console()
    table = Table(title=f"{len(prefs)} learned preference{'s' if len(prefs) != 1 else ''}")
    for col in ("preference", "times", "last learned", "versions", "other wordings"):
        table.add_column(col, overflow="fold")
    for g in prefs:
        others = [h for h in g["hints"] if h != g["hint"]]
        table.add_row(g["hint"], str(g["count"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(g["last_at"])),
                      ", ".join(f"v{v}" for v in g["versions"]) or "-", "; ".join(others[:3]) or "-")
    console.print(table)
    vt = Table(title="share of +1 judgments per policy version")
    for col in ("version", "judged turns", "+1 share"):
        vt.add_column(col)
    for v in versions:
        vt.add_row(f"v{v['version']}", str(v["n"]), f"{v['positive_share']:.0%}")
    console.print(vt)
    return 0

"""`companion history`: every turn with its reward, votes, hint, policy version and time.

Reads the journal only. ``--session`` (id or title) and ``--reward`` filter;
``--json`` prints the rows as JSON (the same fields as the TUI's history screen).
"""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("history", parents=[common], help="print past turns with their judgments",
                       description="Every turn from the journal with its reward, votes, hint, policy version and time.")
    p.add_argument("--session", metavar="ID_OR_TITLE", help="only this session")
    p.add_argument("--reward", choices=["+1", "1", "0", "-1", "none"], help="only turns with this reward (none = not judged yet)")
    p.add_argument("--limit", type=int, default=None, help="only the newest N turns")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def open_journal(args):
    """The journal of --data-dir (read-only use); a clear error when there is none yet."""
    from companion.cli import settings_from_args
    from companion.errors import UserError
    from companion.journal import Journal

    settings = settings_from_args(args)
    if not settings.journal_path.exists():
        raise UserError(f"no journal at {settings.journal_path} yet: chat first (`companion chat`).")
    return Journal(settings.journal_path)


def resolve_session(journal, key: str | None) -> str | None:
    from companion.errors import UserError

    if key is None:
        return None
    sessions = journal.sessions()
    for s in sessions:
        if s["id"] == key or s["id"].startswith(key):
            return s["id"]
    matches = [s for s in sessions if (s.get("title") or "") == key]
    if len(matches) == 1:
        return matches[0]["id"]
    raise UserError(f"no session {key!r} (give an id, an id prefix, or an exact title)"
                    + (" ; several sessions have that title." if len(matches) > 1 else "."))


def run(args) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from companion.tui.data import fmt_reward, fmt_votes, history_rows, to_json
    from companion.tui.status import shorten

    journal = open_journal(args)
    try:
        reward = None if args.reward is None else ("none" if args.reward == "none" else int(args.reward))
        rows = history_rows(journal, resolve_session(journal, args.session), reward)
    finally:
        journal.close()
    if args.limit:
        rows = rows[-args.limit:]
    if args.json:
        print(to_json(rows))
        return 0
    console = Console()
    wide = console.width >= 140  # reply and next message only when they fit; --json has everything
    table = Table(title=f"{len(rows)} turn{'s' if len(rows) != 1 else ''}", show_lines=False)
    cols = ["time", "session", "#", "prompt"] + (["reply", "next message"] if wide else []) + [
        "reward", "votes", "hint", "version", "you"]
    for col in cols:
        table.add_column(col, overflow="fold")
    for r in rows:
        cells = [time.strftime("%m-%d %H:%M", time.localtime(r["created_at"])), shorten(r["session"], 16),
                 str(r["index"]), shorten(r["prompt"], 40)]
        if wide:
            cells += [shorten(r["reply"], 40), shorten(r["next_message"] or "-", 40)]
        cells += [fmt_reward(r["reward"]), fmt_votes(r["votes"]), shorten(r["hint"] or "-", 40),
                  f"v{r['policy_version']}", {1: "good", -1: "bad"}.get(r["feedback"], "")]
        table.add_row(*cells)
    console.print(table)
    return 0

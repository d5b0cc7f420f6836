"""Every key binding of the UI, in one place (Posting/Harlequin style).

Invariants: one entry per action; screens import their tuples from here and
never hard-code keys, so docs/ui.md and the footer always agree with the code.
Chat keys avoid the keys Textual's Input already uses (ctrl+a/e/d/u/w/k/x/c/v)
because the prompt input has focus while chatting; each feedback key also has
an F-key twin for terminals that eat a control key.
"""

from __future__ import annotations

from textual.binding import Binding

# App-wide: screens and the palette.
APP = (
    Binding("ctrl+q", "quit", "Quit", priority=True),
    Binding("f1", "show_chat", "Chat"),
    Binding("f2", "show_history", "History"),
    Binding("f3", "show_prefs", "Learned"),
    Binding("ctrl+p", "command_palette", "Palette", show=False, priority=True),
)

# Chat screen. Feedback keys act on the last reply; they are optional: the
# next message is the normal signal.
CHAT = (
    Binding("escape", "cancel_reply", "Cancel reply", show=False),
    Binding("ctrl+t,f5", "thumbs_up", "Good"),
    Binding("ctrl+g,f6", "thumbs_down", "Bad"),
    Binding("ctrl+r,f7", "correct", "Correct this"),
    Binding("ctrl+y", "copy_last", "Copy reply"),
    Binding("ctrl+n", "new_session", "New chat"),
    Binding("ctrl+o", "toggle_sidebar", "Sessions", show=False),
)

# Session list (sidebar), when it has focus.
SESSIONS = (
    Binding("r", "rename", "Rename"),
    Binding("delete,d", "delete", "Delete"),
)

# Prompt input history.
PROMPT = (
    Binding("up", "history_prev", "Earlier prompt", show=False),
    Binding("down", "history_next", "Later prompt", show=False),
)

# History screen.
HISTORY = (
    Binding("r", "cycle_reward", "Reward filter"),
    Binding("s", "cycle_session", "Session filter"),
    Binding("enter", "open_turn", "Open turn", show=False),
    Binding("escape", "app.show_chat", "Back", show=False),
)

# Turn detail modal.
TURN = (Binding("escape", "dismiss", "Close"), Binding("q", "dismiss", "Close", show=False))

# Preferences screen.
PREFS = (
    Binding("g", "regroup", "Regroup"),
    Binding("escape", "app.show_chat", "Back", show=False),
)

# Modals with a single input (rename).
MODAL = (Binding("escape", "cancel", "Cancel"),)


def describe() -> list[tuple[str, str, str]]:
    """(scope, key, description) for every binding, for docs and the help screen."""
    rows = []
    for scope, group in (("app", APP), ("chat", CHAT), ("sessions", SESSIONS), ("prompt", PROMPT), ("history", HISTORY),
                         ("turn", TURN), ("prefs", PREFS), ("modal", MODAL)):
        for b in group:
            rows.append((scope, b.key, b.description))
    return rows

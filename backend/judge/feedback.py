"""Explicit feedback store: thumbs up/down per user, kept as labelled examples (SQLite).

Contract: ``FeedbackStore(path).record(user, context, reply, next_message,
label, turn_id=None)`` appends one row (label +1 or -1); recording the same
``turn_id`` twice keeps the latest label (the person changed their mind).
``examples(user)`` returns ``[(next_message, label)]`` for that user, oldest
first, only rows that have a next message: the embedding judge reads the next
message, so a thumbs pressed before the person wrote anything is stored (for
history and for LLM judges) but cannot teach the head. Those examples are
appended to the bank when that user's heads are refitted (see embedding.py).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import sqlite_utils

from companion.errors import UserError


class FeedbackStore:
    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite_utils.Database(path)
        except OSError as exc:
            raise UserError(f"cannot open the feedback database {path}: {exc.strerror or exc}.") from None
        self.table = self.db["feedback"]
        if not self.table.exists():
            self.table.create({"id": str, "user": str, "turn_id": str, "context": str, "reply": str,
                               "next_message": str, "label": int, "created_at": float}, pk="id")
            self.table.create_index(["user"])

    def record(self, user: str, context: list[dict], reply: str, next_message: str | None,
               label: int, turn_id: str | None = None) -> str:
        if label not in (-1, 1):
            raise UserError("explicit feedback is +1 (thumbs up) or -1 (thumbs down).")
        if not user:
            raise UserError("explicit feedback needs a user id.")
        row_id = turn_id or str(uuid.uuid4())
        self.table.upsert({"id": row_id, "user": user, "turn_id": turn_id, "context": json.dumps(context or []),
                           "reply": reply or "", "next_message": next_message, "label": int(label),
                           "created_at": time.time()}, pk="id")
        return row_id

    def rows(self, user: str) -> list[dict]:
        return list(self.table.rows_where("user = ?", [user], order_by="created_at"))

    def examples(self, user: str) -> list[tuple[str, int]]:
        return [(r["next_message"], int(r["label"])) for r in self.rows(user)
                if r["next_message"] and r["next_message"].strip()]

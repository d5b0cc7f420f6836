"""The journal: the companion's own SQLite record of every session, turn, judgment and version.

Everything the person says and every reply is written here *before* anything else
happens to it; the link (:mod:`companion.link`) relays it to the backend from the
outbox, at-least-once. One file (``<data_dir>/companion.db``), browsable with
``datasette companion.db`` or ``sqlite-utils tables companion.db``.

Python API (all methods are thread-safe; one connection guarded by a lock)::

    j = Journal(path)                    # creates the schema; j.client_id is stable per file
    sid = j.new_session(title=None)      # ends any open session first (their last turns are sent)
    tid = j.record_turn(sid, messages, reply, prompt_ids=..., token_ids=..., logprobs=...,
                        policy_version=v)        # the turn + its outbox row, one transaction
    j.set_feedback(tid, +1 | -1 | None)  # explicit thumbs (sent with the turn if not sent yet)
    j.set_next_message(tid, text)        # the next state exists: the turn becomes sendable
    j.end_session(sid)                   # last turn gets "no next state" and becomes sendable
    j.sessions() / j.session(sid) / j.turns(session_id=None, reward=None) / j.turn(tid)
    j.rename_session(sid, title) / j.delete_session(sid)
    j.record_judgment(tid, reward, votes, hint, judge_name, judged_at=None)
    j.record_version(version, learned_from={...}, base_version=.., sha256=..)
    j.versions() / j.current_version()
    j.pending_outbox(limit) -> [OutboxItem(id, turn_id, payload, attempts)]   # ready, undelivered
    j.mark_sent([ids]) / j.mark_delivered([ids] or turn_ids=[...]) / j.outbox_counts()
    j.turn_payload(tid) -> the wire dict of a turn (DESIGN "a turn as it travels")

Schema (documented for people browsing the file)::

    meta(key TEXT PK, value TEXT)                 client_id, schema_version
    sessions(id TEXT PK, client_id, title, created_at REAL, ended_at REAL NULL)
    turns(turn_id TEXT PK, session_id -> sessions.id, client_id, idx INTEGER (turn number in the
          session, "index" on the wire), messages JSON (prompt messages incl. system), reply TEXT,
          prompt_ids JSON, token_ids JSON, logprobs JSON, policy_version INTEGER,
          finish_reason TEXT, ttft_s REAL, decode_s REAL, created_at REAL,
          next_state TEXT ('pending' | 'given' | 'none'), next_message TEXT NULL, next_at REAL NULL,
          feedback INTEGER NULL (+1/-1 explicit thumbs),
          reward INTEGER NULL, votes JSON NULL, hint TEXT NULL, judge_name TEXT NULL, judged_at REAL NULL)
    outbox(id INTEGER PK, kind TEXT ('turn'), turn_id -> turns, created_at REAL,
           ready INTEGER (0 until the next state is known), attempts INTEGER,
           last_sent_at REAL NULL, delivered_at REAL NULL)
    versions(version INTEGER PK, base_version INTEGER, applied_at REAL, sha256 TEXT,
             learned_from JSON (summary: n_samples, turn ids, loss, ...))

Invariants
- A turn and its outbox row are written in one transaction: there is never a turn
  without an outbox row, nor an outbox row without its turn.
- A turn is sendable (``ready=1``) once its next state is known: the person's next
  message (``next_state='given'``) or the end of the session (``'none'``, sent with
  ``next_message=None``). Ending a session, starting a new one, or reopening the
  journal after a crash (:meth:`end_open_sessions`) makes the last turn sendable:
  never silently dropped.
- An outbox row is marked delivered only when the backend acked it (the link does
  that); :meth:`pending_outbox` returns undelivered ready rows oldest first.
- Deleting a session deletes its turns and outbox rows locally (what was already
  delivered stays on the backend).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from companion.db import open_wal_database
from companion.errors import UserError

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, client_id TEXT NOT NULL, title TEXT,
    created_at REAL NOT NULL, ended_at REAL
);
CREATE TABLE IF NOT EXISTS turns (
    turn_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    client_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    messages TEXT NOT NULL,
    reply TEXT NOT NULL,
    prompt_ids TEXT NOT NULL,
    token_ids TEXT NOT NULL,
    logprobs TEXT NOT NULL,
    policy_version INTEGER NOT NULL,
    finish_reason TEXT,
    ttft_s REAL,
    decode_s REAL,
    created_at REAL NOT NULL,
    next_state TEXT NOT NULL DEFAULT 'pending',
    next_message TEXT,
    next_at REAL,
    feedback INTEGER,
    reward INTEGER,
    votes TEXT,
    hint TEXT,
    judge_name TEXT,
    judged_at REAL
);
CREATE INDEX IF NOT EXISTS turns_session ON turns(session_id, idx);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL DEFAULT 'turn',
    turn_id TEXT NOT NULL REFERENCES turns(turn_id),
    created_at REAL NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_sent_at REAL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(delivered_at, ready, id);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, base_version INTEGER, applied_at REAL NOT NULL,
    sha256 TEXT, learned_from TEXT
);
"""

_JSON_COLUMNS = ("messages", "prompt_ids", "token_ids", "logprobs", "votes")


class JournalError(UserError):
    """A misuse of the journal the caller can fix (unknown session or turn, bad value)."""


@dataclass
class OutboxItem:
    id: int
    turn_id: str
    kind: str
    payload: dict
    attempts: int


def _decode_turn(row: dict) -> dict:
    out = dict(row)
    for col in _JSON_COLUMNS:
        if out.get(col) is not None:
            out[col] = json.loads(out[col])
    return out


class Journal:
    """SQLite journal; see the module docstring for the API, schema and invariants."""

    def __init__(self, path: str | Path, client_id: str | None = None) -> None:
        self.path = Path(path)
        # One connection shared by the UI thread and the link thread, serialized by the lock.
        self.db, self._lock = open_wal_database(path, _DDL, foreign_keys=True)
        with self._lock:
            meta = {r["key"]: r["value"] for r in self.db["meta"].rows}
            if "client_id" not in meta:
                self.db["meta"].insert_all(
                    [{"key": "client_id", "value": client_id or uuid.uuid4().hex},
                     {"key": "schema_version", "value": str(SCHEMA_VERSION)}],
                    replace=True,
                )
            elif client_id and meta["client_id"] != client_id:
                self.db["meta"].upsert({"key": "client_id", "value": client_id}, pk="key")
            self.client_id: str = self.db["meta"].get("client_id")["value"]

    # -- transactions -------------------------------------------------------------------------
    def _tx(self):
        """BEGIN IMMEDIATE ... COMMIT under the lock (sqlite3 in autocommit mode otherwise)."""
        journal = self

        class _Tx:
            def __enter__(self_inner):
                journal._lock.acquire()
                journal.db.execute("BEGIN IMMEDIATE")
                return journal.db

            def __exit__(self_inner, exc_type, exc, tb):
                try:
                    journal.db.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    journal._lock.release()
                return False

        return _Tx()

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- sessions -----------------------------------------------------------------------------
    def new_session(self, title: str | None = None, end_others: bool = True) -> str:
        """Start a session; by default ends this client's open sessions (their last turns get sent)."""
        if end_others:
            self.end_open_sessions()
        sid = uuid.uuid4().hex
        with self._tx() as db:
            db["sessions"].insert({"id": sid, "client_id": self.client_id, "title": title,
                                   "created_at": time.time(), "ended_at": None})
        return sid

    def end_open_sessions(self) -> list[str]:
        """End every open session of this client (call at start-up to recover after a crash)."""
        with self._lock:
            open_ids = [r["id"] for r in self.db.query(
                "SELECT id FROM sessions WHERE ended_at IS NULL AND client_id = ?", [self.client_id])]
        for sid in open_ids:
            self.end_session(sid)
        return open_ids

    def end_session(self, session_id: str) -> None:
        """Mark the session ended; its pending turns get next_state 'none' and become sendable."""
        now = time.time()
        with self._tx() as db:
            self._require_session(session_id)
            db.execute("UPDATE sessions SET ended_at = COALESCE(ended_at, ?) WHERE id = ?", [now, session_id])
            db.execute(
                "UPDATE turns SET next_state = 'none', next_at = ? WHERE session_id = ? AND next_state = 'pending'",
                [now, session_id],
            )
            db.execute(
                "UPDATE outbox SET ready = 1 WHERE ready = 0 AND turn_id IN "
                "(SELECT turn_id FROM turns WHERE session_id = ?)",
                [session_id],
            )

    def rename_session(self, session_id: str, title: str) -> None:
        with self._tx() as db:
            self._require_session(session_id)
            db.execute("UPDATE sessions SET title = ? WHERE id = ?", [title, session_id])

    def delete_session(self, session_id: str) -> None:
        """Delete a session, its turns and their outbox rows (locally only)."""
        with self._tx() as db:
            self._require_session(session_id)
            db.execute("DELETE FROM outbox WHERE turn_id IN (SELECT turn_id FROM turns WHERE session_id = ?)",
                       [session_id])
            db.execute("DELETE FROM turns WHERE session_id = ?", [session_id])
            db.execute("DELETE FROM sessions WHERE id = ?", [session_id])

    def sessions(self) -> list[dict]:
        """All sessions, newest first, each with ``n_turns`` and ``last_turn_at``."""
        with self._lock:
            return list(self.db.query(
                "SELECT s.*, COUNT(t.turn_id) AS n_turns, MAX(t.created_at) AS last_turn_at "
                "FROM sessions s LEFT JOIN turns t ON t.session_id = s.id "
                "GROUP BY s.id ORDER BY s.created_at DESC, s.rowid DESC"))

    def session(self, session_id: str) -> dict:
        with self._lock:
            return dict(self._require_session(session_id))

    def _require_session(self, session_id: str) -> dict:
        rows = list(self.db.query("SELECT * FROM sessions WHERE id = ?", [session_id]))
        if not rows:
            raise JournalError(f"no session with id {session_id!r} in the journal.")
        return rows[0]

    # -- turns --------------------------------------------------------------------------------
    def record_turn(
        self,
        session_id: str,
        messages: list[dict],
        reply: str,
        *,
        prompt_ids: Iterable[int] = (),
        token_ids: Iterable[int] = (),
        logprobs: Iterable[float] = (),
        policy_version: int = 0,
        feedback: int | None = None,
        finish_reason: str | None = None,
        ttft_s: float | None = None,
        decode_s: float | None = None,
        turn_id: str | None = None,
        created_at: float | None = None,
    ) -> str:
        """Write a turn and its outbox row in one transaction; returns the turn id.

        The outbox row stays unsent (``ready=0``) until the next message or the end of
        the session. Raises :class:`JournalError` for an unknown or ended session.
        """
        if feedback not in (None, 1, -1):
            raise JournalError("feedback must be +1, -1 or None.")
        tid = turn_id or uuid.uuid4().hex
        now = time.time() if created_at is None else created_at
        with self._tx() as db:
            sess = self._require_session(session_id)
            if sess["ended_at"] is not None:
                raise JournalError(f"session {session_id} has ended; start a new one.")
            idx = next(iter(db.query(
                "SELECT COALESCE(MAX(idx) + 1, 0) AS n FROM turns WHERE session_id = ?", [session_id])))["n"]
            db["turns"].insert({
                "turn_id": tid, "session_id": session_id, "client_id": self.client_id, "idx": idx,
                "messages": json.dumps(list(messages)), "reply": reply,
                "prompt_ids": json.dumps([int(i) for i in prompt_ids]),
                "token_ids": json.dumps([int(i) for i in token_ids]),
                "logprobs": json.dumps([float(x) for x in logprobs]),
                "policy_version": int(policy_version), "finish_reason": finish_reason,
                "ttft_s": ttft_s, "decode_s": decode_s, "created_at": now,
                "next_state": "pending", "feedback": feedback,
            })
            db["outbox"].insert({"kind": "turn", "turn_id": tid, "created_at": now, "ready": 0, "attempts": 0})
        return tid

    def set_next_message(self, turn_id: str, text: str) -> None:
        """Record the person's next message as this turn's next state; the turn becomes sendable."""
        with self._tx() as db:
            self._require_turn(turn_id)
            db.execute("UPDATE turns SET next_state = 'given', next_message = ?, next_at = ? WHERE turn_id = ?",
                       [text, time.time(), turn_id])
            db.execute("UPDATE outbox SET ready = 1 WHERE turn_id = ?", [turn_id])

    def set_feedback(self, turn_id: str, feedback: int | None) -> None:
        """Explicit thumbs up (+1) / down (-1) / cleared (None); travels with the turn if not yet sent."""
        if feedback not in (None, 1, -1):
            raise JournalError("feedback must be +1, -1 or None.")
        with self._tx() as db:
            self._require_turn(turn_id)
            db.execute("UPDATE turns SET feedback = ? WHERE turn_id = ?", [feedback, turn_id])

    def record_judgment(self, turn_id: str, reward: int, votes: list[int] | None = None, hint: str | None = None,
                        judge_name: str | None = None, judged_at: float | None = None) -> bool:
        """Store the backend's judgment of a turn; False when the turn is unknown (e.g. deleted)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE turns SET reward = ?, votes = ?, hint = ?, judge_name = ?, judged_at = ? WHERE turn_id = ?",
                [int(reward), json.dumps(list(votes or [])), hint, judge_name,
                 time.time() if judged_at is None else judged_at, turn_id])
            return cur.rowcount > 0

    def turn(self, turn_id: str) -> dict:
        with self._lock:
            return _decode_turn(self._require_turn(turn_id))

    def _require_turn(self, turn_id: str) -> dict:
        rows = list(self.db.query("SELECT * FROM turns WHERE turn_id = ?", [turn_id]))
        if not rows:
            raise JournalError(f"no turn with id {turn_id!r} in the journal.")
        return rows[0]

    def turns(self, session_id: str | None = None, reward: int | None = None, limit: int | None = None) -> list[dict]:
        """Turns oldest first (JSON columns decoded), optionally of one session / one reward."""
        where, args = [], []
        if session_id is not None:
            where.append("session_id = ?")
            args.append(session_id)
        if reward is not None:
            where.append("reward = ?")
            args.append(int(reward))
        sql = "SELECT * FROM turns" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at, rowid"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            return [_decode_turn(r) for r in self.db.query(sql, args)]

    def turn_payload(self, turn_id: str) -> dict:
        """The turn as it travels to the backend (the shared wire dict)."""
        with self._lock:
            return self._payload(self._require_turn(turn_id))

    @staticmethod
    def _payload(row: dict) -> dict:
        return {
            "turn_id": row["turn_id"], "client_id": row["client_id"], "session_id": row["session_id"],
            "index": row["idx"], "messages": json.loads(row["messages"]), "reply": row["reply"],
            "prompt_ids": json.loads(row["prompt_ids"]), "token_ids": json.loads(row["token_ids"]),
            "logprobs": json.loads(row["logprobs"]), "policy_version": row["policy_version"],
            "next_message": row["next_message"] if row["next_state"] == "given" else None,
            "feedback": row["feedback"], "created_at": row["created_at"],
        }

    # -- outbox -------------------------------------------------------------------------------
    def pending_outbox(self, limit: int = 100, exclude: Iterable[int] = ()) -> list[OutboxItem]:
        """Ready, undelivered outbox rows, oldest first, with their wire payload."""
        skip = set(exclude)
        with self._lock:
            rows = list(self.db.query(
                "SELECT o.id, o.kind, o.attempts, t.* FROM outbox o JOIN turns t ON t.turn_id = o.turn_id "
                "WHERE o.delivered_at IS NULL AND o.ready = 1 ORDER BY o.id LIMIT ?", [int(limit) + len(skip)]))
        out = [OutboxItem(r["id"], r["turn_id"], r["kind"], self._payload(r), r["attempts"])
               for r in rows if r["id"] not in skip]
        return out[:limit]

    def mark_sent(self, outbox_ids: Iterable[int]) -> None:
        ids = list(outbox_ids)
        if not ids:
            return
        with self._tx() as db:
            db.execute(f"UPDATE outbox SET attempts = attempts + 1, last_sent_at = ? WHERE id IN "
                       f"({','.join('?' * len(ids))})", [time.time(), *ids])

    def mark_delivered(self, outbox_ids: Iterable[int] = (), turn_ids: Iterable[str] = ()) -> int:
        """Mark rows delivered (by outbox id or turn id); returns how many changed."""
        ids, tids = list(outbox_ids), list(turn_ids)
        n = 0
        with self._tx() as db:
            now = time.time()
            if ids:
                n += db.execute(f"UPDATE outbox SET delivered_at = ? WHERE delivered_at IS NULL AND id IN "
                                f"({','.join('?' * len(ids))})", [now, *ids]).rowcount
            if tids:
                n += db.execute(f"UPDATE outbox SET delivered_at = ? WHERE delivered_at IS NULL AND turn_id IN "
                                f"({','.join('?' * len(tids))})", [now, *tids]).rowcount
        return n

    def outbox_counts(self) -> dict[str, int]:
        """{'waiting': not ready yet, 'pending': ready and unsent/unacked, 'delivered': acked}."""
        with self._lock:
            row = next(iter(self.db.query(
                "SELECT SUM(ready = 0 AND delivered_at IS NULL) AS waiting, "
                "SUM(ready = 1 AND delivered_at IS NULL) AS pending, "
                "SUM(delivered_at IS NOT NULL) AS delivered FROM outbox")))
        return {k: int(v or 0) for k, v in row.items()}

    # -- policy versions ----------------------------------------------------------------------
    def record_version(self, version: int, learned_from: dict[str, Any] | None = None,
                       base_version: int | None = None, sha256: str | None = None,
                       applied_at: float | None = None) -> None:
        """Note that policy ``version`` is now serving (idempotent per version)."""
        with self._tx() as db:
            db["versions"].upsert({
                "version": int(version), "base_version": base_version,
                "applied_at": time.time() if applied_at is None else applied_at,
                "sha256": sha256, "learned_from": json.dumps(learned_from or {}),
            }, pk="version")

    def versions(self) -> list[dict]:
        with self._lock:
            rows = list(self.db.query("SELECT * FROM versions ORDER BY version"))
        for r in rows:
            r["learned_from"] = json.loads(r["learned_from"] or "{}")
        return rows

    def current_version(self) -> int:
        """The newest applied policy version (0 = the base model)."""
        with self._lock:
            row = next(iter(self.db.query("SELECT MAX(version) AS v FROM versions")))
        return int(row["v"] or 0)

"""Opening the project's SQLite files: one place for the connection settings both sides use.

The journal (companion side) and the backend store share the same needs: one connection
used from several threads (serialized by the returned lock), autocommit so each
``with db.conn:`` block is one transaction, WAL so other processes (datasette, reports)
can read while we write, and ``synchronous=NORMAL``, which in WAL mode survives a process
crash (only a power loss may drop the last commit).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import sqlite_utils


def open_wal_database(path: str | Path, ddl: str, foreign_keys: bool = False) -> tuple[sqlite_utils.Database, threading.RLock]:
    """Open (creating folders and tables) a WAL-mode SQLite file; returns (database, lock)."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
    db = sqlite_utils.Database(conn)
    lock = threading.RLock()
    with lock:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if foreign_keys:
            db.execute("PRAGMA foreign_keys=ON")
        conn.executescript(ddl)
    return db, lock

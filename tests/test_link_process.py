"""Real processes: SIGKILL the backend mid-update, keep chatting, restart; no turn lost, none trained twice."""

from __future__ import annotations

import json
import signal
import sqlite3

from safetensors import safe_open

from backend.loops import user_dir_name
from companion.config import load_settings
from companion.journal import Journal
from companion.link import Link, LinkConfig, start_local_backend
from waiting import wait_for

FAST = LinkConfig(ack_timeout_s=0.3, heartbeat_s=0.2, dead_after_s=0.8, max_backoff_s=1.0)
ARGS = ["--stages", "tiny", "--batch-size", "5", "--train-after", "0", "--max-staleness", "1000", "--tiny-slow", "1.0"]


def backend_rows(db_path, sql):
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def add_turns(journal, sid, n, start):
    ids = []
    for i in range(start, start + n):
        msgs = [{"role": "user", "content": f"question {i}"}]
        tid = journal.record_turn(sid, msgs, f"answer {i}", prompt_ids=[1, 9, 9 + i], token_ids=[20 + i, 2],
                                  logprobs=[-1.0, -0.5], policy_version=0)
        journal.set_next_message(tid, "thanks, that is great")
        ids.append(tid)
    return ids


def test_sigkill_mid_update_loses_nothing_trains_nothing_twice(tmp_path, tiny_model_dir):
    settings = load_settings(data_dir=str(tmp_path / "data"), model=str(tiny_model_dir))
    endpoint = f"ipc://{tmp_path}/backend.sock"
    db = settings.data_dir / "backend" / "backend.db"
    journal = Journal(tmp_path / "client.db")
    backend = start_local_backend(settings, ARGS, endpoint=endpoint, log_file=tmp_path / "backend1.log")
    link = Link(journal, endpoint, engine=None, cfg=FAST).start()
    try:
        sid = journal.new_session()
        ids = add_turns(journal, sid, 6, 0)
        # wait until an update is in flight (turns marked 'training'), then kill -9
        assert wait_for(lambda: backend_rows(db, "SELECT 1 FROM turns WHERE stage = 'training'"), 90)
        backend.proc.send_signal(signal.SIGKILL)
        backend.proc.wait(10)
        # the companion keeps going while the backend is down: turns are journaled, outbox grows
        assert wait_for(lambda: not link.connected, 5)
        ids += add_turns(journal, sid, 4, 6)
        journal.end_session(sid)
        assert journal.outbox_counts()["pending"] >= 4
        backend = start_local_backend(settings, ARGS, endpoint=endpoint, log_file=tmp_path / "backend2.log")
        assert link.wait_drained(60), journal.outbox_counts()
        assert wait_for(lambda: len(backend_rows(db, "SELECT 1 FROM turns WHERE stage = 'trained'")) == 10, 120), \
            backend_rows(db, "SELECT stage, COUNT(*) FROM turns GROUP BY stage")
    finally:
        link.stop()
        backend.stop()
    # counts in both databases agree: every client turn is in the backend exactly once
    client_ids = {t["turn_id"] for t in journal.turns()}
    backend_ids = [r[0] for r in backend_rows(db, "SELECT turn_id FROM turns")]
    assert client_ids == set(ids) and sorted(backend_ids) == sorted(ids)
    assert journal.outbox_counts() == {"waiting": 0, "pending": 0, "delivered": 10}
    # what the trainer actually learned from, read from its checkpoints: each turn exactly once
    ckpt_dir = settings.data_dir / "backend" / "users" / user_dir_name(journal.client_id) / "checkpoints"
    trained = []
    for f in sorted(ckpt_dir.glob("v*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            trained += json.loads(fh.metadata()["turn_ids"])
    assert sorted(trained) == sorted(ids), "a turn was trained twice or never"
    assert all(t["reward"] == 1 for t in journal.turns())  # judgments came back, even across the crash

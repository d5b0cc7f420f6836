"""Journal: sessions, turns + outbox in one transaction, next state, judgments, versions."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from companion.journal import Journal, JournalError

MSGS = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]


def _turn(j: Journal, sid: str, reply: str = "hello", **kw) -> str:
    return j.record_turn(sid, MSGS, reply, prompt_ids=[1, 2, 3], token_ids=[4, 5], logprobs=[-0.1, -0.2],
                         policy_version=kw.pop("policy_version", 0), **kw)


def test_turn_waits_for_next_state_then_is_sendable(tmp_path):
    j = Journal(tmp_path / "c.db")
    sid = j.new_session("first")
    t0 = _turn(j, sid)
    assert j.pending_outbox() == []  # no next state yet
    assert j.outbox_counts() == {"waiting": 1, "pending": 0, "delivered": 0}
    j.set_next_message(t0, "thanks, that helped")
    t1 = _turn(j, sid, "second reply", policy_version=1)
    items = j.pending_outbox()
    assert [i.turn_id for i in items] == [t0]
    p = items[0].payload
    assert p["next_message"] == "thanks, that helped"
    assert p["index"] == 0 and p["client_id"] == j.client_id and p["session_id"] == sid
    assert p["token_ids"] == [4, 5] and p["logprobs"] == [-0.1, -0.2] and p["prompt_ids"] == [1, 2, 3]
    assert p["messages"] == MSGS and p["reply"] == "hello" and p["feedback"] is None
    assert j.turn(t1)["idx"] == 1
    assert j.mark_delivered([items[0].id]) == 1
    assert j.mark_delivered([items[0].id]) == 0  # idempotent
    assert j.pending_outbox() == []


def test_ending_session_sends_last_turn_without_next_state(tmp_path):
    j = Journal(tmp_path / "c.db")
    sid = j.new_session()
    t0 = _turn(j, sid)
    j.end_session(sid)
    (item,) = j.pending_outbox()
    assert item.turn_id == t0 and item.payload["next_message"] is None
    assert j.turn(t0)["next_state"] == "none"
    assert j.session(sid)["ended_at"] is not None
    with pytest.raises(JournalError):
        _turn(j, sid)


def test_new_session_and_reopen_end_open_sessions(tmp_path):
    path = tmp_path / "c.db"
    j = Journal(path)
    s1 = j.new_session()
    t1 = _turn(j, s1)
    s2 = j.new_session()  # ends s1: its last turn is sent, never dropped
    assert [i.turn_id for i in j.pending_outbox()] == [t1]
    t2 = _turn(j, s2)
    j.close()
    j2 = Journal(path)  # after a crash: the open session is ended on recovery
    assert j2.client_id == j.client_id
    assert j2.end_open_sessions() == [s2]
    assert [i.turn_id for i in j2.pending_outbox()] == [t1, t2]


def test_turn_and_outbox_are_one_transaction(tmp_path):
    j = Journal(tmp_path / "c.db")
    sid = j.new_session()
    # Make the outbox insert fail inside the transaction: the turn must not survive.
    j.db.execute("CREATE TRIGGER boom BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'boom'); END")
    with pytest.raises(sqlite3.IntegrityError):
        _turn(j, sid)
    assert j.turns() == []
    j.db.execute("DROP TRIGGER boom")
    _turn(j, sid)
    assert len(j.turns()) == 1 and j.outbox_counts()["waiting"] == 1


def test_judgment_feedback_filters_rename_delete(tmp_path):
    j = Journal(tmp_path / "c.db")
    sid = j.new_session()
    a, b = _turn(j, sid, "a"), _turn(j, sid, "b")
    j.set_feedback(a, -1)
    assert j.record_judgment(a, -1, [-1, -1, 0], "be shorter", "embedding")
    assert not j.record_judgment("nope", 1)
    assert [t["turn_id"] for t in j.turns(reward=-1)] == [a]
    t = j.turn(a)
    assert t["votes"] == [-1, -1, 0] and t["hint"] == "be shorter" and t["feedback"] == -1
    assert [t["turn_id"] for t in j.turns(session_id=sid)] == [a, b]
    j.rename_session(sid, "renamed")
    (s,) = j.sessions()
    assert s["title"] == "renamed" and s["n_turns"] == 2
    j.delete_session(sid)
    assert j.sessions() == [] and j.turns() == [] and j.outbox_counts()["waiting"] == 0
    with pytest.raises(JournalError):
        j.rename_session(sid, "x")
    with pytest.raises(JournalError):
        j.set_feedback(a, 2)


def test_versions(tmp_path):
    j = Journal(tmp_path / "c.db")
    assert j.current_version() == 0
    j.record_version(1, {"n_samples": 4, "turn_ids": ["x"]}, base_version=0, sha256="ab")
    j.record_version(2, {"n_samples": 2}, base_version=1)
    assert j.current_version() == 2
    assert j.versions()[0]["learned_from"]["turn_ids"] == ["x"]


def test_concurrent_writers(tmp_path):
    j = Journal(tmp_path / "c.db")
    sid = j.new_session()
    errors = []

    def writer():
        try:
            for _ in range(30):
                t = _turn(j, sid)
                j.set_next_message(t, "ok")
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    idx = [t["idx"] for t in j.turns(session_id=sid)]
    assert sorted(idx) == list(range(90))
    assert len(j.pending_outbox(limit=1000)) == 90

"""UI logic without a terminal: status events, conversation turns in a real journal,
history/preference views, hint grouping with real MiniLM embeddings, and the
`companion history` / `companion prefs` commands."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import tui_support as ts
from companion.engine.local import GenParams
from companion.journal import Journal
from companion.tui.controller import CORRECTION_PREFIX, Conversation
from companion.tui.data import history_rows, learned_preferences, version_stats
from companion.tui.grouping import MiniLMEmbedder, group_texts
from companion.tui.status import LearningStatus, StatusFeed, apply_event

WIRE_KEYS = {"turn_id", "client_id", "session_id", "index", "messages", "reply", "prompt_ids", "token_ids",
             "logprobs", "policy_version", "next_message", "feedback", "created_at"}


@pytest.fixture(scope="module")
def engine():
    return ts.tiny_engine()


@pytest.fixture()
def journal(tmp_path):
    j = Journal(tmp_path / "companion.db")
    yield j
    j.close()


# ---------------------------------------------------------------- status
def test_status_events_fold_into_the_snapshot():
    s = LearningStatus()
    assert apply_event(s, {"kind": "link", "state": "reconnecting", "queued": 3}) is None
    assert s.link_text() == "reconnecting, 3 turns queued"
    apply_event(s, {"kind": "link", "state": "offline", "queued": 5})
    assert s.link_text() == "offline, 5 turns queued"
    apply_event(s, {"kind": "link", "state": "bogus"})
    assert s.link == "offline"  # unknown states keep the old one
    apply_event(s, {"kind": "judgment", "turn_id": "t1", "reward": -1, "votes": [-1, -1, 0], "hint": "Be brief."})
    assert s.judgment_text() == "reward -1 (votes -1 -1 +0) hint: Be brief."
    assert s.judged["t1"]["reward"] == -1
    apply_event(s, {"kind": "training", "running": True})
    assert s.updating
    notice = apply_event(s, {"kind": "version", "version": 2, "learned_from": {"n_samples": 4, "hints": ["Be brief."]}})
    assert notice == "Now serving v2, learned from 4 turns, hints: Be brief."
    assert s.version == 2 and not s.updating
    assert apply_event(s, {"kind": "version", "version": 2}) is None  # not newer: no second notice
    assert apply_event(s, {"kind": "from-the-future"}) is None


def test_updates_that_keep_failing_give_one_notice_and_a_mark_until_a_version_lands():
    s = LearningStatus()
    err = {"kind": "training", "running": False, "error": "RuntimeError: modified by an inplace operation"}
    assert apply_event(s, {**err, "failures": 1}) is None and s.train_error is None  # one can pass: retried
    notice = apply_event(s, {**err, "failures": 2})
    assert notice.startswith("Learning is failing") and "inplace operation" in notice
    assert s.train_error == "RuntimeError: modified by an inplace operation"
    assert apply_event(s, {**err, "failures": 3}) is None  # told once, not every poll
    assert apply_event(s, {"kind": "training", "running": True}) is None and s.train_error is None  # older backends
    apply_event(s, {**err, "failures": 2})
    apply_event(s, {"kind": "version", "version": 1})
    assert s.train_error is None  # an update landed


def test_status_feed_is_safe_across_threads():
    feed = StatusFeed()
    threads = [threading.Thread(target=lambda k=k: [feed.put({"kind": "n", "v": k * 100 + i}) for i in range(100)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = feed.drain(limit=10_000)
    assert sorted(e["v"] for e in got) == list(range(400))
    assert feed.drain() == []


# ---------------------------------------------------------------- conversation
def test_conversation_records_turns_and_next_states(engine, journal):
    params = GenParams(max_new_tokens=8, temperature=0)
    conv = Conversation(system_prompt="You are a helpful assistant.", store=journal)
    assert journal.sessions() == []  # lazily created with the first reply
    msgs = conv.begin("What is 2+2?")
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."}
    reply = engine.generate(msgs, params)
    t1 = conv.finish(reply)
    assert set(Conversation.wire(t1)) == WIRE_KEYS
    stored = journal.turn(t1["turn_id"])
    assert stored["token_ids"] == reply.token_ids and stored["next_state"] == "pending"
    assert journal.outbox_counts()["waiting"] == 1

    assert conv.feedback(1) == 1 and journal.turn(t1["turn_id"])["feedback"] == 1
    assert conv.feedback(1) is None and journal.turn(t1["turn_id"])["feedback"] is None  # same key again clears
    conv.feedback(-1)
    assert conv.correction_prefill() == CORRECTION_PREFIX

    msgs2 = conv.begin(CORRECTION_PREFIX + "it is 4.")
    assert msgs2[-2] == {"role": "assistant", "content": reply.text}  # history carries the reply
    payload = journal.turn_payload(t1["turn_id"])
    assert payload["next_message"] == CORRECTION_PREFIX + "it is 4." and payload["feedback"] == -1
    assert journal.outbox_counts()["pending"] == 1
    t2 = conv.finish(engine.generate(msgs2, params))
    assert t2["index"] == 1
    conv.end()
    assert journal.turn(t2["turn_id"])["next_state"] == "none"
    assert journal.outbox_counts()["pending"] == 2
    assert conv.feedback(1) is None  # nothing pending after the end

    resumed = Conversation.resume(journal, conv.session_id, "sys")
    assert [m["role"] for m in resumed.messages] == ["user", "assistant", "user", "assistant"]
    assert resumed.prompts == ["What is 2+2?", CORRECTION_PREFIX + "it is 4."]
    assert resumed.session_id is None  # continues as a new session: the old one has ended


def test_empty_message_is_refused(journal):
    with pytest.raises(ValueError):
        Conversation(system_prompt="s", store=journal).begin("   ")


# ---------------------------------------------------------------- views
def _populate(journal, hints):
    sid = journal.new_session("Study")
    tids = []
    for i, (reward, hint) in enumerate(hints):
        tid = journal.record_turn(sid, [{"role": "user", "content": f"q{i}"}], f"a{i}", policy_version=i // 2,
                                  created_at=1_700_000_000 + i)
        journal.set_next_message(tid, f"n{i}")
        if reward is not None:
            journal.record_judgment(tid, reward, [reward] * 3, hint, "test", judged_at=1_700_000_100 + i)
        tids.append(tid)
    return sid, tids


def test_history_rows_filter_by_session_and_reward(journal):
    sid, tids = _populate(journal, [(1, None), (-1, "Keep answers shorter."), (0, None), (None, None)])
    other = journal.new_session("Other")
    journal.record_turn(other, [{"role": "user", "content": "x"}], "y")
    assert len(history_rows(journal)) == 5
    assert [r["turn_id"] for r in history_rows(journal, session_id=sid)] == tids
    assert [r["prompt"] for r in history_rows(journal, reward=-1)] == ["q1"]
    assert {r["prompt"] for r in history_rows(journal, reward="none")} == {"q3", "x"}
    row = history_rows(journal, reward=-1)[0]
    assert (row["hint"], row["votes"], row["next_message"], row["session"]) == ("Keep answers shorter.", [-1] * 3, "n1", "Study")
    assert version_stats(journal) == [{"version": 0, "n": 2, "positive_share": 0.5},
                                      {"version": 1, "n": 1, "positive_share": 0.0}]


def test_group_texts_contract_with_a_fixed_embedding():
    # Two orthogonal directions; near-duplicates sit close to one of them.
    vecs = {"a": [1, 0], "a2": [0.95, 0.05], "b": [0, 1], "A": [0.2, 0.8]}
    groups = group_texts(["a", "b", "a2", " A "], lambda ts_: np.array([vecs[t.strip()] for t in ts_]), 0.9)
    assert groups == [[0, 2, 3], [1]] or groups == [[0, 2], [1, 3]]
    # " A " folds to "a": exact duplicates after folding always share a group, whatever the vectors say.
    assert [0, 2, 3] in groups
    assert group_texts([], lambda t: None) == []
    with pytest.raises(ValueError):
        group_texts(["x"], lambda t: np.ones((1, 2)), threshold=0)


def test_minilm_groups_paraphrased_hints(journal):
    texts = ["Keep answers shorter.", "Please be more concise.", "Use Python, not JavaScript.",
             "Give the code in Python.", "Answer in French.", "Be brief."]
    groups = group_texts(texts, MiniLMEmbedder())
    as_sets = [set(g) for g in groups]
    assert {0, 1, 5} in as_sets  # brevity, three wordings
    assert {2, 3} in as_sets  # language choice
    assert {4} in as_sets

    sid, tids = _populate(journal, [(-1, "Keep answers shorter."), (-1, "Please be more concise."),
                                    (-1, "Answer in French."), (-1, "Be brief."), (1, None)])
    journal.record_version(1, {"turn_ids": tids[:2]})
    journal.record_version(2, {"turn_ids": [tids[3]]})
    prefs = learned_preferences(journal, MiniLMEmbedder())
    assert [g["count"] for g in prefs] == [3, 1]
    top = prefs[0]
    assert top["hint"] == "Be brief." and top["versions"] == [1, 2]  # newest wording; every version trained on it
    assert set(top["hints"]) == {"Keep answers shorter.", "Please be more concise.", "Be brief."}
    assert top["last_at"] == 1_700_000_103 and prefs[1]["versions"] == []
    assert [g["count"] for g in learned_preferences(journal, None)] == [1, 1, 1, 1]  # exact mode


# ---------------------------------------------------------------- CLI
def test_history_and_prefs_commands(tmp_path, capsys, monkeypatch):
    from companion.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # rich folds narrow tables; keep cells whole

    j = Journal(tmp_path / "companion.db")
    sid, tids = _populate(j, [(1, None), (-1, "Be brief."), (-1, "be brief.")])
    j.record_version(1, {"turn_ids": tids[1:]})
    j.close()
    assert main(["history", "--data-dir", str(tmp_path), "--json", "--reward", "-1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["q1", "q2"]
    assert main(["history", "--data-dir", str(tmp_path), "--session", "Study"]) == 0
    out = capsys.readouterr().out
    assert "3 turns" in out and "Be brief." in out
    assert main(["prefs", "--data-dir", str(tmp_path), "--json", "--exact"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preferences"][0]["count"] == 2 and data["preferences"][0]["versions"] == [1]
    assert data["versions"] == [{"version": 0, "n": 2, "positive_share": 0.5}, {"version": 1, "n": 1, "positive_share": 0.0}]
    assert main(["prefs", "--data-dir", str(tmp_path), "--exact"]) == 0
    assert "+1 share" in capsys.readouterr().out
    assert main(["history", "--data-dir", str(tmp_path), "--session", "nope"]) == 2
    assert "no session 'nope'" in capsys.readouterr().err
    assert main(["history", "--data-dir", str(tmp_path / "empty")]) == 2


def test_a_refused_update_is_shown_as_refused_not_as_learned():
    from backend.loops import learned_from_summary

    kept = learned_from_summary({"accepted": True, "loss": 0.5, "n_tokens": 9}, ["a", "b"])
    assert kept == {"n_samples": 2, "turn_ids": ["a", "b"], "loss": 0.5, "n_tokens": 9}
    quoted = learned_from_summary({"accepted": True, "n_quoted": 3, "n_hindsight": 0}, ["a"])
    assert quoted["n_quoted"] == 3 and "n_hindsight" not in quoted  # only what this update did
    rolled = learned_from_summary({"accepted": True, "n_rollouts": 2, "rollout_s": 1.5}, ["a"])
    assert (rolled["n_rollouts"], rolled["rollout_s"]) == (2, 1.5) and "n_rollouts" not in quoted
    looped = learned_from_summary({"accepted": True, "loop_tokens": [12], "loop_term": 0.8, "loop_s": 0.0,
                                   "loop_prepared": 2}, ["a"])
    assert (looped["loop_tokens"], looped["loop_term"], looped["loop_s"], looped["loop_prepared"]) == ([12], 0.8, 0.0, 2)
    assert learned_from_summary({"accepted": True, "loop_tokens": [0, 3]}, ["a"])["loop_tokens"] == [0, 3]  # per epoch
    assert "loop_tokens" not in learned_from_summary({"accepted": True, "loop_tokens": []}, ["a"])  # term off
    refused = learned_from_summary({"accepted": False, "reason": "repetition guard: greedy distinct-4 0.40 < base 0.95 - 0.1",
                                    "loss": 0.5, "variety_base": 0.95, "variety_after": 0.4, "rep_after": None}, ["a", "b"])
    assert refused["refused"].startswith("repetition guard: greedy distinct-4")
    assert (refused["variety_base"], refused["variety_after"]) == (0.95, 0.4) and "rep_after" not in refused
    s = LearningStatus()
    notice = apply_event(s, {"kind": "version", "version": 3, "learned_from": {**refused, "hints": ["Be brief."]}})
    assert notice.startswith("Now serving v3: the update was refused and the previous weights kept (repetition guard")
    assert "learned from" not in notice and s.version == 3

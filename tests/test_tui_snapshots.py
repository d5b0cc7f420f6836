"""Snapshot tests (pytest-textual-snapshot) of every screen, deterministic by construction:
fixed terminal size, fixed timestamps (UTC), the tiny model decoding greedily, status
events injected through the real StatusFeed. Update with `pytest --snapshot-update`."""

from __future__ import annotations

import os
import time

import pytest

import tui_support as ts
from companion.engine.local import GenParams
from companion.journal import Journal
from companion.tui.app import CompanionApp
from companion.tui.widgets.prompt_input import PromptInput

SIZE = (110, 30)
T0 = 1_763_000_000.0  # a fixed moment, shown in UTC


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(scope="module")
def engine():
    return ts.tiny_engine()


def seeded_journal(path) -> Journal:
    j = Journal(path, client_id="snapshot")
    sid = j.new_session("Python help")
    rows = [
        ("How do I reverse a list?", "Use slicing: `xs[::-1]`.", "Thanks, that works!", 1, None),
        ("And sort it?", "Here is a long essay about sorting algorithms ...", "Too long, keep answers short.", -1,
         "Keep answers short."),
        ("What about dicts?", "Dicts keep insertion order.", "Please be more concise next time.", -1, "Be more concise."),
    ]
    tids = []
    for i, (prompt, reply, nxt, reward, hint) in enumerate(rows):
        tid = j.record_turn(sid, [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": prompt}], reply,
                            policy_version=i // 2, created_at=T0 + 60 * i, turn_id=f"turn{i}")
        j.set_next_message(tid, nxt)
        j.record_judgment(tid, reward, [reward, reward, 0], hint, "embedding", judged_at=T0 + 60 * i + 5)
        tids.append(tid)
    j.record_version(1, {"turn_ids": tids[:2], "n_samples": 2}, applied_at=T0 + 100)
    j.end_session(sid)
    return j


def test_chat_screen_snapshot(snap_compare, engine, tmp_path):
    journal = Journal(tmp_path / "c.db", client_id="snapshot")
    app = CompanionApp(engine, GenParams(max_new_tokens=16, temperature=0), journal=journal, link_state="connected")

    async def run_before(pilot):
        prompt = app.chat.query_one(PromptInput)
        prompt.cursor_blink = False  # a blinking cursor makes screenshots differ by timing
        prompt.value = "hello there"
        await pilot.press("enter")
        for _ in range(500):
            await pilot.pause(0.02)
            if app.chat.streaming is None and journal.turns():
                break
        tid = journal.turns()[0]["turn_id"]
        app.feed.put({"kind": "judgment", "turn_id": tid, "reward": 1, "votes": [1, 1, 0], "hint": None})
        for _ in range(200):
            await pilot.pause(0.02)
            if app.status.judgment:
                break
        await pilot.wait_for_scheduled_animations()
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_history_screen_snapshot(snap_compare, engine, tmp_path):
    app = CompanionApp(engine, GenParams(max_new_tokens=8, temperature=0), journal=seeded_journal(tmp_path / "h.db"))
    assert snap_compare(app, terminal_size=SIZE, press=["f2", "_"])


def test_turn_detail_snapshot(snap_compare, engine, tmp_path):
    app = CompanionApp(engine, GenParams(max_new_tokens=8, temperature=0), journal=seeded_journal(tmp_path / "d.db"))
    assert snap_compare(app, terminal_size=SIZE, press=["f2", "_", "down", "enter", "_"])


def test_prefs_screen_snapshot(snap_compare, engine, tmp_path):
    app = CompanionApp(engine, GenParams(max_new_tokens=8, temperature=0), journal=seeded_journal(tmp_path / "p.db"))

    async def run_before(pilot):
        await pilot.press("f3")
        for _ in range(1000):
            await pilot.pause(0.02)
            if getattr(app.screen, "groups", None) is not None:
                break
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)

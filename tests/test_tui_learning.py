"""The whole learning loop as the person sees it, in one process: the app (pilot) with a
real engine and journal, the real link (start_learning) to a real backend server with
the tiny stages (cue-word judge, tiny LoRA trainer). Each follow-up's judgment shows in
the status bar and on the reply; after a batch the policy version increments, a notice
says what it learned from, and the preferences screen shows the hint."""

from __future__ import annotations

import asyncio

import pytest

import tui_support as ts
from waiting import pilot_wait_for
from backend.loops import PipelineConfig
from backend.server import BackendServer, ServerConfig
from backend.stages import tiny_stages
from companion.config import load_settings
from companion.engine.local import GenParams
from companion.journal import Journal
from companion.tui.app import CompanionApp
from companion.tui.learning import start_learning
from companion.tui.screens.prefs import PrefsScreen
from companion.tui.widgets.message import ChatMessage
from companion.tui.widgets.prompt_input import PromptInput
from companion.tui.widgets.status_panel import StatusPanel


async def wait_for(pilot, cond, timeout=60.0):
    await pilot_wait_for(pilot, cond, timeout, step=0.05)


def test_judgments_and_new_versions_reach_the_screen(tmp_path):
    engine = ts.tiny_engine()
    endpoint = f"ipc://{tmp_path}/backend.sock"
    server = BackendServer(
        ServerConfig(bind=endpoint, data_dir=tmp_path / "backend",
                     pipeline=PipelineConfig(batch_size=2, train_after_s=0, max_staleness=1000)),
        tiny_stages(ts.tiny_model_dir(), engine.fingerprint),
    ).start()
    journal = Journal(tmp_path / "companion.db")
    settings = load_settings(backend=endpoint, data_dir=str(tmp_path))
    app = CompanionApp(engine, GenParams(max_new_tokens=12, temperature=0), journal=journal, link_state="starting")
    learning = start_learning(settings, engine, journal, app.feed, poll_s=0.1, status_every_s=0.5)

    def status():
        return str(app.chat.query_one(StatusPanel).render())

    async def say(pilot, text):
        app.chat.query_one(PromptInput).value = text
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.streaming is None and app.chat.conv.pending is not None
                       and app.chat.conv.pending["messages"][-1]["content"] == text)

    async def run():
        async with app.run_test(size=(120, 32)) as pilot:
            await wait_for(pilot, lambda: "connected" in status())
            await say(pilot, "What is the capital of France?")
            await say(pilot, "No, that is wrong, answer in one word.")
            first = journal.turns()[0]["turn_id"]
            await wait_for(pilot, lambda: "reward -1" in status())
            assert "hint: No, that is wrong" in status()
            badge = str(app.chat.query(ChatMessage)[1].query_one(".role").render())
            assert "[judged -1 (-1 -1 -1)]" in badge
            assert journal.turn(first)["reward"] == -1  # the link stored it before the UI heard of it
            await say(pilot, "Thanks, that is great!")
            await wait_for(pilot, lambda: "reward +1" in status())
            # Two samples make a batch: the tiny trainer publishes v1, the link applies it.
            await wait_for(pilot, lambda: "policy v1" in status(), timeout=90)
            assert engine.version == 1
            assert app.notices and app.notices[0].startswith("Now serving v1, learned from 2 turns")
            assert "No, that is wrong" in app.notices[0]
            await pilot.press("f3")
            await wait_for(pilot, lambda: isinstance(app.screen, PrefsScreen) and app.screen.groups is not None)
            groups = app.screen.groups
            assert groups[0]["hint"] == "No, that is wrong, answer in one word." and groups[0]["versions"] == [1]
            await app.action_quit()

    try:
        asyncio.run(run())
    finally:
        learning.stop()
        server.stop()
        journal.close()

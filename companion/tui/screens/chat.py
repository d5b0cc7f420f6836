"""The chat screen: sessions sidebar, message list, prompt input, live learning status.

Contract:
- Sending a message never blocks the UI: the engine decodes in a worker thread;
  tokens are appended to the reply widget's text from that thread (a plain
  string append) and the widget re-renders on its own ~20 Hz timer; the final
  re-render and the journal write happen on the UI thread when decoding ends.
- The input stays enabled while a reply streams; Esc cancels the reply (the
  partial reply is kept and recorded: the person saw it). A second message
  while one streams is refused with a notice and left in the input.
- Feedback keys act on the last reply only and are optional; the next message
  is the normal signal (companion.tui.controller).
"""

from __future__ import annotations

import threading

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ListView

from companion.tui import keymap
from companion.tui.controller import Conversation
from companion.tui.screens.rename import RenameScreen
from companion.tui.widgets.message import ChatMessage
from companion.tui.widgets.message_list import MessageList
from companion.tui.widgets.prompt_input import PromptInput
from companion.tui.widgets.session_list import SessionList
from companion.tui.widgets.status_panel import StatusPanel

FEEDBACK_BADGE = {1: "[you: good]", -1: "[you: bad]", None: ""}


class ReplyFinished(Message):
    """Posted when a reply is complete and recorded (tests and the app wait on it)."""

    def __init__(self, turn_id: str) -> None:
        super().__init__()
        self.turn_id = turn_id


class ChatScreen(Screen):
    BINDINGS = list(keymap.CHAT)

    def __init__(self) -> None:
        super().__init__(id="chat")
        self.conv: Conversation | None = None
        self.cancel_event: threading.Event | None = None
        self.streaming: ChatMessage | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="chat-body"):
            with Vertical(id="sidebar"):
                yield Label("Sessions", classes="sidebar-title")
                yield SessionList(id="sessions")
            with Vertical(id="chat-main"):
                yield MessageList(id="messages")
                yield PromptInput(id="prompt")
        yield StatusPanel(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.conv = self.app.new_conversation()
        self.refresh_sessions()
        self.show_status()
        self.query_one(PromptInput).focus()

    # ------------------------------------------------------------ status
    def show_status(self) -> None:
        self.query_one(StatusPanel).show(self.app.status)

    def show_judgment(self, turn_id: str, judgment: dict) -> None:
        msg = self.query_one(MessageList).find(turn_id)
        if msg is not None:
            votes = " ".join(f"{v:+d}" for v in judgment.get("votes") or [])
            msg.set_badge(f"[judged {judgment['reward']:+d}" + (f" ({votes})" if votes else "") + "]")

    # ------------------------------------------------------------ sessions
    def refresh_sessions(self) -> None:
        if self.app.journal is None:
            return
        self.query_one(SessionList).show(self.app.journal.sessions(), current=self.conv.session_id)

    @on(ListView.Selected, "#sessions")
    async def open_session(self, event: ListView.Selected) -> None:
        sid = event.item.name
        if self.streaming is not None or sid == self.conv.session_id:
            return
        self.conv.end()
        self.conv = self.app.resume_conversation(sid)
        await self._show_conversation(self.app.journal.turns(session_id=sid))
        self.refresh_sessions()
        self.query_one(PromptInput).focus()

    async def _show_conversation(self, turns: list[dict]) -> None:
        messages = self.query_one(MessageList)
        await messages.clear()
        for t in turns:
            user = next((m["content"] for m in reversed(t["messages"]) if m["role"] == "user"), "")
            await messages.add("user", user)
            msg = await messages.add("assistant", t["reply"], turn_id=t["turn_id"])
            if t.get("reward") is not None:
                self.show_judgment(t["turn_id"], {"reward": t["reward"], "votes": t.get("votes") or []})
        prompt = self.query_one(PromptInput)
        prompt.history = list(self.conv.prompts)

    async def action_new_session(self) -> None:
        if self.streaming is not None:
            self.notify("A reply is streaming; press Esc first.", severity="warning")
            return
        await self._fresh_conversation()
        self.refresh_sessions()
        self.notify("New chat")

    async def _fresh_conversation(self) -> None:
        """End the current conversation (its last turn becomes sendable) and start an empty one."""
        self.conv.end()
        self.conv = self.app.new_conversation()
        await self.query_one(MessageList).clear()

    def _target_session(self) -> str | None:
        sessions = self.query_one(SessionList)
        if sessions.has_focus and sessions.highlighted_id():
            return sessions.highlighted_id()
        return self.conv.session_id

    def action_rename_session(self) -> None:
        sid = self._target_session()
        if sid is None or self.app.journal is None:
            self.notify("Nothing to rename yet: send a message first.", severity="warning")
            return
        current = self.app.journal.session(sid).get("title") or ""

        def done(title: str | None) -> None:
            if title:
                if sid == self.conv.session_id:
                    self.conv.rename(title)
                else:
                    self.app.journal.rename_session(sid, title)
                self.refresh_sessions()

        self.app.push_screen(RenameScreen(current), done)

    async def action_delete_session(self) -> None:
        sid = self._target_session()
        if sid is None or self.app.journal is None:
            return
        if sid == self.conv.session_id:
            if self.streaming is not None:
                self.notify("A reply is streaming; press Esc first.", severity="warning")
                return
            await self._fresh_conversation()
        self.app.journal.delete_session(sid)
        self.refresh_sessions()
        self.notify("Session deleted")

    def action_toggle_sidebar(self) -> None:
        self.query_one("#sidebar").toggle_class("hidden")

    # ------------------------------------------------------------ chatting
    @on(Input.Submitted, "#prompt")
    async def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.streaming is not None:
            self.notify("A reply is still streaming; press Esc to cancel it.", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        prompt.remember(text)
        prompt.value = ""
        messages_for_engine = self.conv.begin(text)
        messages = self.query_one(MessageList)
        await messages.add("user", text)
        reply_widget = await messages.add("assistant", "", streaming=True)
        self.streaming = reply_widget
        self.cancel_event = threading.Event()
        self.refresh_sessions()
        self._generate(messages_for_engine, reply_widget, self.cancel_event)

    def _generate(self, messages: list[dict], widget: ChatMessage, cancel: threading.Event) -> None:
        app = self.app

        def work() -> None:
            try:
                # widget.push is a plain string append: safe from this thread, rendered by the widget's timer.
                reply = app.engine.generate(messages, app.params, on_token=widget.push, cancel=cancel)
            except Exception as exc:  # the engine failed: say so, keep the chat usable
                app.call_from_thread(self._reply_failed, widget, exc)
                return
            try:
                app.call_from_thread(self._reply_done, widget, reply)
            except RuntimeError:  # the app already exited: record the turn anyway
                self.conv.finish(reply)

        self.run_worker(work, thread=True, exclusive=False, group="generate")

    async def _reply_done(self, widget: ChatMessage, reply) -> None:
        turn = self.conv.finish(reply)  # journal first: the turn is safe before anything else
        if not self.is_attached:  # the app is closing
            return
        self.refresh_sessions()
        self.cancel_event = None
        self.streaming = None
        note = "[cancelled]" if reply.finish_reason == "cancelled" else ""
        await widget.finish(reply.text, turn_id=turn["turn_id"], note=note)
        self.post_message(ReplyFinished(turn["turn_id"]))

    async def _reply_failed(self, widget: ChatMessage, exc: Exception) -> None:
        self.conv.abandon()
        self.streaming = None
        await widget.finish("", note="[failed]")
        self.notify(f"The model failed to reply: {exc}", severity="error")

    def action_cancel_reply(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()

    # ------------------------------------------------------------ feedback
    def _feedback(self, value: int) -> None:
        last = self.query_one(MessageList).last_reply()
        if self.conv.pending is None or last is None or last.turn_id != self.conv.pending["turn_id"]:
            self.notify("No reply to rate yet.", severity="warning")
            return
        now = self.conv.feedback(value)
        last.set_badge(FEEDBACK_BADGE[now])
        self.notify({1: "Marked good", -1: "Marked bad", None: "Feedback cleared"}[now])

    def action_thumbs_up(self) -> None:
        self._feedback(1)

    def action_thumbs_down(self) -> None:
        self._feedback(-1)

    def action_correct(self) -> None:
        prefill = self.conv.correction_prefill()
        if not prefill:
            self.notify("No reply to correct yet.", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        prompt.value = prefill
        prompt.cursor_position = len(prefill)
        prompt.focus()

    def action_copy_last(self) -> None:
        last = self.query_one(MessageList).last_reply()
        if last is None:
            self.notify("No reply to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(last.text)
        self.app.copied = last.text
        self.notify("Reply copied")

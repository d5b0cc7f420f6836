"""The companion Textual app: chat (F1), history (F2), learned preferences (F3).

Contract:
- The app owns the serving engine, the journal, the generation parameters and
  the live :class:`LearningStatus`; screens reach them through ``self.app``.
- Link state, judgments and new versions arrive on a :class:`StatusFeed` filled
  from the link's threads; the app drains it on a 10 Hz timer on the UI thread
  (never touching widgets from another thread). It also watches
  ``engine.version`` itself, so a version applied by any path is announced
  once, with what it learned from (the journal's ``versions.learned_from``).
- Quitting ends the open conversation, so its last turn is sent with "no next
  state" rather than dropped.
- Screens are Textual modes; the command palette (Ctrl+P) lists every action.
"""

from __future__ import annotations

from textual.app import App, SystemCommand

from companion.tui import keymap
from companion.tui.controller import Conversation
from companion.tui.screens.chat import ChatScreen
from companion.tui.screens.history import HistoryScreen
from companion.tui.screens.prefs import PrefsScreen
from companion.tui.status import LearningStatus, StatusFeed, apply_event


class CompanionApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "companion"
    BINDINGS = list(keymap.APP)
    MODES = {"chat": ChatScreen, "history": HistoryScreen, "prefs": PrefsScreen}
    DEFAULT_MODE = "chat"
    UNNOTED_POLLS_MAX = 30  # polls (3 s) to wait for the journal to note a new version before announcing it bare
    STATUS_POLL_S = 0.1

    def __init__(self, engine, params, *, journal=None, system_prompt: str = "You are a helpful assistant.",
                 feed: StatusFeed | None = None, link_state: str = "offline", embedder=None) -> None:
        super().__init__()
        self.engine = engine
        self.params = params
        self.journal = journal
        self.system_prompt = system_prompt
        self.feed = feed or StatusFeed()
        self.status = LearningStatus(link=link_state, version=engine.version)
        self._embedder = embedder
        self.copied: str | None = None  # last text sent to the clipboard (terminals may not echo it back)
        self.notices: list[str] = []  # every new-version notice shown, newest last
        self._unnoted_polls = 0  # polls that saw a new engine version the journal has not noted yet

    @property
    def embedder(self):
        """Sentence embedder for grouping hints; the MiniLM model is loaded on first use."""
        if self._embedder is None:
            from companion.tui.grouping import MiniLMEmbedder

            self._embedder = MiniLMEmbedder()
        return self._embedder

    # ------------------------------------------------------------ conversations
    def new_conversation(self) -> Conversation:
        return Conversation(system_prompt=self.system_prompt, store=self.journal)

    def resume_conversation(self, session_id: str) -> Conversation:
        return Conversation.resume(self.journal, session_id, self.system_prompt)

    @property
    def chat(self) -> ChatScreen:
        return self._chat_screen()

    def _chat_screen(self) -> ChatScreen:
        for stack in self._screen_stacks.values():
            for screen in stack:
                if isinstance(screen, ChatScreen):
                    return screen
        raise LookupError("chat screen not mounted")

    # ------------------------------------------------------------ status
    def on_mount(self) -> None:
        self.set_interval(self.STATUS_POLL_S, self.poll_status)

    def poll_status(self) -> None:
        events = self.feed.drain()
        if self.engine.version > self.status.version and not any(e.get("kind") == "version" for e in events):
            learned = self._learned_from()
            self._unnoted_polls = self._unnoted_polls + 1 if learned is None else 0
            # None: not in the journal yet, a later poll tells it whole; after a few polls, say it anyway
            if learned is not None or self._unnoted_polls > self.UNNOTED_POLLS_MAX:
                events.append({"kind": "version", "version": self.engine.version, "learned_from": learned or {}})
                self._unnoted_polls = 0
        if not events:
            return
        try:
            chat = self._chat_screen()
        except LookupError:
            chat = None
        for event in events:
            notice = apply_event(self.status, event)
            if event.get("kind") == "judgment" and chat is not None and self.status.judgment:
                chat.show_judgment(self.status.judgment["turn_id"], self.status.judgment)
            if notice:
                self.notices.append(notice)
                if event.get("kind") == "training":  # the only notice a training event gives: updates failing
                    self.notify(notice, title="Learning", severity="error", timeout=12)
                else:
                    self.notify(notice, title="New policy version", timeout=6)
        if chat is not None:
            chat.show_status()
        # Judgments and versions change what history and preferences show: refresh the one in view.
        if any(e.get("kind") in ("judgment", "version") for e in events) and hasattr(self.screen, "reload"):
            self.screen.reload()

    def _learned_from(self) -> dict | None:
        """What the serving version learned from, from the journal; None while the journal has not
        noted it. Why wait: the link notes a version in the journal just after apply_delta returns,
        so a poll in between sees the engine's new version first, and a notice made then would say
        nothing of what it learned (and would not be repeated)."""
        if self.journal is None:
            return {}
        from companion.tui.data import version_learned_from

        return version_learned_from(self.journal, self.engine.version)

    # ------------------------------------------------------------ actions
    def action_show_chat(self) -> None:
        self.switch_mode("chat")

    def action_show_history(self) -> None:
        self.switch_mode("history")

    def action_show_prefs(self) -> None:
        self.switch_mode("prefs")

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit()

    def shutdown(self) -> None:
        """End the open conversation (its last turn becomes sendable with no next state)."""
        try:
            chat = self._chat_screen()
        except LookupError:
            return
        if chat.cancel_event is not None:
            chat.cancel_event.set()
        if chat.conv is not None:
            chat.conv.end()

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Chat", "Show the chat (F1)", self.action_show_chat)
        yield SystemCommand("History", "Every turn with its judgment (F2)", self.action_show_history)
        yield SystemCommand("Learned preferences", "What the backend learned (F3)", self.action_show_prefs)

        def on_chat(action: str):
            async def run() -> None:
                await self._chat_screen().run_action(action)

            return run

        for title, help_text, action in (
            ("New chat", "Start a new session", "new_session"),
            ("Rename session", "Rename the current session", "rename_session"),
            ("Delete session", "Delete the current session", "delete_session"),
            ("Good reply", "Mark the last reply as good (explicit +1)", "thumbs_up"),
            ("Bad reply", "Mark the last reply as bad (explicit -1)", "thumbs_down"),
            ("Correct this", "Write a correction of the last reply", "correct"),
            ("Copy reply", "Copy the last reply to the clipboard", "copy_last"),
            ("Cancel reply", "Stop the reply being written", "cancel_reply"),
            ("Toggle sessions", "Show or hide the sessions sidebar", "toggle_sidebar"),
        ):
            yield SystemCommand(title, help_text, on_chat(action))


def run_app(args) -> int:
    """`companion chat` without --plain: build everything, run the app, clean up."""
    from companion.commands.chat import build_session
    from companion.tui.learning import start_learning

    settings, engine, journal, params = build_session(args)
    feed = StatusFeed()
    learning = start_learning(settings, engine, journal, feed, enabled=not args.no_learning)
    app = CompanionApp(engine, params, journal=journal, system_prompt=settings.system_prompt, feed=feed,
                       link_state="disabled" if args.no_learning else "starting")
    try:
        app.run()
    finally:
        app.shutdown()
        learning.stop()
        journal.close()
    return 0

"""The scrolling list of chat messages.

Contract: messages are appended at the end and the view follows the newest
one; :meth:`MessageList.last_reply` is the newest assistant message (the one
the feedback keys act on).
"""

from __future__ import annotations

from textual.containers import VerticalScroll

from companion.tui.widgets.message import ChatMessage


class MessageList(VerticalScroll):
    can_focus = False

    async def add(self, role: str, text: str = "", *, streaming: bool = False, turn_id: str | None = None) -> ChatMessage:
        msg = ChatMessage(role, text, streaming=streaming, turn_id=turn_id)
        await self.mount(msg)
        self.scroll_end(animate=False)
        return msg

    async def clear(self) -> None:
        await self.remove_children()

    def last_reply(self) -> ChatMessage | None:
        replies = [m for m in self.query(ChatMessage) if m.role == "assistant"]
        return replies[-1] if replies else None

    def find(self, turn_id: str) -> ChatMessage | None:
        for m in self.query(ChatMessage):
            if m.turn_id == turn_id:
                return m
        return None

"""Start (or not) the learning link for a chat and turn its callbacks into status events.

Contract: :func:`start_learning` returns a handle with ``stop()``; whatever the
link does, the UI learns about it only through :class:`StatusFeed` events
(see companion.tui.status), put from the link's threads. With learning off, or
when the link module is unavailable, one ``link`` event says so and nothing
else runs. Applying deltas to the engine and recording judgments/versions in
the journal is the link's job; this module only relays what happened.
"""

from __future__ import annotations

from companion.tui.status import StatusFeed


class _Off:
    def stop(self) -> None:
        pass


def start_learning(settings, engine, journal, feed: StatusFeed, enabled: bool = True):
    """Start the link (local backend child or ``settings.backend``); returns a handle with stop()."""
    queued = journal.outbox_counts().get("pending", 0) if journal is not None else 0
    if not enabled:
        feed.put({"kind": "link", "state": "disabled", "queued": queued})
        return _Off()
    try:
        from companion import link as link_mod  # written in parallel (issue 5)
    except ImportError:
        feed.put({"kind": "link", "state": "offline", "queued": queued})
        return _Off()
    return _start_link(link_mod, settings, engine, journal, feed)


def _start_link(link_mod, settings, engine, journal, feed: StatusFeed):
    feed.put({"kind": "link", "state": "offline", "queued": 0})
    return _Off()

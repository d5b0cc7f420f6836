"""Start (or not) the learning link for a chat and turn what it does into status events.

Contract: :func:`start_learning` returns a handle with ``stop()``; the UI learns
about the link only through :class:`StatusFeed` events (companion.tui.status),
put from the link's threads and from one monitor thread here:

- ``link``: every ``poll_s``: connected / reconnecting (was connected, lost it) /
  offline (never reached), with the number of ready turns not yet acked;
- ``judgment``: from ``Link.on_judgment`` as each judgment arrives;
- ``version``: from ``Link.on_version`` after a delta is applied, with what it
  learned from (the journal's ``versions.learned_from``);
- ``training``: from the backend's status (``busy.train``), asked every
  ``status_every_s`` while connected.

Applying deltas and recording judgments/versions in the journal is the link's
job; this module only relays. With learning off one ``link`` event says
"disabled" and nothing runs. The local backend child is started in the
monitor thread, so the app opens at once and shows "starting backend".
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from companion.tui.status import StatusFeed

log = logging.getLogger("companion.tui.learning")


class _Off:
    def stop(self) -> None:
        pass


class LearningHandle:
    def __init__(self, settings, engine, journal, feed: StatusFeed, poll_s: float = 0.5,
                 status_every_s: float = 2.0, backend_args: list[str] | None = None) -> None:
        self.settings, self.engine, self.journal, self.feed = settings, engine, journal, feed
        self.poll_s, self.status_every_s = poll_s, status_every_s
        self.backend_args = backend_args
        self.link = None
        self.backend = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learning-monitor", daemon=True)

    def start(self) -> "LearningHandle":
        self._thread.start()
        return self

    def _queued(self) -> int:
        return self.journal.outbox_counts().get("pending", 0)

    def _run(self) -> None:
        from companion.link import Link, start_local_backend

        endpoint = self.settings.backend
        try:
            if not endpoint:
                self.feed.put({"kind": "link", "state": "starting", "queued": self._queued()})
                log_file = Path(self.settings.data_dir) / "backend.log"
                log_file.parent.mkdir(parents=True, exist_ok=True)
                self.backend = start_local_backend(self.settings, extra_args=self.backend_args, log_file=log_file)
                endpoint = self.backend.endpoint
            if self._stop.is_set():  # the person quit while the backend was starting
                if self.backend is not None:
                    self.backend.stop()
                    self.backend = None
                return
            self.link = Link(self.journal, endpoint, engine=self.engine)
            self.link.on_judgment.append(self._on_judgment)
            self.link.on_version.append(self._on_version)
            self.link.start()
        except Exception as exc:  # the chat must go on without learning
            self.error = str(exc)
            log.warning("learning link failed to start: %s", exc)
            self.feed.put({"kind": "link", "state": "offline", "queued": self._queued()})
            return
        was_connected = False
        waited = self.status_every_s
        while not self._stop.wait(self.poll_s):
            connected = bool(self.link.connected)
            was_connected = was_connected or connected
            state = "connected" if connected else ("reconnecting" if was_connected else "offline")
            self.feed.put({"kind": "link", "state": state, "queued": self._queued()})
            waited += self.poll_s
            if connected and waited >= self.status_every_s:
                waited = 0.0
                stats = self.link.request_status(timeout=self.status_every_s) or {}
                busy = stats.get("busy") or {}
                failures = stats.get("train_failures") or {}
                errors = stats.get("train_error") or {}
                worst = max(failures, key=failures.get, default=None)  # a local backend has one user
                self.feed.put({"kind": "training", "running": bool(busy.get("train")),
                               "failures": int(failures.get(worst, 0)) if worst else 0,
                               "error": errors.get(worst) if worst else None})

    def _on_judgment(self, data: dict) -> None:
        self.feed.put({"kind": "judgment", **data})

    def _on_version(self, version: int) -> None:
        from companion.tui.data import version_learned_from

        learned = version_learned_from(self.journal, version)  # noted by the link before this callback
        self.feed.put({"kind": "version", "version": int(version), "learned_from": learned or {}})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.link is not None:
            self.link.wait_drained(timeout=3)  # last turn of the session: best effort, the outbox keeps it
            self.link.stop()
        if self.backend is not None:
            self.backend.stop()


def start_learning(settings, engine, journal, feed: StatusFeed, enabled: bool = True, **kw):
    """Start the link (local backend child or ``settings.backend``); returns a handle with stop()."""
    if not enabled:
        feed.put({"kind": "link", "state": "disabled", "queued": journal.outbox_counts().get("pending", 0)})
        return _Off()
    return LearningHandle(settings, engine, journal, feed, **kw).start()

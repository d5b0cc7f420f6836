"""The companion's side of the link: relay the journal's outbox, receive judgments and deltas.

:class:`Link` runs one thread that owns a ZeroMQ DEALER socket (sockets are not
thread-safe; nothing else touches it):

- sends ``hello`` (client id, base-model fingerprint, serving version) on start and
  whenever the backend comes back after silence;
- relays ready outbox rows as ``turn`` messages, at most ``window`` in flight; a row is
  marked delivered only when its ``ack`` arrives; an unacked turn is re-sent after
  ``ack_timeout_s * 2**attempts`` (capped at ``max_backoff_s``): at-least-once, and the
  backend deduplicates by turn id;
- pings every ``heartbeat_s``; no message for ``dead_after_s`` marks the backend down
  (ZeroMQ reconnects by itself; the next reply triggers a new hello);
- stores ``judgment`` messages in the journal, then acks them;
- hands ``delta`` messages to an applier thread: verify sha256 (``backend.delta.unpack``),
  ``engine.apply_delta``, note the version in the journal, and only then ``delta-ack``.
  A refused delta is acked with ok=false and the old version keeps serving.

The chat never waits on the link: a dead backend only means the outbox grows.

:func:`start_local_backend` starts ``companion backend`` as a child process on a
private ipc endpoint (with its own thread budget: OMP/torch threads = 1 by default) and
:class:`LocalBackend` stops it on exit.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq

from backend.delta import DeltaError, unpack
from companion import protocol as P
from companion.errors import UserError
from companion.journal import Journal

log = logging.getLogger("companion.link")


@dataclass
class LinkConfig:
    window: int = field(default=64, metadata={"help": "Most turns in flight (sent, not yet acked)."})
    ack_timeout_s: float = field(default=2.0, metadata={"help": "Re-send a turn not acked after this long (doubles per attempt)."})
    max_backoff_s: float = field(default=30.0, metadata={"help": "Longest wait between re-sends of one turn."})
    heartbeat_s: float = field(default=1.0, metadata={"help": "Ping the backend this often."})
    dead_after_s: float = field(default=3.5, metadata={"help": "No message for this long: the backend is down."})
    tick_s: float = field(default=0.01, metadata={"help": "Poll interval of the link thread."})

    def __post_init__(self) -> None:
        if self.window < 1 or self.ack_timeout_s <= 0 or self.heartbeat_s <= 0 or self.dead_after_s <= self.heartbeat_s:
            raise ValueError("link: window >= 1, timeouts > 0 and dead_after_s > heartbeat_s are required.")


class Link:
    def __init__(self, journal: Journal, endpoint: str, engine: Any = None, fingerprint: str | None = None,
                 cfg: LinkConfig | None = None, server_public_key: bytes | None = None,
                 client_secret_file: Path | None = None) -> None:
        self.journal, self.endpoint, self.engine = journal, endpoint, engine
        self.cfg = cfg or LinkConfig()
        self.fingerprint = fingerprint if fingerprint is not None else getattr(engine, "fingerprint", "") or ""
        self.client_id = journal.client_id
        self._curve = (server_public_key, client_secret_file) if server_public_key else None
        self.connected = False
        self.last_error: dict | None = None
        self.server_version = 0
        self.on_judgment: list[Callable[[dict], None]] = []
        self.on_version: list[Callable[[int], None]] = []  # called after a delta is applied
        self.counters = {"sent": 0, "resent": 0, "acked": 0, "judgments": 0, "deltas_applied": 0,
                         "deltas_refused": 0, "errors": 0}
        self._inflight: dict[str, dict] = {}  # turn id -> {outbox_id, sent_at, attempts}
        self._acked: list[tuple[int | None, str | None]] = []
        self._requests: queue.Queue = queue.Queue()  # status requests from other threads
        self._status_waiters: list[queue.Queue] = []
        self._apply_in: queue.Queue = queue.Queue()
        self._apply_out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- public -------------------------------------------------------------------------------
    def start(self) -> "Link":
        for target, name in ((self._run, "link"), (self._applier, "link-apply")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._apply_in.put(None)
        for t in self._threads:
            t.join(timeout)

    def __enter__(self) -> "Link":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def version(self) -> int:
        return int(getattr(self.engine, "version", self.journal.current_version()))

    def request_status(self, timeout: float = 5.0) -> dict | None:
        """Ask the backend for its status (queues, versions, counters); None on timeout."""
        box: queue.Queue = queue.Queue()
        self._requests.put(box)
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_drained(self, timeout: float = 30.0) -> bool:
        """Block until every ready outbox row is delivered (for tests, scripts, clean exits)."""
        end = time.time() + timeout
        while time.time() < end:
            if self.journal.outbox_counts()["pending"] == 0:
                return True
            time.sleep(0.02)
        return False

    # -- link thread --------------------------------------------------------------------------
    def _socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.routing_id = f"{self.client_id}.{uuid.uuid4().hex[:8]}".encode()
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.sndhwm = 10000
        if self._curve:
            from companion.keys import apply_client_curve

            apply_client_curve(sock, self._curve[0], self._curve[1])
        sock.connect(self.endpoint)
        return sock

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = self._socket(ctx)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        last_rx, last_ping = 0.0, 0.0
        self._send(sock, "hello", client_id=self.client_id, fingerprint=self.fingerprint, version=self.version)
        try:
            while not self._stop.is_set():
                now = time.time()
                if poller.poll(int(self.cfg.tick_s * 1000)):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if not self.connected:
                            self.connected = True
                            if last_rx:  # back after silence: introduce ourselves again
                                self._send(sock, "hello", client_id=self.client_id, fingerprint=self.fingerprint,
                                           version=self.version)
                        last_rx = time.time()
                        self._on_frames(sock, frames)
                    self._flush_acks()
                now = time.time()
                if self.connected and now - last_rx > self.cfg.dead_after_s:
                    self.connected = False
                    log.info("backend silent for %.1fs: marked down, outbox keeps filling", now - last_rx)
                if now - last_ping >= self.cfg.heartbeat_s:
                    self._send(sock, "ping", client_id=self.client_id, t=now)
                    last_ping = now
                self._relay(sock, now)
                self._finish_applied(sock)
                self._serve_requests(sock)
        finally:
            sock.close(0)
            ctx.term()

    def _send(self, sock: zmq.Socket, msg_type: str, payload: bytes | None = None, **fields: Any) -> bool:
        try:
            sock.send_multipart(P.encode(msg_type, payload, **fields), zmq.NOBLOCK)
            return True
        except zmq.Again:  # queue full while the backend is away: the resend timer covers it
            return False

    def _relay(self, sock: zmq.Socket, now: float) -> None:
        # Re-send overdue turns (exponential backoff), then fill the window with new ones.
        for tid, st in list(self._inflight.items()):
            wait = min(self.cfg.ack_timeout_s * 2 ** max(st["attempts"] - 1, 0), self.cfg.max_backoff_s)
            if now - st["sent_at"] >= wait:
                if self._send(sock, "turn", client_id=self.client_id, turn=st["payload"]):
                    st["sent_at"], st["attempts"] = now, st["attempts"] + 1
                    self.counters["resent"] += 1
                    self.journal.mark_sent([st["outbox_id"]])
        room = self.cfg.window - len(self._inflight)
        if room <= 0 or (not self.connected and self._inflight):
            return  # while the backend is down, only the oldest probes travel
        taken = {st["outbox_id"] for st in self._inflight.values()}
        items = self.journal.pending_outbox(limit=room, exclude=taken)
        sent = []
        for it in items:
            if it.turn_id in self._inflight:
                continue
            try:
                ok = self._send(sock, "turn", client_id=self.client_id, turn=it.payload)
            except P.ProtocolError as exc:  # a turn the backend would refuse: report, do not loop on it
                self.last_error = {"code": exc.code, "message": str(exc), "ref": it.turn_id}
                self.counters["errors"] += 1
                continue
            if not ok:
                break
            self._inflight[it.turn_id] = {"outbox_id": it.id, "sent_at": now, "attempts": 1, "payload": it.payload}
            sent.append(it.id)
        if sent:
            self.counters["sent"] += len(sent)
            self.journal.mark_sent(sent)

    def _on_frames(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            msg = P.decode(frames)
        except P.ProtocolError as exc:
            self.counters["errors"] += 1
            self.last_error = {"code": exc.code, "message": str(exc), "ref": exc.ref}
            return
        t = msg.type
        if t == "ack":
            st = self._inflight.pop(msg["ref"], None)
            # acks of one burst are written in one transaction (_flush_acks)
            self._acked.append((st["outbox_id"], None) if st is not None else (None, msg["ref"]))
            self.counters["acked"] += 1
        elif t == "judgment":
            data = {k: msg[k] for k in ("turn_id", "reward", "votes", "hint", "judge_name", "judged_at")}
            self.journal.record_judgment(**data)
            self.counters["judgments"] += 1
            self._send(sock, "judgment-ack", client_id=self.client_id, ref=msg["turn_id"])
            for cb in self.on_judgment:
                _safe(cb, data)
        elif t == "delta":
            self._apply_in.put((msg["delta"], msg.payload))
        elif t == "welcome":
            self.server_version = msg["policy_version"]
        elif t == "status":
            for box in self._status_waiters:
                box.put(msg.get("stats", {}))
            self._status_waiters.clear()
        elif t == "error":
            self.counters["errors"] += 1
            self.last_error = dict(msg.fields)
            log.warning("backend error %s: %s", msg["code"], msg["message"])
        # pong: liveness only (last_rx already updated)

    def _flush_acks(self) -> None:
        if self._acked:
            self.journal.mark_delivered([o for o, _ in self._acked if o is not None],
                                        turn_ids=[t for _, t in self._acked if t is not None])
            self._acked = []

    def _serve_requests(self, sock: zmq.Socket) -> None:
        while True:
            try:
                box = self._requests.get_nowait()
            except queue.Empty:
                return
            self._status_waiters.append(box)
            self._send(sock, "status", client_id=self.client_id)

    # -- applier thread (apply_delta may take a while; the socket thread keeps relaying) -------
    def _applier(self) -> None:
        while True:
            item = self._apply_in.get()
            if item is None:
                return
            header, payload = item
            version = int(header.get("version", 0))
            try:
                delta = unpack(header, payload)  # sha256 verified here
                fp = delta.meta.get("base_fingerprint")
                if fp and self.fingerprint and fp != self.fingerprint:
                    raise DeltaError(f"delta v{version} is for base model {fp}, not {self.fingerprint}")
                if version <= self.version:
                    self._apply_out.put((version, True, None, None))  # already serving it (catch-up replay)
                    continue
                if self.engine is None:
                    raise DeltaError("no engine to apply the delta to")
                t0 = time.perf_counter()
                new = int(self.engine.apply_delta(delta))
                learned = _json_or_empty(delta.meta.get("learned_from"))
                learned["apply_ms"] = (time.perf_counter() - t0) * 1e3
                self.journal.record_version(new, learned, base_version=delta.base_version, sha256=delta.sha256)
                self._apply_out.put((new, True, None, header))
            except (DeltaError, ValueError, RuntimeError) as exc:
                self._apply_out.put((version, False, str(exc)[:300], None))

    def _finish_applied(self, sock: zmq.Socket) -> None:
        while True:
            try:
                version, ok, err, header = self._apply_out.get_nowait()
            except queue.Empty:
                return
            if ok and header:
                self.counters["deltas_applied"] += 1
            elif not ok:
                self.counters["deltas_refused"] += 1
            if not ok:
                self.last_error = {"code": "delta-refused", "message": err, "ref": str(version)}
                log.warning("delta v%s refused: %s", version, err)
            self._send(sock, "delta-ack", client_id=self.client_id, version=version if ok else self.version,
                       ok=ok, error=err)
            if ok and header:
                for cb in self.on_version:
                    _safe(cb, version)


def _safe(cb: Callable, arg: Any) -> None:
    try:
        cb(arg)
    except Exception:  # a UI callback must never kill the link
        log.exception("link callback failed")


def _json_or_empty(text: str | None) -> dict:
    import json

    try:
        val = json.loads(text or "{}")
        return val if isinstance(val, dict) else {}
    except ValueError:
        return {}


# -- a local backend as a child process -------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphaned backend
    except OSError:
        pass


class LocalBackend:
    """A ``companion backend`` child process on a private endpoint; ``stop()`` (or exit) ends it."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, tmpdir: Path | None) -> None:
        self.proc, self.endpoint, self._tmpdir = proc, endpoint, tmpdir

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_backend(settings, extra_args: list[str] | None = None, endpoint: str | None = None,
                        ready_timeout: float = 120.0, log_file: Path | None = None, threads: int = 1) -> LocalBackend:
    """Start ``companion backend`` as a child on a private ipc endpoint; returns when it is bound.

    The child gets OMP_NUM_THREADS=``threads`` and trains with that many torch threads
    (``--train-threads``, unless ``extra_args`` sets it), always with OMP_WAIT_POLICY=PASSIVE so
    its idle threads sleep instead of spinning. The default 1 keeps a core for serving here
    (the chat, free-running replays); a synchronous replay, where serving and training take
    turns, gives both every core. ``settings`` supplies data_dir (backend state goes to
    ``<data_dir>/backend``) and model.
    """
    if threads < 1:
        raise ValueError("threads must be at least 1")
    extra_args = list(extra_args or [])
    if "--train-threads" not in extra_args:
        extra_args += ["--train-threads", str(threads)]
    tmpdir = None
    if endpoint is None:
        tmpdir = Path(tempfile.mkdtemp(prefix="companion-"))  # mode 0700: private to this user
        endpoint = f"ipc://{tmpdir}/backend.sock"
    cmd = [sys.executable, "-m", "companion.cli", "backend", "--bind", endpoint,
           "--data-dir", str(settings.data_dir), *(["--model", str(settings.model)] if settings.model else []),
           *extra_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    stderr = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, preexec_fn=_die_with_parent)
    deadline = time.time() + ready_timeout
    line = b""
    # The child prints one line "READY <endpoint>" once its socket is bound.
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(b"READY") or not line:
            break
    if not line.startswith(b"READY"):
        proc.kill()
        proc.wait()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise UserError(f"the local backend did not start (exit code {proc.returncode}); see its log"
                        + (f" {log_file}." if log_file else "."))
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    return LocalBackend(proc, endpoint, tmpdir)


def _drain(stream) -> None:
    for _ in iter(stream.readline, b""):
        pass

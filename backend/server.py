"""The backend service: a ZeroMQ ROUTER that ingests turns and pushes judgments and deltas.

One socket thread owns the ROUTER (ZeroMQ sockets are not thread-safe). For each
message it:

- decodes and checks it (:mod:`companion.protocol`); any violation gets an ``error``
  reply and the loop goes on (never a crash);
- ``hello``: remembers connection -> user, replies ``welcome``, re-sends judgments the
  client never acked and the user's latest delta if the client is behind;
- ``turn``: stores it (:class:`backend.store.Store`) *before* acking; a turn id seen
  before is acked as ``duplicate`` and not processed again; new turns go to the
  pipeline (:mod:`backend.loops`: judging -> samples -> training -> publishing);
- ``status``: replies queue depths, policy versions, last update times, counters, and
  updates failed in a row with the last failure's first line (``train_failures``, ``train_error``);
- ``ping``: ``pong``; ``judgment-ack`` / ``delta-ack``: bookkeeping.

Judgments and deltas produced by the pipeline threads reach the socket thread through
a queue and go to every live connection of that user only (per-user isolation).

Security: a loopback bind needs nothing; any other bind requires CURVE (server key
pair + allowed client keys, see :mod:`companion.keys`) and refuses to start without.
With CURVE, a connection may only act as the user its key is registered for.

Thread budget: the backend sets torch to ``train_threads`` (default 1) threads at start,
so serving in the companion process keeps a core.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from backend.loops import Pipeline, PipelineConfig, Stages
from backend.store import Store
from companion import keys as keymod
from companion import protocol as P
from companion.errors import UserError

log = logging.getLogger("companion.backend")


@dataclass
class ServerConfig:
    bind: str = field(default="tcp://127.0.0.1:5555", metadata={"help": "ZeroMQ endpoint to bind (ipc:// or tcp://)."})
    data_dir: Path = field(default=Path("~/.local/share/companion/backend"),
                           metadata={"help": "Folder for backend.db, checkpoints and latest deltas."})
    keys_dir: Path | None = field(default=None, metadata={
        "help": "Folder with server.key_secret and allowed/*.key; required for a non-loopback bind."})
    train_threads: int = field(default=1, metadata={"help": "Torch threads of the backend process (training)."})
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if not self.bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise UserError(f"--bind {self.bind!r} is not a ZeroMQ endpoint (tcp://host:port or ipc://path).")
        if self.train_threads < 1:
            raise UserError("train_threads must be at least 1.")


class _KeyAuthenticator(ThreadAuthenticator):
    """CURVE ZAP handler: only listed client keys; the User-Id is the key's user name."""

    def __init__(self, context: zmq.Context, allowed: dict[bytes, str]) -> None:
        super().__init__(context)
        self.allowed = allowed

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85

        return self.allowed.get(z85.encode(client_public_key), "")  # the allowed map holds Z85 text keys


class BackendServer:
    def __init__(self, cfg: ServerConfig, stages: Stages) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.store = Store(cfg.data_dir / "backend.db")
        self.pipeline = Pipeline(self.store, stages, cfg.pipeline, cfg.data_dir, self._post)
        self._out: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._conns: dict[bytes, dict] = {}  # ROUTER identity -> {user, last_seen, version}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._auth: _KeyAuthenticator | None = None
        self.endpoint = cfg.bind
        self.sock = self._bind()

    # -- set-up -------------------------------------------------------------------------------
    def _bind(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> EHOSTUNREACH instead of silence
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client takes over its identity
        sock.setsockopt(zmq.MAXMSGSIZE, P.ZMQ_MAXMSGSIZE)
        sock.sndhwm = sock.rcvhwm = 10000
        if not keymod.is_loopback(self.cfg.bind):
            kd = self.cfg.keys_dir
            secret = kd / "server.key_secret" if kd else None
            if not secret or not secret.exists():
                raise UserError(f"binding {self.cfg.bind} beyond loopback needs CURVE keys: run "
                                "`companion keys create --server` and `companion keys allow CLIENT.key --user NAME`.")
            allowed = keymod.allowed_clients(kd)
            if not allowed:
                raise UserError(f"no allowed client keys in {kd / 'allowed'}: run `companion keys allow CLIENT.key --user NAME`.")
            pub, sec = keymod.load_keypair(secret)
            self._auth = _KeyAuthenticator(self.ctx, allowed)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(kd / "allowed"))
            sock.curve_server = True
            sock.curve_secretkey, sock.curve_publickey = sec, pub
        try:
            if self.cfg.bind.endswith(":0") and self.cfg.bind.startswith("tcp://"):
                port = sock.bind_to_random_port(self.cfg.bind.rsplit(":", 1)[0])
                self.endpoint = f"{self.cfg.bind.rsplit(':', 1)[0]}:{port}"
            else:
                sock.bind(self.cfg.bind)
        except zmq.ZMQError as exc:
            sock.close()
            raise UserError(f"cannot bind {self.cfg.bind}: {exc}.") from None
        return sock

    def start(self) -> "BackendServer":
        try:
            import torch

            torch.set_num_threads(self.cfg.train_threads)
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        self.pipeline.start()
        self._thread = threading.Thread(target=self._serve, name="backend-socket", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.pipeline.stop()
        if self._auth:
            self._auth.stop()
        self.sock.close(0)
        self.ctx.term()
        self.store.close()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.is_set():
                time.sleep(0.5)
        finally:
            self.stop()

    # -- socket thread ------------------------------------------------------------------------
    def _post(self, user: str, kind: str, data: Any) -> None:
        """Called by pipeline threads: queue a judgment or delta for the socket thread."""
        self._out.put((user, kind, data))

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            # A short poll keeps pipeline output (judgments, deltas) flowing within ~5 ms.
            if poller.poll(5):
                for _ in range(1000):  # drain what is there, then serve the outbound queue
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
            self._flush_out()

    def _send(self, ident: bytes, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart([ident, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not reading): it will catch up on hello
            self._conns.pop(ident, None)
            return False

    def _flush_out(self) -> None:
        while True:
            try:
                user, kind, data = self._out.get_nowait()
            except queue.Empty:
                return
            if kind == "judgment":
                frames = P.encode("judgment", **data)
            else:
                header, payload = data
                frames = P.encode("delta", payload, delta=header, user=user)
            for ident in [i for i, c in self._conns.items() if c["user"] == user]:
                self._send(ident, frames)
            self.store.bump(user, f"{kind}s_pushed")

    def _on_frames(self, frames: list) -> None:
        ident = frames[0].bytes
        curve_user = None
        if self._auth is not None:
            try:
                curve_user = frames[-1].get("User-Id") or None
            except zmq.ZMQError:
                curve_user = None
        try:
            msg = P.decode([f.bytes for f in frames[1:]])
            self._dispatch(ident, msg, curve_user)
        except P.ProtocolError as exc:
            self.store.bump("*", "protocol_errors")
            self._send(ident, P.error_frames(exc))

    def _user_of(self, ident: bytes, client_id: str | None, curve_user: str | None, ref: str) -> str:
        if curve_user is not None and client_id is not None and client_id != curve_user:
            raise P.ProtocolError("forbidden", f"this key belongs to {curve_user!r}, not {client_id!r}", ref)
        user = client_id or curve_user or (self._conns.get(ident) or {}).get("user")
        if user is None:
            raise P.ProtocolError("no-hello", "say hello (or send client_id) first", ref)
        conn = self._conns.setdefault(ident, {"user": user, "version": None})
        conn["user"], conn["last_seen"] = user, time.time()
        return user

    def _dispatch(self, ident: bytes, msg: P.Message, curve_user: str | None) -> None:
        t = msg.type
        if t == "ping":
            if msg.get("client_id"):
                self._user_of(ident, msg["client_id"], curve_user, msg.id)
            self._send(ident, P.encode("pong", **({"t": msg["t"]} if "t" in msg.fields else {})))
        elif t == "turn":
            user = self._user_of(ident, msg["client_id"], curve_user, msg.id)
            turn = msg["turn"]
            if turn["client_id"] != user:
                raise P.ProtocolError("forbidden", "a turn's client_id must be the sender's", msg.id)
            new = self.store.add_turn(user, turn)  # stored (committed) before the ack leaves
            self.store.bump(user, "turns_received" if new else "turns_duplicate")
            self._send(ident, P.encode("ack", ref=turn["turn_id"], status="stored" if new else "duplicate"))
            if new:
                self.pipeline.submit(turn["turn_id"])
        elif t == "hello":
            user = self._user_of(ident, msg["client_id"], curve_user, msg.id)
            fp = self.pipeline.stages.fingerprint
            if fp and msg["fingerprint"] and msg["fingerprint"] != fp:
                raise P.ProtocolError("wrong-base", f"backend trains base model {fp}, client serves {msg['fingerprint']}",
                                      msg.id)
            self._conns[ident]["version"] = msg["version"]
            latest = self.pipeline.latest_delta(user)
            self._send(ident, P.encode("welcome", ref=msg.id, user=user, server="companion-backend",
                                       policy_version=int(latest[0]["version"]) if latest else 0))
            for row in self.store.undelivered_judgments(user):
                self._send(ident, P.encode("judgment", turn_id=row["turn_id"], reward=row["reward"],
                                           votes=row["votes"] or [], hint=row["hint"], judge_name=row["judge_name"],
                                           judged_at=row["judged_at"]))
            if latest and int(latest[0]["version"]) > msg["version"]:
                self._send(ident, P.encode("delta", latest[1], delta=latest[0], user=user))
        elif t == "judgment-ack":
            user = self._user_of(ident, msg["client_id"], curve_user, msg.id)
            self.store.mark_judgment_delivered(user, msg["ref"])
        elif t == "delta-ack":
            user = self._user_of(ident, msg["client_id"], curve_user, msg.id)
            self._conns[ident]["version"] = msg["version"]
            self.store.bump(user, "deltas_applied" if msg["ok"] else "deltas_refused")
        elif t == "status":
            asker = None
            if msg.get("client_id") or curve_user:
                asker = self._user_of(ident, msg.get("client_id"), curve_user, msg.id)
            # With CURVE (a shared, remote backend) each person sees only their own figures.
            stats = self.pipeline.stats(user=asker if self._auth is not None else None)
            stats["connections"] = len(self._conns) if self._auth is None else None
            stats["time"] = time.time()
            self._send(ident, P.encode("status", stats=stats))
        else:
            raise P.ProtocolError("unexpected-type", f"a backend does not accept {t!r} messages", msg.id)

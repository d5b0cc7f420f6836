"""The wire protocol between the companion (DEALER) and the backend (ROUTER); both sides import it.

A message is a ZeroMQ multipart message of one or two frames:

    frame 0: UTF-8 JSON header {"p": PROTOCOL_VERSION, "type": <type>, "id": <str>, ...fields}
    frame 1: (only ``delta``) the safetensors bytes of the weight delta (see backend.delta)

The ROUTER side sees an extra identity frame in front; :func:`decode` takes the
frames *after* the identity.

Message types (direction, fields beyond p/type/id):

    hello       c->s  client_id, fingerprint, version                  -> "welcome"
    welcome     s->c  ref, user, policy_version, server
    turn        c->s  turn (the shared turn dict: turn_id, client_id, session_id, index,
                      messages, reply, prompt_ids, token_ids, logprobs, policy_version,
                      next_message, feedback, created_at)              -> "ack"
    ack         s->c  ref (the acked id: turn id for turns), status ("stored" | "duplicate")
    judgment    s->c  turn_id, reward, votes, hint, judge_name, judged_at  -> "judgment-ack"
    judgment-ack c->s ref (turn id)
    delta       s->c  delta (backend.delta header: version, base_version, format, meta, sha256),
                      user  + payload frame                           -> "delta-ack"
    delta-ack   c->s  version, ok, error
    status      c->s  (request, no fields)  |  s->c  stats (dict)
    ping / pong either way: ``t`` (sender's clock, echoed back)
    error       s->c  code, message, ref (the offending message id, if readable)

Every client->server message also carries ``client_id`` (so a reconnecting client is
recognised without a new hello). Invariants:

- :func:`decode` checks the protocol version, the type, the schema of every field and
  the size caps, and raises :class:`ProtocolError` (with a code for the ``error``
  reply) on any violation; it never raises anything else for bad input.
- Size caps are separate: ``MAX_TURN_BYTES`` for a turn header, ``MAX_DELTA_BYTES``
  for a delta payload, ``MAX_HEADER_BYTES`` for every other header.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_TURN_BYTES = 2 * 1024 * 1024
# 1 GiB: a full-weight delta of SmolLM2-135M in fp32 is 538 MB (the 256 MiB of Sessions 1-15 refused
# it, so mode 'full' never reached the engine); the trainer refuses full mode up front for a model
# whose delta would not fit (backend.trainer.Trainer).
MAX_DELTA_BYTES = 1024 * 1024 * 1024
# A ZeroMQ-level guard (bigger than any legal message) so a hostile peer cannot make the
# backend buffer gigabytes; legal-but-oversize messages still get an application error reply.
ZMQ_MAXMSGSIZE = MAX_TURN_BYTES * 4


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``code`` goes into the error reply."""

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.ref = ref


@dataclass
class Message:
    type: str
    fields: dict[str, Any]
    payload: bytes | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


# -- schema ---------------------------------------------------------------------------------
# A spec maps a field name to (checker, required). Checkers return True when valid.


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _ident(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 128


def _messages(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and _str(m.get("content"))
        for m in v
    )


def _reward(v: Any) -> bool:
    return _int(v) and v in (-1, 0, 1)


def _feedback(v: Any) -> bool:
    return v is None or (_int(v) and v in (-1, 1))


TURN_SPEC: dict[str, tuple[Callable[[Any], bool], bool]] = {
    "turn_id": (_ident, True),
    "client_id": (_ident, True),
    "session_id": (_ident, True),
    "index": (lambda v: _int(v) and v >= 0, True),
    "messages": (_messages, True),
    "reply": (_str, True),
    "prompt_ids": (_list_of(_int), True),
    "token_ids": (_list_of(_int), True),
    "logprobs": (_list_of(_num), True),
    "policy_version": (lambda v: _int(v) and v >= 0, True),
    "next_message": (_opt(_str), True),
    "feedback": (_feedback, False),
    "created_at": (_num, True),
}


def _turn(v: Any) -> bool:
    if not isinstance(v, dict):
        return False
    _check_fields(v, TURN_SPEC, "turn")
    if len(v["token_ids"]) != len(v["logprobs"]):
        raise ProtocolError("bad-schema", "turn: token_ids and logprobs differ in length")
    return True


def _delta_header(v: Any) -> bool:
    return (isinstance(v, dict) and _int(v.get("version")) and _int(v.get("base_version"))
            and v.get("format") in ("lora", "full") and _str(v.get("sha256"))
            and isinstance(v.get("meta", {}), dict))


SPECS: dict[str, dict[str, tuple[Callable[[Any], bool], bool]]] = {
    "hello": {"client_id": (_ident, True), "fingerprint": (_str, True), "version": (_int, True)},
    "welcome": {"ref": (_str, True), "user": (_str, True), "policy_version": (_int, True), "server": (_str, False)},
    "turn": {"client_id": (_ident, True), "turn": (_turn, True)},
    "ack": {"ref": (_str, True), "status": (_str, True)},
    "judgment": {"turn_id": (_ident, True), "reward": (_reward, True), "votes": (_list_of(_int), True),
                 "hint": (_opt(_str), True), "judge_name": (_opt(_str), True), "judged_at": (_num, True)},
    "judgment-ack": {"client_id": (_ident, True), "ref": (_ident, True)},
    "delta": {"delta": (_delta_header, True), "user": (_str, True)},
    "delta-ack": {"client_id": (_ident, True), "version": (_int, True), "ok": (lambda v: isinstance(v, bool), True),
                  "error": (_opt(_str), False)},
    "status": {"client_id": (_opt(_ident), False), "stats": (lambda v: isinstance(v, dict), False)},
    "ping": {"client_id": (_opt(_ident), False), "t": (_num, False)},
    "pong": {"t": (_num, False)},
    "error": {"code": (_str, True), "message": (_str, True), "ref": (_opt(_str), False)},
}
TYPES = frozenset(SPECS)
PAYLOAD_TYPES = frozenset({"delta"})


def _check_fields(obj: dict, spec: dict, where: str) -> None:
    for name, (check, required) in spec.items():
        if name not in obj:
            if required:
                raise ProtocolError("bad-schema", f"{where}: missing field {name!r}")
            continue
        ok = check(obj[name])
        if not ok:
            raise ProtocolError("bad-schema", f"{where}: field {name!r} has an invalid value")
    extra = set(obj) - set(spec) - {"p", "type", "id"}
    if extra:
        raise ProtocolError("bad-schema", f"{where}: unknown field(s) {sorted(extra)[:3]}")


# -- encode / decode ------------------------------------------------------------------------
def encode(msg_type: str, payload: bytes | None = None, msg_id: str | None = None, **fields: Any) -> list[bytes]:
    """Frames for one message; validates it the same way the receiver will."""
    header = {"p": PROTOCOL_VERSION, "type": msg_type, "id": msg_id or uuid.uuid4().hex[:16], **fields}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    frames = [raw] if payload is None else [raw, payload]
    decode(frames)  # never send what the other side would refuse
    return frames


def decode(frames: list[bytes]) -> Message:
    """Parse and check one message (frames after any ROUTER identity); raises ProtocolError."""
    if not frames or len(frames) > 2:
        raise ProtocolError("bad-frames", f"expected 1 or 2 frames, got {len(frames)}")
    raw = bytes(frames[0])
    if len(raw) > MAX_TURN_BYTES:
        raise ProtocolError("too-large", f"header of {len(raw)} bytes exceeds {MAX_TURN_BYTES}")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad-json", f"header is not JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad-json", "header is not a JSON object")
    ref = header.get("id") if isinstance(header.get("id"), str) else None
    if header.get("p") != PROTOCOL_VERSION:
        raise ProtocolError("bad-version", f"protocol version {header.get('p')!r}, expected {PROTOCOL_VERSION}", ref)
    msg_type = header.get("type")
    if msg_type not in TYPES:
        raise ProtocolError("unknown-type", f"unknown message type {str(msg_type)[:40]!r}", ref)
    if ref is None or not 0 < len(ref) <= 64:
        raise ProtocolError("bad-schema", "message id must be a short string", None)
    if msg_type != "turn" and len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("too-large", f"{msg_type} header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}", ref)
    payload = bytes(frames[1]) if len(frames) == 2 else None
    if (payload is not None) != (msg_type in PAYLOAD_TYPES):
        raise ProtocolError("bad-frames", f"{msg_type} {'needs' if payload is None else 'takes no'} payload frame", ref)
    if payload is not None and len(payload) > MAX_DELTA_BYTES:
        raise ProtocolError("too-large", f"delta payload of {len(payload)} bytes exceeds {MAX_DELTA_BYTES}", ref)
    try:
        _check_fields(header, SPECS[msg_type], msg_type)
    except ProtocolError as exc:
        exc.ref = ref
        raise
    fields = {k: v for k, v in header.items() if k not in ("p", "type", "id")}
    return Message(msg_type, fields, payload, id=ref)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def error_frames(exc: ProtocolError) -> list[bytes]:
    return encode("error", code=exc.code, message=str(exc)[:500], ref=exc.ref)

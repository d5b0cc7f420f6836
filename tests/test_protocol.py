"""Wire protocol: round trips, schema checks, version, size caps, payload frames."""

from __future__ import annotations

import json

import pytest

from companion import protocol as P

TURN = {"turn_id": "t1", "client_id": "u1", "session_id": "s", "index": 0,
        "messages": [{"role": "user", "content": "hi"}], "reply": "yo", "prompt_ids": [1], "token_ids": [2, 3],
        "logprobs": [-0.5, -0.1], "policy_version": 0, "next_message": None, "feedback": -1, "created_at": 1.0}


def raw(header: dict, *more: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *more]


def test_round_trip_turn_and_delta():
    m = P.decode(P.encode("turn", client_id="u1", turn=TURN))
    assert m.type == "turn" and m["turn"] == TURN and m.payload is None
    hdr = {"version": 2, "base_version": 1, "format": "lora", "meta": {}, "sha256": "ab"}
    m = P.decode(P.encode("delta", b"\x00" * 10, delta=hdr, user="u1"))
    assert m.payload == b"\x00" * 10 and m["delta"]["version"] == 2


@pytest.mark.parametrize("header,code", [
    ({"p": 99, "type": "ping", "id": "x"}, "bad-version"),
    ({"p": 1, "type": "launch", "id": "x"}, "unknown-type"),
    ({"p": 1, "type": "ping"}, "bad-schema"),
    ({"p": 1, "type": "hello", "id": "x", "client_id": "u", "fingerprint": "f"}, "bad-schema"),
    ({"p": 1, "type": "hello", "id": "x", "client_id": "u", "fingerprint": "f", "version": "1"}, "bad-schema"),
    ({"p": 1, "type": "hello", "id": "x", "client_id": "u", "fingerprint": "f", "version": True}, "bad-schema"),
    ({"p": 1, "type": "ping", "id": "x", "extra": 1}, "bad-schema"),
    ({"p": 1, "type": "turn", "id": "x", "client_id": "u1", "turn": dict(TURN, logprobs=[-1.0])}, "bad-schema"),
    ({"p": 1, "type": "turn", "id": "x", "client_id": "u1", "turn": dict(TURN, feedback=0)}, "bad-schema"),
    ({"p": 1, "type": "turn", "id": "x", "client_id": "u1",
      "turn": dict(TURN, messages=[{"role": "robot", "content": "x"}])}, "bad-schema"),
    ({"p": 1, "type": "judgment", "id": "x", "turn_id": "t", "reward": 2, "votes": [], "hint": None,
      "judge_name": None, "judged_at": 1.0}, "bad-schema"),
    ([1, 2], "bad-json"),
])
def test_schema_errors(header, code):
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(raw(header))
    assert ei.value.code == code


def test_non_json_nan_frames_and_sizes():
    for frames in ([b"\xff\xfe"], [b"{not json"], [b'{"p": NaN}']):
        with pytest.raises(P.ProtocolError) as ei:
            P.decode(frames)
        assert ei.value.code == "bad-json"
    with pytest.raises(P.ProtocolError) as ei:
        P.decode([b"{}", b"", b""])
    assert ei.value.code == "bad-frames"
    with pytest.raises(P.ProtocolError) as ei:  # a ping with a payload frame
        P.decode(raw({"p": 1, "type": "ping", "id": "x"}, b"x"))
    assert ei.value.code == "bad-frames" and ei.value.ref == "x"
    big_turn = dict(TURN, reply="x" * (P.MAX_TURN_BYTES + 1))
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(raw({"p": 1, "type": "turn", "id": "x", "client_id": "u1", "turn": big_turn}))
    assert ei.value.code == "too-large"
    # a turn may be bigger than other headers, other headers may not
    mid = dict(TURN, reply="x" * (P.MAX_HEADER_BYTES + 10))
    assert P.decode(P.encode("turn", client_id="u1", turn=mid)).type == "turn"
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(raw({"p": 1, "type": "error", "id": "x", "code": "c", "message": "m" * P.MAX_HEADER_BYTES}))
    assert ei.value.code == "too-large"


def test_encode_refuses_what_decode_refuses():
    with pytest.raises(P.ProtocolError):
        P.encode("hello", client_id="u")
    frames = P.error_frames(P.ProtocolError("bad-json", "nope", "r1"))
    m = P.decode(frames)
    assert m.type == "error" and m["ref"] == "r1" and m["code"] == "bad-json"

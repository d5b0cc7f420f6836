"""The backend under hostile input and CURVE: malformed frames, unknown keys, non-loopback binds."""

from __future__ import annotations

import json
import random

import pytest
import zmq

from backend.loops import PipelineConfig
from backend.server import BackendServer, ServerConfig
from backend.stages import tiny_stages
from companion import keys as K
from companion import protocol as P
from companion.errors import UserError

TURN = {"turn_id": "t1", "client_id": "u1", "session_id": "s", "index": 0,
        "messages": [{"role": "user", "content": "hi"}], "reply": "yo", "prompt_ids": [1], "token_ids": [2],
        "logprobs": [-0.5], "policy_version": 0, "next_message": "thanks", "feedback": None, "created_at": 1.0}


def _bad_frames(rng: random.Random) -> list[bytes]:
    """One message the backend must refuse (never a valid client message)."""
    kind = rng.randrange(9)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 200))]
    if kind == 1:
        good = P.encode("turn", client_id="u1", turn=TURN)[0]
        return [good[: rng.randrange(1, len(good) - 1)]]  # truncated JSON
    if kind == 2:
        return [json.dumps({"p": rng.choice([0, 2, "1", None]), "type": "ping", "id": "x"}).encode()]
    if kind == 3:
        return [json.dumps({"p": 1, "type": rng.choice(["pwn", "", "TURN", "ack", "pong", "welcome", "delta"]),
                            "id": "x"}).encode()]
    if kind == 4:  # a turn with one field broken
        t = dict(TURN)
        key = rng.choice(list(t))
        t[key] = rng.choice([{}, [None], True])  # no turn field accepts any of these
        return [json.dumps({"p": 1, "type": "turn", "id": "x", "client_id": "u1", "turn": t}).encode()]
    if kind == 5:
        return [b"{}", rng.randbytes(8), rng.randbytes(8)]  # too many frames
    if kind == 6:
        return [json.dumps({"p": 1, "type": "ping", "id": "x"}).encode(), rng.randbytes(4)]  # stray payload
    if kind == 7:
        return [json.dumps(rng.choice([[], 1, "s", None, {"p": 1}])).encode()]
    return [json.dumps({"p": 1, "type": "hello", "id": "x", "client_id": rng.choice(["", "u" * 200, 3]),
                        "fingerprint": "f", "version": 0}).encode()]


def test_ten_thousand_malformed_frames_each_get_an_error(tmp_path, tiny_model_dir):
    cfg = ServerConfig(bind=f"ipc://{tmp_path}/b.sock", data_dir=tmp_path / "b",
                       pipeline=PipelineConfig(batch_size=100, train_after_s=0))
    server = BackendServer(cfg, tiny_stages(tiny_model_dir)).start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(server.endpoint)
    rng = random.Random(0)
    n, errors, other = 10_000, 0, []
    try:
        for i in range(n):
            s.send_multipart(_bad_frames(rng))
            # read replies as they come so neither side's queue fills up
            while s.poll(0):
                m = P.decode(s.recv_multipart())
                errors += m.type == "error"
                if m.type != "error":
                    other.append(m.type)
        # two oversize turns (beyond the turn cap, below the socket guard)
        big = json.dumps({"p": 1, "type": "turn", "id": "big", "client_id": "u1",
                          "turn": dict(TURN, reply="x" * (P.MAX_TURN_BYTES + 100))}).encode()
        s.send_multipart([big])
        s.send_multipart([big])
        while errors < n + 2 and s.poll(5000):
            m = P.decode(s.recv_multipart())
            errors += m.type == "error"
        assert errors == n + 2 and other == []
        # still alive and serving
        s.send_multipart(P.encode("ping", t=1.0))
        assert s.poll(5000) and P.decode(s.recv_multipart()).type == "pong"
        s.send_multipart(P.encode("turn", client_id="u1", turn=TURN))
        assert s.poll(5000) and P.decode(s.recv_multipart())["status"] == "stored"
        assert server.store.counters()["protocol_errors"] == n + 2
    finally:
        s.close(0)
        ctx.term()
        server.stop()


def test_non_loopback_requires_curve_keys(tmp_path, tiny_model_dir):
    assert K.is_loopback("ipc:///tmp/x") and K.is_loopback("tcp://127.0.0.1:5") and K.is_loopback("tcp://localhost:5")
    assert not K.is_loopback("tcp://0.0.0.0:5") and not K.is_loopback("tcp://*:5")
    with pytest.raises(UserError, match="CURVE"):
        BackendServer(ServerConfig(bind="tcp://0.0.0.0:0", data_dir=tmp_path / "b", keys_dir=tmp_path / "keys"),
                      tiny_stages(tiny_model_dir))


def _ask(ctx, endpoint, server_pub=None, secret_file=None, client_id="alice") -> str | None:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    # A refused handshake can drop the only pipe before the send: a DEALER with no peer blocks
    # on send forever, so a bounded send ("refused" = None) instead of a hung test.
    s.sndtimeo = 1500
    if server_pub:
        K.apply_client_curve(s, server_pub, secret_file)
    s.connect(endpoint)
    try:
        try:
            s.send_multipart(P.encode("ping", client_id=client_id, t=1.0))
        except zmq.Again:
            return None
        if s.poll(1500):
            m = P.decode(s.recv_multipart())
            return m.type if m.type != "error" else f"error:{m['code']}"
        return None
    finally:
        s.close(0)


def test_curve_only_listed_clients(tmp_path, tiny_model_dir):
    kd = tmp_path / "keys"
    K.create_keypair(kd, "server")
    alice_pub, alice_sec = K.create_keypair(tmp_path / "alice", "client")
    _, mallory_sec = K.create_keypair(tmp_path / "mallory", "client")
    K.allow_client(kd, alice_pub, "alice")
    server = BackendServer(ServerConfig(bind="tcp://0.0.0.0:0", data_dir=tmp_path / "b", keys_dir=kd),
                           tiny_stages(tiny_model_dir)).start()
    port = server.endpoint.rsplit(":", 1)[1]
    ep = f"tcp://127.0.0.1:{port}"
    server_pub = K.load_public(kd / "server.key")
    ctx = zmq.Context()
    try:
        assert _ask(ctx, ep, server_pub, alice_sec) == "pong"
        assert _ask(ctx, ep, server_pub, alice_sec, client_id="bob") == "error:forbidden"  # key is alice's
        assert _ask(ctx, ep, server_pub, mallory_sec) is None  # unknown key: refused at the handshake
        assert _ask(ctx, ep) is None  # no CURVE at all
        # a shared backend tells each person only their own figures
        server.store.bump("bob", "turns_received")
        server.store.bump("alice", "turns_received")
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        K.apply_client_curve(s, server_pub, alice_sec)
        s.connect(ep)
        s.send_multipart(P.encode("status", client_id="alice"))
        assert s.poll(3000)
        stats = P.decode(s.recv_multipart())["stats"]
        s.close(0)
        assert stats["counters"] == {"turns_received": 1}
        assert set(stats["policy_versions"]) == {"alice"} and stats["connections"] is None
    finally:
        ctx.destroy(linger=0)  # closes any socket a failed assertion left open (term() would hang)
        server.stop()

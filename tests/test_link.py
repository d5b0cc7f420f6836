"""The link end to end in one process: real sockets, real SQLite, real engine, tiny real trainer."""

from __future__ import annotations

import time

import pytest
import zmq

from backend.loops import PipelineConfig
from backend.server import BackendServer, ServerConfig
from backend.stages import tiny_stages
from companion import protocol as P
from companion.engine.local import LocalEngine
from companion.journal import Journal
from companion.link import Link, LinkConfig
from companion.models import model_fingerprint
from waiting import wait_for

FAST = LinkConfig(ack_timeout_s=0.3, heartbeat_s=0.2, dead_after_s=0.8, max_backoff_s=1.0)


def make_server(tmp_path, model_dir, name="backend", batch_size=2, **kw):
    cfg = ServerConfig(bind=f"ipc://{tmp_path}/{name}.sock", data_dir=tmp_path / name,
                       pipeline=PipelineConfig(batch_size=batch_size, train_after_s=0.0, **kw))
    return BackendServer(cfg, tiny_stages(model_dir, model_fingerprint(model_dir))).start()


def chat_turns(engine, journal, n, next_message="thanks, great answer", session=None):
    """n real generated turns, each followed by a next message (the next state)."""
    from companion.engine.local import GenParams

    sid = session or journal.new_session()
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Say hi"}]
    ids = []
    for i in range(n):
        r = engine.generate(msgs, GenParams(max_new_tokens=6, temperature=1.0, seed=i))
        tid = journal.record_turn(sid, msgs, r.text, prompt_ids=r.prompt_ids, token_ids=r.token_ids,
                                  logprobs=r.logprobs, policy_version=r.version)
        journal.set_next_message(tid, next_message)
        ids.append(tid)
    return sid, ids


@pytest.fixture(scope="module")
def engine_factory(tiny_model_dir):
    return lambda: LocalEngine(tiny_model_dir, dtype="fp32", threads=1)


def test_turn_in_judgment_and_delta_back_applied(tmp_path, tiny_model_dir, engine_factory):
    server = make_server(tmp_path, tiny_model_dir)
    engine = engine_factory()
    journal = Journal(tmp_path / "c.db")
    before = engine.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    link = Link(journal, server.endpoint, engine=engine, cfg=FAST).start()
    try:
        _, ids = chat_turns(engine, journal, 2)
        assert link.wait_drained(20)
        assert wait_for(lambda: all(journal.turn(t)["reward"] == 1 for t in ids), 20)
        assert journal.turn(ids[0])["judge_name"] == "cue-words"
        assert wait_for(lambda: engine.version == 1, 60), link.last_error
        # the applier notes the version in the journal just after apply_delta returns
        assert wait_for(lambda: journal.current_version() == 1, 10)
        v = journal.versions()[0]
        assert sorted(v["learned_from"]["turn_ids"]) == sorted(ids)
        engine.settle()  # LoRA factors fold into the weights after apply_delta; reading them directly
        after = engine.model.model.layers[0].self_attn.q_proj.weight
        assert not after.eq(before).all()  # weights really changed
        st = link.request_status()
        assert st["policy_versions"][journal.client_id] == 1
        assert st["counters"]["turns_received"] == 2 and st["stages"]["trained"] == 2
        # the backend learns that the client applied it
        assert wait_for(lambda: server.store.counters(journal.client_id).get("deltas_applied") == 1, 5)
        # judgments were acked: nothing left to re-send on the next hello
        assert wait_for(lambda: server.store.undelivered_judgments(journal.client_id) == [], 5)
    finally:
        link.stop()
        server.stop()


def test_duplicates_are_acked_not_retrained(tmp_path, tiny_model_dir):
    server = make_server(tmp_path, tiny_model_dir, batch_size=100)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(server.endpoint)
    turn = {"turn_id": "t1", "client_id": "u1", "session_id": "s", "index": 0,
            "messages": [{"role": "user", "content": "hi"}], "reply": "yo", "prompt_ids": [1], "token_ids": [2],
            "logprobs": [-0.5], "policy_version": 0, "next_message": "thanks", "feedback": None, "created_at": 1.0}
    try:
        statuses = []
        for _ in range(3):
            s.send_multipart(P.encode("turn", client_id="u1", turn=turn))
            m = _recv_type(s, "ack", dealer=True)
            assert m["ref"] == "t1"
            statuses.append(m["status"])
        assert statuses == ["stored", "duplicate", "duplicate"]
        assert len(server.store.turns()) == 1
        # another user cannot send a turn in u1's name on the same connection
        bad = dict(turn, turn_id="t2")
        s.send_multipart(P.encode("turn", client_id="u2", turn=bad))
        m = _recv_type(s, "error", dealer=True)
        assert m["code"] == "forbidden"
    finally:
        s.close(0)
        ctx.term()
        server.stop()


def test_per_user_isolation(tmp_path, tiny_model_dir, engine_factory):
    server = make_server(tmp_path, tiny_model_dir)
    ea, eb = engine_factory(), engine_factory()
    ja, jb = Journal(tmp_path / "a.db"), Journal(tmp_path / "b.db")
    la = Link(ja, server.endpoint, engine=ea, cfg=FAST).start()
    lb = Link(jb, server.endpoint, engine=eb, cfg=FAST).start()
    try:
        chat_turns(ea, ja, 2)
        assert wait_for(lambda: ea.version == 1, 60)
        time.sleep(0.5)
        assert eb.version == 0 and jb.current_version() == 0  # b never receives a's adapter
        chat_turns(eb, jb, 1)  # one sample: b's batch is not full, so b does not train
        assert lb.wait_drained(10)
        st = la.request_status()
        assert st["policy_versions"] == {ja.client_id: 1, jb.client_id: 0}
        users = {r["user"] for r in server.store.turns(stage="trained")}
        assert users == {ja.client_id}
    finally:
        la.stop()
        lb.stop()
        server.stop()


def test_bad_checksum_refused_old_version_keeps_serving(tmp_path, tiny_model_dir, engine_factory):
    from backend.delta import pack
    from backend.stages import TinyLoraTrainer

    engine = engine_factory()
    journal = Journal(tmp_path / "c.db")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = Link(journal, f"tcp://127.0.0.1:{port}", engine=engine, cfg=FAST).start()
    try:
        assert router.poll(5000)
        ident, *frames = router.recv_multipart()
        assert P.decode(frames).type == "hello"
        tr = TinyLoraTrainer(tiny_model_dir, tmp_path / "ck")
        for p in tr.model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1)
        tr.version = 1
        header, payload = pack(tr.export_delta())
        w0 = engine.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        corrupt = bytearray(payload)
        corrupt[-5] ^= 0xFF
        router.send_multipart([ident, *P.encode("delta", bytes(corrupt), delta=header, user="x")])
        ack = _recv_type(router, "delta-ack")
        assert ack["ok"] is False and "checksum" in ack["error"] and ack["version"] == 0
        assert engine.version == 0 and engine.model.model.layers[0].self_attn.q_proj.weight.equal(w0)
        router.send_multipart([ident, *P.encode("delta", payload, delta=header, user="x")])
        ack = _recv_type(router, "delta-ack")
        assert ack["ok"] is True and ack["version"] == 1 and engine.version == 1
    finally:
        link.stop()
        router.close(0)
        ctx.term()


def _recv_type(sock, msg_type, timeout=10.0, dealer=False):
    end = time.time() + timeout
    while time.time() < end:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if not dealer:
                frames = frames[1:]
            m = P.decode(frames)
            if m.type == msg_type:
                return m
    raise AssertionError(f"no {msg_type} within {timeout}s")

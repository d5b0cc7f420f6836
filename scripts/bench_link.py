"""Benchmark the link on loopback: turn ack round trip, delta push -> applied, outbox drain rate.

    .venv/bin/python scripts/bench_link.py [--turns 500] [--backlog 1000] [--deltas 5]

- turn ack: a DEALER sends one turn at a time to a backend *child process* (tiny stages,
  training off) on tcp://127.0.0.1 and waits for the ack (the turn is committed to SQLite
  first). Baseline in the same run: ping -> pong on the same socket (no storage).
- delta applied: a LoRA delta of the trainer's default size (r=8 on q,k,v,o,gate,up,down of
  all 30 SmolLM2 layers) is pushed over the wire to a Link whose engine is the real
  LocalEngine (bf16); timed from send to the delta-ack (sent only after apply_delta).
  Baseline: engine.apply_delta in-process (no wire, no checksum).
- drain: 1,000 ready turns in a journal, a Link starts: turns per second until all acked.

Last line: one JSON object (turn_ack_p50_ms, turn_ack_p99_ms, ping_p50_ms, delta_applied_ms,
delta_apply_direct_ms, delta_mb, drain_turns_per_s, drain_backlog).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zmq  # noqa: E402

from backend.delta import Delta, pack  # noqa: E402
from companion import protocol as P  # noqa: E402
from companion.config import load_settings  # noqa: E402
from companion.engine.local import LocalEngine  # noqa: E402
from companion.journal import Journal  # noqa: E402
from companion.link import Link, LinkConfig, start_local_backend  # noqa: E402
from companion.models import resolve_model_path  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def turn(i, client="bench"):
    return {"turn_id": f"t{i}-{time.time_ns()}", "client_id": client, "session_id": "s", "index": i,
            "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "x" * 200}],
            "reply": "y" * 400, "prompt_ids": list(range(60)), "token_ids": list(range(120)),
            "logprobs": [-0.5] * 120, "policy_version": 0, "next_message": "thanks", "feedback": None,
            "created_at": time.time()}


def rtt(sock, frames, want):
    t0 = time.perf_counter()
    sock.send_multipart(frames)
    while True:
        if not sock.poll(10000):
            raise RuntimeError(f"no {want} within 10 s")
        if P.decode(sock.recv_multipart()).type == want:
            return (time.perf_counter() - t0) * 1e3


def default_lora_delta(model_path: Path, version: int, r: int = 8) -> Delta:
    cfg = json.loads((model_path / "config.json").read_text())
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    g = torch.Generator().manual_seed(version)
    tensors = {}
    for layer in range(L):
        for mod, (out_f, in_f) in shapes.items():
            base = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.01  # [r, in]
            tensors[f"{base}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01  # [out, r]
    return Delta(version, version - 1, "lora", tensors, {"lora_r": r, "lora_alpha": 16})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=500)
    ap.add_argument("--backlog", type=int, default=1000)
    ap.add_argument("--deltas", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-link-"))
    settings = load_settings(data_dir=str(tmp / "data"))
    model_path = resolve_model_path(settings)
    out: dict = {}

    # 1. turn ack round trip against a backend child process
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    backend = start_local_backend(settings, ["--stages", "tiny", "--batch-size", "1000000", "--train-after", "0"],
                                  endpoint=endpoint, log_file=tmp / "backend.log")
    try:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        for i in range(20):  # warm-up
            rtt(sock, P.encode("ping", client_id="bench", t=0.0), "pong")
            rtt(sock, P.encode("turn", client_id="bench", turn=turn(i)), "ack")
        pings = [rtt(sock, P.encode("ping", client_id="bench", t=0.0), "pong") for _ in range(a.turns)]
        acks = [rtt(sock, P.encode("turn", client_id="bench", turn=turn(i)), "ack") for i in range(a.turns)]
        sock.close(0)
        ctx.term()
        out.update(turn_ack_p50_ms=round(statistics.median(acks), 3), turn_ack_p99_ms=round(pct(acks, 99), 3),
                   ping_p50_ms=round(statistics.median(pings), 3), ping_p99_ms=round(pct(pings, 99), 3))
        print(f"turn -> ack  p50 {out['turn_ack_p50_ms']:.2f} ms  p99 {out['turn_ack_p99_ms']:.2f} ms "
              f"(baseline ping -> pong p50 {out['ping_p50_ms']:.2f} ms, p99 {out['ping_p99_ms']:.2f} ms; n={a.turns})")

        # 3. drain a backlog of ready turns through a real Link
        journal = Journal(tmp / "drain.db")
        sid = journal.new_session()
        for i in range(a.backlog):
            t = turn(i, journal.client_id)
            tid = journal.record_turn(sid, t["messages"], t["reply"], prompt_ids=t["prompt_ids"],
                                      token_ids=t["token_ids"], logprobs=t["logprobs"])
            journal.set_next_message(tid, "thanks")
        t0 = time.perf_counter()
        link = Link(journal, endpoint, engine=None, fingerprint="").start()
        ok = link.wait_drained(300)
        drain_s = time.perf_counter() - t0
        link.stop()
        out.update(drain_turns_per_s=round(a.backlog / drain_s, 1), drain_backlog=a.backlog, drain_complete=ok)
        print(f"drain        {a.backlog} turns in {drain_s:.2f} s = {out['drain_turns_per_s']:.0f} turns/s "
              f"(baseline one-at-a-time: {1e3 / out['turn_ack_p50_ms']:.0f} turns/s)")
    finally:
        backend.stop()

    # 2. delta push -> applied, real engine behind a real Link
    engine = LocalEngine(model_path, dtype="bf16", threads=1)
    direct = []
    for v in range(1, 3):
        d = default_lora_delta(model_path, v)
        t0 = time.perf_counter()
        engine.apply_delta(d)
        direct.append((time.perf_counter() - t0) * 1e3)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    journal = Journal(tmp / "delta.db")
    link = Link(journal, f"tcp://127.0.0.1:{port}", engine=engine).start()
    ident, *_ = router.recv_multipart()  # hello
    applied, size = [], 0
    for v in range(3, 3 + a.deltas):
        header, payload = pack(default_lora_delta(model_path, v))
        size = len(payload)
        frames = P.encode("delta", payload, delta=header, user="bench")
        t0 = time.perf_counter()
        router.send_multipart([ident, *frames])
        while True:
            router.poll(30000)
            _, *fr = router.recv_multipart()
            m = P.decode(fr)
            if m.type == "delta-ack":
                assert m["ok"], m.get("error")
                break
        applied.append((time.perf_counter() - t0) * 1e3)
    link.stop()
    router.close(0)
    ctx.term()
    out.update(delta_applied_ms=round(statistics.median(applied), 1), delta_applied_max_ms=round(max(applied), 1),
               delta_apply_direct_ms=round(statistics.median(direct), 1), delta_mb=round(size / 2**20, 2))
    print(f"delta        {out['delta_mb']:.1f} MB LoRA r8 all-linear: push -> applied p50 {out['delta_applied_ms']:.0f} ms,"
          f" max {out['delta_applied_max_ms']:.0f} ms (baseline apply_delta in-process {out['delta_apply_direct_ms']:.0f} ms)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""The LLM judge against a local HTTP server speaking the OpenAI chat-completions protocol.

The server below is a STAND-IN for the model server (SGLang, vLLM or a hosted
API): no capable model can run in CI, so it answers from a script keyed on the
next message. Everything on the judge's side is real: HTTP, JSON, threads,
boxed-vote parsing, majority vote and the paper's hint selection.
"""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.judge import load_judge
from backend.judge.llm import parse_boxed
from companion.errors import UserError

SCRIPT = {
    # next message -> completions returned in turn for judge requests
    "Perfect, thanks!": ["The user thanks the assistant. \\boxed{1}"] * 3,
    "No, I asked for Python.": ["A correction. \\boxed{-1}", "Redo request. \\boxed{-1}", "Maybe \\boxed{0} no wait \\boxed{1}"],
    "Hmm.": ["Ambiguous \\boxed{0}", "I think \\boxed{1}", "Probably \\boxed{-1}"],
    "Garbled": ["no score here", "\\boxed{7}", "\\boxed{-1}"],
}
HINTS = {
    "No, I asked for Python.": "The user wants Python. [HINT_START]Write the solution in Python, not JavaScript.[HINT_END] \\boxed{1}",
}


class StandIn(BaseHTTPRequestHandler):
    counters: dict = {}
    requests: list = []

    def log_message(self, *args):   # keep test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.requests.append((self.path, body, self.headers.get("Authorization")))
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        nxt = user.split("user's next message at turn t+1):\n", 1)[1].split("\n\n", 1)[0]
        if "hint" in system.lower():
            text = HINTS.get(nxt, "Nothing to act on. \\boxed{-1}")
        else:
            it = StandIn.counters.setdefault(nxt, itertools.cycle(SCRIPT[nxt]))
            text = next(it)
        out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture()
def server():
    StandIn.counters, StandIn.requests = {}, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_parse_boxed_takes_the_last_valid_value():
    assert parse_boxed("first \\boxed{1} then \\boxed{-1}") == -1
    assert parse_boxed("\\boxed{ +1 }") == 1
    assert parse_boxed("\\boxed{2}") is None
    assert parse_boxed("no box") is None


def test_llm_judge_votes_majority_and_hint(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-local")
    j = load_judge("llm", m=3, endpoint=server, model="judge-model", api_key_env="JUDGE_TEST_KEY")
    ctx = [{"role": "user", "content": "Write a sort function."}]
    good = j.judge(ctx, "def sort(x): ...", "Perfect, thanks!")
    assert (good.reward, good.votes, good.hint) == (1, [1, 1, 1], None)
    bad = j.judge(ctx, "function sort(x) {}", "No, I asked for Python.")
    assert bad.reward == -1 and sorted(bad.votes) == [-1, -1, 1]
    assert bad.hint == "Write the solution in Python, not JavaScript."
    tie = j.judge(ctx, "...", "Hmm.")
    assert tie.reward == 0 and sorted(tie.votes) == [-1, 0, 1]
    assert tie.hint is None
    garbled = j.judge(ctx, "...", "Garbled")
    assert garbled.votes == [-1] and garbled.reward == -1 and garbled.extra["unparseable"] == 2
    path, body, auth = StandIn.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model" and auth == "Bearer sk-local"
    assert "\\boxed{" in body["messages"][0]["content"] and "Write a sort function." in body["messages"][1]["content"]
    # m judge requests per turn, plus one hint request for each turn not judged +1.
    assert len(StandIn.requests) == 4 * 3 + 3


def test_unreachable_endpoint_is_a_user_error():
    j = load_judge("llm", m=1, endpoint="http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(UserError, match="cannot reach"):
        j.judge([], "r", "Thanks")
    with pytest.raises(UserError):
        load_judge("llm", endpoint="localhost:30000")

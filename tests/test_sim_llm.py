"""LLM persona and rater over HTTP: a local OpenAI-compatible server stands in for the remote model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from companion.errors import UserError
from companion.sim.llm import ChatEndpoint, LLMPersonaUser, LLMRater
from companion.sim.persona import load_persona
from companion.sim.user import SimulatedUser


@pytest.fixture()
def server():
    seen: list[dict] = []
    answers = {"rate": "0.8", "person": "Ugh, too long and too fancy. Redo it?"}

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            text = answers["rate"] if "Rate how well" in body["messages"][0]["content"] else answers["person"]
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", seen, answers
    httpd.shutdown()


def test_llm_person_keeps_the_rule_meaning_and_uses_the_llm_words(server):
    url, seen, _ = server
    persona = load_persona("student")
    task = persona.tasks[0]
    long_reply = "Rome fell for crucial reasons. " * 30
    llm_user, rule_user = LLMPersonaUser(persona, 5, ChatEndpoint(url)), SimulatedUser(persona, 5)
    for _ in range(10):
        a, b = llm_user.react(task, long_reply), rule_user.react(task, long_reply)
        assert (a.intended, a.kind, a.named, a.rewrite) == (b.intended, b.kind, b.named, b.rewrite)
        if a.kind != "neutral":
            assert a.text == "Ugh, too long and too fancy. Redo it?"
    assert seen and persona.description.split()[0] in seen[0]["messages"][0]["content"]


def test_llm_rater_snaps_to_quarter_steps_and_reports_bad_answers(server):
    url, seen, answers = server
    persona = load_persona("teacher")
    rater = LLMRater(ChatEndpoint(url))
    assert rater.rate(persona, persona.eval_tasks[0], "Nice work!") == 0.75
    answers["rate"] = "I cannot rate this."
    with pytest.raises(UserError, match="not a number"):
        rater.rate(persona, persona.eval_tasks[0], "x")
    with pytest.raises(UserError, match="failed"):
        ChatEndpoint("http://127.0.0.1:9/v1", timeout=2).complete([{"role": "user", "content": "hi"}])

"""`companion chat --plain` with the real SmolLM2-135M-Instruct: streams a sensible reply,
takes explicit feedback, and journals both turns with their next states."""

from __future__ import annotations

import io
import json

import pytest

from companion.cli import main


@pytest.mark.real_model
def test_plain_chat_with_the_real_model(tmp_path, monkeypatch, capsys, real_model_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/good\nThanks!\n/quit\n"))
    rc = main(["chat", "--plain", "--no-learning", "--temperature", "0", "--max-new-tokens", "16",
               "--data-dir", str(tmp_path), "--model", str(real_model_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out  # greedy SmolLM2 knows this one
    assert "[feedback on the last reply: 1]" in out
    assert main(["history", "--data-dir", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["What is the capital of France?", "Thanks!"]
    assert rows[0]["next_message"] == "Thanks!" and rows[0]["feedback"] == 1
    assert rows[1]["next_state"] == "none"  # /quit ended the session: the last turn is sendable

"""The real `companion chat` app in a real terminal (tmux): type a prompt, read the screen.

Skips cleanly where tmux is missing (.ci/run installs it). Uses a tiny random
model folder via --model, greedy decoding and --no-learning, so it is fast and
needs no backend; the journal it writes is checked after quitting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import tui_support as ts
from companion.journal import Journal

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def _capture(sock: str, target: str) -> str:
    return subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-t", target],
                          capture_output=True, text=True).stdout


def _wait_screen(sock, target, predicate, timeout):
    end = time.time() + timeout
    screen = ""
    while time.time() < end:
        screen = _capture(sock, target)
        if predicate(screen):
            return screen
        time.sleep(0.25)
    raise AssertionError(f"screen never matched; last screen:\n{screen}")


def test_companion_chat_in_tmux(tmp_path):
    model = ts.tiny_model_dir()
    sock, target = f"companion-test-{uuid.uuid4().hex[:8]}", "chat"
    companion = Path(sys.executable).with_name("companion")
    cmd = (f"OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 {companion} chat --model {model} --data-dir {tmp_path} "
           f"--no-learning --temperature 0 --max-new-tokens 16")
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-s", target, "-x", "110", "-y", "30", cmd], check=True,
                   env={**os.environ, "TERM": "xterm-256color"})
    try:
        t0 = time.time()
        _wait_screen(sock, target, lambda s: "Message (Enter to send" in s, timeout=90)
        print(f"app ready after {time.time() - t0:.1f} s")
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", target, "hello there", "Enter"], check=True)
        screen = _wait_screen(sock, target, lambda s: "Assistant" in s and "1 turn" in s, timeout=60)
        assert "You" in screen and "hello there" in screen  # the message list
        assert "learning off" in screen and "policy v0" in screen  # the status panel
        assert "Correct this" in screen  # the footer's feedback keys
        print(f"reply shown after {time.time() - t0:.1f} s")
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", target, "C-q"], check=True)
        end = time.time() + 30
        while time.time() < end and subprocess.run(["tmux", "-L", sock, "has-session", "-t", target],
                                                   capture_output=True).returncode == 0:
            time.sleep(0.2)
        print(f"exited after {time.time() - t0:.1f} s")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
    j = Journal(tmp_path / "companion.db")
    turns = j.turns()
    j.close()
    assert len(turns) == 1 and turns[0]["messages"][-1]["content"] == "hello there"
    assert turns[0]["next_state"] == "none"  # quitting ended the session: the last turn is sendable

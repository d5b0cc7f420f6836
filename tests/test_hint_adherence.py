"""scripts/hint_adherence.py: each placement puts the hint in one place, as the trainer would."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from backend.samples import HINT_TEMPLATE, SYSTEM_HINT_TEMPLATE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hint_adherence.py"
spec = importlib.util.spec_from_file_location("hint_adherence", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

MSGS = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Why is the sky blue?"}]
HINT = "Keep it short."


@pytest.mark.parametrize("placement, system, user", [
    ("append", "Be helpful.", "Why is the sky blue?" + HINT_TEMPLATE.format(hint=HINT)),
    ("append-plain", "Be helpful.", "Why is the sky blue?\n\nKeep it short."),
    ("prepend", "Be helpful.", "Keep it short.\n\nWhy is the sky blue?"),
    ("system", "Be helpful." + SYSTEM_HINT_TEMPLATE.format(hint=HINT), "Why is the sky blue?"),
])
def test_each_placement_puts_the_hint_in_one_place(placement, system, user):
    out = probe.placed(MSGS, HINT, placement)
    assert [m["content"] for m in out] == [system, user]
    assert MSGS[1]["content"] == "Why is the sky blue?" and MSGS[0]["content"] == "Be helpful."  # a copy


def test_unknown_placement_and_help():
    with pytest.raises(ValueError):
        probe.placed(MSGS, HINT, "middle")
    assert set(probe.PLACEMENTS) == {"append", "append-plain", "prepend", "system"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--placements", "middle"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice: 'middle'" in out.stderr

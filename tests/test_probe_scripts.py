"""The probe scripts under scripts/ refuse user mistakes with one line, before loading any model
(their measurements need the real model and minutes of CPU: run by hand, figures in docs/)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["quoted_transfer.py", "opd_credit.py"])
def test_a_preference_that_is_not_an_absent_one_is_one_line(script):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--pref", "short"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "short" in res.stderr and "absent" in res.stderr


def test_quoted_transfer_checks_its_numbers():
    res = subprocess.run([sys.executable, str(ROOT / "scripts/quoted_transfer.py"), "--updates", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "--updates" in res.stderr and "Traceback" not in res.stderr

"""scripts/bench_memory.py: user mistakes get a clear message, never a traceback (the benchmark itself
loads the real model twice and is run by hand; its figures are in docs/trainer.md)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/bench_memory.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_unknown_mode_is_refused_before_any_model_is_loaded():
    out = _run("--modes", "lora,fp8")
    assert out.returncode == 2
    assert "--modes takes lora and/or full, not fp8" in out.stderr
    assert "Traceback" not in out.stderr


def test_zero_updates_is_refused():
    out = _run("--updates", "0")
    assert out.returncode == 2
    assert "--updates must be at least 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_rss_reader_reports_this_process():
    sys.path.insert(0, str(ROOT))
    from scripts.bench_memory import _rss_mb

    before = _rss_mb()
    block = bytearray(64 * 1024 * 1024)  # touched: 64 MB resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert _rss_mb() - before > 50

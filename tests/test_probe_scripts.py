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


def _fake_run(folder: Path, tokenizer) -> Path:
    """A replay run folder whose backend store holds two versions of two judged turns each."""
    import json
    import sqlite3

    (folder / "backend").mkdir(parents=True)
    con = sqlite3.connect(folder / "backend" / "backend.db")
    con.execute("create table turns (turn_id text, payload text, reward integer, hint text)")
    con.execute("create table versions (version integer, turn_ids text)")
    rows = [("What is 2+2?", "2+2 equals 4.", 1, None),
            ("Name a color.", "Blue is a lovely color, and so is green.", -1, "Answer in one word."),
            ("Name a fruit.", "An apple, which is a fruit that grows on trees.", -1, "Answer in one word."),
            ("What is 3+3?", "3+3 equals 6.", 1, None)]
    for i, (q, a, reward, hint) in enumerate(rows):
        msgs = [{"role": "user", "content": q}]
        payload = {"turn_id": f"t{i}", "client_id": "u", "messages": msgs,
                   "token_ids": tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]}
        con.execute("insert into turns values (?, ?, ?, ?)", (f"t{i}", json.dumps(payload), reward, hint))
    con.execute("insert into versions values (1, ?)", (json.dumps(["t0", "t1"]),))
    con.execute("insert into versions values (2, ?)", (json.dumps(["t2", "t3"]),))
    con.commit()
    con.close()
    return folder


def _step_probe(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/step_probe.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_step_probe_retrains_a_runs_batches_and_reports_the_step_sizes(tiny_model_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    run = _fake_run(tmp_path / "run", AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    quiet = '"repetition_guard": false, "lora_rank": 4, "replay_praised": 0, "w_loops": 0'
    lines = {}
    for name, extra in (("adamw", '"lr": 1e-3'), ("sgd", '"optimizer": "sgd", "lr": 0.5')):
        res = _step_probe("--run", str(run), "--updates", "5", "--model", str(tiny_model_dir),
                          "--trainer", "{" + quiet + ", " + extra + "}")
        assert res.returncode == 0, res.stderr
        lines[name] = [json.loads(x) for x in res.stdout.splitlines()]
    for out in lines.values():
        assert [x["update"] for x in out] == [1, 2]  # only two versions exist
        assert [x["rewards"] for x in out] == [[1, -1], [-1, 1]] and [x["hinted"] for x in out] == [1, 1]
        assert all(x["accepted"] and x["step_norm"] > 0 and x["grad_norm"] > 0 for x in out)
        assert out[0]["total_norm"] == out[0]["step_norm"] and out[1]["total_norm"] > 0
    assert lines["adamw"][0]["step_norm"] != lines["sgd"][0]["step_norm"]


def test_step_probe_refuses_user_mistakes_in_one_line(tmp_path):
    res = _step_probe("--run", str(tmp_path))
    assert res.returncode == 2 and "not a replay run folder" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / "backend.db").write_bytes(b"not a database")
    for args, words in ((["--updates", "0"], "--updates must be at least 1"),
                        (["--trainer", "[1]"], "--trainer must be a JSON object"),
                        (["--trainer", '{"optimizer": "adam"}'], "optimizer must be 'adamw' or 'sgd'"),
                        (["--trainer", '{"mode": "full"}'], "mode must be 'lora'"),
                        ([], "cannot read")):
        res = _step_probe("--run", str(tmp_path), *args)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr


def _random_move(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/random_move.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_random_move_measures_the_base_then_each_move_of_the_asked_size(tiny_model_dir):
    import json

    res = _random_move("--persona", "teacher", "--norms", "0.5", "--seeds", "0,1", "--tokens", "8",
                       "--model", str(tiny_model_dir))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [(x["norm"], x["seed"]) for x in lines] == [(0.0, None), (0.5, 0), (0.5, 1)]
    assert all(0 <= x["score"] <= 1 and 0 <= x["distinct4"] <= 1 for x in lines)
    assert all(x["drop"] == round(lines[0]["distinct4"] - x["distinct4"], 3) for x in lines[1:])


def test_random_move_refuses_user_mistakes_in_one_line():
    for args, words in ((["--norms", "big"], "--norms must be a comma-separated list of numbers"),
                        (["--norms", "0.3,-1"], "--norms must all be positive"),
                        (["--seeds", ""], "--seeds is empty"),
                        (["--persona", "nobody"], "no persona file or persona named 'nobody'")):
        res = _random_move(*args)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr

"""scripts/eval_task_misses.py: per eval task, the share of runs that met every preference and the
misses by preference, from the folders a replay writes; user mistakes get one clear line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/eval_task_misses.py"


def _run_folder(tmp_path, name, evals):
    d = tmp_path / name
    (d / "eval_replies").mkdir(parents=True)
    (d / "report.json").write_text(json.dumps({"persona": "student", "seed": 0}))
    for turn, failed in evals.items():
        (d / "eval_replies" / f"turn{turn:03d}.json").write_text(json.dumps({"turn": turn, "replies": ["x"] * 13, "failed": failed}))
    return str(d)


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_counts_each_tasks_misses_over_the_runs_last_evaluations(tmp_path):
    ok = [[] for _ in range(13)]
    a = _run_folder(tmp_path, "a", {0: [["short"]] * 13, 36: [["plain-words"], *ok[1:]]})
    b = _run_folder(tmp_path, "b", {0: ok, 36: [["plain-words", "short"], ["answers"], *ok[2:]]})
    res = _run(a, b)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    t1, t2, t3 = out["tasks"][:3]
    assert out["runs"] == 2 and out["turn"] is None
    assert t1["prompt"].startswith("What causes the phases of the moon")  # the student's first eval task
    assert (t1["all_pass"], t1["misses"]) == (0.0, {"plain-words": 2, "short": 1})
    assert (t2["all_pass"], t2["misses"]) == (0.5, {"answers": 1})
    assert (t3["all_pass"], t3["misses"]) == (1.0, {})
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")][1:]
    assert table[0].startswith("| 1 |") and table[1].startswith("| 2 |")  # worst task first
    res = _run(a, b, "--turn", "0")
    first = json.loads(res.stdout.splitlines()[-1])["tasks"][0]
    assert (first["all_pass"], first["misses"]) == (0.5, {"short": 1})


def test_user_mistakes_are_one_line(tmp_path):
    a = _run_folder(tmp_path, "a", {36: [[]] * 13})
    short = _run_folder(tmp_path, "short", {36: [[]] * 12})
    for args, words in [((str(tmp_path / "missing"),), "no eval_replies"),
                        ((a, "--turn", "12"), "no evaluation at turn 12"),
                        ((a, short), "different numbers of eval tasks")]:
        res = _run(*args)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr

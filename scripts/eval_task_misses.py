"""Which eval tasks hold a group of replay runs down, and by which preference.

Usage: .venv/bin/python scripts/eval_task_misses.py runs/<a> runs/<b> ... [--turn 36] [--persona FILE]

Every run folder keeps its evaluations' greedy replies and the preferences each one failed
(``eval_replies/turnNNN.json``: ``replies`` and ``failed``, one entry per eval task in the
persona's order). For the chosen evaluation (default: each run's last one) this prints, per eval
task, the share of runs whose reply met every preference and how many runs missed each
preference, worst task first, so a task no run passes (a word the model cannot give up, a sum
it cannot do) shows apart from the learning's spread. Last line: ONE JSON object
{"runs": n, "turn": t or null, "tasks": [{"task": i (1-based), "prompt", "all_pass", "misses": {pref: count}}]}.

The persona (for the prompts) is read from the first run's report.json unless --persona names
one; runs made with personas of different eval-task counts are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _last_eval(ap: argparse.ArgumentParser, run: Path, turn: int | None) -> dict:
    folder = run / "eval_replies"
    if turn is not None:
        path = folder / f"turn{turn:03d}.json"
        if not path.is_file():
            ap.error(f"{run} has no evaluation at turn {turn} ({path.name} is missing)")
    else:
        found = sorted(folder.glob("turn*.json"))
        if not found:
            ap.error(f"{run} has no eval_replies/turn*.json (not a replay run folder, or it was interrupted before turn 0)")
        path = found[-1]
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        ap.error(f"{path} is not valid JSON ({exc.msg})")
    if not isinstance(data.get("failed"), list):
        ap.error(f"{path} has no per-task 'failed' list")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="replay run folders (runs/<time>-<persona>-<method>)")
    ap.add_argument("--turn", type=int, help="the evaluation turn to read (default: each run's last evaluation)")
    ap.add_argument("--persona", help="persona name or file for the prompts (default: the first run's)")
    args = ap.parse_args(argv)

    from companion.errors import UserError
    from companion.sim.persona import load_persona

    evals = [_last_eval(ap, run, args.turn) for run in args.runs]
    counts = {len(e["failed"]) for e in evals}
    if len(counts) != 1:
        ap.error(f"the runs were evaluated on different numbers of eval tasks ({sorted(counts)}); compare one persona at a time")
    (n_tasks,) = counts
    prompts = [""] * n_tasks
    name = args.persona
    if name is None:
        report = args.runs[0] / "report.json"
        name = json.loads(report.read_text()).get("persona") if report.is_file() else None
    if name:
        try:
            persona = load_persona(name)
        except UserError as exc:
            ap.error(str(exc))
        if len(persona.eval_tasks) == n_tasks:
            prompts = [t.prompt for t in persona.eval_tasks]

    rows = []
    for i in range(n_tasks):
        misses = Counter(p for e in evals for p in e["failed"][i])
        passed = sum(not e["failed"][i] for e in evals)
        rows.append({"task": i + 1, "prompt": prompts[i], "all_pass": round(passed / len(evals), 3), "misses": dict(misses.most_common())})
    turn = args.turn
    which = f"turn {turn}" if turn is not None else "each run's last evaluation"
    print(f"{len(evals)} runs, {which}; worst task first")
    print("| task | prompt | runs meeting every preference | misses by preference |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["all_pass"], r["task"])):
        misses = ", ".join(f"{p} {c}" for p, c in r["misses"].items()) or "-"
        prompt = r["prompt"] if len(r["prompt"]) <= 60 else r["prompt"][:57] + "..."
        print(f"| {r['task']} | {prompt} | {r['all_pass']:.2f} | {misses} |")
    print(json.dumps({"runs": len(evals), "turn": turn, "tasks": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

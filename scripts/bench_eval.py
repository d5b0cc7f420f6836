"""Evaluation benchmark: one replay evaluation (greedy replies to a persona's eval tasks), timed.

A 36-turn replay evaluates 7 times (turn 0 and every 6 turns); inline, those evaluations
were 25-30% of its wall time (docs/replay.md, Session 8). This times one evaluation on the
real model, batched as the replay runs it, two ways, interleaved per round so machine noise
hits both alike:

- ``baseline``: what the engine did before Session 8, every row decoded until the longest
  reply of the batch ends (finished rows kept in the batch);
- ``drop``: finished rows leave the batch (:meth:`LocalEngine._keep_rows`).

Both must give the same replies token for token (``same_replies``), and with ``--run`` also
the replies that replay recorded at its last evaluation (``same_as_run``: the evaluation is
a function of the weights alone). The headline is the time ratio. The base model writes
long replies (many run to ``--max-new-tokens``), so dropping rows saves least at turn 0;
``--run`` evaluates a replay's last policy version, whose replies are shorter.

Last line: one JSON object (eval_s_baseline, eval_s_drop, ratio_drop, same_replies,
same_as_run, version, + settings).

    .venv/bin/python scripts/bench_eval.py [--persona student] [--rounds 2] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--persona", default="student", help="persona name or file (default student)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the two ways (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="as the replay (default 160)")
    ap.add_argument("--run", metavar="RUN_DIR", help="a learning replay's folder (runs/<time>-<persona>-<method>): "
                    "evaluate its last policy version (the backend's latest.json + latest.safetensors)")
    args = ap.parse_args()

    from companion.config import Settings
    from companion.engine.local import LocalEngine
    from companion.models import resolve_model_path
    from companion.sim.evaluation import run_eval
    from companion.sim.persona import load_persona

    settings = Settings()
    persona = load_persona(args.persona)
    torch.set_num_threads(1)  # as the replay serves and evaluates
    engine = LocalEngine(resolve_model_path(settings), dtype=settings.dtype, threads=1)
    recorded = None
    if args.run:
        from backend.loops import read_latest_delta

        users = sorted(Path(args.run).glob("backend/users/*"))
        latest = read_latest_delta(users[0]) if users else None
        if latest is None:
            ap.error(f"{args.run}: no saved policy version in backend/users/ (not a learning replay's folder?)")
        engine.apply_delta(latest)
        last = sorted(Path(args.run).glob("eval_replies/turn*.json"))
        if last:
            rec = json.loads(last[-1].read_text())
            recorded = rec["replies"] if rec.get("version") == engine.version else None
    keep_rows = engine._keep_rows

    def timed(drop: bool):
        engine._keep_rows = keep_rows if drop else (lambda state, keep: False)
        t0 = time.perf_counter()
        res = run_eval(engine, persona, settings.system_prompt, args.max_new_tokens)
        return time.perf_counter() - t0, res.replies

    times: dict[str, list[float]] = {"baseline": [], "drop": []}
    replies: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for way in times:
            s, rep = timed(way == "drop")
            times[way].append(s)
            replies.setdefault(way, rep)
            print(f"round {r + 1}: {way:9s} {s:6.1f} s", flush=True)
    words = [len(x.split()) for x in replies["baseline"]]
    med = {k: statistics.median(v) for k, v in times.items()}
    same = replies["baseline"] == replies["drop"]
    same_as_run = None if recorded is None else replies["drop"] == recorded
    print(f"policy version {engine.version}; eval replies: {len(words)}, words min/median/max "
          f"{min(words)}/{statistics.median(words)}/{max(words)}")
    print(f"baseline (finished rows kept): {med['baseline']:.1f} s")
    print(f"finished rows dropped:         {med['drop']:.1f} s  ({med['baseline'] / med['drop']:.2f}x)")
    print(f"same replies both ways: {same}; same as the run's last evaluation: {same_as_run}")
    print(json.dumps({
        "eval_s_baseline": round(med["baseline"], 2), "eval_s_drop": round(med["drop"], 2),
        "ratio_drop": round(med["baseline"] / med["drop"], 3), "same_replies": same,
        "same_as_run": same_as_run, "version": engine.version, "rounds": args.rounds, "persona": persona.name,
        "eval_tasks": len(words), "max_new_tokens": args.max_new_tokens,
    }))
    return 0 if same and same_as_run is not False else 1


if __name__ == "__main__":
    sys.exit(main())

"""Measure the base model on each persona's eval tasks (greedy), the persona's starting point.

Usage: .venv/bin/python scripts/measure_base.py [--personas student teacher] [--max-new-tokens 160] [--show]
Prints per-preference pass rates, score, all-pass and distinct-4 per persona, then ONE JSON line
with keys {persona}_base_all_pass, {persona}_base_score, {persona}_base_distinct4 and
baseline_all_pass_target (0.3: the persona must leave room to learn).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--personas", nargs="+", default=["student", "teacher"])
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show", action="store_true", help="print every reply with the preferences it fails")
    args = ap.parse_args()

    from companion.config import load_settings
    from companion.engine.local import LocalEngine
    from companion.models import resolve_model_path
    from companion.sim.evaluation import run_eval
    from companion.sim.persona import load_persona

    settings = load_settings()
    engine = LocalEngine(resolve_model_path(settings), dtype=settings.dtype, threads=args.threads)
    out = {}
    for name in args.personas:
        persona = load_persona(name)
        t0 = time.perf_counter()
        res = run_eval(engine, persona, settings.system_prompt, args.max_new_tokens)
        dt = time.perf_counter() - t0
        print(f"\n== {name}: {len(persona.eval_tasks)} eval tasks, {dt:.1f} s")
        for pid, rate in res.per_pref.items():
            print(f"  {pid:<14} pass {rate:.2f}")
        print(f"  score {res.score:.3f}  all-pass {res.all_pass:.3f}  distinct-4 {res.distinct4:.3f}")
        if args.show:
            for task, reply, sc in zip(persona.eval_tasks, res.replies, res.scores):
                print(f"\n--- {task.prompt[:70]!r}  fails: {sc.failed}\n{reply}")
        out[f"{name}_base_all_pass"] = round(res.all_pass, 4)
        out[f"{name}_base_score"] = round(res.score, 4)
        out[f"{name}_base_distinct4"] = round(res.distinct4, 4)
    out["baseline_all_pass_target"] = 0.3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the hint goes: how often the hinted model writes what the person asked for, per placement.

The OPD term distils the policy towards the same model shown the person's hint (backend.samples,
``hint_template``). It can only move the policy towards what the hinted model itself would write,
so the share of hinted replies that meet the persona bounds what the term can teach.

For each training task (never an eval task) the base policy samples a reply as the replay does
(the local engine, temperature 0.5, a seed per task); every reply that misses a preference gets a
correction from the simulated person (rewrite requests and vague complaints are redrawn until a
correction comes), the shipped judge extracts the hint, and the model answers the task again with
the hint placed each way below (greedy, and ``--samples`` at the replay's temperature). Every
reply is scored against the persona's preferences.

Placements (``--placements``; ``append`` is the shipped ``HINT_TEMPLATE``):
  append         the last user message + "\\n\\n[user's hint / instruction]\\n{hint}"
  append-plain   the last user message + "\\n\\n{hint}"
  prepend        "{hint}\\n\\n" + the last user message
  system         the system prompt + "\\n\\nThe user's instruction for every reply: {hint}"
                 (``backend.samples.SYSTEM_HINT_TEMPLATE``, ``hint_placement`` "system")

Usage: .venv/bin/python scripts/hint_adherence.py [--persona student] [--tasks 24] [--samples 2]
Prints a table, then ONE JSON line: {placement: {"n", "all_pass", "score", per preference rate}}
with the unhinted replies under "none".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

PLACEMENTS = ("append", "append-plain", "prepend", "system")


def placed(messages: list[dict], hint: str, placement: str) -> list[dict]:
    """``messages`` with ``hint`` placed as ``placement`` says (a copy). "append" and "system" are
    built by ``backend.samples.hinted_messages``, the trainer's own builder, so the probe measures
    exactly the prompts ``hint_placement`` "user" and "system" give the OPD teacher."""
    from backend.samples import hinted_messages

    if placement == "append":
        return hinted_messages(messages, hint, placement="user")
    if placement == "system":
        return hinted_messages(messages, hint, placement="system")
    out = copy.deepcopy(messages)
    last_user = next(m for m in reversed(out) if m["role"] == "user")
    if placement == "append-plain":
        last_user["content"] += f"\n\n{hint}"
    elif placement == "prepend":
        last_user["content"] = f"{hint}\n\n{last_user['content']}"
    else:
        raise ValueError(f"unknown placement {placement!r}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persona", default="student")
    ap.add_argument("--tasks", type=int, default=24, help="training tasks to try")
    ap.add_argument("--samples", type=int, default=2, help="sampled hinted replies per placement, besides the greedy one")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from backend.judge import load_judge
    from companion.config import load_settings
    from companion.engine.local import GenParams, LocalEngine
    from companion.models import resolve_model_path
    from companion.sim.persona import load_persona
    from companion.sim.scoring import score_reply
    from companion.sim.user import SimulatedUser

    settings = load_settings()
    persona = load_persona(args.persona)
    engine = LocalEngine(resolve_model_path(settings), dtype=settings.dtype, threads=1)
    judge = load_judge("embedding")
    user = SimulatedUser(persona, seed=args.seed)
    prefs = [p.id for p in persona.preferences]
    rows: dict[str, list] = {k: [] for k in ("none", *args.placements)}

    def gen(messages, seed=None, temperature=0.0):
        params = GenParams(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=seed)
        return engine.generate(messages, params).text

    for i, task in enumerate(persona.tasks[: args.tasks]):
        messages = [{"role": "system", "content": settings.system_prompt}, {"role": "user", "content": task.prompt}]
        reply = gen(messages, seed=args.seed * 1000 + i, temperature=args.temperature)
        score = score_reply(persona, reply, task)
        rows["none"].append(score)
        if score.all_pass:
            continue
        for _ in range(50):  # a correction, not a vague complaint or a rewrite request
            r = user.react(task, reply)
            if r.kind == "correction" and not r.rewrite:
                break
        hint = judge.judge_batch([(messages, reply, r.text)])[0].hint
        if not hint:
            print(f"task {i}: no hint from {r.text!r}", flush=True)
            continue
        line = [f"task {i}: missed {','.join(score.failed)}; hint {hint!r}"]
        for placement in args.placements:
            hinted = placed(messages, hint, placement)
            got = [score_reply(persona, gen(hinted), task)]
            got += [score_reply(persona, gen(hinted, seed=args.seed * 1000 + i * 10 + k, temperature=args.temperature), task)
                    for k in range(args.samples)]
            rows[placement].extend(got)
            line.append(f"  {placement:13s} all-pass {sum(s.all_pass for s in got)}/{len(got)}"
                        f"  missed {[','.join(s.failed) for s in got]}")
        print("\n".join(line), flush=True)

    out = {}
    for k, scores in rows.items():
        if not scores:
            continue
        out[k] = {"n": len(scores), "all_pass": round(sum(s.all_pass for s in scores) / len(scores), 3),
                  "score": round(sum(s.score for s in scores) / len(scores), 3)}
        out[k].update({p: round(sum(p not in s.failed for s in scores) / len(scores), 3) for p in prefs})
    print(f"\n{'placement':14s} {'n':>4s} {'all-pass':>9s} {'score':>6s} " + " ".join(f"{p:>15s}" for p in prefs))
    for k, v in out.items():
        print(f"{k:14s} {v['n']:4d} {v['all_pass']:9.3f} {v['score']:6.3f} " + " ".join(f"{v[p]:15.3f}" for p in prefs))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from companion.errors import run_script

    run_script(main)

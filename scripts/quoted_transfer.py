"""Does pushing down a word where the person objected to it carry over to held-out prompts?

For an ``absent`` preference of a persona (default: the student's plain-words), the base policy
samples replies to training tasks as the replay does (local engine, temperature 0.5, a seed per
task). Every reply that breaks the preference becomes a criticised sample (reward -1) whose hint is
the shipped judge's reading of a correction quoting the reply's own offending words ("stop using
words like 'fundamental'", the {found} placeholder of docs/personas.md). The megatron trainer at the
product's defaults, with each ``--w-quoted`` value in turn, then makes ``--updates`` updates over
those samples (batches of ``--batch``, cycled) and after each one reads the probability of

- *trained*: the first token of each offending word in the criticised replies themselves, and
- *held out*: the first token of the first offending word in the base's greedy reply to every eval
  task that has one (prompts never trained on, as the replay's evaluation),

against the mean log-prob of the held-out replies' other tokens (a word can fall because
everything falls). A persona's target is met on held-out prompts, so the second figure is the
one personalization needs.

Usage: .venv/bin/python scripts/quoted_transfer.py [--persona student] [--pref plain-words]
       [--tasks 24] [--updates 6] [--batch 4] [--w-quoted 0 1 5]
Prints one row per value and update, then ONE JSON line: {"w_quoted": {w: [{"update", "p_trained",
"p_held_out", "other_logp_held_out", "p_held_out_each"}, ...]}, "n_trained": n, "n_held_out": m,
"held_out_tasks": [eval task numbers, 1-based], "held_out_words": [the word each one starts]}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from backend.samples import token_spans  # noqa: E402  (the spans the trainer's quoted positions use)


def first_match_token(tokenizer, ids: list[int], pattern, text: str) -> int | None:
    """Index of the reply token where the first match of ``pattern`` starts, or None."""
    m = pattern.search(text)
    if m is None:
        return None
    return next((k for k, (a, b) in enumerate(token_spans(tokenizer, ids)) if a < m.end() and b > m.start()), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persona", default="student")
    ap.add_argument("--pref", default="plain-words", help="an 'absent' preference of the persona")
    ap.add_argument("--tasks", type=int, default=24, help="training tasks to sample replies for")
    ap.add_argument("--updates", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="samples per update (the replay's batch size)")
    ap.add_argument("--w-quoted", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.updates < 1 or args.batch < 1 or args.tasks < 1 or any(w < 0 for w in args.w_quoted):
        ap.error("--updates, --batch and --tasks must be at least 1 and --w-quoted values >= 0")

    import torch

    from backend.judge import load_judge
    from backend.samples import build_sample
    from backend.trainer import Trainer, TrainerConfig
    from companion.config import load_settings
    from companion.engine.local import GenParams, LocalEngine
    from companion.errors import UserError
    from companion.models import resolve_model_path
    from companion.sim.persona import load_persona
    from companion.sim.scoring import fill_correction

    settings = load_settings()
    persona = load_persona(args.persona)
    pref = next((p for p in persona.preferences if p.id == args.pref), None)
    if pref is None or pref.check != "absent":
        raise UserError(f"{persona.name} has no 'absent' preference {args.pref!r}; "
                        f"its absent ones: {', '.join(p.id for p in persona.preferences if p.check == 'absent') or 'none'}.")
    model = resolve_model_path(settings)
    engine = LocalEngine(model, dtype=settings.dtype, threads=1)
    judge = load_judge("embedding")
    eos = set(engine._eos_ids())
    system = {"role": "system", "content": settings.system_prompt}
    # The correction the replay's person would send, quoting the reply (a phrasing with {found} if the
    # persona has one, else a plain sentence that quotes).
    phrasing = next((c for c in pref.corrections if "{found}" in c), "stop using words like {found}")

    samples = []
    for i, task in enumerate(persona.tasks[: args.tasks]):
        messages = [system, {"role": "user", "content": task.prompt}]
        reply = engine.generate(messages, GenParams(max_new_tokens=args.max_new_tokens,
                                                    temperature=args.temperature, seed=args.seed * 1000 + i))
        ids = [t for t in reply.token_ids if t not in eos]
        if not ids or not pref.pattern.search(reply.text):
            continue
        correction = fill_correction(pref, phrasing, reply.text)
        hint = judge.judge_batch([(messages, reply.text, correction)])[0].hint
        turn = {"turn_id": f"probe-{i}", "client_id": "probe", "messages": messages,
                "prompt_ids": reply.prompt_ids, "token_ids": ids, "policy_version": 0}
        s = build_sample(turn, -1, hint, engine.tokenizer)
        if s is not None and s.quoted_positions:
            samples.append(s)
    held, held_names = [], []
    for task in persona.eval_tasks:
        messages = [system, {"role": "user", "content": task.prompt}]
        reply = engine.generate(messages, GenParams(max_new_tokens=args.max_new_tokens, temperature=0.0))
        ids = [t for t in reply.token_ids if t not in eos]
        k = first_match_token(engine.tokenizer, ids, pref.pattern, reply.text) if ids else None
        if k is not None:
            held.append((list(reply.prompt_ids), ids, k))
            held_names.append((persona.eval_tasks.index(task) + 1, pref.pattern.search(reply.text).group(0)))
    if not samples or not held:
        print("no criticised training reply with a quoted word, or no eval reply that breaks the preference")
        return 1
    print(f"{len(samples)} criticised training replies ({sum(len(s.quoted_positions) for s in samples)} quoted tokens), "
          f"{len(held)} of {len(persona.eval_tasks)} held-out greedy replies break {pref.id}", flush=True)

    def measure(tr) -> dict:
        trained = []
        for s in samples:
            lp, _, _ = tr._score([(s.prompt_ids, s.response_ids)])
            trained += [float(lp[t].exp()) for t in s.quoted_positions if t < len(lp)]
        p_held, other = [], []
        for prompt, ids, k in held:
            lp, _, _ = tr._score([(prompt, ids)])
            p_held.append(float(lp[k].exp()))
            other.append(float(torch.cat([lp[:k], lp[k + 1:]]).mean()))
        return {"p_trained": round(st.mean(trained), 4), "p_held_out": round(st.mean(p_held), 4),
                "other_logp_held_out": round(st.mean(other), 4), "p_held_out_each": [round(x, 3) for x in p_held]}

    out = {}
    for w in args.w_quoted:
        tr = Trainer(TrainerConfig(w_quoted=w), model_path=model, checkpoint_dir=tempfile.mkdtemp())
        rows = [{"update": 0, **measure(tr)}]
        for u in range(args.updates):
            start = (u * args.batch) % len(samples)
            batch = [samples[(start + j) % len(samples)] for j in range(min(args.batch, len(samples)))]
            tr.update(batch)
            rows.append({"update": u + 1, **measure(tr)})
        for r in rows:
            print(f"w_quoted {w:g}  update {r['update']}: p(quoted word) trained {r['p_trained']:.3f}, "
                  f"held out {r['p_held_out']:.3f}; held-out other tokens mean log p {r['other_logp_held_out']:+.3f}",
                  flush=True)
        print(f"w_quoted {w:g}, held out per eval task (word): " + ", ".join(
            f"{t} ({word}) {a:.3f} -> {b:.3f}"
            for (t, word), a, b in zip(held_names, rows[0]["p_held_out_each"], rows[-1]["p_held_out_each"])), flush=True)
        out[str(w)] = rows
    print(json.dumps({"w_quoted": out, "n_trained": len(samples), "n_held_out": len(held),
                      "held_out_tasks": [t for t, _ in held_names], "held_out_words": [w for _, w in held_names]}))
    return 0


if __name__ == "__main__":
    from companion.errors import run_script

    run_script(main)

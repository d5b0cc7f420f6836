"""Token credit of the OPD term: does the hinted teacher single out the words a correction is about?

For an ``absent`` preference of a persona (default: the student's plain-words), the base policy
samples replies to training tasks as the replay does (the local engine, temperature 0.5, a seed per
task); every reply that breaks the preference is criticised with each of the preference's own
corrections, the shipped judge extracts the hint, and the megatron trainer (default config, version
0) scores the reply's tokens without and with the hint. The OPD term log p_teacher - log p_old is
then split into the tokens that fall inside a pattern match (the words the person objects to) and
all other reply tokens, raw and centred within each reply (``opd_center``).

Usage: .venv/bin/python scripts/opd_credit.py [--persona student] [--pref plain-words] [--tasks 24]
Prints the figures, then ONE JSON line with keys n_replies, n_match_tokens, opd_match_mean,
opd_other_mean, opd_other_sd, match_share_negative, centred_match_mean_sd, match_share_below_reply_mean.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persona", default="student")
    ap.add_argument("--pref", default="plain-words", help="an 'absent' preference of the persona")
    ap.add_argument("--tasks", type=int, default=24, help="training tasks to sample replies for")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from backend.judge import load_judge
    from backend.samples import build_sample, token_spans
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
    if pref is None:
        raise UserError(f"{persona.name} has no preference {args.pref!r}; it has {', '.join(p.id for p in persona.preferences)}.")
    if pref.check != "absent":
        raise UserError(f"{args.pref} is a '{pref.check}' preference; this probe needs an 'absent' one.")
    pattern = pref.pattern  # compiled by the persona loader, with the flags the scoring uses
    model = resolve_model_path(settings)
    engine = LocalEngine(model, dtype=settings.dtype, threads=1)
    trainer = Trainer(TrainerConfig(repetition_guard=False), model_path=model, checkpoint_dir=tempfile.mkdtemp())
    judge = load_judge("embedding")
    eos = set(engine._eos_ids())
    match, other, centred_match, below = [], [], [], []
    n_replies = 0
    for i, task in enumerate(persona.tasks[: args.tasks]):
        messages = [{"role": "system", "content": settings.system_prompt}, {"role": "user", "content": task.prompt}]
        reply = engine.generate(messages, GenParams(max_new_tokens=args.max_new_tokens,
                                                    temperature=args.temperature, seed=args.seed * 1000 + i))
        ids = [t for t in reply.token_ids if t not in eos]
        found = [(m.start(), m.end()) for m in pattern.finditer(reply.text)]
        if not found or not ids:
            continue
        n_replies += 1
        inside = [any(a < e and b > s for s, e in found) for a, b in token_spans(engine.tokenizer, ids)]
        turn = {"turn_id": f"probe-{i}", "client_id": "probe", "messages": messages,
                "prompt_ids": reply.prompt_ids, "token_ids": ids, "policy_version": 0}
        # A phrasing with {found} quotes this reply's own words, as the replay's simulated person does.
        judgments = judge.judge_batch([(messages, reply.text, fill_correction(pref, c, reply.text)) for c in pref.corrections])
        old = None  # the unhinted log-probs are the same for every correction: scored once per reply
        for hint in (j.hint for j in judgments if j.hint):
            s = build_sample(turn, -1, hint, trainer.tokenizer)
            if old is None:
                old, _, _ = trainer._score([(s.prompt_ids, s.response_ids)])
            teacher, _, _ = trainer._score([(s.teacher_prompt_ids, s.response_ids)])
            d = (teacher - old).tolist()  # [len(ids)] the OPD term per reply token
            mu, sd = st.mean(d), st.pstdev(d) or 1.0
            for x, hit in zip(d, inside):
                (match if hit else other).append(x)
                if hit:
                    centred_match.append((x - mu) / sd)
                    below.append(x < mu)
        print(f"task {i}: {len(ids)} tokens, {[reply.text[s:e] for s, e in found]}", flush=True)
    if not match:
        print("no reply broke the preference; nothing to measure")
        return 1
    out = {
        "n_replies": n_replies, "n_match_tokens": len(match),
        "opd_match_mean": round(st.mean(match), 4), "opd_other_mean": round(st.mean(other), 4),
        "opd_other_sd": round(st.pstdev(other), 4),
        "match_share_negative": round(sum(x < 0 for x in match) / len(match), 3),
        "centred_match_mean_sd": round(st.mean(centred_match), 3),
        "match_share_below_reply_mean": round(sum(below) / len(below), 3),
    }
    print(f"OPD term on the words the correction is about: {out['opd_match_mean']:+.3f} nats per token "
          f"({out['match_share_negative']:.0%} negative); on the other reply tokens {out['opd_other_mean']:+.3f} "
          f"(sd {out['opd_other_sd']:.3f}); centred within the reply: {out['centred_match_mean_sd']:+.2f} sd, "
          f"{out['match_share_below_reply_mean']:.0%} below the reply's mean")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from companion.errors import run_script

    run_script(main)
